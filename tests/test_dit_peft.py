"""PEFT folders of diffusion transformers (what PEFT's ``save_pretrained`` writes for a diffusers transformer:
``base_model.model.transformer_blocks.0.attn.to_q.lora_A.weight`` + adapter_config.json) read as the family, under
diffusers' ``transformer.`` names, so they combine with the same model's LoRAs in other namings.

Oracles: PEFT itself (each LoRA layer's ``get_delta_weight``, float32) for the folder's ΔW; diffusers'
``FluxPipeline.lora_state_dict`` for the kohya file's (tests/test_flux.py); ``load_lora_weights`` + ``fuse_lora`` for
the written default output. Tolerances: rtol 1e-5 / atol 1e-6 on ΔW; fused float32 weights atol 1e-5.
"""

from __future__ import annotations

import helpers
import pytest
import torch
from dit_helpers import assert_deltas, assert_fused, fused

import loramix

diffusers = pytest.importorskip("diffusers")
peft = pytest.importorskip("peft")
test_flux = pytest.importorskip("test_flux")


def peft_folder(path, targets: list[str] | str, seed: int = 3) -> dict[str, torch.Tensor]:
    """A PEFT LoRA of the tiny Flux transformer saved by PEFT; returns PEFT's ΔW per ``transformer.<path>``."""
    torch.manual_seed(0)
    model = diffusers.FluxTransformer2DModel(**test_flux.CONFIG).eval()
    torch.manual_seed(seed)
    config = peft.LoraConfig(r=2, lora_alpha=4, target_modules=targets, init_lora_weights=False)
    wrapped = peft.get_peft_model(model, config)
    wrapped.save_pretrained(str(path))
    return {
        f"transformer.{name.removeprefix('base_model.model.')}": module.get_delta_weight("default").double()
        for name, module in wrapped.named_modules()
        if isinstance(module, peft.tuners.lora.LoraLayer) and hasattr(module, "get_delta_weight")
    }


def test_a_flux_peft_folder_reads_as_flux_and_combines_with_kohya(tmp_path):
    expected = peft_folder(tmp_path / "peft", ["to_q", "add_v_proj", "proj_mlp", "x_embedder"])
    adapter = loramix.load_adapter(tmp_path / "peft")
    assert adapter.provenance["family"] == "flux"  # x_embedder is Flux.1's name only
    assert_deltas(adapter, expected)
    kohya = test_flux.kohya_file(tmp_path / "k.safetensors")
    report = loramix.run(
        loramix.Plan(
            adapters=[str(tmp_path / "peft"), str(kohya)],
            weights=[0.4, 0.6],
            method="cat",
            output=str(tmp_path / "out"),
        )
    )
    total = {n: 0.4 * d for n, d in expected.items()}
    for name, delta in test_flux.oracle_deltas(kohya).items():
        total[name] = total.get(name, 0) + 0.6 * delta
    assert_deltas(report.adapter, total)
    assert report.format == "diffusers"  # x_embedder lies outside the blocks: diffusers' names (tests/test_flux.py)
    assert_deltas(loramix.load_adapter(tmp_path / "out"), total)


def test_a_peft_folder_of_shared_block_names_is_written_as_diffusers(tmp_path):
    """Attention modules alone are Flux.1's, SD3's and HunyuanVideo's names alike: no family, written by default in
    diffusers' names (never a PEFT folder no pipeline loads), which diffusers fuses to PEFT's ΔW."""
    expected = peft_folder(tmp_path / "peft", ["to_q", "to_k"])
    adapter = loramix.load_adapter(tmp_path / "peft")
    assert "family" not in adapter.provenance and "flux" in adapter.provenance["fits"]
    assert_deltas(adapter, expected)
    report = loramix.run(loramix.Plan(adapters=[str(tmp_path / "peft")], method="cat", output=str(tmp_path / "out")))
    assert report.format == "diffusers"
    base = test_flux._tiny_pipeline().transformer.state_dict()
    weights = fused(test_flux._tiny_pipeline(), tmp_path / "out" / "pytorch_lora_weights.safetensors")
    assert_fused(weights, base, expected)


def test_a_language_model_peft_folder_is_left_alone(tmp_path):
    made = helpers.make_peft_adapter(helpers.tiny_llama, tmp_path, "llm", target_modules=["q_proj", "v_proj"])
    adapter = loramix.load_adapter(made.path)
    assert "fits" not in adapter.provenance and not any(n.startswith("transformer.") for n in adapter.modules)


def test_the_base_model_names_the_family_of_shared_names(tmp_path):
    """Shared diffusers block names and a declared Flux.1 base: --format kohya joins them into sd-scripts' Flux names,
    which diffusers' Flux loader reads to the same ΔW."""
    expected = peft_folder(tmp_path / "peft", r"transformer_blocks\.\d+\.attn\.to_[qkv]")  # the double blocks'
    plan = loramix.Plan(adapters=[str(tmp_path / "peft")], method="cat", format="kohya", output=str(tmp_path / "out"))
    loramix.run(loramix.Plan(**{**plan.__dict__, "base_model": "black-forest-labs/FLUX.1-dev"}))
    (written,) = (tmp_path / "out").glob("*.safetensors")
    from safetensors import safe_open

    with safe_open(str(written), "pt") as f:
        assert "lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight" in set(f.keys())
    assert_deltas(loramix.load_adapter(written), expected)
    assert test_flux.oracle_deltas(written).keys() == expected.keys()
