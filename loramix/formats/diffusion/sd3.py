"""Stable Diffusion 3 / 3.5's module map: Stability AI's original MMDiT module names (what kohya/sd-scripts'
``lora_unet_joint_blocks_0_x_block_attn_qkv`` and ComfyUI's ``diffusion_model.joint_blocks.0.x_block.attn.qkv`` name
LoRAs by) onto diffusers' ``SD3Transformer2DModel`` modules.

Followed from diffusers' checkpoint converter (``loaders/single_file_utils.py``,
``convert_sd3_transformer_checkpoint_to_diffusers``) and ComfyUI's inverse map (``comfy/utils.py``,
``mmdit_to_diffusers``): a joint block's ``x_block.attn.qkv`` is ``transformer_blocks.N.attn.to_q``, ``to_k``,
``to_v`` by thirds of its rows, ``context_block.attn.qkv`` is ``add_q_proj``, ``add_k_proj``, ``add_v_proj``, and
SD3.5 Medium's second attention ``x_block.attn2.qkv`` is ``attn2.to_q``, ``to_k``, ``to_v``; the last block's
``context_block.adaLN_modulation.1`` (2·hidden rows: shift and scale of an ``AdaLayerNormContinuous``, where the other
blocks have 6·hidden) and ``final_layer.adaLN_modulation.1`` are ``norm1_context.linear`` and ``norm_out.linear``
with their halves swapped (diffusers' ``swap_scale_shift``). ``x_embedder.proj`` (``pos_embed.proj``) is a conv.
diffusers has no converter for these names: its SD3 loader reads diffusers' own (``transformer.…``) only.
"""

from __future__ import annotations

from loramix.formats.diffusion.family import Family, Rule

_X = "joint_blocks.{i}.x_block"
_C = "joint_blocks.{i}.context_block"
_B = "transformer_blocks.{i}"

RULES = (
    Rule(f"{_X}.attn.qkv", tuple(f"{_B}.attn.to_{x}" for x in "qkv"), "thirds"),
    Rule(f"{_X}.attn.proj", (f"{_B}.attn.to_out.0",)),
    Rule(f"{_X}.attn2.qkv", tuple(f"{_B}.attn2.to_{x}" for x in "qkv"), "thirds"),
    Rule(f"{_X}.attn2.proj", (f"{_B}.attn2.to_out.0",)),
    Rule(f"{_X}.mlp.fc1", (f"{_B}.ff.net.0.proj",)),
    Rule(f"{_X}.mlp.fc2", (f"{_B}.ff.net.2",)),
    Rule(f"{_X}.adaLN_modulation.1", (f"{_B}.norm1.linear",)),
    Rule(f"{_C}.attn.qkv", tuple(f"{_B}.attn.add_{x}_proj" for x in "qkv"), "thirds"),
    Rule(f"{_C}.attn.proj", (f"{_B}.attn.to_add_out",)),
    Rule(f"{_C}.mlp.fc1", (f"{_B}.ff_context.net.0.proj",)),
    Rule(f"{_C}.mlp.fc2", (f"{_B}.ff_context.net.2",)),
    Rule(f"{_C}.adaLN_modulation.1", (f"{_B}.norm1_context.linear",), "swap_last"),
    Rule("x_embedder.proj", ("pos_embed.proj",)),
    Rule("context_embedder", ("context_embedder",)),
    Rule("t_embedder.mlp.0", ("time_text_embed.timestep_embedder.linear_1",)),
    Rule("t_embedder.mlp.2", ("time_text_embed.timestep_embedder.linear_2",)),
    Rule("y_embedder.mlp.0", ("time_text_embed.text_embedder.linear_1",)),
    Rule("y_embedder.mlp.2", ("time_text_embed.text_embedder.linear_2",)),
    Rule("final_layer.linear", ("proj_out",)),
    Rule("final_layer.adaLN_modulation.1", ("norm_out.linear",), "swap"),
)

SD3 = Family(
    name="sd3",
    label="SD3/SD3.5",
    model_class="SD3Transformer2DModel",
    rules=RULES,
    # names only SD3 has among the families loramix knows (its diffusers block names are Flux's double blocks')
    markers=("joint_blocks.", "x_block", "context_block", ".attn2.", "pos_embed.proj"),
)
