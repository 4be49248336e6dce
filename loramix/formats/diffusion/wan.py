"""Wan 2.x's module map: the original Wan code's module names (what musubi-tuner's ``lora_unet_blocks_0_self_attn_q``
and ComfyUI's ``diffusion_model.blocks.0.self_attn.q`` name LoRAs by) onto diffusers' ``WanTransformer3DModel``.

Followed from diffusers' converters (``diffusers/loaders/lora_conversion_utils.py``:
``_convert_non_diffusers_wan_lora_to_diffusers``, ``_convert_musubi_wan_lora_to_diffusers``): self-attention
``q``/``k``/``v``/``o`` is ``attn1.to_q``/``to_k``/``to_v``/``to_out.0``, cross-attention the same on ``attn2`` (with
the image-to-video ``k_img``/``v_img`` as ``add_k_proj``/``add_v_proj``), ``ffn.0``/``ffn.2`` is
``ffn.net.0.proj``/``ffn.net.2``; outside the blocks ``head.head`` is ``proj_out`` and the embedders are
``condition_embedder``'s. Wan fuses no projection: every original module is one diffusers module.
"""

from __future__ import annotations

from loramix.formats.diffusion.family import Family, Rule

_ATTN = {"q": "to_q", "k": "to_k", "v": "to_v", "o": "to_out.0"}
RULES = (
    *(Rule(f"blocks.{{i}}.self_attn.{o}", (f"blocks.{{i}}.attn1.{d}",)) for o, d in _ATTN.items()),
    *(Rule(f"blocks.{{i}}.cross_attn.{o}", (f"blocks.{{i}}.attn2.{d}",)) for o, d in _ATTN.items()),
    Rule("blocks.{i}.cross_attn.k_img", ("blocks.{i}.attn2.add_k_proj",)),
    Rule("blocks.{i}.cross_attn.v_img", ("blocks.{i}.attn2.add_v_proj",)),
    Rule("blocks.{i}.ffn.0", ("blocks.{i}.ffn.net.0.proj",)),
    Rule("blocks.{i}.ffn.2", ("blocks.{i}.ffn.net.2",)),
    Rule("head.head", ("proj_out",)),
    Rule("time_projection.1", ("condition_embedder.time_proj",)),
    Rule("text_embedding.0", ("condition_embedder.text_embedder.linear_1",)),
    Rule("text_embedding.2", ("condition_embedder.text_embedder.linear_2",)),
    Rule("time_embedding.0", ("condition_embedder.time_embedder.linear_1",)),
    Rule("time_embedding.2", ("condition_embedder.time_embedder.linear_2",)),
    Rule("img_emb.proj.1", ("condition_embedder.image_embedder.ff.net.0.proj",)),
    Rule("img_emb.proj.3", ("condition_embedder.image_embedder.ff.net.2",)),
)

WAN = Family(
    name="wan",
    label="Wan 2.x",
    model_class="WanTransformer3DModel",
    rules=RULES,
    markers=("self_attn", "cross_attn", ".attn1.", ".attn2.", "ffn.", "condition_embedder"),
)
