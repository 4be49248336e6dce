"""kohya/A1111 and diffusers LoRA files: detection, reading, writing, and combining against float64 formulas."""

from __future__ import annotations

import pytest
import torch
from click.testing import CliRunner
from huggingface_hub import ModelCard
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from loramix import combine, load_adapter, save_adapter
from loramix.adapter import LoraAdapter, LoraModule
from loramix.cli import main
from loramix.errors import OutputError

PROJ_IN = "lora_unet_down_blocks_0_attentions_0_proj_in"  # a 1×1 conv in SD 1.x
TO_Q = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
CONV1 = "lora_unet_down_blocks_0_resnets_0_conv1"  # a 3×3 conv (LoCon-style LoRA)
TE_Q = "lora_te_text_model_encoder_layers_0_self_attn_q_proj"
# module: (out, in, kernel)
SHAPES = {PROJ_IN: (12, 12, (1, 1)), TO_Q: (12, 10, ()), CONV1: (8, 6, (3, 3)), TE_Q: (10, 10, ())}


def _kohya_file(path, rank: int, seed: int, modules=tuple(SHAPES), alpha=True):
    gen = torch.Generator().manual_seed(seed)
    tensors = {}
    for i, name in enumerate(modules):
        out, inp, kernel = SHAPES[name]
        down = torch.randn(rank, inp, *kernel, generator=gen)
        up = torch.randn(out, rank, *((1, 1) if kernel else ()), generator=gen)
        tensors[f"{name}.lora_down.weight"] = down
        tensors[f"{name}.lora_up.weight"] = up
        if alpha:
            tensors[f"{name}.alpha"] = torch.tensor(float(rank + i + 1) / 2)
    save_file(tensors, str(path))
    return tensors


def _delta64(tensors: dict, name: str) -> torch.Tensor:
    """(alpha/r)·up·down in float64, as kohya's loaders apply it (conv kernels flattened)."""
    down = tensors[f"{name}.lora_down.weight"].double()
    up = tensors[f"{name}.lora_up.weight"].double()
    rank = down.shape[0]
    alpha = tensors[f"{name}.alpha"].double().item() if f"{name}.alpha" in tensors else rank
    return alpha / rank * up.reshape(up.shape[0], rank) @ down.reshape(rank, -1)


def test_single_kohya_file_loads_with_its_names_layouts_and_scales(tmp_path):
    tensors = _kohya_file(tmp_path / "style.safetensors", rank=4, seed=0)
    adapter = load_adapter(tmp_path / "style.safetensors")
    assert sorted(adapter.modules) == sorted(SHAPES)
    assert adapter.provenance["format"] == "kohya"
    assert adapter.modules[CONV1].layout == "conv2d" and adapter.modules[CONV1].kernel_size == (3, 3)
    assert adapter.modules[PROJ_IN].layout == "conv2d" and adapter.modules[PROJ_IN].base_shape == (12, 12, 1, 1)
    assert adapter.modules[TO_Q].layout == "out_in"
    for name in SHAPES:
        expected = _delta64(tensors, name)
        got = adapter.modules[name].delta(dtype=torch.float64).reshape(expected.shape[0], -1)
        torch.testing.assert_close(got, expected)
    assert adapter.modules[TE_Q].scale == pytest.approx((4 + 3 + 1) / 2 / 4)


def test_missing_alpha_means_alpha_equals_rank(tmp_path):
    _kohya_file(tmp_path / "noalpha.safetensors", rank=3, seed=1, alpha=False)
    adapter = load_adapter(tmp_path / "noalpha.safetensors")
    assert {m.scale for m in adapter.modules.values()} == {1.0}


def _kohya_write(adapter, folder, **options):
    """Write ``adapter`` as a kohya file into ``folder`` (atomically, no card); the file's path."""
    return save_adapter(adapter, folder, format="kohya", card=False, **options) / f"{folder.name}.safetensors"


def test_read_write_round_trip_restores_every_key(tmp_path):
    tensors = _kohya_file(tmp_path / "in.safetensors", rank=4, seed=2)
    written = _kohya_write(load_adapter(tmp_path / "in.safetensors"), tmp_path / "again")
    assert written == tmp_path / "again" / "again.safetensors"
    back = load_file(str(written))
    assert sorted(back) == sorted(tensors)
    for key, value in tensors.items():
        if key.endswith(".alpha"):
            assert back[key].item() == pytest.approx(value.item(), rel=1e-6)
        else:
            assert torch.equal(back[key], value), key
    with safe_open(str(written), "pt") as f:
        assert f.metadata()["ss_network_dim"] == "4"
    assert sorted(load_adapter(tmp_path / "again").modules) == sorted(SHAPES)  # a folder holding one kohya file
    _kohya_write(load_adapter(tmp_path / "in.safetensors"), tmp_path / "again", overwrite=True)  # an earlier output


@pytest.mark.parametrize("method", ["cat", "svd"])
def test_kohya_plus_kohya_written_as_kohya_is_the_weighted_sum(tmp_path, method):
    one = _kohya_file(tmp_path / "one.safetensors", rank=4, seed=3)
    two = _kohya_file(tmp_path / "two.safetensors", rank=2, seed=4, modules=(PROJ_IN, TO_Q, CONV1))
    weights = [0.7, -0.4]
    result = CliRunner().invoke(
        main,
        ["combine", str(tmp_path / "one.safetensors"), str(tmp_path / "two.safetensors"), "-w", "0.7,-0.4"]
        + ["-m", method, "--format", "kohya", "-o", str(tmp_path / "out")],
    )
    assert result.exit_code == 0, result.output
    assert "kohya format" in result.output
    out = load_file(str(tmp_path / "out" / "out.safetensors"))
    assert sorted(out) == sorted(one)  # the kohya names, exactly
    for name in SHAPES:
        expected = sum(w * _delta64(t, name) for w, t in zip(weights, (one, two)) if f"{name}.alpha" in t)
        got = _delta64(out, name)
        assert (got - expected).norm() <= 1e-5 * expected.norm(), name
    assert out[f"{CONV1}.lora_down.weight"].shape[1:] == (6, 3, 3)
    assert out[f"{CONV1}.lora_up.weight"].shape[2:] == (1, 1)
    assert (tmp_path / "out" / "loramix_recipe.yaml").is_file()
    card = ModelCard.load(tmp_path / "out" / "README.md")
    assert {"loramix", "kohya", method} <= set(card.data.tags) and card.data.library_name is None
    assert "kohya/A1111 LoRA adapter" in card.text


def test_diffusers_names_read_and_write_as_kohya_keys(tmp_path):
    (tmp_path / "diffusers").mkdir()
    gen = torch.Generator().manual_seed(5)
    down, up = torch.randn(2, 12, 1, 1, generator=gen), torch.randn(12, 2, 1, 1, generator=gen)
    a, b = torch.randn(4, 10, generator=gen), torch.randn(10, 4, generator=gen)
    save_file(
        {
            "unet.down_blocks.0.attentions.0.proj_in.lora.down.weight": down,
            "unet.down_blocks.0.attentions.0.proj_in.lora.up.weight": up,
            "text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_A.weight": a,
            "text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_B.weight": b,
            "text_encoder.text_model.encoder.layers.0.self_attn.q_proj.alpha": torch.tensor(8.0),
        },
        str(tmp_path / "diffusers" / "pytorch_lora_weights.safetensors"),
    )
    adapter = load_adapter(tmp_path / "diffusers")  # diffusers' save_lora_weights folder
    assert sorted(adapter.modules) == [
        "text_encoder.text_model.encoder.layers.0.self_attn.q_proj",
        "unet.down_blocks.0.attentions.0.proj_in",
    ]
    assert adapter.modules["text_encoder.text_model.encoder.layers.0.self_attn.q_proj"].scale == 2.0
    assert adapter.modules["unet.down_blocks.0.attentions.0.proj_in"].scale == 1.0
    out = load_file(str(_kohya_write(adapter, tmp_path / "k")))
    assert torch.equal(out[f"{PROJ_IN}.lora_down.weight"], down)
    assert torch.equal(out[f"{TE_Q}.lora_up.weight"], b)
    assert out[f"{TE_Q}.alpha"].item() == 8.0 and out[f"{PROJ_IN}.alpha"].item() == 2.0


def test_kohya_inputs_are_saved_as_a_kohya_file_and_never_as_peft(tmp_path):
    """save_adapter's default for kohya inputs is their own format; a PEFT folder of kohya names is refused (PEFT
    itself finds none of them in any model: NoMatchingPeftModuleError/ValueError, checked in test_compat)."""
    one = _kohya_file(tmp_path / "one.safetensors", rank=4, seed=6)
    merged = combine([tmp_path / "one.safetensors"], weights=[2.0], method="cat")
    save_adapter(merged, tmp_path / "default")
    assert not (tmp_path / "default" / "adapter_config.json").exists()
    back = load_adapter(tmp_path / "default" / "default.safetensors")
    got = back.modules[TO_Q].delta(dtype=torch.float64)
    assert (got - 2.0 * _delta64(one, TO_Q)).norm() <= 1e-5 * got.norm()
    with pytest.raises(OutputError, match=r"kohya name, which no model has.*\(pass format='kohya'\)"):
        save_adapter(merged, tmp_path / "peft", format="peft")
    assert not (tmp_path / "peft").exists()


def test_what_kohya_cannot_hold_is_refused(tmp_path):
    module = LoraModule(A=torch.ones(2, 3), B=torch.ones(4, 2), scale=1.0, bias=torch.ones(4))
    with pytest.raises(OutputError, match="lora_B biases"):
        _kohya_write(LoraAdapter(modules={"x": module}), tmp_path / "bias")
    embedding = LoraModule(A=torch.ones(2, 3), B=torch.ones(4, 2), scale=1.0, layout="embedding")
    with pytest.raises(OutputError, match="linear and conv2d"):
        _kohya_write(LoraAdapter(modules={"e": embedding}), tmp_path / "emb")
    assert not (tmp_path / "bias").exists() and not (tmp_path / "emb").exists()


def test_kohya_metadata_names_the_base_and_is_carried(tmp_path):
    """sd-scripts' ss_base_model_version (older files: ss_v2) is the base, ss_sd_model_name the checkpoint trained on:
    inspect shows them, combine no longer warns "base model unknown", the card names the base and the kohya output's
    metadata (read back with safetensors) carries it; one sd_v1 and one SDXL LoRA are different bases."""
    tensors = _kohya_file(tmp_path / "style.safetensors", rank=4, seed=7)
    meta = {"ss_base_model_version": "sd_v1", "ss_sd_model_name": "v1-5-pruned-emaonly.safetensors"}
    save_file(tensors, str(tmp_path / "style.safetensors"), metadata=meta)
    save_file(tensors, str(tmp_path / "old.safetensors"), metadata={"ss_v2": "False"})
    shown = CliRunner().invoke(
        main, ["inspect", str(tmp_path / "style.safetensors"), str(tmp_path / "old.safetensors")]
    )
    assert "base model    sd_v1 (trained on v1-5-pruned-emaonly.safetensors)" in shown.output
    assert shown.output.count("base model    sd_v1\n") == 1, shown.output  # old.safetensors, from ss_v2
    inputs = [str(tmp_path / "style.safetensors"), str(tmp_path / "old.safetensors")]
    result = CliRunner().invoke(main, ["combine", *inputs, "-m", "cat", "-o", str(tmp_path / "out")])
    assert result.exit_code == 0 and "warning" not in result.output, result.output
    assert "LoRA adapter for `sd_v1`" in (tmp_path / "out" / "README.md").read_text()
    with safe_open(str(tmp_path / "out" / "out.safetensors"), "pt") as f:
        assert f.metadata()["ss_base_model_version"] == "sd_v1"
    save_file(tensors, str(tmp_path / "xl.safetensors"), metadata={"ss_base_model_version": "sdxl_base_v1-0"})
    refused = CliRunner().invoke(
        main, ["combine", inputs[0], str(tmp_path / "xl.safetensors"), "-o", str(tmp_path / "x")]
    )
    assert refused.exit_code == 2 and "different base models" in refused.output


def test_a_kohya_file_without_metadata_is_warned_about_once(tmp_path):
    for name, seed in (("one", 8), ("two", 9)):
        _kohya_file(tmp_path / f"{name}.safetensors", rank=2, seed=seed)
    files = [str(tmp_path / "one.safetensors"), str(tmp_path / "two.safetensors")]
    result = CliRunner().invoke(main, ["combine", *files, "-m", "cat", "-o", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    warnings = [line for line in result.output.splitlines() if line.startswith("warning:")]
    assert sorted(warnings) == [
        f"warning: {n}: base model unknown; only module shapes can be checked against the others"
        for n in ("one", "two")
    ]
