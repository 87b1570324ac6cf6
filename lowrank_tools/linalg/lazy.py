"""Lazy public names for a package (PEP 562): a name is imported from its module on first use, so importing one
module of a package does not import the others (``lowrank-tools info`` reads an adapter without the SVD machinery).
Standard library only."""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping

__all__ = ["lazy_exports"]


def lazy_exports(package: str, exports: Mapping[str, str], namespace: dict) -> tuple[Callable, Callable]:
    """``(__getattr__, __dir__)`` for ``package``: ``exports`` maps a public name to its module (relative, ``".svd"``);
    a name is imported on first look-up and cached in ``namespace`` (the package's globals)."""

    def getattr_(name: str):
        if name not in exports:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(exports[name], package), name)
        namespace[name] = value  # cached: the next look-up is a plain attribute
        return value

    def dir_():
        return sorted(set(namespace) | set(exports))

    return getattr_, dir_
