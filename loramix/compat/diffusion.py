"""`loramix check` for diffusion-transformer LoRA files (Flux.1, SD3/3.5, Wan 2.x, Qwen-Image): what diffusers'
pipelines' ``load_lora_weights`` and ComfyUI's LoRA loader make of the file as written, by its naming
(``provenance["key_style"]``) and modules.

Each rule cites the code it follows:

- diffusers 0.42, ``loaders/lora_conversion_utils.py``, ``_convert_kohya_flux_lora_to_diffusers`` (kohya files, and
  ComfyUI's ``diffusion_model.`` files with ``lora_down`` keys, which it renames to kohya's first): double blocks
  0–18 and single blocks 0–37 only (any other key is "Incompatible keys"); ``linear1`` split at ``dims=[3072, 3072,
  3072, 12288]`` (Flux.1's sizes; another hidden size fails its assert); ``img_in``, ``txt_in``, ``time_in``,
  ``vector_in``, ``guidance_in`` and ``final_layer`` keyed without ``transformer.``, which ``load_lora_weights``
  then leaves out (their ΔW is lost; ``final_layer``'s alpha is also ignored). Its branch for diffusers' own flat
  names (``lora_transformer_…``, ``_convert_mixture_state_dict_to_diffusers``) keys a block's attention modules and
  drops the rest of the name for any other block module (``single_transformer_blocks.1.proj_out`` becomes
  ``single_transformer_blocks.1``). ``lora_state_dict`` sends a file to
  that converter only when a key holds ``.lora_down.weight``: ComfyUI files with PEFT's ``lora_A`` keys reach none.
- diffusers 0.42, ``_convert_musubi_wan_lora_to_diffusers`` (Wan files in musubi-tuner's ``lora_unet_`` names):
  every block from 0 to the last must hold all of ``self_attn``/``cross_attn`` ``q``, ``k``, ``v``, ``o`` and
  ``ffn_0``/``ffn_2`` (it pops each one; a missing one is a KeyError). Its ``diffusion_model.`` converter and
  the Qwen-Image converters read any subset.
- diffusers 0.42, ``SD3LoraLoaderMixin.lora_state_dict``: no converter at all; only diffusers' own ``transformer.…``
  names load (sd-scripts' and ComfyUI's names, and diffusers' flat ``lora_transformer_…``, load nothing).
- diffusers 0.42, ``HunyuanVideoLoraLoaderMixin.lora_state_dict``: a file with an ``img_attn_qkv`` key goes through
  ``_convert_hunyuan_video_lora_to_diffusers``, which reads the original names with PEFT's ``lora_A``/``lora_B`` keys
  (under ``diffusion_model.``, ``transformer.`` or none; only in a file that holds an ``img_attn_qkv`` module, else
  nothing is converted and nothing loads); ``load_lora_weights`` refuses a file with any key without
  "lora" in it (an ``.alpha``), and kohya's ``lora_down``/``lora_up`` keys are split as if they were ``lora_B``. Only
  those names and diffusers' own load, and two modules go wrong even so: ``final_layer.adaLN_modulation.1`` (its
  ``lora_A`` rows swapped with ``lora_B``'s halves) and the text refiner's ``self_attn_qkv`` (``lora_A`` split in
  three like ``lora_B``: a shape error).
- ComfyUI for HunyuanVideo (``comfy/lora.py``, "diffusion-pipe lora format"; ``comfy/supported_models.py``,
  ``HunyuanVideo.process_unet_state_dict``): ``diffusion_model.``/``transformer.`` + the original names map, except
  the embedders its model renames (``time_in.mlp``, ``guidance_in.mlp``, ``txt_in.t_embedder.mlp``,
  ``txt_in.c_embedder``); ``lora_unet_`` names follow its model's own names, which also rename ``_mod.linear``,
  ``modulation.linear`` and ``mlp.fc1``/``fc2``, so musubi-tuner's names of those modules are left out; diffusers'
  ``transformer.transformer_blocks…`` names are not mapped at all.
- ComfyUI, ``comfy/lora.py`` (``model_lora_keys_unet``: kohya ``lora_unet_`` and ``diffusion_model.`` names of
  every model, diffusers ``transformer.`` names of Flux and SD3 only, at the commit these rules were read from,
  41444b5) and ``comfy/lora_convert.py`` (``convert_lora``: XLabs processor keys only in a
  file that holds both ``double_blocks.18.processor.qkv_lora2`` and ``single_blocks.37.processor.qkv_lora``).
"""

from __future__ import annotations

import re

from loramix.adapter import LoraAdapter
from loramix.compat.facts import Verdict
from loramix.formats._keys import sample
from loramix.formats.diffusion import reading
from loramix.formats.diffusion.hunyuan import HUNYUAN_VIDEO

FLUX_BLOCKS = {"transformer_blocks": 19, "single_transformer_blocks": 38}  # the converter's range(19), range(38)
FLUX_HIDDEN = 3072  # the converter's linear1 dims: 3 × 3072 + 12288
BLOCK = re.compile(r"^transformer\.(?P<kind>single_transformer_blocks|transformer_blocks)\.(?P<i>\d+)\.")


WAN_BLOCK = tuple(f"attn{n}.{p}" for n in (1, 2) for p in ("to_q", "to_k", "to_v", "to_out.0")) + (
    "ffn.net.0.proj",
    "ffn.net.2",
)


def family_verdicts(adapter: LoraAdapter, src: str) -> list[Verdict]:
    """diffusers' and ComfyUI's verdicts on a recognised diffusion-transformer LoRA file (see the module docstring)."""
    family = adapter.provenance.get("family")
    if family is None:  # diffusers' names of several families' modules (``fits``): each reads its own
        note = ""
        if "hunyuan-video" in adapter.provenance.get("fits", []):
            note = "of Flux.1 and SD3; not of HunyuanVideo, whose diffusers names it does not map (--format comfyui)"
        return [Verdict("diffusers", "yes"), Verdict("ComfyUI", "yes", note=note)]
    if family == "flux":
        return [_diffusers(adapter, src), _comfyui(adapter, src)]
    comfy = Verdict("ComfyUI", "yes")
    if "diffusers" in adapter.provenance.get("key_style", ""):
        reason = "its key map names diffusers' transformer.… modules for Flux and SD3 only"
        comfy = Verdict("ComfyUI", "no", reason, f"loramix combine {src} -m cat --format comfyui -o OUT")
    if family == "wan":
        return [_wan_diffusers(adapter, src), comfy]
    if family == "sd3":
        return [_sd3_diffusers(adapter, src), Verdict("ComfyUI", "yes")]
    if family == "hunyuan-video":
        return _hunyuan(adapter, src)
    return [Verdict("diffusers", "yes"), comfy]


HUNYUAN_EMBEDDERS = ("time_in.mlp", "guidance_in.mlp", "txt_in.t_embedder.mlp", "txt_in.c_embedder")
IMG_QKV = re.compile(r"^transformer\.transformer_blocks\.\d+\.attn\.to_[qkv]$")  # from an img_attn_qkv
HUNYUAN_KOHYA_MISSES = (*HUNYUAN_EMBEDDERS, "_mod.linear", "modulation.linear", "mlp.fc")


def _hunyuan(adapter: LoraAdapter, src: str) -> list[Verdict]:
    style, namings = adapter.provenance.get("key_style", ""), adapter.provenance.get("namings", [])
    fix = f"loramix combine {src} -m cat --format comfyui -o OUT"
    kohya_keys = "kohya" in namings or "comfyui" in style.replace("comfyui-peft", "")
    diffusers = Verdict("diffusers", "yes")
    if kohya_keys or "diffusers-flat" in namings:
        reason = "its HunyuanVideo converter reads the original names with lora_A/lora_B keys and no alpha only"
        diffusers = Verdict("diffusers", "no", reason, fix)
    elif "original" in namings and not any(IMG_QKV.match(n) for n in adapter.modules):
        reason = "it converts HunyuanVideo's original names only in a file with an img_attn_qkv module"
        diffusers = Verdict("diffusers", "no", reason, f"loramix combine {src} -m cat --format diffusers -o OUT")
    elif "original" in namings and any(".refiner_blocks." in n and ".attn.to_" in n for n in adapter.modules):
        reason = "its converter splits the text refiner's self_attn_qkv lora_A in three too, and fails on it"
        diffusers = Verdict("diffusers", "no", reason, f"loramix combine {src} -m cat --format diffusers -o OUT")
    elif "original" in namings and "transformer.norm_out.linear" in adapter.modules:
        reason = "its converter swaps the halves of final_layer.adaLN_modulation.1's lora_A rows along with lora_B's"
        diffusers = Verdict("diffusers", "wrong", reason, f"loramix combine {src} -m cat --format diffusers -o OUT")
    if namings == ["diffusers"] or "diffusers-flat" in namings:
        return [diffusers, Verdict("ComfyUI", "no", "its key map names HunyuanVideo's original modules only", fix)]
    misses = HUNYUAN_KOHYA_MISSES if "kohya" in namings else HUNYUAN_EMBEDDERS
    originals = {n: _original(HUNYUAN_VIDEO, n) for n in adapter.modules if n.startswith("transformer.")}
    lost = sorted({o for o in originals.values() if any(m in o for m in misses)})
    if lost:
        reason = f"its key map leaves out {len(lost)} module(s) its model renames ({sample(lost)})"
        return [diffusers, Verdict("ComfyUI", "wrong", reason, fix)]
    return [diffusers, Verdict("ComfyUI", "yes")]


def _original(family, name: str) -> str:
    """The original module (path) a diffusers-named module of ``family`` belongs to."""
    rule, block, _ = reading(family, name)
    return rule.name(rule.original, block)


def _sd3_diffusers(adapter: LoraAdapter, src: str) -> Verdict:
    other = [n for n in adapter.provenance.get("namings", []) if n != "diffusers"]
    if other:
        fix = f"loramix combine {src} -m cat --format diffusers -o OUT"
        return Verdict("diffusers", "no", f"its SD3 loader converts no {' or '.join(other)} names", fix)
    return Verdict("diffusers", "yes")


def _wan_diffusers(adapter: LoraAdapter, src: str) -> Verdict:
    if "kohya" not in adapter.provenance.get("key_style", ""):
        return Verdict("diffusers", "yes")
    blocks = {int(b["i"]) for n in adapter.modules if (b := re.match(r"^transformer\.blocks\.(?P<i>\d+)\.", n))}
    missing = [
        f"blocks.{i}.{p}"
        for i in range(max(blocks, default=-1) + 1)
        for p in WAN_BLOCK
        if f"transformer.blocks.{i}.{p}" not in adapter.modules
    ]
    if missing:
        fix = f"loramix combine {src} -m cat --format comfyui -o OUT"
        reason = (
            f"its musubi-tuner converter needs every block's attention and FFN modules (missing: {sample(missing)})"
        )
        return Verdict("diffusers", "no", reason, fix)
    return Verdict("diffusers", "yes")


def _diffusers(adapter: LoraAdapter, src: str) -> Verdict:
    name, style = "diffusers", adapter.provenance.get("key_style", "")
    fix = f"loramix combine {src} -m cat --format diffusers -o OUT"
    modules = [n for n in adapter.modules if n.startswith("transformer.")]
    if "comfyui-peft" in style:
        return Verdict(name, "no", "ComfyUI names with lora_A/lora_B keys reach none of its Flux converters", fix)
    namings = adapter.provenance.get("namings", [])
    if "diffusers-flat" in namings:  # its "mixture" converter: attention is all it keys inside a block
        lost = [n for n in modules if BLOCK.match(n) and ".attn." not in n]
        if lost:
            reason = f"its converter of diffusers' flat names keys only attention inside the blocks ({sample(lost)})"
            return Verdict(name, "no", reason, fix)
    kohya_names = "kohya" in namings or "comfyui" in style
    if not kohya_names:  # diffusers' own names, flat (its "mixture" converter) or dotted, and XLabs': read whole
        return Verdict(name, "yes")
    beyond = [n for n in modules if (b := BLOCK.match(n)) and int(b["i"]) >= FLUX_BLOCKS[b["kind"]]]
    if beyond:
        return Verdict(name, "no", f"its kohya converter reads Flux.1's 19+38 blocks only ({sample(beyond)})", fix)
    wide = [
        n
        for n, m in adapter.modules.items()
        if n.startswith("transformer.single_transformer_blocks.") and n.endswith(".attn.to_q")
        if m.in_features != FLUX_HIDDEN
    ]
    if wide:
        return Verdict(
            name, "no", f"its kohya converter splits linear1 at hidden {FLUX_HIDDEN} only ({sample(wide)})", fix
        )
    top = [n for n in modules if not BLOCK.match(n)]
    if top:
        reason = f"its kohya converter drops {len(top)} module(s) outside the blocks ({sample(top)})"
        return Verdict(name, "wrong", reason, fix)
    return Verdict(name, "yes")


def _comfyui(adapter: LoraAdapter, src: str) -> Verdict:
    style = adapter.provenance.get("key_style", "")
    full_uso = {
        "transformer.transformer_blocks.18.attn.add_q_proj",
        "transformer.single_transformer_blocks.37.attn.to_q",
    }
    if "xlabs" in style and not full_uso <= set(adapter.modules):
        fix = f"loramix combine {src} -m cat --format kohya -o OUT"
        return Verdict("ComfyUI", "no", "it converts XLabs keys only in a file with every block's", fix)
    return Verdict("ComfyUI", "yes")
