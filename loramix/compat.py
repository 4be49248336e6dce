"""Which consumers load an adapter and read every module's scale right: PEFT (by version), transformers, vLLM,
SGLang, LoRAX/TGI, llama.cpp, and diffusers/ComfyUI for kohya files.

Each rule rebuilds what the consumer's own loader does (the comment above it names the file and function it was read
from) and compares the scale that consumer gives each module with the module's true scale (the one PEFT's newest
rules give, which is what loramix reads). `check` returns one `Verdict` per consumer: ``"yes"`` (loads, every module
right), ``"wrong"`` (loads, but some module is scaled wrong or some part is silently dropped), ``"no"`` (refused)
or ``"n/a"`` (the consumer reads another kind of file),
with the reason and the loramix command that fixes it. `check_source` loads a source and its raw config first.
"""

from __future__ import annotations

import math
import re
from collections import defaultdict
from dataclasses import asdict, dataclass
from pathlib import Path

from loramix.adapter import LoraAdapter, portable_rank
from loramix.formats import load_adapter
from loramix.formats._keys import CONFIG_FILE, read_config, sample
from loramix.sources import resolve

# vLLM: vllm/config/lora.py, MaxLoRARanks (older: vllm/config.py, LoRAConfig.__post_init__, possible_max_ranks).
VLLM_MAX_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
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
# The first release whose LoraConfig has each later key (git show vX:src/peft/tuners/lora/config.py). Keys not
# listed here are newer than loramix knows, or not PEFT's: treated as unknown to every release checked.
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
    "use_qalora": (0, 17),
    "qalora_group_size": (0, 17),
    "alora_invocation_tokens": (0, 18),
    "ensure_weight_tying": (0, 18),
    "arrow_config": (0, 18),
    "peft_version": (0, 18),
}
# Module types LoRAX/TGI build adapter layers for (lorax_server/adapters/lora.py and TGI's adapters/lora.py).
LORAX_TYPES = {
    "q_proj",
    "k_proj",
    "v_proj",
    "o_proj",
    "gate_proj",
    "up_proj",
    "down_proj",
    "qkv_proj",
    "c_proj",
    "c_fc",
}
LORAX_TYPES |= {"lm_head"}
REL = 1e-6  # a scale within this relative error is right (float32 rounding of alpha/r)
FIX_LAYOUT = "loramix combine {src} -m cat -o OUT"
FIX_MERGE = "loramix combine {src} -m cat --merge-into BASE -o OUT (serve the merged model)"
FIX_GGUF = "loramix combine {src} -m cat --format gguf --gguf-base BASE -o OUT"


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


@dataclass
class Report:
    """All verdicts for one adapter."""

    name: str
    source: str
    verdicts: list[Verdict]

    def to_dict(self) -> dict:
        return {"name": self.name, "source": self.source, "verdicts": [asdict(v) for v in self.verdicts]}


def check_source(src: str | Path, **load_options) -> Report:
    """Load ``src`` (as `load_adapter`) and its raw adapter_config.json (when a PEFT folder) and `check` it."""
    adapter = load_adapter(src, log_warnings=False, **load_options)
    path = resolve(src)
    folder = path if path.is_dir() else path.parent
    config = read_config(folder, peft_types=("LORA", "ADALORA")) if (folder / CONFIG_FILE).is_file() else None
    return check(adapter, config)


def check(adapter: LoraAdapter, config: dict | None) -> Report:
    """The verdict of every consumer on ``adapter``; ``config`` is its raw adapter_config.json (None: not a PEFT
    folder, e.g. a kohya file)."""
    src = adapter.source if " " not in adapter.source else repr(adapter.source)
    if config is None:
        verdicts = _kohya(adapter, src)
    else:
        facts = _Facts(adapter, config)
        verdicts = [
            _peft(facts, src),
            _transformers(facts, src),
            _vllm(facts, src),
            _sglang(facts, src),
            _lorax(facts, src),
            _llama_cpp(facts, src),
            Verdict("diffusers/ComfyUI", "n/a", "checked for kohya/diffusers files (write one with --format kohya)"),
        ]
    return Report(adapter.name, adapter.source, verdicts)


class _Facts:
    """What every rule looks at: the tensors' ranks and true scales, the config's r/alpha/patterns, the extras."""

    def __init__(self, adapter: LoraAdapter, config: dict) -> None:
        self.adapter, self.config = adapter, config
        self.modules = adapter.modules
        self.r = config.get("r", 8)
        self.alpha = config.get("lora_alpha", 8)
        self.rslora = bool(config.get("use_rslora"))
        self.rank_pattern = config.get("rank_pattern") or {}
        self.alpha_pattern = config.get("alpha_pattern") or {}
        self.heads = sorted(n for n, e in adapter.extra.items() if e.kind in ("modules_to_save", "bias"))
        self.saved_layers = sorted(n for n, e in adapter.extra.items() if e.kind == "base_layer")
        self.max_rank = max(m.rank for m in self.modules.values())
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


def _global_scale(facts: _Facts, *, rslora: bool) -> float:
    return facts.alpha / (math.sqrt(facts.r) if rslora else facts.r)


def _scale_reason(facts: _Facts, wrong: list[str], rule: str) -> str:
    name = wrong[0]
    return (
        f"{len(wrong)} of {len(facts.modules)} module(s) scaled wrong ({rule}; e.g. {name}: true scale "
        f"{facts.modules[name].scale:.6g})"
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


def _peft_resolved(facts: _Facts, version: tuple[int, int], name: str) -> tuple[float, float]:
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


def _peft_problem(facts: _Facts, version: tuple[int, int]) -> tuple[str, str] | None:
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


def _peft(facts: _Facts, src: str) -> Verdict:
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


def _transformers(facts: _Facts, src: str) -> Verdict:
    # transformers/integrations/peft.py, PeftAdapterMixin.load_adapter: PEFT's LoraConfig and set_peft_model_state_dict
    peft = _peft_problem(facts, PEFT_VERSIONS[-1])
    if peft is None:
        return Verdict("transformers", "yes", note="through PEFT")
    return Verdict("transformers", peft[0], f"through PEFT: {peft[1]}", FIX_LAYOUT.format(src=src))


# --------------------------------------------------------------------------------------------------------- vLLM


def _vllm(facts: _Facts, src: str) -> Verdict:
    if facts.adalora:
        return Verdict("vLLM", "no", "AdaLoRA (lora_E) keys are unsupported LoRA weights", FIX_LAYOUT.format(src=src))
    # vllm/lora/peft_helper.py, PEFTHelper._validate_features: DoRA, modules_to_save and bias are refused;
    # vllm/lora/utils.py, parse_fine_tuned_lora_name: any key but lora_A/lora_B(.weight) is "unsupported"
    parts = facts.unsupported_parts()
    saved = [n for n in facts.saved_layers if not n.endswith(("embed_tokens.weight", "lm_head.weight"))]
    if saved:
        parts.append(f"saved base layers ({sample(saved, 2)})")
    if parts:
        return Verdict("vLLM", "no", f"refuses {', '.join(parts)}", FIX_MERGE.format(src=src))
    # PEFTHelper.__post_init__: one vllm_lora_scaling_factor = lora_alpha/r (or /√r with use_rslora) for every
    # module; rank_pattern/alpha_pattern are dropped by PEFTHelper.from_dict
    wrong = facts.wrong_scales(lambda n: _global_scale(facts, rslora=facts.rslora))
    # PEFTHelper.validate_legal: r ≤ --max-lora-rank; base_linear.py, set_lora: every tensor fits max_lora_rank
    need = max(facts.r, facts.max_rank)
    fitting = [r for r in VLLM_MAX_RANKS if r >= need]
    if not fitting:
        return Verdict(
            "vLLM", "no", f"rank {need} is above the largest --max-lora-rank (512)", FIX_LAYOUT.format(src=src)
        )
    note = f"--max-lora-rank {fitting[0]}"
    if wrong:
        return Verdict(
            "vLLM", "wrong", _scale_reason(facts, wrong, "one lora_alpha/r for all"), FIX_LAYOUT.format(src=src), note
        )
    return Verdict("vLLM", "yes", note=note)


# ------------------------------------------------------------------------------------------------------- SGLang


def _sglang(facts: _Facts, src: str) -> Verdict:
    fix = FIX_LAYOUT.format(src=src)
    if facts.adalora:
        return Verdict("SGLang", "no", "AdaLoRA is not LoRA (LoRAAdapter asserts peft_type lora)", fix)
    # python/sglang/srt/lora/lora_config.py, LoRAConfig.__init__: r, lora_alpha, target_modules are required
    missing = [k for k in ("r", "lora_alpha", "target_modules") if k not in facts.config]
    if missing:
        return Verdict("SGLang", "no", f"config lacks {', '.join(missing)} (KeyError)", fix)
    # mem_pool.py, LoRAMemoryPool.load_lora_weight_to_buffer: every buffer view is sliced to config r
    off = sorted({m.rank for m in facts.modules.values()} - {facts.r})
    if off:
        return Verdict(
            "SGLang", "no", f"module ranks {off} differ from config r {facts.r} (buffer shape mismatch)", fix
        )
    if facts.adapter.has_dora:  # lora_manager.py, validate_new_adapter (recent): DoRA refused; older: ignored
        return Verdict("SGLang", "no", "refuses DoRA (older releases ignore the magnitudes)", FIX_MERGE.format(src=src))
    if isinstance(facts.config.get("target_modules"), str):  # utils.py, get_normalized_target_modules (older)
        return Verdict("SGLang", "no", "target_modules is a regex string (older releases iterate its letters)", fix)
    # lora.py, normalize_qkv_proj: q_proj and v_proj must both be there once either is
    layers = defaultdict(set)
    for name in facts.modules:
        parent, _, leaf = name.rpartition(".")
        layers[parent].add(leaf)
    lonely = [p for p, leaves in layers.items() if ("q_proj" in leaves) != ("v_proj" in leaves)]
    if lonely:
        return Verdict("SGLang", "no", f"q_proj without v_proj (or v without q) in {sample(lonely, 2)}", None)
    # lora.py, LoRAAdapter.__init__: scaling = lora_alpha / r (no rsLoRA branch); patterns are never read
    wrong = facts.wrong_scales(lambda n: _global_scale(facts, rslora=False))
    dropped = [p for p in ("lora_B biases", "full tensors") if any(u.startswith(p) for u in facts.unsupported_parts())]
    if wrong:
        return Verdict("SGLang", "wrong", _scale_reason(facts, wrong, "lora_alpha/r, rsLoRA ignored"), fix)
    if dropped:
        return Verdict("SGLang", "wrong", f"drops {', '.join(dropped)}", FIX_MERGE.format(src=src))
    return Verdict("SGLang", "yes", note=f"--max-lora-rank ≥ {facts.r}")


# ---------------------------------------------------------------------------------------------------- LoRAX/TGI


def _lorax(facts: _Facts, src: str) -> Verdict:
    fix = FIX_LAYOUT.format(src=src)
    if facts.adalora:
        return Verdict("LoRAX/TGI", "no", "AdaLoRA is not LoRA", fix)
    # lorax_server/utils/punica.py, pad_rank: ranks ≤ 8 padded to 8, larger to a multiple of 16 (TP=1)
    by_type: dict[str, set[int]] = defaultdict(set)
    layers_of: dict[str, set[str]] = defaultdict(set)
    all_layers = set()
    for name, m in facts.modules.items():
        found = re.search(r"\.(\d+)\.", name)
        leaf = name.rpartition(".")[2]
        by_type[leaf].add(portable_rank([m.rank]))
        if found:
            layers_of[leaf].add(found.group(1))
            all_layers.add(found.group(1))
    # adapters/lora.py, LoraWeights.__init__: torch.stack of every layer's padded factors
    mixed = sorted(t for t, ranks in by_type.items() if len(ranks) > 1)
    if mixed:
        return Verdict("LoRAX/TGI", "no", f"padded ranks differ across layers of {', '.join(mixed)} (stack fails)", fix)
    problems = []
    # adapters/lora.py, LoraWeights.load: a type missing from any layer is dropped for all layers
    partial = sorted(t for t, layers in layers_of.items() if layers != all_layers)
    if partial:
        problems.append(f"drops {', '.join(partial)} (not in every layer)")
    ignored = sorted(t for t in by_type if t not in LORAX_TYPES)
    if ignored:
        problems.append(f"ignores module type(s) {', '.join(ignored)}")
    # LoraWeights.load: scale = lora_alpha / config.r (use_rslora: TGI honours it, LoRAX's peft 0.4.0 has no such
    # field), then config.r = the padded rank, which scales every later layer type by alpha / padded r
    padded = portable_rank([facts.r])
    wrong = facts.wrong_scales(lambda n: _global_scale(facts, rslora=False))
    if padded != facts.r:
        problems.append(f"config r {facts.r} is padded to {padded} and then read as r (scale ×{facts.r / padded:.3g})")
    elif wrong:
        problems.append(_scale_reason(facts, wrong, "lora_alpha/r, rsLoRA ignored by LoRAX"))
    parts = facts.unsupported_parts()
    if parts:
        problems.append(f"drops {', '.join(parts)}")
    if problems:
        scaled = padded != facts.r or wrong
        return Verdict(
            "LoRAX/TGI", "wrong", "; ".join(problems), FIX_MERGE.format(src=src) if parts else fix if scaled else None
        )
    return Verdict("LoRAX/TGI", "yes")


# ---------------------------------------------------------------------------------------------------- llama.cpp


def _llama_cpp(facts: _Facts, src: str) -> Verdict:
    fix = FIX_GGUF.format(src=src)
    # convert_lora_to_gguf.py, __main__: alpha = lparams["lora_alpha"]
    if "lora_alpha" not in facts.config:
        return Verdict("llama.cpp", "no", "config lacks lora_alpha (the converter's KeyError)", fix)
    # convert_lora_to_gguf.py, LoraModel.get_tensors: any key but lora_A/lora_B/lora_embedding_A/B (and skipped
    # base_layer copies) is "Unexpected name" and exits
    parts = facts.unsupported_parts()
    if facts.adalora:
        parts.append("AdaLoRA lora_E")
    if parts:
        return Verdict("llama.cpp", "no", f"the converter exits on {', '.join(parts)}", FIX_MERGE.format(src=src))
    # src/llama-adapter.h, llama_adapter_lora_weight::get_scale: alpha / each tensor pair's own rank (b->ne[0])
    wrong = facts.wrong_scales(lambda n: facts.alpha / facts.modules[n].rank)
    if wrong:
        return Verdict("llama.cpp", "wrong", _scale_reason(facts, wrong, "one lora_alpha over each tensor's rank"), fix)
    return Verdict("llama.cpp", "yes", note="convert_lora_to_gguf.py, or loramix --format gguf")


# ------------------------------------------------------------------------------------------------- kohya files


def _kohya(adapter: LoraAdapter, src: str) -> list[Verdict]:
    """A kohya/diffusers file: diffusers and ComfyUI read each module's alpha/rank; the PEFT engines do not read it."""
    # diffusers/loaders/lora_conversion_utils.py, _convert_non_diffusers_lora_to_diffusers: per-module alpha into
    # network_alphas; diffusers/utils/peft_utils.py, get_peft_kwargs: alpha_pattern/rank_pattern per module
    layouts = sorted({m.layout for m in adapter.modules.values()} - {"linear", "conv2d"})
    reads = (
        Verdict("diffusers/ComfyUI", "yes")
        if not layouts
        else Verdict("diffusers/ComfyUI", "no", f"layouts {layouts} have no kohya form", None)
    )
    others = ("PEFT", "transformers", "vLLM", "SGLang", "LoRAX/TGI", "llama.cpp")
    reason = "reads PEFT folders, not kohya/diffusers files"
    return [*(Verdict(name, "no", reason, None) for name in others), reads]
