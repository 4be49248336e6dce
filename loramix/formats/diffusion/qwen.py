"""Qwen-Image's module map. Its reference code is diffusers' ``QwenImageTransformer2DModel``, so the original names
are diffusers' own: musubi-tuner/kohya flatten them (``lora_unet_transformer_blocks_0_attn_to_q``), ComfyUI prefixes
them (``diffusion_model.transformer_blocks.0.attn.to_q``), as diffusers' ``_convert_non_diffusers_qwen_lora_to_
diffusers`` reads them back. Qwen-Image fuses no projection.
"""

from __future__ import annotations

from loramix.formats.diffusion.family import Family, Rule

_BLOCK = "transformer_blocks.{i}"
_MODULES = (
    *(f"{_BLOCK}.attn.{p}" for p in ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj")),
    f"{_BLOCK}.attn.to_add_out",
    *(f"{_BLOCK}.{s}_mod.1" for s in ("img", "txt")),
    *(f"{_BLOCK}.{s}_mlp.net.{p}" for s in ("img", "txt") for p in ("0.proj", "2")),
    "img_in",
    "txt_in",
    "proj_out",
    "norm_out.linear",
    "time_text_embed.timestep_embedder.linear_1",
    "time_text_embed.timestep_embedder.linear_2",
)

QWEN_IMAGE = Family(
    name="qwen-image",
    label="Qwen-Image",
    model_class="QwenImageTransformer2DModel",
    rules=tuple(Rule(name, (name,)) for name in _MODULES),
    markers=("img_mod.", "txt_mod.", "img_mlp.", "txt_mlp."),
)
