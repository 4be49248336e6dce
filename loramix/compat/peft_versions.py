"""PEFT's and transformers' readings of an adapter_config.json, release by release (PEFT 0.5 to the newest):
unknown keys, pattern matching, rank/alpha resolution."""

from __future__ import annotations

import math
import re

from loramix.compat.facts import FIX_LAYOUT, REL, Facts, Verdict, consumer

# PEFT releases checked, oldest to newest (minor versions); the newest rules also stand for later releases.
PEFT_VERSIONS = tuple((0, minor) for minor in range(5, 22))
# Config keys LoraConfig / PeftConfig had in PEFT 0.5 (peft/tuners/lora.py, LoraConfig; peft/utils/config.py).
PEFT_05_KEYS = {
    "peft_type",
    "base_model_name_or_path",
    "revision",
    "task_type",
    "inference_mode",
    "auto_mapping",
    "r",
    "target_modules",
    "lora_alpha",
    "lora_dropout",
    "fan_in_fan_out",
    "bias",
    "modules_to_save",
    "init_lora_weights",
    "layers_to_transform",
    "layers_pattern",
}
# The first release whose LoraConfig or PeftConfig has each later key: the dataclass fields of
# src/peft/tuners/lora/config.py (LoraConfig) and src/peft/config.py (PeftConfigMixin, PeftConfig) at each tag
# v0.5.0 … v0.20.0, and the 0.21 release. Keys not listed here are newer than loramix knows, or not PEFT's: treated
# as unknown to every release checked.
PEFT_KEY_SINCE = {
    "rank_pattern": (0, 6),
    "alpha_pattern": (0, 6),
    "loftq_config": (0, 7),
    "megatron_config": (0, 7),
    "megatron_core": (0, 7),
    "use_rslora": (0, 8),
    "use_dora": (0, 9),
    "layer_replication": (0, 10),
    "runtime_config": (0, 12),
    "lora_bias": (0, 14),
    "exclude_modules": (0, 14),
    "eva_config": (0, 14),
    "trainable_token_indices": (0, 15),
    "corda_config": (0, 15),
    "target_parameters": (0, 17),
    "use_qalora": (0, 16),
    "qalora_group_size": (0, 16),
    "alora_invocation_tokens": (0, 18),
    "ensure_weight_tying": (0, 18),
    "arrow_config": (0, 18),
    "peft_version": (0, 18),
    "lora_ga_config": (0, 19),
    "use_bdlora": (0, 19),
    "monteclora_config": (0, 20),
    "velora_config": (0, 20),
    "kasa_config": (0, 21),
}

# PEFT's ParamWrapper (target_parameters, since 0.17) reads a fused expert parameter (E, a, b) as (E, in=a, out=b)
# in 0.17 and 0.18 (peft/tuners/lora/layer.py, ParamWrapper._get_in_out_features), swaps only where the experts
# module says is_transposed in 0.19, and from 0.20 on swaps unless it says so (ParamWrapper.update_layer): so the
# (E, out, in) experts of transformers 5 (Qwen3-MoE, Mixtral, DeepSeek, ...) are read as they are written only by 0.20+.
EXPERTS_IN_OUT = (0, 20)
EXPERTS_IN_OUT_REASON = (
    "reads fused (E, out, in) expert parameters as (E, in, out) before 0.20 (size mismatch; a transposed ΔW where "
    "square)"
)

# --------------------------------------------------------------------------------------------------------- PEFT


# Keys whose value changes nothing unless another feature is on (their defaults are not empty values).
INERT_KEYS = {"peft_version", "megatron_core", "qalora_group_size"}


def _inert(key: str, value) -> bool:
    return key in INERT_KEYS or value in (None, False, {}, [], "none", "")


def _pattern_lookup(patterns: dict, keys, name: str, *, anchored_dot: bool):
    """PEFT ≤ 0.14: the first key with re.match(rf".*\\.{key}$", name), else the name itself (exact-key fallback);
    0.15+: re.match(rf"(.*\\.)?({key})$", name) (peft/utils/other.py, get_pattern_key)."""
    for key in keys:
        regex = rf".*\.{key}$" if anchored_dot else rf"(.*\.)?({key})$"
        try:
            if re.match(regex, name):
                return key
        except re.error:
            continue
    return name


def _peft_resolved(facts: Facts, version: tuple[int, int], name: str) -> tuple[float, float]:
    """(r, alpha) PEFT ``version`` gives module ``name`` (peft/tuners/lora/model.py, LoraModel._create_and_replace:
    0.6–0.13 pool both dicts' keys and use the first match for both; 0.14+ look each dict up on its own)."""
    rp, ap = facts.rank_pattern, facts.alpha_pattern
    old = version < (0, 15)
    if version < (0, 14):
        key = _pattern_lookup(rp, [*rp, *ap], name, anchored_dot=True)
        r_key = a_key = key
    else:
        r_key = _pattern_lookup(rp, rp, name, anchored_dot=old)
        a_key = _pattern_lookup(ap, ap, name, anchored_dot=old)
    return rp.get(r_key, facts.r), ap.get(a_key, facts.alpha)


def _peft_problem(facts: Facts, version: tuple[int, int]) -> tuple[str, str] | None:
    """("no" | "wrong", reason) for PEFT ``version``, or None when it reads the adapter right."""
    for key, value in facts.config.items():
        since = PEFT_KEY_SINCE.get(key, (99, 0)) if key not in PEFT_05_KEYS else (0, 0)
        if version >= since:
            continue
        # peft/config.py, PeftConfigMixin.from_pretrained: 0.6–0.13 build config_cls(**kwargs) (TypeError on an
        # unknown key); ≤ 0.5 set only known attributes; 0.14+ drop unknown keys (_check_and_remove_unused_kwargs)
        if (0, 6) <= version < (0, 14):
            return "no", f"unknown config key {key} (TypeError)"
        if not _inert(key, value):
            return "wrong", f"ignores {key}"
    if version < (0, 6):
        return None if not (facts.rank_pattern or facts.alpha_pattern) else ("wrong", "ignores the patterns")
    if facts.experts and (0, 17) <= version < EXPERTS_IN_OUT:
        return "no", EXPERTS_IN_OUT_REASON
    for name, m in facts.modules.items():
        r, alpha = _peft_resolved(facts, version, name)
        if r != m.rank:
            return "no", f"{name}: config gives rank {r}, the tensors have {m.rank} (size mismatch)"
        if not math.isclose(alpha, facts.true_alpha(name), rel_tol=REL, abs_tol=0):
            return "wrong", f"{name}: lora_alpha resolves to {alpha:g} instead of {facts.true_alpha(name):g}"
    return None


def _version(v: tuple[int, int]) -> str:
    return f"{v[0]}.{v[1]}"


def _ranges(versions: list[tuple[int, int]]) -> str:
    """ "0.6–0.13, 0.21+" for a sorted list of releases out of `PEFT_VERSIONS`."""
    runs: list[list[tuple[int, int]]] = []
    for v in versions:
        if runs and PEFT_VERSIONS.index(v) == PEFT_VERSIONS.index(runs[-1][-1]) + 1:
            runs[-1].append(v)
        else:
            runs.append([v])
    parts = []
    for run in runs:
        if run[-1] == PEFT_VERSIONS[-1]:
            parts.append(f"{_version(run[0])}+")
        else:
            parts.append(_version(run[0]) + (f"–{_version(run[-1])}" if len(run) > 1 else ""))
    return ", ".join(parts)


@consumer("PEFT")
def peft(facts: Facts, src: str) -> Verdict:
    problems = {v: _peft_problem(facts, v) for v in PEFT_VERSIONS}
    good = [v for v, p in problems.items() if p is None]
    if problems[PEFT_VERSIONS[-1]] is not None:
        status, reason = problems[PEFT_VERSIONS[-1]]
        return Verdict("PEFT", status, reason, FIX_LAYOUT.format(src=src))
    bad = [v for v, p in problems.items() if p is not None]
    note = f"PEFT {_ranges(good)}"
    if not bad:
        return Verdict("PEFT", "yes", note=note)
    first = problems[bad[-1]]
    reason = f"PEFT {_ranges(bad)}: {first[1]}"
    return Verdict("PEFT", "yes", note=f"{note} (not {reason})", fix=FIX_LAYOUT.format(src=src))


@consumer("transformers")
def transformers(facts: Facts, src: str) -> Verdict:
    # transformers/integrations/peft.py, PeftAdapterMixin.load_adapter: PEFT's LoraConfig and set_peft_model_state_dict
    peft = _peft_problem(facts, PEFT_VERSIONS[-1])
    if peft is None:
        return Verdict("transformers", "yes", note="through PEFT")
    return Verdict("transformers", peft[0], f"through PEFT: {peft[1]}", FIX_LAYOUT.format(src=src))
