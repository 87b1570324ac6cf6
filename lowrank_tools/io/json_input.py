"""JSON read from files a user gives: parsed strictly, checked by type, every failure one line naming the file and
field.

Every JSON the tool reads goes through :func:`load_json`: safetensors headers, ``config.json``, ``adapter_config.json``,
shard indexes and JSON held in safetensors metadata strings (kohya names, diffusers LoraConfigs). It refuses what
would otherwise surface as a Python error far from the file:

- duplicate keys in an object (``json`` silently keeps the last one);
- ``NaN``, ``Infinity``, ``-Infinity`` and numbers that overflow a float (``1e400``), which are not JSON;
- nesting deeper than :data:`MAX_DEPTH` (200,000 ``[`` would raise ``RecursionError``, and a deep value breaks
  whatever walks it later, ``repr`` included);
- bytes that are not UTF-8, and ``\\ud800``-style escapes of lone surrogates (not Unicode text either).

The accessors (:func:`get_str`, :func:`get_int`, :func:`get_number`, ...) read one field and raise the caller's error
class naming the field and the type found, so call sites never meet a ``TypeError`` / ``AttributeError``.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from pathlib import Path

from ..errors import CorruptCheckpoint, LowRankError

__all__ = ["MAX_DEPTH", "load_json", "check_depth", "type_name", "get_mapping", "get_str", "get_int", "get_number",
           "get_bool", "get_str_list", "get_str_map"]

#: deepest nesting accepted (real configs and headers are 2 to 5 levels deep)
MAX_DEPTH = 64
_REQUIRED = object()


class _Problem(ValueError):
    """Raised inside the parser hooks; turned into the caller's error class with the file named."""


def _pairs(pairs: list[tuple[str, object]]) -> dict:
    obj: dict = {}
    for key, value in pairs:
        if key in obj:
            raise _Problem(f"key {_short(key)} appears twice in one object")
        obj[key] = value
    return obj


def _constant(name: str) -> float:
    raise _Problem(f"{name} is not a JSON number")


def _float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise _Problem(f"number {_short(text)} is out of range for a float")
    return value


def load_json(source: str | bytes | Path, *, what: str | None = None, error: type[LowRankError] = CorruptCheckpoint,
              fix: str = "re-save it") -> object:
    """Parse JSON text (``str``/``bytes``) or a file (``Path``) strictly (see the module docstring).

    ``what`` names the input in messages (default: the path); ``error`` is the class raised, ``fix`` the advice."""
    what = what or str(source)
    try:
        text = source.read_bytes() if isinstance(source, Path) else source
        if isinstance(text, bytes):
            text = text.decode("utf-8")
        value = json.loads(text, object_pairs_hook=_pairs, parse_constant=_constant, parse_float=_float)
    except OSError as exc:
        raise error(f"{what} cannot be read ({exc.strerror or exc}): check the path and its permissions") from None
    except UnicodeDecodeError as exc:
        raise error(f"{what} is not UTF-8 text (byte {exc.start}): {fix}") from None
    except RecursionError:
        raise error(f"{what}: JSON nested deeper than {MAX_DEPTH} levels: {fix}") from None
    except _Problem as exc:
        raise error(f"{what}: {exc}: {fix}") from None
    except ValueError as exc:  # json.JSONDecodeError, an int of more than 4300 digits
        raise error(f"{what} is not valid JSON ({str(exc)[:120]}): {fix}") from None
    check_depth(value, what, error=error, fix=fix)
    return value


def check_depth(value: object, what: str, *, error: type[LowRankError] = CorruptCheckpoint, fix: str = "re-save it",
                limit: int = MAX_DEPTH) -> None:
    """Raise ``error`` when lists/objects in ``value`` nest deeper than ``limit`` or a string is not Unicode text
    (walked without recursion)."""
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, str):
            _check_text(item, what, error, fix)
            continue
        children = item.values() if isinstance(item, dict) else item if isinstance(item, list) else None
        if children is None:
            continue
        if depth > limit:
            raise error(f"{what}: JSON nested deeper than {limit} levels: {fix}")
        if isinstance(item, dict):
            for key in item:
                _check_text(key, what, error, fix)
        stack.extend((child, depth + 1) for child in children)


def _check_text(text: str, what: str, error, fix: str) -> None:
    """A string escape ``\\ud800`` decodes to a lone surrogate, which is not Unicode text (the reference
    safetensors parser refuses it, and printing it would fail later)."""
    if not text.isascii():
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            raise error(f"{what}: string {text[:40]!r} holds a lone surrogate escape (\\ud800-\\udfff): "
                        f"{fix}") from None


def type_name(value: object) -> str:
    """The JSON name of a parsed value's type, for messages."""
    names = {dict: "an object", list: "an array", str: "a string", bool: "a boolean", int: "an integer",
             float: "a number", type(None): "null"}
    return names.get(type(value), type(value).__name__)


def _short(text: str, limit: int = 60) -> str:
    text = repr(text) if not text.startswith(("'", '"')) else text
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _get(obj: Mapping, key: str, default, where: str, error, want: str):
    if not isinstance(obj, Mapping):
        raise error(f"{where}: expected a JSON object, found {type_name(obj)}")
    if key not in obj or (obj[key] is None and default is not _REQUIRED):
        if default is _REQUIRED:
            raise error(f"{where}: field {key!r} is missing: it must be {want}")
        return default, True
    return obj[key], False


def _wrong(key: str, value: object, where: str, want: str, error) -> LowRankError:
    shown = repr(value) if isinstance(value, (str, int, float, list)) and len(repr(value)) <= 60 else type_name(value)
    return error(f"{where}: {key} {shown} is not {want}")


def get_mapping(obj: Mapping, key: str, where: str, *, default=_REQUIRED, error=CorruptCheckpoint) -> dict:
    """``obj[key]`` as a JSON object (``default`` when absent or null)."""
    value, missing = _get(obj, key, default, where, error, "an object")
    if not missing and not isinstance(value, dict):
        raise _wrong(key, value, where, "an object", error)
    return value


def get_str(obj: Mapping, key: str, where: str, *, default=_REQUIRED, error=CorruptCheckpoint) -> str:
    value, missing = _get(obj, key, default, where, error, "a string")
    if not missing and not isinstance(value, str):
        raise _wrong(key, value, where, "a string", error)
    return value


def get_bool(obj: Mapping, key: str, where: str, *, default=_REQUIRED, error=CorruptCheckpoint) -> bool:
    value, missing = _get(obj, key, default, where, error, "true or false")
    if not missing and not isinstance(value, bool):
        raise _wrong(key, value, where, "true or false", error)
    return value


def get_int(obj: Mapping, key: str, where: str, *, default=_REQUIRED, error=CorruptCheckpoint, minimum: int = 0,
            maximum: int = 2**63 - 1) -> int:
    """An integer in [minimum, maximum] (booleans and floats refused)."""
    want = f"an integer in [{minimum}, {maximum}]"
    value, missing = _get(obj, key, default, where, error, want)
    if not missing and (isinstance(value, bool) or not isinstance(value, int) or not minimum <= value <= maximum):
        raise _wrong(key, value, where, want, error)
    return value


def get_number(obj: Mapping, key: str, where: str, *, default=_REQUIRED, error=CorruptCheckpoint) -> float:
    """A finite number (integer or float; booleans refused) as a float."""
    value, missing = _get(obj, key, default, where, error, "a number")
    if missing:
        return value
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (isinstance(value, int) and
                                                                          abs(value) > 2**1023):
        raise _wrong(key, value, where, "a number", error)
    return float(value)


def get_str_list(obj: Mapping, key: str, where: str, *, default=_REQUIRED, error=CorruptCheckpoint) -> list[str]:
    value, missing = _get(obj, key, default, where, error, "a list of strings")
    if not missing and (not isinstance(value, list) or not all(isinstance(v, str) for v in value)):
        raise _wrong(key, value, where, "a list of strings", error)
    return value


def get_str_map(obj: Mapping, key: str, where: str, *, default=_REQUIRED, error=CorruptCheckpoint) -> dict[str, str]:
    value, missing = _get(obj, key, default, where, error, "an object of strings")
    if not missing:
        if not isinstance(value, dict):
            raise _wrong(key, value, where, "an object of strings", error)
        for k, v in value.items():
            if not isinstance(v, str):
                raise error(f"{where}: field {key!r}: entry {_short(k)} is {type_name(v)}, expected a string")
    return value
