"""What every compatibility rule looks at (`Facts`), the verdict it gives (`Verdict`), the shared fixes, and the
registry of the consumers that read PEFT folders: a consumer's rule is one function ``rule(facts, src) -> Verdict``
decorated with `@consumer("name")` where it is defined, as merge methods are with `@method`."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

from loramix.adapter import LoraAdapter
from loramix.formats._keys import sample

REL = 1e-6  # a scale within this relative error is right (float32 rounding of alpha/r)
FIX_LAYOUT = "loramix combine {src} -m cat -o OUT"
FIX_MERGE = "loramix combine {src} -m cat --merge-into BASE -o OUT (serve the merged model)"
FIX_GGUF = "loramix combine {src} -m cat --format gguf --gguf-base BASE -o OUT"
FIX_CONVERT = "loramix convert {src} --base BASE -o OUT (the plain LoRA closest to it)"
# The readers of PEFT folders in the order reports list them; a consumer registered beyond these is listed after.
LISTED = ("PEFT", "transformers", "vLLM", "SGLang", "LoRAX/TGI", "llama.cpp")


@dataclass
class Verdict:
    """One consumer's reading of one adapter: ``status`` is "yes", "wrong", "no" or "n/a"; ``reason`` says why (empty
    for yes), ``fix`` the loramix command that makes it "yes" (None when there is none), ``note`` what to pass the
    consumer (vLLM's --max-lora-rank, PEFT's version range)."""

    consumer: str
    status: str
    reason: str = ""
    fix: str | None = None
    note: str = ""


class Facts:
    """What every rule looks at: the tensors' ranks and true scales, the config's r/alpha/patterns, the extras."""

    def __init__(self, adapter: LoraAdapter, config: dict) -> None:
        self.adapter, self.config = adapter, config
        # the rules for ordinary modules; expert modules (PEFT target_parameters) have rules of their own
        self.modules = {n: m for n, m in adapter.modules.items() if m.expert is None}
        self.experts = len(self.modules) < len(adapter.modules)
        self.r = config.get("r", 8)
        self.alpha = config.get("lora_alpha", 8)
        self.rslora = bool(config.get("use_rslora"))
        self.rank_pattern = config.get("rank_pattern") or {}
        self.alpha_pattern = config.get("alpha_pattern") or {}
        self.heads = sorted(n for n, e in adapter.extra.items() if e.kind in ("modules_to_save", "bias"))
        self.saved_layers = sorted(n for n, e in adapter.extra.items() if e.kind == "base_layer")
        self.max_rank = max((m.rank for m in adapter.modules.values()), default=0)
        self.adalora = config.get("peft_type", "LORA") == "ADALORA"

    def true_alpha(self, name: str) -> float:
        m = self.modules[name]
        return m.scale * (math.sqrt(m.rank) if self.adapter.use_rslora else m.rank)

    def wrong_scales(self, scale_of) -> list[str]:
        """Modules whose scale under ``scale_of(name)`` differs from the true one."""
        return [n for n, m in self.modules.items() if not math.isclose(scale_of(n), m.scale, rel_tol=REL, abs_tol=0)]

    def unsupported_parts(self) -> list[str]:
        """What engines other than PEFT cannot hold: DoRA, lora_B biases, heads and trained biases."""
        parts = []
        if self.adapter.has_dora:
            parts.append("DoRA magnitudes")
        if self.adapter.has_lora_bias:
            parts.append("lora_B biases")
        if self.heads:
            parts.append(f"full tensors ({sample(self.heads, 2)})")
        return parts

    def fix_unsupported(self, src: str) -> str:
        """The command that makes `unsupported_parts` servable: a conversion when DoRA is all of them, else a merge."""
        only_dora = self.adapter.has_dora and not (self.adapter.has_lora_bias or self.heads)
        return (FIX_CONVERT if only_dora else FIX_MERGE).format(src=src)


def global_scale(facts: Facts, *, rslora: bool) -> float:
    return facts.alpha / (math.sqrt(facts.r) if rslora else facts.r)


def scale_reason(facts: Facts, wrong: list[str], rule: str) -> str:
    name = wrong[0]
    return (
        f"{len(wrong)} of {len(facts.modules)} module(s) scaled wrong ({rule}; e.g. {name}: true scale "
        f"{facts.modules[name].scale:.6g})"
    )


Rule = Callable[[Facts, str], Verdict]
RULES: dict[str, Rule] = {}  # consumer name → its rule for a PEFT folder


def consumer(name: str) -> Callable[[Rule], Rule]:
    """Register the decorated ``rule(facts, src) -> Verdict`` as how consumer ``name`` reads a PEFT folder."""

    def register(rule: Rule) -> Rule:
        if name in RULES:
            raise ValueError(f"consumer {name} is registered twice")
        RULES[name] = rule
        return rule

    return register


def peft_consumers() -> list[str]:
    """The registered readers of PEFT folders, in the order reports list them."""
    return sorted(RULES, key=lambda name: LISTED.index(name) if name in LISTED else len(LISTED))
