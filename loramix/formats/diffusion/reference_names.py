"""Diffusion LoRA files in the original (reference-code) module names, which kohya's reader does not take: ComfyUI's
and Black Forest Labs' ``diffusion_model.<module>`` keys, and XLabs' attention-processor keys.

- ComfyUI/BFL: ``diffusion_model.double_blocks.0.img_attn.qkv.lora_down.weight`` / ``.lora_up.weight`` /
  ``.alpha``, or PEFT's ``.lora_A.weight`` / ``.lora_B.weight``; the scale is alpha/rank (1 without alpha), as
  ComfyUI reads it. ComfyUI's ``text_encoders.clip_l.transformer.<path>`` keys are the CLIP text encoder's
  (``text_encoder.<path>``).
- XLabs (x-flux): ``double_blocks.N.processor.qkv_lora1.down.weight`` / ``.up.weight`` (``qkv_lora1``: the image
  stream's ``img_attn.qkv``, ``qkv_lora2``: the text stream's ``txt_attn.qkv``, ``proj_lora1``/``proj_lora2``: their
  ``proj``), ``single_blocks.N.processor.qkv_lora`` (the q, k, v rows of ``linear1``) and ``proj_lora``
  (``linear2``), optionally under ``diffusion_model.``. x-flux's ``LoRALinearLayer`` has no alpha in these files:
  the scale is 1, as diffusers' XLabs converter reads it.

Modules are named by their original dotted path (``double_blocks.0.img_attn.qkv``), which
`loramix.formats.diffusion.identify` then maps onto diffusers' modules. Such a file is a diffusion LoRA file like a
kohya one: its adapter's ``provenance["format"]`` is ``kohya`` (written back as a kohya file by default), its
``key_style`` ``comfyui`` (``comfyui-peft`` with lora_A/lora_B keys) or ``xlabs``.
"""

from __future__ import annotations

import re
from collections import defaultdict
from pathlib import Path

import torch

from loramix.adapter import LoraAdapter
from loramix.errors import AdapterFormatError
from loramix.formats import kohya
from loramix.formats.diffusion import identify
from loramix.io.files import check_finite, read_tensors

NAME = "kohya"  # a diffusion LoRA file: what diffusers and ComfyUI load, written back as kohya
COMFY = re.compile(r"^diffusion_model\.(?P<module>.+)\.(?P<side>lora_down|lora_up|lora_A|lora_B)\.weight$")
COMFY_ALPHA = re.compile(r"^diffusion_model\.(?P<module>.+)\.alpha$")
COMFY_TEXT = re.compile(r"^text_encoders\.clip_l\.transformer\.(?P<module>.+)\.(?P<side>lora_\w+|alpha)(?:\.weight)?$")
XLABS = re.compile(
    r"^(?:diffusion_model\.)?(?P<block>(?:double|single)_blocks\.\d+)\.processor\."
    r"(?P<kind>qkv|proj)_lora(?P<stream>[12]?)\.(?P<side>down|up)\.weight$"
)
# XLabs processor layer → the original module it adds to ((block kind, kind, stream) → module suffix)
XLABS_MODULES = {
    ("double", "qkv", "1"): "img_attn.qkv",
    ("double", "qkv", "2"): "txt_attn.qkv",
    ("double", "proj", "1"): "img_attn.proj",
    ("double", "proj", "2"): "txt_attn.proj",
    ("single", "qkv", ""): "linear1",
    ("single", "proj", ""): "linear2",
}
SIDES = {"lora_down": "A", "lora_A": "A", "down": "A", "lora_up": "B", "lora_B": "B", "up": "B", "alpha": "alpha"}


def _place(key: str) -> tuple[str, str, str] | None:
    """(module, side, style) of a key, or None."""
    found = XLABS.match(key)
    if found is not None:
        module = XLABS_MODULES.get((found["block"].split("_")[0], found["kind"], found["stream"]))
        return (f"{found['block']}.{module}", SIDES[found["side"]], "xlabs") if module else None
    found = COMFY.match(key) or COMFY_ALPHA.match(key)
    if found is not None:
        side = found.groupdict().get("side") or "alpha"
        return found["module"], SIDES[side], "comfyui-peft" if side in ("lora_A", "lora_B") else "comfyui"
    found = COMFY_TEXT.match(key)
    if found is not None and found["side"] in SIDES:
        return f"text_encoder.{found['module']}", SIDES[found["side"]], "comfyui"
    return None


def detect(path: Path) -> bool:
    file = kohya.find_file(path, accept=_is_file)
    return file is not None


def _is_file(path: Path) -> bool:
    keys = kohya.file_keys(path)
    return bool(keys) and any(_place(k) is not None for k in keys) and not any(kohya.lycoris_key(k) for k in keys)


def read(path: str | Path, *, allow_nonfinite: bool = False) -> LoraAdapter:
    """Read a ComfyUI/BFL or XLabs diffusion LoRA file (or a folder holding one) onto diffusers' module names."""
    path = Path(path)
    file = kohya.find_file(path, accept=_is_file) or path
    tensors = read_tensors(file)
    if not allow_nonfinite:
        check_finite(file, tensors)
    parts: dict[str, dict[str, torch.Tensor]] = defaultdict(dict)
    styles, ignored = set(), []
    for key, tensor in tensors.items():
        placed = _place(key)
        if placed is None:
            ignored.append(key)
            continue
        module, side, style = placed
        if side in parts[module]:
            raise AdapterFormatError(f"{file}: module {module} has two {side} tensors (key {key})")
        parts[module][side] = tensor
        styles.add(style)
    if ignored:
        raise AdapterFormatError(
            f"{file}: {len(ignored)} key(s) are no ComfyUI/BFL or XLabs LoRA factor ({', '.join(ignored[:3])})"
        )
    modules = {name: kohya.lora_module(file, name, found) for name, found in sorted(parts.items())}
    adapter = LoraAdapter(
        modules=modules,
        source=str(path),
        name=file.stem,
        file_bytes=file.stat().st_size,
        provenance={"format": NAME, "key_style": "+".join(sorted(styles)), "file": file.name},
    )
    return identify(adapter, str(file))
