"""``--format comfyui``: a diffusion-transformer LoRA in ComfyUI's (and Black Forest Labs') own names,
``diffusion_model.<original module>.lora_down.weight`` / ``.lora_up.weight`` / ``.alpha`` — kohya's file layout
under ComfyUI's names (`loramix.formats.kohya.write` with ``naming="comfyui"``). ComfyUI maps ``diffusion_model.``
keys onto any model it loads (comfy/lora.py, ``model_lora_keys_unet``), and diffusers' Flux, Wan and Qwen-Image
loaders read them. It is the default file for Wan LoRAs (`loramix.formats.diffusion.file_naming`).
"""

from __future__ import annotations

from pathlib import Path

import torch

from loramix.adapter import LoraAdapter
from loramix.formats import kohya

NAME = "comfyui"


def write(
    adapter: LoraAdapter, folder: Path, *, dtype: torch.dtype | None = None, file_name: str | None = None
) -> Path:
    """Write ``adapter`` as ``FOLDER/<file_name>`` (default: the folder's name + ``.safetensors``) in ComfyUI's
    names into the existing ``folder``; returns the file."""
    return kohya.write(adapter, folder, dtype=dtype, file_name=file_name, naming="comfyui")
