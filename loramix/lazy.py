"""A deferred import for the modules that the CLI loads before anything is computed (the merge methods and the
factor-space maths they use): ``torch = lazy("torch")`` stands in for the module and imports it on first use, so
``loramix --help`` and ``loramix methods`` start without importing torch. Nothing else changes: once imported,
attribute access goes straight to the real module in ``sys.modules``.
"""

from __future__ import annotations

import importlib
from types import ModuleType


class LazyModule:
    """Stands in for module ``name`` until an attribute is first asked for."""

    def __init__(self, name: str) -> None:
        self._name = name

    def __getattr__(self, attribute: str):
        module: ModuleType = importlib.import_module(self._name)
        return getattr(module, attribute)


def lazy(name: str) -> LazyModule:
    return LazyModule(name)
