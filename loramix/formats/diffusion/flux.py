"""Flux.1's module map: Black Forest Labs' original module names (what kohya/sd-scripts, ComfyUI and XLabs name
LoRAs by) onto diffusers' ``FluxTransformer2DModel`` modules, the one identity loramix keeps.

Followed from diffusers' own converters (``diffusers/loaders/lora_conversion_utils.py``:
``_convert_kohya_flux_lora_to_diffusers``, ``_convert_xlabs_flux_lora_to_diffusers``) and its checkpoint converter
(``scripts/convert_flux_to_diffusers.py``): ``double_blocks.N.img_attn.qkv`` is ``transformer_blocks.N.attn.to_q``,
``to_k``, ``to_v`` by thirds of its rows; ``single_blocks.N.linear1`` is ``single_transformer_blocks.N.attn.to_q``,
``to_k``, ``to_v`` (hidden rows each) then ``proj_mlp`` (the rest); ``final_layer.adaLN_modulation.1`` is
``norm_out.linear`` with its shift and scale halves swapped (diffusers' ``swap_scale_shift``). Every other original
module is one diffusers module. Flux.1 [dev]/[schnell] have 19 double and 38 single blocks, hidden 3072 and an MLP
of 4·hidden; the map itself takes the sizes from the LoRA's shapes.
"""

from __future__ import annotations

from loramix.formats.diffusion.family import Family, Rule

_DOUBLE = "double_blocks.{i}"
_JOINT = "transformer_blocks.{i}"
_SINGLE_BFL = "single_blocks.{i}"
_SINGLE = "single_transformer_blocks.{i}"

RULES = (
    Rule(f"{_DOUBLE}.img_attn.qkv", tuple(f"{_JOINT}.attn.to_{x}" for x in "qkv"), "thirds"),
    Rule(f"{_DOUBLE}.img_attn.proj", (f"{_JOINT}.attn.to_out.0",)),
    Rule(f"{_DOUBLE}.img_mlp.0", (f"{_JOINT}.ff.net.0.proj",)),
    Rule(f"{_DOUBLE}.img_mlp.2", (f"{_JOINT}.ff.net.2",)),
    Rule(f"{_DOUBLE}.img_mod.lin", (f"{_JOINT}.norm1.linear",)),
    Rule(f"{_DOUBLE}.txt_attn.qkv", tuple(f"{_JOINT}.attn.add_{x}_proj" for x in "qkv"), "thirds"),
    Rule(f"{_DOUBLE}.txt_attn.proj", (f"{_JOINT}.attn.to_add_out",)),
    Rule(f"{_DOUBLE}.txt_mlp.0", (f"{_JOINT}.ff_context.net.0.proj",)),
    Rule(f"{_DOUBLE}.txt_mlp.2", (f"{_JOINT}.ff_context.net.2",)),
    Rule(f"{_DOUBLE}.txt_mod.lin", (f"{_JOINT}.norm1_context.linear",)),
    Rule(f"{_SINGLE_BFL}.linear1", (*(f"{_SINGLE}.attn.to_{x}" for x in "qkv"), f"{_SINGLE}.proj_mlp"), "qkv_rest"),
    Rule(f"{_SINGLE_BFL}.linear2", (f"{_SINGLE}.proj_out",)),
    Rule(f"{_SINGLE_BFL}.modulation.lin", (f"{_SINGLE}.norm.linear",)),
    Rule("img_in", ("x_embedder",)),
    Rule("txt_in", ("context_embedder",)),
    Rule("time_in.in_layer", ("time_text_embed.timestep_embedder.linear_1",)),
    Rule("time_in.out_layer", ("time_text_embed.timestep_embedder.linear_2",)),
    Rule("vector_in.in_layer", ("time_text_embed.text_embedder.linear_1",)),
    Rule("vector_in.out_layer", ("time_text_embed.text_embedder.linear_2",)),
    Rule("guidance_in.in_layer", ("time_text_embed.guidance_embedder.linear_1",)),
    Rule("guidance_in.out_layer", ("time_text_embed.guidance_embedder.linear_2",)),
    Rule("final_layer.linear", ("proj_out",)),
    Rule("final_layer.adaLN_modulation.1", ("norm_out.linear",), "swap"),
)

FLUX = Family(
    name="flux",
    label="Flux.1",
    model_class="FluxTransformer2DModel",
    rules=RULES,
    # names only Flux has among the families loramix knows (SD3's joint blocks share transformer_blocks.N.attn.*)
    markers=("double_blocks.", "single_blocks.", "single_transformer_blocks.", "guidance_embedder", "img_attn"),
    mlp_ratio=4,
)
