"""`--quantized-as mxfp4`: an adapter trained on gpt-oss loaded in MXFP4 (transformers' ``Mxfp4Config``: the
experts' ``gate_up_proj`` and ``down_proj`` quantized, nothing else) is merged onto the weights it was trained with,
dequant(quant(W)) + ΔW, while every tensor MXFP4 does not quantize gets W + ΔW.

Oracles: quant(W) is the float64 reference of the kernel transformers 5.25 loads (``mxfp4_reference`` in
test_quantized_requant, on W cast to bfloat16 as transformers' ``Mxfp4Quantize`` does), its dequantization
transformers' own ``convert_moe_packed_tensors`` in float64, ΔW PEFT's ``get_delta_weight``: the round trip bit for
bit; the merged bf16 weight within one bf16 step of dequant(quant(W)) + ΔW and ≥ 99% equal to its bf16 rounding
(`assert_bf16_close`: ΔW added in float32 before the one cast to bf16). Tensors no adapter changes and MXFP4 does not
quantize are byte for byte the base's.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from click.testing import CliRunner
from helpers import assert_bf16_close, make_peft_adapter, random_model
from safetensors.torch import load_file
from test_quantized_base import tiny, tiny_gpt_oss
from test_quantized_requant import EXPERT_PARAMS, mxfp4_reference, peft_deltas

from loramix import analyze, merge_into_base
from loramix.cli import main

mxfp4 = pytest.importorskip("transformers.integrations.mxfp4")


def transformers_round_trip(weight: torch.Tensor) -> torch.Tensor:
    """dequant(quant(W)) in float64: the reference quantizer on W in bfloat16, transformers' dequantization."""
    blocks, scales = mxfp4_reference(weight.to(torch.bfloat16))
    return mxfp4.convert_moe_packed_tensors(blocks, scales, dtype=torch.float64)


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("mxfp4-qlora")
    tiny_gpt_oss().to(torch.bfloat16).save_pretrained(tmp / "base")
    adapter = make_peft_adapter(
        tiny_gpt_oss, tmp, "adapter", target_modules=["q_proj"], target_parameters=EXPERT_PARAMS
    )
    return SimpleNamespace(
        tmp=tmp,
        adapter=adapter.path,
        deltas=peft_deltas(adapter.peft_model),
        base=load_file(tmp / "base" / "model.safetensors"),
    )


def test_mxfp4_trained_adapter_merges_onto_the_mxfp4_round_trip(made):
    out = made.tmp / "out"
    report = merge_into_base(made.adapter, made.tmp / "base", out, quantized_as="mxfp4")
    written = load_file(out / "model.safetensors")
    experts = sorted(k for k in made.base if k.endswith(("experts.gate_up_proj", "experts.down_proj")))
    assert len(experts) == 4 and sorted(report.round_tripped) == experts
    for key in experts:
        trained_on = transformers_round_trip(made.base[key])
        assert not torch.equal(trained_on.to(torch.bfloat16), made.base[key]), key  # the round trip changes W
        assert_bf16_close(written[key], trained_on + made.deltas[key].double(), key)
    queries = [k for k in made.deltas if "q_proj" in k]
    assert len(queries) == 2
    for key in queries:  # a module MXFP4 does not quantize: W + ΔW
        assert_bf16_close(written[key], made.base[key].double() + made.deltas[key].double(), key)
    for key in set(made.base) - set(experts) - set(queries):  # router, other attention, embeddings, norms, head
        assert torch.equal(written[key], made.base[key]), key
    card = (out / "README.md").read_text()
    assert "trained on a quantized base (MXFP4, 32-entry blocks with E8M0 scales" in card
    assert "bitsandbytes" not in card


def test_mxfp4_round_trip_is_the_reference_bit_for_bit(made):
    """The weights the adapter trained on, loramix's round trip of each bf16 expert parameter, are exactly
    transformers' dequantization of the reference's codes and scales (the kernel's rounding on W in bfloat16)."""
    from loramix.quantize import Quantization, round_trip

    settings = Quantization(quant_type="mxfp4", blocksize=32)
    for key in (k for k in made.base if k.endswith(("experts.gate_up_proj", "experts.down_proj"))):
        ours = round_trip(made.base[key], settings)
        assert ours.dtype == torch.bfloat16
        assert torch.equal(ours.double(), transformers_round_trip(made.base[key])), key


def test_mxfp4_round_trip_only_targeted_leaves_other_experts(made):
    """With ``round_trip="targeted"`` only the expert parameters the adapter changes are round-tripped: a layer's
    experts with no update stay W."""
    adapter = make_peft_adapter(
        tiny_gpt_oss, made.tmp, "one", target_modules=["q_proj"], target_parameters=[EXPERT_PARAMS[1]]
    )
    out = made.tmp / "targeted"
    report = merge_into_base(adapter.path, made.tmp / "base", out, quantized_as="mxfp4", round_trip="targeted")
    assert sorted(report.round_tripped) == [f"model.layers.{i}.mlp.experts.down_proj" for i in (0, 1)]
    written = load_file(out / "model.safetensors")
    key = "model.layers.0.mlp.experts.gate_up_proj"
    assert torch.equal(written[key], made.base[key])


def test_analyze_measures_expert_deltas_against_the_mxfp4_grid(made):
    """analyze --quantized-as mxfp4: for each expert the share of ‖ΔW‖² below half its MXFP4 step, the step being
    the E2M1 grid spacing at W's code times the block's 2^(s − 127) (float64 reference here); the dense q_proj is
    no quantized weight (None)."""
    result = analyze([str(made.adapter)], base=str(made.tmp / "base"), quantized_as="mxfp4")
    modules = result.adapters[0].modules
    key = "model.layers.1.mlp.experts.gate_up_proj"
    blocks, scales = mxfp4_reference(made.base[key])
    spacing = torch.tensor([0.5] * 4 + [1.0] * 2 + [2.0] * 2, dtype=torch.float64)
    codes = torch.stack((blocks & 0xF, blocks >> 4), -1).flatten(-2).long() & 7
    step = (spacing[codes] * torch.exp2(scales.double() - 127)[..., None]).flatten(-2).transpose(1, 2)
    delta = made.deltas[key].double()
    for e in range(delta.shape[0]):
        below = torch.where(delta[e].abs() < step[e] / 2, delta[e], 0).square().sum() / delta[e].square().sum()
        assert modules[f"model.layers.1.mlp.experts.{e}.gate_up_proj"].below_step == pytest.approx(float(below))
    assert modules["model.layers.1.self_attn.q_proj"].below_step is None


@pytest.mark.parametrize(
    "case, says",
    [
        ("llama", "transformers' MXFP4 quantizes only gpt-oss expert parameters"),
        ("ragged", "48 inputs, not a multiple of MXFP4's 32-entry block"),
        ("blocksize", "MXFP4's blocks are 32 entries"),
    ],
)
def test_mxfp4_round_trip_refused_where_it_does_not_apply(made, case, says):
    if case == "llama":
        base = made.tmp / "llama"
        if not base.exists():
            tiny().to(torch.bfloat16).save_pretrained(base)
        adapter = make_peft_adapter(tiny, made.tmp, "llama-adapter", target_modules=["q_proj"]).path
    elif case == "ragged":
        base = made.tmp / "ragged"

        def ragged():
            return random_model(
                "gpt_oss", vocab_size=64, hidden_size=48, intermediate_size=64, num_hidden_layers=1,
                num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_local_experts=2,
                num_experts_per_tok=1, max_position_embeddings=64,
            )  # fmt: skip

        ragged().to(torch.bfloat16).save_pretrained(base)
        adapter = make_peft_adapter(ragged, made.tmp, "ragged-adapter", target_modules=["q_proj"]).path
    else:
        base, adapter = made.tmp / "base", made.adapter
    out = made.tmp / f"refused-{case}"
    args = ["combine", str(adapter), "--merge-into", str(base), "--quantized-as", "mxfp4", "-o", str(out)]
    result = CliRunner().invoke(main, [*args, *(["--blocksize", "64"] if case == "blocksize" else [])])
    assert result.exit_code == 2, result.output
    assert says in result.output and len(result.output.strip().splitlines()) == 1, result.output
    assert not out.exists()
