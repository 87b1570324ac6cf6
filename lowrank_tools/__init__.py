"""lowrank-tools: post-hoc low-rank adapters.

Extract LoRA factors from a base and a fully fine-tuned checkpoint, resize and merge adapters
without densifying them, bake them into full weights, and analyze singular-value spectra.
The command line (``lowrank-tools``) is a thin shell over these functions.

The public names below are imported on first use (PEP 562), so that ``import lowrank_tools`` (and the command
line's ``--help``) does not pay for torch: ``from lowrank_tools import extract`` works as it always did.
"""

import importlib as _importlib
import sys as _sys
import types as _types
from typing import TYPE_CHECKING as _TYPE_CHECKING

if _TYPE_CHECKING:  # the same names, imported for type checkers and tests/test_architecture.py's layer graph
    from .adapter import Adapter, LoraModule, ModuleKind
    from .apply import apply
    from .io.checkpoint import open_checkpoint
    from .extract.streaming import ExtractOptions, extract
    from .io.formats import load_adapter, save_adapter
    from .linalg.svd import Method, RankRule
    from .merge import merge
    from .resize import resize

__version__ = "0.1.0"

_EXPORTS = {  # public name -> the module that defines it
    "Adapter": ".adapter", "LoraModule": ".adapter", "ModuleKind": ".adapter", "apply": ".apply",
    "open_checkpoint": ".io.checkpoint", "ExtractOptions": ".extract.streaming", "extract": ".extract.streaming",
    "load_adapter": ".io.formats", "save_adapter": ".io.formats", "Method": ".linalg.svd", "RankRule": ".linalg.svd",
    "merge": ".merge", "resize": ".resize",
}
# Functions named like a module or subpackage (lowrank_tools.apply is the function, lowrank_tools.extract too): the
# import system sets the submodule as an attribute of the package whenever it is imported, so these four are
# properties of the package's class that always answer the function.
_SHADOWED = ("apply", "extract", "merge", "resize")

__all__ = ["Adapter", "ExtractOptions", "LoraModule", "ModuleKind", "Method", "RankRule", "extract", "load_adapter",
           "open_checkpoint", "save_adapter", "resize", "merge", "apply", "__version__"]


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(_importlib.import_module(_EXPORTS[name], __name__), name)
    if name not in _SHADOWED:
        globals()[name] = value  # cached: the next look-up is a plain attribute
    return value


def __dir__():
    return sorted(set(globals()) | set(_EXPORTS))


def _function(name: str) -> property:
    """The property of a shadowed name: what was set on the package unless that is the submodule, else the function."""
    def get(module):
        value = module.__dict__.get(name)
        return __getattr__(name) if value is None or isinstance(value, _types.ModuleType) else value

    def put(module, value):
        module.__dict__[name] = value

    return property(get, put, lambda module: module.__dict__.pop(name, None))


class _Package(_types.ModuleType):
    """This package's module type: the shadowed names answer the function, never the submodule of the same name."""

    apply = _function("apply")
    extract = _function("extract")
    merge = _function("merge")
    resize = _function("resize")


_sys.modules[__name__].__class__ = _Package
