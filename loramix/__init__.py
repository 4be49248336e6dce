"""loramix: load, analyse and combine LoRA adapters in factor space.

The public API, imported on first use (so that ``loramix --help`` starts without importing torch):
`load_adapter`, `load_adapters`, `save_adapter`, `combine`, `analyze`, `run` (a `Plan` end to end),
`merge_into_base`, `search`, `push_to_hub`, and the data model `LoraAdapter`, `LoraModule`, `ExtraTensor`.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "ExtraTensor": "loramix.adapter",
    "LoraAdapter": "loramix.adapter",
    "LoraModule": "loramix.adapter",
    "LoramixError": "loramix.errors",
    "Plan": "loramix.recipe",
    "analyze": "loramix.analysis",
    "combine": "loramix.combination",
    "load_adapter": "loramix.formats",
    "load_adapters": "loramix.formats",
    "merge_into_base": "loramix.pipeline",
    "push_to_hub": "loramix.hub",
    "run": "loramix.pipeline",
    "save_adapter": "loramix.pipeline",
    "search": "loramix.weight_search",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'loramix' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
