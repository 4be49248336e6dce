"""Adapters named as the checkpoint stores the model (``model.layers.N`` for a Qwen2-VL, as PEFT wrote them with
transformers 4) where transformers 5 holds the modules under other names (``model.language_model.layers.N``):
PEFT then finds no module of that name and the adapter loads as a no-op (measured with PEFT 0.21 and transformers
5.25 on a tiny Qwen2-VL: the logits are the base's). Told only when the base's config.json is at hand."""

from __future__ import annotations

from importlib.metadata import version

from loramix.adapter import LoraAdapter
from loramix.compat.facts import Verdict
from loramix.io.conversion_mapping import model_names
from loramix.sources import local_config


def stored_names(adapter: LoraAdapter) -> list[tuple[str, str]]:
    """(name, in-memory name) of the modules ``adapter`` names as the checkpoint stores them, when it differs."""
    folder = local_config(adapter.base_model) if adapter.base_model else None
    names = model_names(folder) if folder is not None else None
    if names is None:
        return []
    found = [(n, names.memory_name(n)) for n, m in adapter.modules.items() if m.expert is None]
    return [(n, memory) for n, memory in found if memory not in (None, n)]


def renamed_verdicts(adapter: LoraAdapter, src: str) -> dict[str, Verdict]:
    """PEFT's and transformers' verdicts on an adapter named as the checkpoint stores its modules (none otherwise)."""
    stored = stored_names(adapter)
    if not stored:
        return {}
    name, memory = stored[0]
    reason = (
        f"{len(stored)} module(s) named as the checkpoint stores them ({name}; transformers {version('transformers')} "
        f"holds it as {memory}): PEFT finds no such module and loads the adapter as a no-op"
    )
    fix = f"loramix combine {src} -m cat --base-model {adapter.base_model} -o OUT (today's names)"
    return {consumer: Verdict(consumer, "wrong", reason, fix) for consumer in ("PEFT", "transformers")}
