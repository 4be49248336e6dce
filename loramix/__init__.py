"""loramix: load, analyse and combine LoRA adapters in factor space.

The public API, imported on first use (so that ``loramix --help`` starts without importing torch):
`load_adapter`, `load_adapters`, `save_adapter`, `combine`, `analyze`, `run` (a plan end to end: `Plan` for combine,
`ExtractPlan`, `ConvertPlan`, `AlignPlan`, `SearchPlan`, `AnalyzePlan`),
`merge_into_base`, `extract` (a LoRA from a fine-tuned model), `search`, `search_subset` (which modules of each
adapter to keep before a merge), `input_grams` (what data-aware merges
fit to), `push_to_hub`, the data model
`LoraAdapter`, `LoraModule`, `ExtraTensor`, and for models loaded in a Python session `inject_adapter`,
`to_peft_state_dict`, `lora_config` (adapters back into PEFT) and `merge_into_model`, `unmerge` (ΔW in and out of a
loaded model's weights).
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "ExtraTensor": "loramix.adapter",
    "LoraAdapter": "loramix.adapter",
    "LoraModule": "loramix.adapter",
    "LoramixError": "loramix.errors",
    "AlignPlan": "loramix.plans",
    "AnalyzePlan": "loramix.plans",
    "ConvertPlan": "loramix.plans",
    "ExtractPlan": "loramix.plans",
    "Plan": "loramix.plans",
    "RankRule": "loramix.linalg",
    "SearchPlan": "loramix.plans",
    "analyze": "loramix.analysis",
    "combine": "loramix.weight_search",
    "extract": "loramix.pipeline",
    "inject_adapter": "loramix.formats.live",
    "input_grams": "loramix.weight_search",
    "load_adapter": "loramix.formats",
    "load_adapters": "loramix.formats",
    "lora_config": "loramix.formats.live",
    "merge_into_model": "loramix.merge.loaded_model",
    "merge_into_base": "loramix.merging",
    "push_to_hub": "loramix.hub",
    "run": "loramix.pipeline",
    "save_adapter": "loramix.pipeline",
    "search": "loramix.weight_search",
    "search_subset": "loramix.weight_search",
    "to_peft_state_dict": "loramix.formats.live",
    "unmerge": "loramix.merge.loaded_model",
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
