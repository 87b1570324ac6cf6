"""``ADAPTER[:WEIGHT]`` arguments of merge and apply: parse them, load the adapters they name.

The text after the last colon is a weight when what precedes it is an existing path
(``lora.safetensors:0.5``); otherwise the whole text is the path (so ``C:\\x`` or ``a:b`` folders
still work). A weight that is then not a finite number is a usage error.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from .adapter import Adapter
from .errors import InvalidOption
from .io.formats import load_adapter

__all__ = ["AdapterSpec", "WeightedAdapter", "parse_adapter_spec", "load_weighted", "as_weighted"]


@dataclass(frozen=True)
class AdapterSpec:
    """One parsed ``ADAPTER[:WEIGHT]`` argument."""

    path: Path
    weight: float = 1.0


@dataclass
class WeightedAdapter:
    """An adapter in memory with the weight its products are multiplied by, and where it came from."""

    adapter: Adapter
    weight: float = 1.0
    source: str = "<in-memory>"


def parse_adapter_spec(text: str | os.PathLike) -> AdapterSpec:
    """``"a.safetensors:0.5"`` -> ``AdapterSpec(Path("a.safetensors"), 0.5)``; no weight means 1.0.

    Raises :class:`InvalidOption` (exit status 2) when the text after the colon is not a finite number.
    """
    text = os.fspath(text)
    head, sep, tail = text.rpartition(":")
    if not sep or not head or not Path(head).exists():
        return AdapterSpec(Path(text))
    try:
        weight = float(tail)
    except ValueError:
        raise InvalidOption(f"adapter argument {text!r}: weight {tail!r} is not a number: write ADAPTER:WEIGHT with "
                            f"a number, e.g. {head}:0.5") from None
    if not math.isfinite(weight):
        raise InvalidOption(f"adapter argument {text!r}: weight {tail!r} is not finite: give a finite number, e.g. "
                            f"{head}:0.5")
    return AdapterSpec(Path(head), weight)


def load_weighted(specs: Sequence[str | os.PathLike | AdapterSpec], *, base=None) -> list[WeightedAdapter]:
    """Parse every argument first (a usage error costs no loading), then load each adapter.

    ``base``: the checkpoint the adapters are for (apply); kohya keys without recorded names are matched to it."""
    parsed = [s if isinstance(s, AdapterSpec) else parse_adapter_spec(s) for s in specs]
    loaded = [load_adapter(s.path) if base is None else load_adapter(s.path, base=base) for s in parsed]
    return [WeightedAdapter(a, s.weight, str(s.path)) for a, s in zip(loaded, parsed)]


def as_weighted(items: Sequence[WeightedAdapter | Adapter | tuple]) -> list[WeightedAdapter]:
    """Accept ``WeightedAdapter``, bare ``Adapter`` (weight 1) or ``(adapter, weight)`` tuples."""
    out = []
    for i, item in enumerate(items):
        if isinstance(item, WeightedAdapter):
            out.append(item)
        elif isinstance(item, Adapter):
            out.append(WeightedAdapter(item, 1.0, f"adapter #{i + 1}"))
        elif isinstance(item, tuple) and len(item) == 2 and isinstance(item[0], Adapter):
            weight = float(item[1])
            if not math.isfinite(weight):
                raise InvalidOption(f"adapter #{i + 1}: weight {item[1]!r} is not finite: give a finite number")
            out.append(WeightedAdapter(item[0], weight, f"adapter #{i + 1}"))
        else:
            raise TypeError(f"adapter #{i + 1}: expected an Adapter, (Adapter, weight) or WeightedAdapter, "
                            f"got {type(item).__name__}")
    return out
