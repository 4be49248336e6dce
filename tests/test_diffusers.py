"""diffusers pipelines as bases (`merge_into_base` / `--merge-into` on a pipeline folder), kohya names found again in
a transformers base, PEFT → kohya names for SD's text encoder, and `extract` from two pipelines (one kohya file that
diffusers loads and loramix merges back).

Oracle: diffusers' own ``load_lora_weights`` + ``fuse_lora`` (+ ``unload_lora_weights``, which keeps the fused
weights) on the same tiny pipeline, and PEFT's ``merge_and_unload`` for a transformers base. Tolerances: a float32
merge equals the oracle to float32 rounding (rtol 1e-5, atol 1e-6: ΔW is formed in a different order); a bf16 merge is
within one bf16 ulp of the oracle's float32 result and equals its rounding almost everywhere (`assert_bf16_close`).
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from loramix import load_adapter, merge_into_base, save_adapter
from loramix.errors import CheckpointError
from loramix.io.diffusers import sgm_to_diffusers
from loramix.linalg import RankRule
from tests.helpers import assert_bf16_close, make_peft_adapter, tiny_llama

diffusers = pytest.importorskip("diffusers")
peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

UNET = dict(
    block_out_channels=(8, 16),
    layers_per_block=1,
    sample_size=8,
    in_channels=4,
    out_channels=4,
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=16,
    attention_head_dim=2,
    norm_num_groups=4,
)
CLIP = dict(
    hidden_size=16,
    intermediate_size=32,
    num_attention_heads=2,
    num_hidden_layers=2,
    vocab_size=100,
    max_position_embeddings=16,
    projection_dim=16,
)
# kohya module (name → (out, in, kernel)): linear, 3×3 conv, 1×1 conv (proj_in, conv_shortcut), text attention and
# MLP. diffusers 0.42 reads a text encoder's kohya attention modules only when out_proj is among them (it tells its
# key styles apart by "to_out_lora"), as in every kohya file (kohya targets q, k, v, out_proj, fc1, fc2).
KOHYA_MODULES = {
    "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q": (8, 8, ()),
    "lora_unet_down_blocks_0_attentions_0_proj_in": (8, 8, (1, 1)),
    "lora_unet_down_blocks_0_resnets_0_conv1": (8, 8, (3, 3)),
    "lora_unet_down_blocks_1_resnets_0_conv_shortcut": (16, 8, (1, 1)),
    "lora_unet_mid_block_attentions_0_transformer_blocks_0_ff_net_0_proj": (128, 16, ()),
    "lora_unet_up_blocks_1_attentions_0_transformer_blocks_0_attn2_to_k": (8, 16, ()),
    "lora_te_text_model_encoder_layers_0_self_attn_q_proj": (16, 16, ()),
    "lora_te_text_model_encoder_layers_0_self_attn_out_proj": (16, 16, ()),
    "lora_te_text_model_encoder_layers_1_mlp_fc1": (32, 16, ()),
}


def _components(seed: int = 0):
    torch.manual_seed(seed)
    unet = diffusers.UNet2DConditionModel(**UNET)
    text_encoder = transformers.CLIPTextModel(transformers.CLIPTextConfig(**CLIP))
    return unet.eval(), text_encoder.eval()


def _pipeline(unet, text_encoder):
    return diffusers.StableDiffusionPipeline(
        vae=None,
        text_encoder=text_encoder,
        tokenizer=None,
        unet=unet,
        scheduler=diffusers.DDIMScheduler(),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


@pytest.fixture(scope="module")
def pipe_folder(tmp_path_factory) -> Path:
    """A tiny SD pipeline saved as diffusers does; the UNet in several shards, the text encoder in one file."""
    folder = tmp_path_factory.mktemp("pipe") / "sd"
    unet, text_encoder = _components()
    _pipeline(unet, text_encoder).save_pretrained(str(folder))
    for stale in (folder / "unet").glob("diffusion_pytorch_model*"):
        stale.unlink()
    unet.save_pretrained(str(folder / "unet"), max_shard_size="40KB")
    return folder


def _fused(pipe_folder: Path, lora: Path | dict) -> dict[str, dict[str, torch.Tensor]]:
    """diffusers' own merge: load_lora_weights + fuse_lora, then the LoRA layers unloaded (weights stay fused)."""
    unet = diffusers.UNet2DConditionModel.from_pretrained(str(pipe_folder / "unet"))
    text_encoder = transformers.CLIPTextModel.from_pretrained(str(pipe_folder / "text_encoder"))
    pipe = _pipeline(unet, text_encoder)
    pipe.load_lora_weights(dict(lora) if isinstance(lora, dict) else str(lora))
    pipe.fuse_lora(lora_scale=1.0)
    pipe.unload_lora_weights()
    return {"unet": pipe.unet.state_dict(), "text_encoder": pipe.text_encoder.state_dict()}


def _read_component(folder: Path) -> dict[str, torch.Tensor]:
    tensors = {}
    for file in sorted(folder.glob("*.safetensors")):
        with safe_open(str(file), "pt") as f:
            tensors.update({k: f.get_tensor(k) for k in f.keys()})
    return tensors


def _kohya_file(path: Path, seed: int = 5, network_dim: int | None = None) -> Path:
    """A kohya file of `KOHYA_MODULES`; ranks 2–4 by module, or ``network_dim`` for all (as kohya trains)."""
    gen = torch.Generator().manual_seed(seed)
    tensors = {}
    for i, (name, (out, inp, kernel)) in enumerate(KOHYA_MODULES.items()):
        rank = network_dim or 2 + i % 3
        tensors[f"{name}.lora_down.weight"] = 0.3 * torch.randn(rank, inp, *kernel, generator=gen)
        tensors[f"{name}.lora_up.weight"] = 0.3 * torch.randn(out, rank, *((1, 1) if kernel else ()), generator=gen)
        # one alpha for every module, as kohya writes (network_alpha): scale alpha/rank ≠ 1 and different per module.
        # Per-module alphas are not compared: diffusers 0.42 keys the alpha_pattern of attention and text-encoder MLP
        # modules by its old processor names, which PEFT then ignores (it warns); loramix applies alpha/rank per module.
        tensors[f"{name}.alpha"] = torch.tensor(3.0)
    save_file(tensors, str(path))
    return path


def _check(out: Path, fused: dict, changed: set[str], *, dtype: torch.dtype) -> None:
    for component, reference in fused.items():
        ours = _read_component(out / component)
        assert set(ours) == set(reference), component
        for name, tensor in ours.items():
            if component not in changed:  # copied as it was
                torch.testing.assert_close(tensor, reference[name], rtol=0, atol=0)
            elif dtype == torch.float32:
                torch.testing.assert_close(tensor, reference[name], rtol=1e-5, atol=1e-6, msg=f"{component}.{name}")
            else:
                assert_bf16_close(tensor, reference[name], f"{component}.{name}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kohya_file_merged_into_pipeline_equals_diffusers_fuse(tmp_path, pipe_folder, dtype):
    lora = _kohya_file(tmp_path / "kohya.safetensors")
    report = merge_into_base(str(lora), pipe_folder, tmp_path / "out", dtype=dtype)
    fused = _fused(pipe_folder, load_file(str(lora)))
    out = tmp_path / "out"
    _check(out, fused, {"unet", "text_encoder"}, dtype=dtype)
    base = fused["unet"]["down_blocks.0.resnets.0.conv1.weight"]
    assert not torch.equal(base, _read_component(pipe_folder / "unet")["down_blocks.0.resnets.0.conv1.weight"])
    # the same layout: shard files and index of the UNet as the original, every other file copied
    assert sorted(p.name for p in (out / "unet").iterdir()) == sorted(p.name for p in (pipe_folder / "unet").iterdir())
    index = json.loads((out / "unet" / "diffusion_pytorch_model.safetensors.index.json").read_text())
    original = json.loads((pipe_folder / "unet" / "diffusion_pytorch_model.safetensors.index.json").read_text())
    assert index["weight_map"] == original["weight_map"]
    assert (out / "model_index.json").read_bytes() == (pipe_folder / "model_index.json").read_bytes()
    assert (out / "unet" / "config.json").read_bytes() == (pipe_folder / "unet" / "config.json").read_bytes()
    assert (out / "scheduler" / "scheduler_config.json").is_file()
    assert "unet.down_blocks.0.resnets.0.conv1" in report.survival and len(report.survival) == len(KOHYA_MODULES)
    # diffusers loads the merged pipeline as it stands
    loaded = diffusers.UNet2DConditionModel.from_pretrained(str(out / "unet"), torch_dtype=dtype)
    assert loaded.down_blocks[0].resnets[0].conv1.weight.dtype == dtype


def test_diffusers_named_file_merged_into_pipeline_equals_diffusers_fuse(tmp_path, pipe_folder):
    """A diffusers LoRA (PEFT lora_A/lora_B under unet./text_encoder., saved by diffusers' save_lora_weights with each
    component's LoraConfig in the metadata: lora_alpha ≠ r, rank and alpha patterns), convs included."""
    unet, text_encoder = _components()
    torch.manual_seed(3)
    unet_config = peft.LoraConfig(
        r=4,
        lora_alpha=8,
        rank_pattern={"conv1": 2},
        alpha_pattern={"proj_in": 2},
        init_lora_weights=False,
        target_modules=["to_q", "conv1", "proj_in", "conv_shortcut"],
    )
    te_config = peft.LoraConfig(
        r=2, lora_alpha=6, init_lora_weights=False, target_modules=["q_proj", "k_proj", "v_proj", "out_proj"]
    )
    unet = peft.inject_adapter_in_model(unet_config, unet)
    text_encoder = peft.inject_adapter_in_model(te_config, text_encoder)
    diffusers.StableDiffusionPipeline.save_lora_weights(
        str(tmp_path / "lora"),
        unet_lora_layers=peft.get_peft_model_state_dict(unet),
        text_encoder_lora_layers=peft.get_peft_model_state_dict(text_encoder),
        unet_lora_adapter_metadata=unet_config.to_dict(),
        text_encoder_lora_adapter_metadata=te_config.to_dict(),
    )
    file = tmp_path / "lora" / "pytorch_lora_weights.safetensors"
    assert any(k.startswith("unet.") and ".lora_A." in k for k in load_file(str(file)))
    scales = {n: m.scale for n, m in load_adapter(str(file)).modules.items()}
    assert scales["unet.down_blocks.0.resnets.0.conv1"] == 4.0 and scales["unet.mid_block.attentions.0.proj_in"] == 0.5
    assert scales["text_encoder.encoder.layers.0.self_attn.q_proj"] == 3.0
    merge_into_base(str(file), pipe_folder, tmp_path / "out", dtype=torch.float32)
    _check(tmp_path / "out", _fused(pipe_folder, file), {"unet", "text_encoder"}, dtype=torch.float32)


def test_kohya_inputs_combine_by_default_into_a_kohya_file_diffusers_loads(tmp_path, pipe_folder):
    """Two SD kohya files combined with no --format give the file diffusers reads (not a PEFT folder of kohya names);
    oracle: diffusers' load_lora_weights + fuse_lora of the output equals the sum of each input's fused ΔW (float32
    rounding: rtol 1e-5, atol 1e-5). One network_dim per file, as kohya trains: diffusers 0.42 misreads per-module
    alphas of attention modules (see `_kohya_file`), in the inputs as in any output."""
    from click.testing import CliRunner

    from loramix.cli import main

    style = _kohya_file(tmp_path / "style.safetensors", seed=5, network_dim=4)
    detail = _kohya_file(tmp_path / "detail.safetensors", seed=6, network_dim=4)
    out = tmp_path / "out"
    result = CliRunner().invoke(main, ["combine", str(style), str(detail), "-m", "cat", "-w", "1,1", "-o", str(out)])
    assert result.exit_code == 0, result.output
    assert "(kohya format)" in result.output
    assert not (out / "adapter_config.json").exists() and (out / "out.safetensors").is_file()
    state, alphas = diffusers.StableDiffusionPipeline.lora_state_dict(str(out / "out.safetensors"))
    assert state and alphas is not None
    base = {
        "unet": _read_component(pipe_folder / "unet"),
        "text_encoder": _read_component(pipe_folder / "text_encoder"),
    }
    ours, one, two = (_fused(pipe_folder, path) for path in (out / "out.safetensors", style, detail))
    for component, tensors in ours.items():
        for name, tensor in tensors.items():
            expected = one[component][name] + two[component][name] - base[component][name]
            torch.testing.assert_close(tensor, expected, rtol=1e-5, atol=1e-5, msg=f"{component}.{name}")
    assert "\nformat: kohya\n" in (out / "loramix_recipe.yaml").read_text()


def test_untouched_component_is_copied_as_it_was(tmp_path, pipe_folder):
    file = tmp_path / "unet-only.safetensors"
    name = "lora_unet_down_blocks_0_resnets_0_conv1"
    save_file(
        {f"{name}.lora_down.weight": torch.ones(1, 8, 3, 3), f"{name}.lora_up.weight": torch.ones(8, 1, 1, 1)},
        str(file),
    )
    merge_into_base(str(file), pipe_folder, tmp_path / "out")
    for part in ("text_encoder/model.safetensors", "text_encoder/config.json"):
        assert (tmp_path / "out" / part).read_bytes() == (pipe_folder / part).read_bytes()


def test_pipeline_name_errors_are_one_line(tmp_path, pipe_folder):
    save_file(
        {
            "lora_unet_no_such_block.lora_down.weight": torch.ones(1, 8),
            "lora_unet_no_such_block.lora_up.weight": torch.ones(8, 1),
        },
        str(tmp_path / "bad.safetensors"),
    )
    with pytest.raises(CheckpointError, match="kohya module lora_unet_no_such_block matches no module of unet"):
        merge_into_base(str(tmp_path / "bad.safetensors"), pipe_folder, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_sgm_names_map_to_diffusers_blocks():
    """kohya's SDXL names (Stability's UNet blocks) → diffusers' paths, checked against diffusers' own mapping for the
    SDXL layout (layers_per_block 2; down blocks without attention first, up blocks without attention last)."""
    config = {
        "layers_per_block": 2,
        "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
        "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    }
    cases = {
        "input_blocks_4_1_transformer_blocks_0_ff_net_2": "down_blocks_1_attentions_0_transformer_blocks_0_ff_net_2",
        "input_blocks_7_1_proj_in": "down_blocks_2_attentions_0_proj_in",
        "input_blocks_1_0_in_layers_2": "down_blocks_0_resnets_0_conv1",
        "input_blocks_3_0_op": "down_blocks_0_downsamplers_0_conv",
        "input_blocks_4_0_skip_connection": "down_blocks_1_resnets_0_conv_shortcut",
        "middle_block_1_proj_in": "mid_block_attentions_0_proj_in",
        "middle_block_2_emb_layers_1": "mid_block_resnets_1_time_emb_proj",
        "output_blocks_2_2_conv": "up_blocks_0_upsamplers_0_conv",
        "output_blocks_5_1_proj_out": "up_blocks_1_attentions_2_proj_out",
        "output_blocks_8_0_out_layers_3": "up_blocks_2_resnets_2_conv2",
        "time_embed_0": "time_embedding_linear_1",
        "label_emb_0_2": "add_embedding_linear_2",
        "input_blocks_0_0": "conv_in",
        "out_2": "conv_out",
    }
    for sgm, expected in cases.items():
        assert sgm_to_diffusers(sgm, config) == expected, sgm
        # diffusers' own converter agrees (its dotted names, with its attention-processor spelling removed)
        state = {
            f"lora_unet_{sgm}.lora_down.weight": torch.zeros(1, 1),
            f"lora_unet_{sgm}.lora_up.weight": torch.zeros(1, 1),
        }
        from diffusers.loaders.lora_conversion_utils import (
            _convert_non_diffusers_lora_to_diffusers,
            _maybe_map_sgm_blocks_to_diffusers,
        )

        unet_config = type("Config", (), config)
        mapped, _ = _convert_non_diffusers_lora_to_diffusers(_maybe_map_sgm_blocks_to_diffusers(state, unet_config))
        theirs = re.sub(r"[._]lora\.down\.weight$", "", next(iter(mapped)).removeprefix("unet.")).replace(
            ".processor", ""
        )
        assert theirs.replace(".", "_") == expected, sgm


def test_sgm_named_kohya_file_merges_like_its_diffusers_names(tmp_path, pipe_folder):
    """The same factors under kohya's SDXL (Stability block) names and under diffusers' paths give the same pipeline
    (the diffusers-path kohya names are checked against diffusers' fuse above); the tiny UNet has one layer per block,
    an attention-free first up block with an upsampler."""
    pairs = {
        "input_blocks_1_1_proj_in": ("down_blocks_0_attentions_0_proj_in", (8, 8, (1, 1))),
        "input_blocks_2_0_op": ("down_blocks_0_downsamplers_0_conv", (8, 8, (3, 3))),
        "middle_block_1_transformer_blocks_0_attn1_to_q": (
            "mid_block_attentions_0_transformer_blocks_0_attn1_to_q",
            (16, 16, ()),
        ),
        "output_blocks_1_0_in_layers_2": ("up_blocks_0_resnets_1_conv1", (16, 24, (3, 3))),
        "output_blocks_1_1_conv": ("up_blocks_0_upsamplers_0_conv", (16, 16, (3, 3))),
        "output_blocks_3_1_proj_out": ("up_blocks_1_attentions_1_proj_out", (8, 8, (1, 1))),
    }
    gen = torch.Generator().manual_seed(9)
    sgm, plain = {}, {}
    for old, (new, (out, inp, kernel)) in pairs.items():
        down = torch.randn(2, inp, *kernel, generator=gen)
        up = torch.randn(out, 2, *((1, 1) if kernel else ()), generator=gen)
        for tensors, name in ((sgm, f"lora_unet_{old}"), (plain, f"lora_unet_{new}")):
            tensors |= {f"{name}.lora_down.weight": down, f"{name}.lora_up.weight": up}
    for label, tensors in (("sgm", sgm), ("plain", plain)):
        save_file(tensors, str(tmp_path / f"{label}.safetensors"))
        merge_into_base(str(tmp_path / f"{label}.safetensors"), pipe_folder, tmp_path / label, dtype=torch.float32)
    ours, reference = _read_component(tmp_path / "sgm" / "unet"), _read_component(tmp_path / "plain" / "unet")
    assert all(torch.equal(ours[k], reference[k]) for k in reference)
    assert not torch.equal(
        reference["up_blocks.0.upsamplers.0.conv.weight"],
        _read_component(pipe_folder / "unet")["up_blocks.0.upsamplers.0.conv.weight"],
    )


def test_kohya_lora_of_a_transformers_model_merges_into_its_checkpoint(tmp_path):
    """A kohya file of a Llama model (written by loramix from a PEFT adapter) finds the checkpoint's dotted names
    again; the merge equals PEFT's merge_and_unload of the PEFT adapter."""
    made = make_peft_adapter(tiny_llama, tmp_path, "peft", target_modules=["q_proj", "v_proj", "down_proj"])
    kohya = save_adapter(str(made.path), tmp_path / "kohya", format="kohya")
    keys = set(load_file(str(kohya / "kohya.safetensors")))
    assert "lora_model_layers_0_self_attn_q_proj.lora_down.weight" in keys
    base = tmp_path / "base"
    tiny_llama().save_pretrained(str(base), max_shard_size="20KB")
    report = merge_into_base(str(kohya / "kohya.safetensors"), base, tmp_path / "out", dtype="bfloat16")
    assert "model.layers.0.self_attn.q_proj" in report.survival
    merged = made.load_with_peft().merge_and_unload().state_dict()
    ours = {}
    for file in (tmp_path / "out").glob("*.safetensors"):
        ours |= load_file(str(file))
    assert set(ours) <= set(merged) and "model.layers.1.mlp.down_proj.weight" in ours
    for name, tensor in ours.items():
        assert_bf16_close(tensor, merged[name], name)


def test_kohya_names_unmatched_or_ambiguous_are_one_line_errors(tmp_path):
    base = tmp_path / "base"
    base.mkdir()
    (base / "config.json").write_text(json.dumps({"model_type": "toy"}))
    save_file({"a.b_c.weight": torch.zeros(2, 2), "a_b.c.weight": torch.zeros(2, 2)}, str(base / "model.safetensors"))
    for name, message in (("lora_a_b_c", "fits several base modules"), ("lora_x_y", "matches no module of base")):
        tensors = {f"{name}.lora_down.weight": torch.ones(1, 2), f"{name}.lora_up.weight": torch.ones(2, 1)}
        save_file(tensors, str(tmp_path / f"{name}.safetensors"))
        with pytest.raises(CheckpointError, match=message) as caught:
            merge_into_base(str(tmp_path / f"{name}.safetensors"), base, tmp_path / "out")
        assert "\n" not in str(caught.value)


def test_peft_text_encoder_written_as_kohya_loads_in_diffusers(tmp_path, pipe_folder):
    """A PEFT adapter of SD's CLIP text encoder, written with --format kohya, has kohya/A1111's names, and diffusers'
    load_lora_weights of that file on the pipeline reproduces PEFT's ΔW on the text encoder."""

    def clip():
        return transformers.CLIPTextModel.from_pretrained(str(pipe_folder / "text_encoder")).eval()

    made = make_peft_adapter(clip, tmp_path, "te", target_modules=["q_proj", "out_proj", "fc1"], r=4, lora_alpha=8)
    out = save_adapter(str(made.path), tmp_path / "te-kohya", format="kohya")
    keys = set(load_file(str(out / "te-kohya.safetensors")))
    assert "lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight" in keys
    assert "lora_te_text_model_encoder_layers_1_mlp_fc1.alpha" in keys
    fused = _fused(pipe_folder, out / "te-kohya.safetensors")["text_encoder"]
    merged = made.load_with_peft().merge_and_unload().state_dict()
    assert set(fused) == set(merged)
    for name, tensor in fused.items():
        torch.testing.assert_close(tensor, merged[name], rtol=1e-5, atol=1e-6, msg=name)
    assert len(load_adapter(str(out)).modules) == 6  # 3 kinds × 2 layers


# planted rank-2 updates (module → kind): UNet linear, 3×3 conv, 1×1 convs; the text encoder's attention projections
# (diffusers reads a text encoder's kohya attention LoRA only with out_proj among its modules, see KOHYA_MODULES)
PLANTED = {
    "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q": "linear",
    "unet.up_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k": "linear",
    "unet.down_blocks.0.resnets.0.conv1": "conv 3×3",
    "unet.down_blocks.0.attentions.0.proj_in": "conv 1×1",
    "unet.down_blocks.1.resnets.0.conv_shortcut": "conv 1×1",
    "text_encoder.encoder.layers.0.self_attn.q_proj": "linear",
    "text_encoder.encoder.layers.0.self_attn.out_proj": "linear",
}
CHANGED_NORM = "unet.down_blocks.0.resnets.0.norm1.weight"  # not a LoRA target: reported, not carried


@pytest.fixture(scope="module")
def tuned_pipe(pipe_folder, tmp_path_factory):
    """A fine-tuned copy of `pipe_folder` (its UNet in one file): rank-2 ΔW planted on `PLANTED`, a changed norm."""
    unet = diffusers.UNet2DConditionModel.from_pretrained(str(pipe_folder / "unet"))
    text_encoder = transformers.CLIPTextModel.from_pretrained(str(pipe_folder / "text_encoder"))
    modules = {"unet": unet, "text_encoder": text_encoder}
    gen = torch.Generator().manual_seed(11)
    planted = {}
    with torch.no_grad():
        for name in PLANTED:
            component, _, path = name.partition(".")
            weight = modules[component].get_submodule(path).weight
            flat = weight.reshape(weight.shape[0], -1)
            delta = torch.randn(flat.shape[0], 2, generator=gen) @ torch.randn(2, flat.shape[1], generator=gen)
            delta *= 0.1 * flat.norm() / delta.norm()
            weight += delta.reshape(weight.shape)
            planted[name] = delta
        unet.get_submodule(CHANGED_NORM.removeprefix("unet.").removesuffix(".weight")).weight.mul_(1.5)
    folder = tmp_path_factory.mktemp("tuned") / "sd-tuned"
    _pipeline(unet, text_encoder).save_pretrained(str(folder))
    state = {"unet": unet.state_dict(), "text_encoder": text_encoder.state_dict()}
    return folder, planted, state


def test_extract_from_pipelines_loads_in_diffusers_and_merges_back(tmp_path, pipe_folder, tuned_pipe):
    """`loramix extract BASE TUNED --rank 2` on two pipelines: one kohya file that recovers each planted ΔW to float32
    rounding (the planted ΔW has rank 2, so the truncation is exact); diffusers' load_lora_weights + fuse_lora of it on
    the base, and loramix's --merge-into, both give the fine-tuned weights (float32: rtol 1e-5, atol 1e-6 — ΔW is
    rebuilt from factors, a few ulps of W) everywhere but the changed norm, which is reported as not carried."""
    from click.testing import CliRunner

    from loramix.cli import main

    tuned, planted, state = tuned_pipe
    out = tmp_path / "lora"
    result = CliRunner().invoke(main, ["extract", str(pipe_folder), str(tuned), "--rank", "2", "-o", str(out)])
    assert result.exit_code == 0, result.output
    assert f"1 changed tensor(s) are not carried ({CHANGED_NORM})" in result.output  # the warning (stderr)
    assert "7 modules, rank 2" in result.output and "1 other changed tensor not carried" in result.output
    report = json.loads((out / "extraction.json").read_text())
    assert report["format"] == "kohya" and list(report["not_carried"]) == [CHANGED_NORM]
    file = out / "lora.safetensors"
    keys = set(load_file(str(file)))
    assert "lora_unet_down_blocks_0_resnets_0_conv1.lora_down.weight" in keys
    assert "lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight" in keys
    adapter = load_adapter(str(file))
    assert len(adapter.modules) == len(PLANTED)
    for name, delta in planted.items():
        kohya = "lora_" + name.replace("text_encoder.", "te.text_model.").replace(".", "_")
        ours = adapter.modules[kohya].delta(dtype=torch.float64).reshape(delta.shape)
        assert float((ours - delta.double()).norm() / delta.norm()) < 1e-5, name
    for label, merged in (
        ("diffusers", _fused(pipe_folder, file)),
        ("loramix", _merged_back(file, pipe_folder, tmp_path / "merged")),
    ):
        for component, reference in state.items():
            for key, tensor in reference.items():
                expected = (
                    _read_component(pipe_folder / component)[key] if f"{component}.{key}" == CHANGED_NORM else tensor
                )
                torch.testing.assert_close(
                    merged[component][key], expected, rtol=1e-5, atol=1e-6, msg=f"{label} {component}.{key}"
                )


def _merged_back(file: Path, base: Path, out: Path) -> dict[str, dict[str, torch.Tensor]]:
    """`loramix combine FILE --merge-into BASE --dtype float32 -o OUT`, read back per component."""
    from click.testing import CliRunner

    from loramix.cli import main

    args = ["combine", str(file), "--merge-into", str(base), "--dtype", "float32", "-o", str(out)]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    return {c: _read_component(out / c) for c in ("unet", "text_encoder")}


def test_extract_pipeline_errors_are_one_line(tmp_path, pipe_folder, tuned_pipe):
    from loramix import extract
    from loramix.errors import MethodError

    tuned = tuned_pipe[0]
    with pytest.raises(CheckpointError, match="not a diffusers pipeline folder") as caught:
        extract(pipe_folder / "unet", tuned, tmp_path / "a", rank_rule=RankRule(rank=2))
    assert str(pipe_folder / "unet") in str(caught.value)
    partial = tmp_path / "partial"
    shutil.copytree(tuned, partial, ignore=shutil.ignore_patterns("text_encoder"))
    with pytest.raises(CheckpointError, match=r"components \(unet\) differ from the base .*\(text_encoder, unet\)"):
        extract(pipe_folder, partial, tmp_path / "b", rank_rule=RankRule(rank=2))
    with pytest.raises(MethodError, match="one kohya file"):
        extract(pipe_folder, tuned, tmp_path / "c", rank_rule=RankRule(rank=2), format="peft")
    assert not any((tmp_path / n).exists() for n in "abc")
