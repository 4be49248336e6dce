"""HunyuanVideo's module map: Tencent's original module names (what musubi-tuner's
``lora_unet_double_blocks_0_img_attn_qkv`` and diffusion-pipe's ``diffusion_model.double_blocks.0.img_attn_qkv``
name LoRAs by) onto diffusers' ``HunyuanVideoTransformer3DModel`` modules.

Followed from diffusers' converter (``loaders/lora_conversion_utils.py``,
``_convert_hunyuan_video_lora_to_diffusers``): a double block's ``img_attn_qkv``/``txt_attn_qkv`` is ``attn.to_q``,
``to_k``, ``to_v`` / ``add_q_proj``, ``add_k_proj``, ``add_v_proj`` by thirds of its rows; a single block's
``linear1`` is ``attn.to_q``, ``to_k``, ``to_v`` (hidden rows each) then ``proj_mlp``; the text refiner's
``self_attn_qkv`` is its ``attn.to_q``, ``to_k``, ``to_v``; ``final_layer.adaLN_modulation.1`` is ``norm_out.linear``
with its shift and scale halves swapped. HunyuanVideo has hidden 3072 and an MLP of 4·hidden; diffusers' names of
its blocks are Flux.1's, so a LoRA on those alone is told apart only by an original name or a module only
HunyuanVideo has (the text refiner).
"""

from __future__ import annotations

from loramix.formats.diffusion.family import Family, Rule

_D, _B = "double_blocks.{i}", "transformer_blocks.{i}"
_S, _ST = "single_blocks.{i}", "single_transformer_blocks.{i}"
_R = "txt_in.individual_token_refiner.blocks.{i}"
_RT = "context_embedder.token_refiner.refiner_blocks.{i}"

RULES = (
    Rule(f"{_D}.img_attn_qkv", tuple(f"{_B}.attn.to_{x}" for x in "qkv"), "thirds"),
    Rule(f"{_D}.img_attn_proj", (f"{_B}.attn.to_out.0",)),
    Rule(f"{_D}.img_mod.linear", (f"{_B}.norm1.linear",)),
    Rule(f"{_D}.img_mlp.fc1", (f"{_B}.ff.net.0.proj",)),
    Rule(f"{_D}.img_mlp.fc2", (f"{_B}.ff.net.2",)),
    Rule(f"{_D}.txt_attn_qkv", tuple(f"{_B}.attn.add_{x}_proj" for x in "qkv"), "thirds"),
    Rule(f"{_D}.txt_attn_proj", (f"{_B}.attn.to_add_out",)),
    Rule(f"{_D}.txt_mod.linear", (f"{_B}.norm1_context.linear",)),
    Rule(f"{_D}.txt_mlp.fc1", (f"{_B}.ff_context.net.0.proj",)),
    Rule(f"{_D}.txt_mlp.fc2", (f"{_B}.ff_context.net.2",)),
    Rule(f"{_S}.linear1", (*(f"{_ST}.attn.to_{x}" for x in "qkv"), f"{_ST}.proj_mlp"), "qkv_rest"),
    Rule(f"{_S}.linear2", (f"{_ST}.proj_out",)),
    Rule(f"{_S}.modulation.linear", (f"{_ST}.norm.linear",)),
    Rule(f"{_R}.self_attn_qkv", tuple(f"{_RT}.attn.to_{x}" for x in "qkv"), "thirds"),
    Rule(f"{_R}.self_attn_proj", (f"{_RT}.attn.to_out.0",)),
    Rule(f"{_R}.mlp.fc1", (f"{_RT}.ff.net.0.proj",)),
    Rule(f"{_R}.mlp.fc2", (f"{_RT}.ff.net.2",)),
    Rule(f"{_R}.adaLN_modulation.1", (f"{_RT}.norm_out.linear",)),
    Rule("txt_in.input_embedder", ("context_embedder.proj_in",)),
    Rule("txt_in.t_embedder.mlp.0", ("context_embedder.time_text_embed.timestep_embedder.linear_1",)),
    Rule("txt_in.t_embedder.mlp.2", ("context_embedder.time_text_embed.timestep_embedder.linear_2",)),
    Rule("txt_in.c_embedder.linear_1", ("context_embedder.time_text_embed.text_embedder.linear_1",)),
    Rule("txt_in.c_embedder.linear_2", ("context_embedder.time_text_embed.text_embedder.linear_2",)),
    Rule("time_in.mlp.0", ("time_text_embed.timestep_embedder.linear_1",)),
    Rule("time_in.mlp.2", ("time_text_embed.timestep_embedder.linear_2",)),
    Rule("vector_in.in_layer", ("time_text_embed.text_embedder.linear_1",)),
    Rule("vector_in.out_layer", ("time_text_embed.text_embedder.linear_2",)),
    Rule("guidance_in.mlp.0", ("time_text_embed.guidance_embedder.linear_1",)),
    Rule("guidance_in.mlp.2", ("time_text_embed.guidance_embedder.linear_2",)),
    Rule("final_layer.linear", ("proj_out",)),
    Rule("final_layer.adaLN_modulation.1", ("norm_out.linear",), "swap"),
)

HUNYUAN_VIDEO = Family(
    name="hunyuan-video",
    label="HunyuanVideo",
    model_class="HunyuanVideoTransformer3DModel",
    rules=RULES,
    # names only HunyuanVideo has among the families loramix knows
    markers=("_attn_qkv", "_attn_proj", "_mod.linear", "mlp.fc", "modulation.linear", "txt_in.", "token_refiner"),
    mlp_ratio=4,
)
