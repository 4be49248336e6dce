"""`--quantized-as fp8`: an adapter trained on a dense base that transformers loaded in block FP8
(``FineGrainedFP8Config``, quantized on the fly) is merged onto the weights it was trained with,
dequant(quant(W)) + ΔW, not W + ΔW.

Oracle: transformers' own ``Fp8Quantize`` (its on-the-fly quantization; on-the-fly loading itself needs a GPU) and
``Fp8Dequantize`` on each Linear weight, the result in the base's bfloat16 as the loaded model holds it, plus PEFT's
``get_delta_weight``: within one bf16 step, ≥ 99% equal to its bf16 rounding (`assert_bf16_close`). Embeddings,
norms and the output head are not quantized by that integration and stay as they were, byte for byte.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from click.testing import CliRunner
from helpers import assert_bf16_close, make_peft_adapter
from safetensors.torch import load_file
from test_quantized_base import LINEARS, tiny

from loramix import merge_into_base
from loramix.cli import main

fp8 = pytest.importorskip("transformers.integrations.finegrained_fp8")
from transformers import FineGrainedFP8Config  # noqa: E402


def transformers_round_trip(weight: torch.Tensor, block: int) -> torch.Tensor:
    settings = SimpleNamespace(quantization_config=FineGrainedFP8Config(weight_block_size=[block, block]))
    parts = fp8.Fp8Quantize(settings).convert({"w.weight": weight.float()})
    if "w.weight_scale_inv" not in parts:  # a shape the block does not tile: passed through
        return weight
    codes, scale = parts["w.weight"], parts["w.weight_scale_inv"]
    return fp8.Fp8Dequantize(None)._dequantize_one(codes, scale, torch.float32).to(weight.dtype)


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("fp8-qlora")
    tiny().to(torch.bfloat16).save_pretrained(tmp / "base")
    adapter = make_peft_adapter(tiny, tmp, "adapter", target_modules=["q_proj", "v_proj", "down_proj"])
    deltas = {
        n.removeprefix("base_model.model.") + ".weight": m.get_delta_weight("default").detach().float()
        for n, m in adapter.peft_model.named_modules()
        if hasattr(m, "get_delta_weight") and "default" in getattr(m, "lora_A", {})
    }
    return SimpleNamespace(
        tmp=tmp, adapter=adapter.path, deltas=deltas, base=load_file(tmp / "base" / "model.safetensors")
    )


def test_fp8_trained_adapter_merges_onto_the_fp8_round_trip(made):
    out = made.tmp / "out"
    report = merge_into_base(made.adapter, made.tmp / "base", out, quantized_as="fp8", blocksize=32)
    written = load_file(out / "model.safetensors")
    linears = [k for k in made.base if k.endswith(".weight") and k.rsplit(".", 2)[-2] in LINEARS]
    assert set(report.round_tripped) == set(linears)
    for key in linears:
        trained_on = transformers_round_trip(made.base[key], 32)
        assert not torch.equal(trained_on, made.base[key]), key  # the round trip changes the weight
        if key in made.deltas:
            assert_bf16_close(written[key], trained_on.float() + made.deltas[key], key)
        else:
            assert torch.equal(written[key], trained_on), key
    for key in set(made.base) - set(linears):  # embeddings, norms, lm_head
        assert torch.equal(written[key], made.base[key]), key
    card = (out / "README.md").read_text()
    assert "trained on a quantized base (block FP8, 32×32 blocks (transformers' FineGrainedFP8))" in card


def test_fp8_default_block_is_transformers_default_and_cli_accepts_it(made):
    """With transformers' default 128×128 blocks no weight of this 64-wide model is tiled, and Fp8Quantize passes
    such weights through unquantized: so does the merge (nothing round-tripped, plain W + ΔW)."""
    out = made.tmp / "cli"
    args = ["-q", "combine", str(made.adapter), "--merge-into", str(made.tmp / "base"), "--quantized-as", "fp8"]
    result = CliRunner().invoke(main, [*args, "-o", str(out)])
    assert result.exit_code == 0, result.output
    written = load_file(out / "model.safetensors")
    key = "model.layers.0.self_attn.k_proj.weight"
    assert torch.equal(transformers_round_trip(made.base[key], 128), made.base[key])  # passed through
    assert torch.equal(written[key], made.base[key])
    key = "model.layers.0.self_attn.q_proj.weight"
    assert_bf16_close(written[key], made.base[key].float() + made.deltas[key], key)
