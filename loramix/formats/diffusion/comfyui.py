"""``--format comfyui``: a diffusion-transformer LoRA in ComfyUI's (and Black Forest Labs') own names,
``diffusion_model.<original module>.lora_down.weight`` / ``.lora_up.weight`` / ``.alpha`` — kohya's file layout
under ComfyUI's names (`loramix.formats.kohya.write` with ``naming="comfyui"``). ComfyUI maps ``diffusion_model.``
keys onto any model it loads (comfy/lora.py, ``model_lora_keys_unet``), and diffusers' Flux, Wan and Qwen-Image
loaders read them. It is the default file for Wan and HunyuanVideo LoRAs
(`loramix.formats.diffusion.file_naming`).

HunyuanVideo's is diffusion-pipe's layout instead (musubi-tuner's ``convert_lora.py --target other``):
``diffusion_model.<original module>.lora_A.weight`` / ``.lora_B.weight`` with the scale folded into B and no alpha,
since diffusers' HunyuanVideo loader refuses a file with ``.alpha`` keys (every key must hold "lora") and ComfyUI
maps those names for HunyuanVideo (its ``diffusion-pipe lora format``), at scale 1 without alpha.
"""

from __future__ import annotations

from pathlib import Path

import torch

from loramix.adapter import LoraAdapter
from loramix.errors import OutputError
from loramix.formats import kohya
from loramix.formats.diffusion import family_of
from loramix.formats.diffusion.hunyuan import HUNYUAN_VIDEO
from loramix.io.tensorfile import write_safetensors

NAME = "comfyui"


def write(
    adapter: LoraAdapter, folder: Path, *, dtype: torch.dtype | None = None, file_name: str | None = None
) -> Path:
    """Write ``adapter`` as ``FOLDER/<file_name>`` (default: the folder's name + ``.safetensors``) in ComfyUI's
    names into the existing ``folder``; returns the file."""
    if family_of(adapter) is not HUNYUAN_VIDEO:
        return kohya.write(adapter, folder, dtype=dtype, file_name=file_name, naming="comfyui")
    if not adapter.modules:
        raise OutputError(f"{folder}: the adapter has no LoRA modules, so there is no ComfyUI file to write")
    file = folder / (file_name or folder.name + ".safetensors")
    return write_safetensors(file, _scaled(kohya.state_dict(adapter, naming="comfyui"), dtype))


def _scaled(tensors: dict[str, torch.Tensor], dtype: torch.dtype | None) -> dict[str, torch.Tensor]:
    """kohya's lora_down/lora_up/alpha keys as lora_A/lora_B with alpha/rank folded into lora_B (in float32)."""
    out = {}
    for key, tensor in tensors.items():
        if key.endswith(".lora_down.weight"):
            out[key.replace(".lora_down.", ".lora_A.")] = tensor.to(dtype or tensor.dtype)
        elif key.endswith(".lora_up.weight"):
            module = key.removesuffix(".lora_up.weight")
            scale = float(tensors[f"{module}.alpha"]) / tensor.shape[1]
            out[f"{module}.lora_B.weight"] = (tensor.float() * scale).to(dtype or tensor.dtype).contiguous()
    return out
