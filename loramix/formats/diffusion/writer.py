"""``--format diffusers``: a LoRA file in diffusers' own naming, ``OUT/pytorch_lora_weights.safetensors`` (the file
``pipe.load_lora_weights(OUT)`` looks for), as diffusers' ``save_lora_weights`` writes it.

Keys are ``<component>.<module path>.lora_A.weight`` / ``.lora_B.weight`` (``transformer.transformer_blocks.0.attn
.to_q``, ``unet.down_blocks.0…``, ``text_encoder.…``; a conv LoRA keeps its kernel in A and 1×1 in B). The file's
``lora_adapter_metadata`` holds each component's LoraConfig (``<component>.r``, ``.lora_alpha``,
``.target_modules``), which diffusers' loader builds the LoRA layers from. The file is written in loramix's portable
rank layout (`loramix.adapter.portable_layout`: one rank, zero-padded, one scale with the ratios folded into B), so
one r and one lora_alpha describe every module and no rank or alpha pattern (which PEFT matches by name suffix, first
key first) can land on the wrong module.
Only modules under diffusers' names can be written so: a kohya-named module (``lora_unet_…``, whose dots only a base
can find again) or a module without a component is refused, as are heads, ``lora_B`` biases and DoRA magnitudes.
"""

from __future__ import annotations

import json
import re
from collections import defaultdict
from pathlib import Path

import torch

from loramix.adapter import LoraAdapter, LoraModule, portable_layout
from loramix.errors import OutputError
from loramix.formats.kohya import COMPONENTS, DIFFUSERS_FILE, DIFFUSERS_METADATA
from loramix.io.tensorfile import write_safetensors

NAME = "diffusers"


def state_dict(adapter: LoraAdapter, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """diffusers' key layout for ``adapter``; refuses what the format cannot hold."""
    if adapter.extra:
        raise OutputError(f"diffusers LoRA files cannot hold heads ({', '.join(sorted(adapter.extra)[:3])})")
    out = {}
    for name, m in adapter.modules.items():
        _check(name, m)
        cast = dtype or m.A.dtype
        down, up = m.A, m.B
        if m.layout == "conv2d":
            down, up = m.A.reshape(m.rank, -1, *m.kernel_size), m.B.reshape(m.out_features, m.rank, 1, 1)
        out[f"{name}.lora_A.weight"] = down.to(cast).contiguous()
        out[f"{name}.lora_B.weight"] = up.to(cast).contiguous()
    return out


def _check(name: str, m: LoraModule) -> None:
    component, dot, path = name.partition(".")
    if not dot or component not in COMPONENTS:
        raise OutputError(
            f"module {name} has no diffusers name (a pipeline component, then the module's path: "
            f"{', '.join(COMPONENTS)}): write it with --format kohya",
            option="format",
            value="kohya",
        )
    if m.bias is not None or m.magnitude is not None:
        raise OutputError(f"module {name}: loramix writes diffusers files without lora_B biases or DoRA magnitudes")
    if m.layout not in ("out_in", "conv2d"):
        raise OutputError(f"module {name}: diffusers files hold linear and conv2d LoRA only, not {m.layout}")


def metadata(adapter: LoraAdapter) -> dict[str, str]:
    """The ``lora_adapter_metadata`` entry of ``adapter`` (one rank, one scale: `portable_layout`): each component's
    LoraConfig fields, flat (``transformer.r``, …). ``target_modules`` is a regex of the exact paths, as PEFT
    full-matches a string: a list entry would also match every module whose path ends the same way (a top-level
    ``proj_out`` and each single block's)."""
    by_component: dict[str, list[str]] = defaultdict(list)
    for name in adapter.modules:
        component, _, path = name.partition(".")
        by_component[component].append(path)
    module = next(iter(adapter.modules.values()))
    config: dict = {}
    for component, paths in sorted(by_component.items()):
        config[f"{component}.r"] = module.rank
        config[f"{component}.lora_alpha"] = module.scale * module.rank
        config[f"{component}.target_modules"] = "^(?:" + "|".join(re.escape(p) for p in sorted(paths)) + ")$"
    return {"format": "pt", DIFFUSERS_METADATA: json.dumps(config, sort_keys=True)}


def write(adapter: LoraAdapter, folder: Path, *, dtype: torch.dtype | None = None) -> Path:
    """Write ``adapter`` as ``FOLDER/pytorch_lora_weights.safetensors`` into the existing ``folder``."""
    if not adapter.modules:
        raise OutputError(f"{folder}: the adapter has no LoRA modules, so there is no diffusers file to write")
    adapter = portable_layout(adapter)
    return write_safetensors(folder / DIFFUSERS_FILE, state_dict(adapter, dtype), metadata(adapter))
