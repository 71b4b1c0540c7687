"""Lazy re-exports for package ``__init__`` files (PEP 562), at the bottom of the house
with :mod:`fxpress.errors`: importing it loads nothing else."""
from __future__ import annotations

import importlib
from typing import Any, Callable


def lazy_exports(package: str, namespace: dict, exports: dict[str, str],
                 submodules: tuple[str, ...] = ()) -> tuple[Callable[[str], Any], Callable[[], list]]:
    """``(__getattr__, __dir__)`` for ``package``: ``exports`` maps a public name to the
    module (absolute, or relative to the package with a leading dot) that defines it;
    ``submodules`` are imported on attribute access. A loaded name is cached in ``namespace``."""

    def __getattr__(name: str) -> Any:
        if name in exports:
            value = getattr(importlib.import_module(exports[name], package), name)
        elif name in submodules:
            value = importlib.import_module(f"{package}.{name}")
        else:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        namespace[name] = value
        return value

    def __dir__() -> list[str]:
        return sorted(set(namespace) | set(exports) | set(submodules))

    return __getattr__, __dir__
