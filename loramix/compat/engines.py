"""The serving engines' readings of an adapter: vLLM, SGLang, LoRAX/TGI, llama.cpp, and diffusers/ComfyUI for kohya
files. Each rule's comment names the consumer's source file and function it was read from."""

from __future__ import annotations

import re
from collections import defaultdict

from loramix.adapter import LoraAdapter, portable_rank
from loramix.compat.facts import (
    FIX_GGUF,
    FIX_LAYOUT,
    FIX_MERGE,
    Facts,
    Verdict,
    consumer,
    global_scale,
    peft_consumers,
    scale_reason,
)
from loramix.formats._keys import sample
from loramix.formats.kohya import KOHYA_PREFIX

# vLLM: vllm/config/lora.py, MaxLoRARanks (older: vllm/config.py, LoRAConfig.__post_init__, possible_max_ranks).
VLLM_MAX_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
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

# --------------------------------------------------------------------------------------------------------- vLLM


@consumer("vLLM")
def vllm(facts: Facts, src: str) -> Verdict:
    if facts.adalora:
        return Verdict("vLLM", "no", "AdaLoRA (lora_E) keys are unsupported LoRA weights", FIX_LAYOUT.format(src=src))
    # vllm/lora/peft_helper.py, PEFTHelper._validate_features: DoRA, modules_to_save and bias are refused;
    # vllm/lora/utils.py, parse_fine_tuned_lora_name: any key but lora_A/lora_B(.weight) is "unsupported"
    parts = facts.unsupported_parts()
    saved = [n for n in facts.saved_layers if not n.endswith(("embed_tokens.weight", "lm_head.weight"))]
    if saved:
        parts.append(f"saved base layers ({sample(saved, 2)})")
    if parts:
        return Verdict("vLLM", "no", f"refuses {', '.join(parts)}", facts.fix_unsupported(src))
    # PEFTHelper.__post_init__: one vllm_lora_scaling_factor = lora_alpha/r (or /√r with use_rslora) for every
    # module; rank_pattern/alpha_pattern are dropped by PEFTHelper.from_dict
    wrong = facts.wrong_scales(lambda n: global_scale(facts, rslora=facts.rslora))
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
            "vLLM", "wrong", scale_reason(facts, wrong, "one lora_alpha/r for all"), FIX_LAYOUT.format(src=src), note
        )
    return Verdict("vLLM", "yes", note=note)


# ------------------------------------------------------------------------------------------------------- SGLang


@consumer("SGLang")
def sglang(facts: Facts, src: str) -> Verdict:
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
        return Verdict(
            "SGLang", "no", "refuses DoRA (older releases ignore the magnitudes)", facts.fix_unsupported(src)
        )
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
    wrong = facts.wrong_scales(lambda n: global_scale(facts, rslora=False))
    dropped = [p for p in ("lora_B biases", "full tensors") if any(u.startswith(p) for u in facts.unsupported_parts())]
    if wrong:
        return Verdict("SGLang", "wrong", scale_reason(facts, wrong, "lora_alpha/r, rsLoRA ignored"), fix)
    if dropped:
        return Verdict("SGLang", "wrong", f"drops {', '.join(dropped)}", FIX_MERGE.format(src=src))
    return Verdict("SGLang", "yes", note=f"--max-lora-rank ≥ {facts.r}")


# ---------------------------------------------------------------------------------------------------- LoRAX/TGI


@consumer("LoRAX/TGI")
def lorax(facts: Facts, src: str) -> Verdict:
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
        return Verdict("LoRAX/TGI", "no", f"padded ranks differ across layers of {_some(mixed)} (stack fails)", fix)
    problems = []
    # adapters/lora.py, LoraWeights.load: a type missing from any layer is dropped for all layers
    partial = sorted(t for t, layers in layers_of.items() if layers != all_layers)
    if partial:
        problems.append(f"drops {_some(partial)} (not in every layer)")
    ignored = sorted(t for t in by_type if t not in LORAX_TYPES)
    if ignored:
        problems.append(f"ignores module type{'s' * (len(ignored) != 1)} {_some(ignored)}")
    # LoraWeights.load: scale = lora_alpha / config.r (use_rslora: TGI honours it, LoRAX's peft 0.4.0 has no such
    # field), then config.r = the padded rank, which scales every later layer type by alpha / padded r
    padded = portable_rank([facts.r])
    wrong = facts.wrong_scales(lambda n: global_scale(facts, rslora=False))
    if padded != facts.r:
        problems.append(f"config r {facts.r} is padded to {padded} and then read as r (scale ×{facts.r / padded:.3g})")
    elif wrong:
        problems.append(scale_reason(facts, wrong, "lora_alpha/r, rsLoRA ignored by LoRAX"))
    parts = facts.unsupported_parts()
    if parts:
        problems.append(f"drops {', '.join(parts)}")
    if problems:
        scaled = padded != facts.r or wrong
        return Verdict(
            "LoRAX/TGI", "wrong", "; ".join(problems), facts.fix_unsupported(src) if parts else fix if scaled else None
        )
    return Verdict("LoRAX/TGI", "yes")


def _some(types: list[str]) -> str:
    """Names for one line: all of a few, or the first three and the count."""
    return sample(types) + (f" ({len(types)} in all)" if len(types) > 3 else "")


# ---------------------------------------------------------------------------------------------------- llama.cpp


@consumer("llama.cpp")
def llama_cpp(facts: Facts, src: str) -> Verdict:
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
        return Verdict("llama.cpp", "no", f"the converter exits on {', '.join(parts)}", facts.fix_unsupported(src))
    # src/llama-adapter.h, llama_adapter_lora_weight::get_scale: alpha / each tensor pair's own rank (b->ne[0])
    wrong = facts.wrong_scales(lambda n: facts.alpha / facts.modules[n].rank)
    if wrong:
        return Verdict("llama.cpp", "wrong", scale_reason(facts, wrong, "one lora_alpha over each tensor's rank"), fix)
    return Verdict("llama.cpp", "yes", note="convert_lora_to_gguf.py, or loramix --format gguf")


# ------------------------------------------------------------------------------------------------- kohya files


def kohya_verdicts(adapter: LoraAdapter, src: str) -> list[Verdict]:
    """A kohya/diffusers file: diffusers and ComfyUI read each module's alpha/rank; the PEFT engines do not read it."""
    # diffusers/loaders/lora_conversion_utils.py, _convert_non_diffusers_lora_to_diffusers: per-module alpha into
    # network_alphas; diffusers/utils/peft_utils.py, get_peft_kwargs: alpha_pattern/rank_pattern per module
    layouts = sorted({m.layout for m in adapter.modules.values()} - {"out_in", "conv2d"})
    reads = (
        Verdict("diffusers/ComfyUI", "yes")
        if not layouts
        else Verdict("diffusers/ComfyUI", "no", f"layouts {layouts} have no kohya form", None)
    )
    if adapter.provenance.get("format") == "lycoris":
        # ComfyUI (comfy/weight_adapter) reads LoHa/LoKr; diffusers' converter reads lora_down/lora_up, and LoKr
        # only for a few models (lora_conversion_utils.py, _convert_non_diffusers_lokr_to_diffusers)
        reads = Verdict(
            "diffusers/ComfyUI",
            "no",
            "a LyCORIS file: ComfyUI reads it, diffusers reads kohya lora_down/lora_up files",
            f"loramix combine {src} --format kohya -o OUT (the exact LoRA; --rank K to truncate)",
        )
    reason = "reads PEFT folders, not kohya/diffusers files"
    return [*(Verdict(name, "no", reason, None) for name in peft_consumers()), reads]


def kohya_named_folder(adapter: LoraAdapter, src: str) -> list[Verdict]:
    """A PEFT folder whose target modules are flattened kohya names (``lora_unet_…``): no model has such a module, so
    PEFT finds none (peft/tuners/tuners_utils.py, inject_adapter: NoMatchingPeftModuleError "Target modules … not
    found in the base model") and the engines map none onto the model; diffusers reads kohya files, not this folder."""
    name = next(n for n in adapter.modules if KOHYA_PREFIX.match(n))
    reason = f"target modules are kohya names no model has (e.g. {name})"
    fix = f"loramix combine {src} -m cat --format kohya -o OUT"
    folder = Verdict("diffusers/ComfyUI", "no", "reads kohya/diffusers files, not a PEFT folder of kohya names", fix)
    return [*(Verdict(name, "no", reason, fix) for name in peft_consumers()), folder]
