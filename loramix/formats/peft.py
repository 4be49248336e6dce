"""PEFT's adapter format: ``adapter_config.json`` plus ``adapter_model.safetensors`` (or a legacy ``.bin``).

Reading normalises what real files contain (see `loramix.formats._keys`) and reconciles the config with the
tensors (the tensors win, with a warning that says what differed). Writing produces a folder
``PeftModel.from_pretrained`` loads as it is.
"""

from __future__ import annotations

import json
import logging
import math
import re
from collections import Counter, defaultdict
from pathlib import Path

import torch

from loramix import experts
from loramix.adapter import MISREADERS, LoraAdapter, LoraModule, check_rank_layout, is_portable, portable_layout
from loramix.architecture import GPT2_CONV1D
from loramix.errors import AdapterFormatError, OutputError
from loramix.formats import peft_experts
from loramix.formats._keys import (
    CONFIG_FILE,
    PREFIX,
    check_patterns,
    finish_adapter,
    load_folder,
    module_from_parts,
    pattern_regex,
    pattern_value,
    sample,
    split_keys,
)
from loramix.formats.kohya import KOHYA_PREFIX
from loramix.io.tensorfile import write_safetensors

log = logging.getLogger(__name__)

NAME = "peft"
WEIGHTS_FILE = "adapter_model.safetensors"


def detect(path: Path) -> bool:
    """A folder with adapter_config.json (other PEFT types are refused by `read`, naming the type)."""
    return path.is_dir() and (path / CONFIG_FILE).is_file()


def read(path: str | Path, *, allow_nonfinite: bool = False) -> LoraAdapter:
    """Read a PEFT adapter folder into a `LoraAdapter` (tensors keep their stored dtype)."""
    config, weights, tensors = load_folder(path, allow_nonfinite=allow_nonfinite)
    modules, extra, notes = parse(config, tensors, config_where=Path(path) / CONFIG_FILE, where=weights)
    return finish_adapter(
        path, config, weights, modules, extra, notes, use_rslora=bool(config.get("use_rslora", False))
    )


def parse(
    config: dict, tensors: dict[str, torch.Tensor], *, config_where, where
) -> tuple[dict[str, LoraModule], dict, list[str]]:
    """(modules, extra tensors, notes) of a checked PEFT LoRA config and its saved-format state dict (from files or
    a live model: ``config_where`` and ``where`` name them in errors)."""
    check_patterns(config_where, config)
    notes: list[str] = []
    parts, extra = split_keys(tensors, notes, config=config, where=where)
    if not parts:
        raise AdapterFormatError(f"{where}: holds no LoRA tensors (no lora_A / lora_B keys)")
    fused = peft_experts.pop_params(parts, config, where=where, config_where=config_where)
    modules = _build_modules(where, parts, config, notes, config_where) | fused
    if config.get("bias", "none") != "none" and not any(n.endswith(".bias") for n in extra):
        notes.append(f"config says bias={config['bias']!r} but no bias tensors were saved: trained biases are absent")
    return modules, extra, notes


def _build_modules(
    weights: Path | str, parts: dict, config: dict, notes: list[str], where: Path | str
) -> dict[str, LoraModule]:
    r_default = config.get("r", 8)
    alpha_default = config.get("lora_alpha", 8)
    rank_pattern = config.get("rank_pattern") or {}
    alpha_pattern = config.get("alpha_pattern") or {}
    rslora = bool(config.get("use_rslora", False))
    fan_in_fan_out = bool(config.get("fan_in_fan_out", False))
    disagreements: dict[tuple[int, int], list[str]] = defaultdict(list)
    modules = {}
    for name in sorted(parts):
        module = module_from_parts(weights, name, parts[name], fan_in_fan_out)
        r_config = pattern_value(rank_pattern, name, r_default, where=where)
        if r_config != module.rank:
            disagreements[(r_config, module.rank)].append(name)
        alpha = pattern_value(alpha_pattern, name, alpha_default, where=where)
        module.scale = float(alpha) / (math.sqrt(module.rank) if rslora else module.rank)
        modules[name] = module
    for (r_config, r_tensor), names in sorted(disagreements.items()):
        notes.append(
            f"config says r={r_config} but the tensors have rank {r_tensor} for {len(names)} module(s) "
            f"({sample(names)}): using rank {r_tensor}"
        )
    if not fan_in_fan_out and any(GPT2_CONV1D.search(n) for n in modules):
        notes.append(
            "fan_in_fan_out=false but the modules look like GPT-2 Conv1D layers: the base architecture decides how "
            "ΔW lies on the weight when a base is given (as PEFT does)"
        )
    return modules


def state_dict(adapter: LoraAdapter, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """PEFT's saved key layout for ``adapter`` (tensors cast to ``dtype`` when given)."""

    def cast(t: torch.Tensor) -> torch.Tensor:
        return (t if dtype is None else t.to(dtype)).contiguous()

    out: dict[str, torch.Tensor] = peft_experts.state_items(adapter, cast)
    for name, m in adapter.modules.items():
        if m.expert is not None:
            continue
        key = PREFIX + name
        if m.layout == "embedding":
            out[f"{key}.lora_embedding_A"] = cast(m.A)
            out[f"{key}.lora_embedding_B"] = cast(m.B)
        elif m.layout == "conv2d":
            out[f"{key}.lora_A.weight"] = cast(m.A.reshape(m.rank, -1, *m.kernel_size))
            out[f"{key}.lora_B.weight"] = cast(m.B.reshape(m.out_features, m.rank, 1, 1))
        else:
            out[f"{key}.lora_A.weight"] = cast(m.A)
            out[f"{key}.lora_B.weight"] = cast(m.B)
        if m.bias is not None:
            out[f"{key}.lora_B.bias"] = cast(m.bias)
        if m.magnitude is not None:
            shape = (1, -1, *(1 for _ in m.kernel_size)) if m.layout == "conv2d" else (-1,)  # PEFT's DoRA shapes
            out[f"{key}.lora_magnitude_vector"] = cast(m.magnitude.reshape(shape))
    for name, item in adapter.extra.items():
        if item.kind == "base_layer":
            module, _, param = name.rpartition(".")
            out[f"{PREFIX}{module}.base_layer.{param}"] = cast(item.tensor)
        else:
            out[PREFIX + name] = cast(item.tensor)
    return out


def _number(value: float) -> int | float:
    return round(value) if math.isclose(value, round(value), rel_tol=0, abs_tol=1e-9) else value


def _patterns(values: dict[str, float], default: float) -> dict[str, float]:
    """Pattern entries for the modules off ``default``. PEFT matches a key against the tail of every module name,
    so a name that would also match another module (``a.x`` matches ``z.a.x``) is written anchored and escaped."""
    out = {}
    for name, value in values.items():
        if value != default:
            regex = re.compile(pattern_regex(name))
            clash = any(other != name and regex.match(other) for other in values)
            out["^" + re.escape(name) if clash else name] = value
    return out


# Keys a config may leave out: PEFT fills in these values. Written only when they differ, so that older PEFT
# releases (0.6–0.13 refuse keys they do not know: lora_bias came in 0.14, use_dora 0.9, use_rslora 0.8,
# rank_pattern/alpha_pattern 0.6) and engines that parse the config read every adapter that needs none of them.
CONFIG_DEFAULTS = {
    "base_model_name_or_path": None,
    "task_type": None,
    "rank_pattern": {},
    "alpha_pattern": {},
    "use_rslora": False,
    "use_dora": False,
    "lora_bias": False,
    "fan_in_fan_out": False,
    "modules_to_save": None,
    "bias": "none",
}


def config_dict(adapter: LoraAdapter) -> dict:
    """An adapter_config.json that makes PEFT rebuild exactly ``adapter``'s ranks and scales.

    r is the largest rank (an engine that sizes its buffers by r then fits every module), lora_alpha the most common
    one; the modules off those get pattern entries. Keys at their default value are left out (`CONFIG_DEFAULTS`).
    """
    plain = {n: m for n, m in adapter.modules.items() if m.expert is None}
    param_ranks, param_alphas = peft_experts.config_items(adapter)
    ranks = {n: m.rank for n, m in plain.items()} | param_ranks
    alphas = {n: m.scale * (math.sqrt(m.rank) if adapter.use_rslora else m.rank) for n, m in plain.items()}
    alphas = {n: _number(a) for n, a in (alphas | param_alphas).items()}
    r = max(ranks.values())
    alpha = Counter(alphas.values()).most_common(1)[0][0]
    heads = sorted({n.rpartition(".")[0] for n, e in adapter.extra.items() if e.kind == "modules_to_save"})
    optional = {
        "base_model_name_or_path": adapter.base_model,
        "task_type": adapter.task_type,
        "rank_pattern": _patterns(ranks, r),
        "alpha_pattern": _patterns(alphas, alpha),
        "use_rslora": adapter.use_rslora,
        "use_dora": adapter.has_dora,
        "lora_bias": adapter.has_lora_bias,
        "fan_in_fan_out": any(m.layout == "conv1d_fan_in_fan_out" for m in adapter.modules.values()),
        "modules_to_save": heads or None,
        "bias": "all" if any(e.kind == "bias" for e in adapter.extra.values()) else "none",
    }
    return {
        "peft_type": "LORA",
        "r": r,
        "lora_alpha": alpha,
        "target_modules": sorted(plain),
        **({"target_parameters": sorted(param_ranks)} if param_ranks else {}),
        "inference_mode": True,
        **{key: value for key, value in optional.items() if value != CONFIG_DEFAULTS[key]},
    }


def warn_exact_layout() -> None:
    log.warning(
        "`rank_layout='exact'` writes per-module ranks/scales (rank_pattern, alpha_pattern, use_rslora), which %s "
        "misread; the default portable layout does not",
        MISREADERS,
    )


def write(
    adapter: LoraAdapter, folder: Path, *, dtype: torch.dtype | None = None, rank_layout: str = "portable"
) -> Path:
    """Write ``adapter`` as PEFT files into the existing ``folder``; returns the weights file.

    ``rank_layout="portable"`` writes one rank and one scale for every module (`loramix.adapter.portable_layout`),
    which every serving engine reads right; ``"exact"`` keeps each module's own rank and scale in rank_pattern /
    alpha_pattern (and use_rslora), which only PEFT, transformers and diffusers read right (a warning says so).
    """
    if not adapter.modules:
        raise OutputError(f"{folder}: the adapter has no LoRA modules, so there is no PEFT adapter to write")
    flat = next((name for name in adapter.modules if KOHYA_PREFIX.match(name)), None)
    if flat is not None:
        raise OutputError(
            f"{folder}: module {flat} has a kohya name, which no model has: a PEFT folder of it loads nowhere; "
            "write a kohya file, which diffusers, ComfyUI and A1111 read",
            option="format",
            value="kohya",
        )
    check_rank_layout(rank_layout)
    if rank_layout == "portable":
        adapter = portable_layout(adapter)
    elif not is_portable(adapter):
        warn_exact_layout()
    adapter = experts.uniform_adapter(adapter)
    tensors = state_dict(adapter, dtype)
    write_safetensors(folder / WEIGHTS_FILE, tensors, {"format": "pt"})
    (folder / CONFIG_FILE).write_text(json.dumps(config_dict(adapter), indent=2) + "\n")
    return folder / WEIGHTS_FILE
