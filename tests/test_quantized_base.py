"""Merging into quantized bases (`loramix.io.quantized`, `loramix.merge.quantized_base`): block FP8 recognised, merged
onto its dequantized weights and written in its own format or dense; every other or damaged quantized layout
refused in one line with nothing written.

Oracles: transformers' fine-grained FP8 integration itself — ``Fp8Quantize`` (which quantizes the test bases and
re-quantizes the expected merge) and ``Fp8Dequantize`` (its CPU dequantization) — and transformers loading the
written checkpoint on CPU (without a GPU it loads fine-grained FP8 dequantized). ΔW from PEFT's own
``get_delta_weight``. Tolerances:

- same format: the expected checkpoint is Fp8Quantize(Fp8Dequantize(W) + ΔW). loramix forms W + ΔW with its own
  float32 products, so a sum can differ by a float32 ulp and a value lying on a rounding boundary may land in the
  neighbouring FP8 code: scales must agree to 1e-6 relative, ≥ 99.9% of codes exactly and all within one FP8 step.
  A missing dequantization (ΔW added to codes) or a kept old scale fails by orders of magnitude. Tensors no adapter
  changes (their codes and scales among them) are compared byte for byte, config.json as parsed JSON.
- dense bf16: within one bf16 step of Fp8Dequantize(W) + ΔW, ≥ 99% equal to its bf16 rounding (`assert_bf16_close`).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from click.testing import CliRunner
from helpers import assert_bf16_close, make_peft_adapter, random_model
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from loramix import analyze, extract, load_adapter, merge_into_base
from loramix.cli import main
from loramix.errors import CheckpointError
from loramix.linalg import RankRule

fp8 = pytest.importorskip("transformers.integrations.finegrained_fp8")
from transformers import AutoModelForCausalLM, FineGrainedFP8Config  # noqa: E402

BLOCK = [32, 32]
TARGETS = ["q_proj", "v_proj", "down_proj"]
LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
QC = {"quant_method": "fp8", "weight_block_size": BLOCK, "activation_scheme": "dynamic"}


def tiny() -> torch.nn.Module:
    return random_model(
        "llama",
        vocab_size=64,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=False,
    )


def _quantizer(block=BLOCK, scale_fmt: str = "float"):
    settings = FineGrainedFP8Config(weight_block_size=block, scale_fmt=scale_fmt)
    return fp8.Fp8Quantize(SimpleNamespace(quantization_config=settings))


def _dequantize(codes: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """transformers' own CPU dequantization (float32)."""
    return fp8.Fp8Dequantize(None)._dequantize_one(codes, scale, torch.float32)


def write_fp8_base(folder: Path, model: torch.nn.Module, qc: dict = QC) -> Path:
    """``model`` stored as transformers' fine-grained FP8 checkpoint: every decoder Linear quantized by
    ``Fp8Quantize`` (codes + weight_scale_inv; power-of-two scales stored as float32 for ``scale_fmt: ue8m0``, as
    DeepSeek-V3.1 ships them), the rest in bfloat16."""
    folder.mkdir(parents=True)
    quantize = _quantizer(qc["weight_block_size"], qc.get("scale_fmt", "float"))
    tensors = {}
    for name, value in model.state_dict().items():
        if name.endswith(".weight") and name.rsplit(".", 2)[-2] in LINEARS:
            tensors.update(
                {
                    k: v.float() if v.dim() and k.endswith("_inv") else v
                    for k, v in quantize.convert({name: value.float()}).items()
                }
            )
        else:
            tensors[name] = value.to(torch.bfloat16)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(folder / "model.safetensors"))
    config = {**model.config.to_dict(), "quantization_config": qc, "dtype": "bfloat16"}
    (folder / "config.json").write_text(json.dumps(config))
    return folder


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("fp8")
    adapter = make_peft_adapter(tiny, tmp, "adapter", target_modules=TARGETS)
    base = write_fp8_base(tmp / "base", tiny())
    deltas = {}
    for name, module in adapter.peft_model.named_modules():
        if hasattr(module, "get_delta_weight") and name.rsplit(".", 1)[-1] in TARGETS:
            key = name.removeprefix("base_model.model.") + ".weight"
            deltas[key] = module.get_delta_weight("default").detach().float()
    return SimpleNamespace(
        tmp=tmp, adapter=adapter.path, base=base, deltas=deltas, tensors=load_file(base / "model.safetensors")
    )


def _raw(path: Path) -> dict[str, bytes]:
    with safe_open(str(path), "pt") as f:
        return {k: f.get_tensor(k).contiguous().view(torch.uint8).numpy().tobytes() for k in f.keys()}


def test_fp8_same_format_is_transformers_requantization(made):
    out = made.tmp / "same"
    report = merge_into_base(made.adapter, made.base, out)
    written = load_file(out / "model.safetensors")
    assert set(written) == set(made.tensors)
    assert json.loads((out / "config.json").read_text()) == json.loads((made.base / "config.json").read_text())
    for key, delta in made.deltas.items():
        scale_key = key + "_scale_inv"
        W = _dequantize(made.tensors[key], made.tensors[scale_key])
        expected = _quantizer().convert({key: W + delta})
        codes, scale = written[key], written[scale_key]
        assert codes.dtype == torch.float8_e4m3fn and scale.dtype == torch.float32
        assert torch.allclose(scale, expected[scale_key], rtol=1e-6, atol=0), key
        ours, theirs = codes.float(), expected[key].float()
        assert (ours == theirs).float().mean() >= 0.999, key
        spacing = torch.exp2(torch.floor(torch.log2(theirs.abs().clamp(min=2.0**-6))) - 3)
        assert bool(((ours - theirs).abs() <= spacing).all()), key
    raw_in, raw_out = _raw(made.base / "model.safetensors"), _raw(out / "model.safetensors")
    changed = {k for key in made.deltas for k in (key, key + "_scale_inv")}
    assert all(raw_out[k] == raw_in[k] for k in raw_in if k not in changed)
    assert "re-quantized" in report.written_as and "32×32" in report.written_as
    assert set(report.below_step) == {k.removesuffix(".weight") for k in made.deltas}
    assert all(0 <= v <= 1 for v in report.below_step.values())
    card = (out / "README.md").read_text()
    assert "## Quantized base" in card and "stored as block FP8 (float8_e4m3fn, 32×32 blocks), the merged" in card
    assert "stored in bfloat16" not in card


def test_fp8_writer_starts_every_weights_codes_before_any_scales(made, monkeypatch):
    """A merged weight's codes and weight_scale_inv come from one re-quantization: the writer starts all codes
    first, so that two workers work on two weights instead of one waiting on the other's (recorded with one worker:
    the order tasks start in). The bytes do not depend on the worker count."""
    from loramix.io.quantized import Requantized

    taken, take = [], Requantized.take
    monkeypatch.setattr(Requantized, "take", lambda self, key, part: taken.append(part) or take(self, key, part))
    merge_into_base(made.adapter, made.base, made.tmp / "one-worker", workers=1)
    assert taken == sorted(taken) and taken.count(0) == taken.count(1) == len(made.deltas)
    merge_into_base(made.adapter, made.base, made.tmp / "two-workers", workers=2)
    ones, twos = (
        _raw(made.tmp / "one-worker" / "model.safetensors"),
        _raw(made.tmp / "two-workers" / "model.safetensors"),
    )
    assert ones == twos


def test_the_cli_card_says_the_quantized_format_not_the_base_dtype(made):
    """The CLI's card says "stored in the base's dtype" for a merge; a quantized base written in its own format is
    "stored as" that format instead (the API's card names a dtype, checked above)."""
    out = made.tmp / "cli-card"
    result = CliRunner().invoke(main, ["combine", str(made.adapter), "--merge-into", str(made.base), "-o", str(out)])
    assert result.exit_code == 0, result.output
    card = (out / "README.md").read_text()
    assert "stored as block FP8 (float8_e4m3fn, 32×32 blocks)" in card and "stored in the base's dtype" not in card


def test_fp8_power_of_two_scales_requantized_as_transformers_does(made):
    """scale_fmt ue8m0: every 1/s rounded up to a power of two before quantizing; the oracle is Fp8Quantize with
    that setting (its float8_e8m0fnu scales compared as float32, the dtype the base stores)."""
    base = write_fp8_base(made.tmp / "ue8m0", tiny(), {**QC, "scale_fmt": "ue8m0"})
    tensors = load_file(base / "model.safetensors")
    out = made.tmp / "ue8m0-out"
    report = merge_into_base(made.adapter, base, out)
    assert "power-of-two scales" in report.written_as
    written = load_file(out / "model.safetensors")
    for key, delta in made.deltas.items():
        W = _dequantize(tensors[key], tensors[key + "_scale_inv"])
        expected = _quantizer(scale_fmt="ue8m0").convert({key: W + delta})
        assert torch.equal(written[key + "_scale_inv"], expected[key + "_scale_inv"].float()), key
        assert (written[key].float() == expected[key].float()).float().mean() >= 0.999, key


def test_fp8_written_checkpoint_loads_in_transformers(made):
    """transformers loads the re-quantized checkpoint on CPU (dequantized, as it does without a GPU): its weights
    are transformers' dequantization of what was written, and that is dequant(W) + ΔW to within half an FP8 step."""
    out = made.tmp / "loaded"
    merge_into_base(made.adapter, made.base, out)
    written = load_file(out / "model.safetensors")
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    params = dict(model.named_parameters())
    for key, delta in made.deltas.items():
        theirs = _dequantize(written[key], written[key + "_scale_inv"])
        assert torch.equal(params[key].detach().float(), theirs), key
        intended = _dequantize(made.tensors[key], made.tensors[key + "_scale_inv"]) + delta
        scale = written[key + "_scale_inv"].repeat_interleave(32, 0).repeat_interleave(32, 1)
        assert float(((theirs - intended).abs() / scale).max()) <= 16.001, key  # half the FP8 step at codes ≥ 256
    assert torch.isfinite(model(torch.arange(8)[None]).logits).all()


def test_fp8_dense_output(made):
    out = made.tmp / "dense"
    report = merge_into_base(made.adapter, made.base, out, dtype="bfloat16")
    written = load_file(out / "model.safetensors")
    config = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in config and config["dtype"] == "bfloat16"
    assert not [k for k in written if k.endswith("_scale_inv")]
    for key, codes in made.tensors.items():
        if codes.dtype != torch.float8_e4m3fn:
            continue
        W = _dequantize(codes, made.tensors[key + "_scale_inv"])
        if key in made.deltas:
            assert_bf16_close(written[key], W + made.deltas[key], key)
        else:
            assert torch.equal(written[key], W.to(torch.bfloat16)), key
    assert report.written_as.startswith("dense bfloat16")
    model = AutoModelForCausalLM.from_pretrained(out)
    assert torch.equal(model.model.layers[0].self_attn.q_proj.weight, written["model.layers.0.self_attn.q_proj.weight"])


def test_fp8_cli_says_how_it_was_written(made):
    out = made.tmp / "cli"
    result = CliRunner().invoke(
        main, ["-q", "combine", str(made.adapter), "--merge-into", str(made.base), "-o", str(out)]
    )
    assert result.exit_code == 0, result.output
    assert "written as block FP8 (float8_e4m3fn, 32×32 blocks)" in result.output
    assert "ΔW below half a quantization step" in result.output


def test_fp8_base_with_quantized_as_is_refused(made):
    with pytest.raises(CheckpointError, match="a block FP8 .* base; quantized_as is for dense bases"):
        merge_into_base(made.adapter, made.base, made.tmp / "nf4-on-fp8", quantized_as="nf4")
    assert not (made.tmp / "nf4-on-fp8").exists()
    with pytest.raises(CheckpointError, match="a block FP8 .* base; quantized_as is for dense bases"):
        analyze([str(made.adapter)], base=str(made.base), quantized_as="fp8")


def test_fp8_analyze_base_norms_are_of_dequantized_weights(made):
    result = analyze([str(made.adapter)], base=str(made.base))
    norms = {name: m.base_norm for name, m in result.adapters[0].modules.items()}
    for key in made.deltas:
        W = _dequantize(made.tensors[key], made.tensors[key + "_scale_inv"]).double()
        assert norms[key.removesuffix(".weight")] == pytest.approx(float(W.norm()), rel=1e-6)


def test_fp8_extract_against_a_quantized_base(made):
    """extract reads the FP8 base dequantized (scales are no tensors of their own): from the dense merge of the
    adapter, the rank-4 extraction gives back PEFT's ΔW up to the bf16 rounding of the merged weights."""
    dense = made.tmp / "for-extract"
    merge_into_base(made.adapter, made.base, dense, dtype="float32")
    extraction = extract(made.base, dense, made.tmp / "extracted", rank_rule=RankRule(rank=4))
    adapter = load_adapter(made.tmp / "extracted")
    assert {f"{m}.weight" for m in adapter.modules} >= set(made.deltas)
    for key, delta in made.deltas.items():
        ours = adapter.modules[key.removesuffix(".weight")].delta(dtype=torch.float64)
        assert float((ours - delta.double()).norm() / delta.double().norm()) < 1e-5, key
    assert extraction.modules


def test_fp8_ragged_blocks_match_float64_reference(tmp_path):
    """Shapes that are no multiple of the block (scale grid ceil(rows/b) × ceil(cols/b)): transformers dequantizes
    only whole blocks, so the reference here is float64 codes · scale per block."""
    qc = {**QC, "weight_block_size": [48, 40]}
    folder = tmp_path / "base"
    folder.mkdir()
    codes = (torch.randn(64, 96) * 100).clamp(-448, 448).to(torch.float8_e4m3fn)
    scale = torch.rand(2, 3) + 0.01
    save_file(
        {"model.layers.0.mlp.up_proj.weight": codes, "model.layers.0.mlp.up_proj.weight_scale_inv": scale},
        str(folder / "model.safetensors"),
    )
    (folder / "config.json").write_text(json.dumps({"model_type": "llama", "quantization_config": qc}))
    from loramix.io.base import open_base

    base = open_base(folder)
    ours = base.dense("model.layers.0.mlp.up_proj.weight").rows(17, 61)
    expanded = scale.double().repeat_interleave(48, 0)[:64].repeat_interleave(40, 1)[:, :96]
    assert torch.equal(ours, (codes.double() * expanded)[17:61].float())  # one correctly rounded product
    assert base.weight_names() == ["model.layers.0.mlp.up_proj.weight"]
    # the local step behind the "below half a step" share: the e4m3 grid's spacing at the code (2^(e−3) for
    # |code| in [2^e, 2^(e+1)), 2^−9 below 2^−6) times the block's scale, here from log2 in float64
    step = base.dense("model.layers.0.mlp.up_proj.weight").scheme.step(codes, scale)
    spacing = torch.exp2(torch.floor(torch.log2(codes.double().abs().clamp(min=2.0**-6))) - 3)
    assert torch.equal(step.double(), spacing * expanded)


# ----------------------------------------------------------------------------------------------- compressed-tensors


def ct_config(strategy: str, static: bool) -> dict:
    """A compressed-tensors ``float-quantized`` config as llm-compressor writes it (FP8 / FP8_DYNAMIC schemes)."""
    acts = {"num_bits": 8, "type": "float", "symmetric": True, "strategy": "tensor" if static else "token"}
    weights = {"num_bits": 8, "type": "float", "symmetric": True, "strategy": strategy, "dynamic": False}
    if strategy == "block":
        weights["block_structure"] = BLOCK
    group = {"targets": ["Linear"], "weights": weights, "input_activations": {**acts, "dynamic": not static}}
    return {
        "quant_method": "compressed-tensors",
        "format": "float-quantized",
        "quantization_status": "compressed",
        "config_groups": {"group_0": group},
        "ignore": ["lm_head"],
    }


def ct_quantize(W: torch.Tensor, strategy: str) -> tuple[torch.Tensor, torch.Tensor]:
    """compressed-tensors' symmetric FP8 in float64 (its calculate_qparams and quantize, from the source): scale =
    max(amax / 448, float32 eps) per tensor ([1]) or output channel ([out, 1]), stored in bfloat16; codes =
    clamp(W / scale, ±448) cast to float8_e4m3fn."""
    W = W.double()
    if strategy == "block":  # 32×32 blocks of a weight whose sides are multiples of 32
        amax = W.reshape(W.shape[0] // 32, 32, W.shape[1] // 32, 32).abs().amax(dim=(1, 3))
    else:
        amax = W.abs().amax(dim=1, keepdim=True) if strategy == "channel" else W.abs().amax().reshape(1)
    scale = (amax / 448).clamp(min=torch.finfo(torch.float32).eps).to(torch.bfloat16)
    codes = (W / _per_entry(scale.double(), W.shape)).clamp(-448, 448).to(torch.float8_e4m3fn)
    return codes, scale


def _per_entry(scale: torch.Tensor, shape) -> torch.Tensor:
    if scale.dim() == 2 and scale.shape[1] > 1:  # blocks
        return scale.repeat_interleave(32, 0).repeat_interleave(32, 1)
    return scale.reshape(-1, 1).expand(shape)


def ct_dequantize(codes: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return codes.double() * _per_entry(scale.double(), codes.shape)


def write_ct_base(folder: Path, model: torch.nn.Module, strategy: str, static: bool) -> Path:
    folder.mkdir(parents=True)
    tensors = {}
    for name, value in model.state_dict().items():
        if name.endswith(".weight") and name.rsplit(".", 2)[-2] in LINEARS:
            codes, scale = ct_quantize(value, strategy)
            tensors |= {name: codes, name + "_scale": scale}
            if static:
                tensors[name.removesuffix("weight") + "input_scale"] = torch.rand(1) + 0.5
        else:
            tensors[name] = value.to(torch.bfloat16)
    save_file(tensors, str(folder / "model.safetensors"))
    config = {**model.config.to_dict(), "quantization_config": ct_config(strategy, static), "dtype": "bfloat16"}
    (folder / "config.json").write_text(json.dumps(config))
    return folder


@pytest.mark.parametrize("strategy, static", [("channel", False), ("tensor", True), ("block", False)])
def test_compressed_tensors_fp8_same_format_and_dense(made, strategy, static):
    base = write_ct_base(made.tmp / f"ct-{strategy}", tiny(), strategy, static)
    tensors = load_file(base / "model.safetensors")
    out = made.tmp / f"ct-{strategy}-same"
    report = merge_into_base(made.adapter, base, out)
    written = load_file(out / "model.safetensors")
    assert json.loads((out / "config.json").read_text()) == json.loads((base / "config.json").read_text())
    what = "32×32 blocks" if strategy == "block" else f"per-{strategy}"
    assert report.written_as.startswith(f"compressed-tensors FP8 (float8_e4m3fn, {what} weight_scale)")
    for key, delta in made.deltas.items():
        codes, scale = ct_quantize(ct_dequantize(tensors[key], tensors[key + "_scale"]) + delta.double(), strategy)
        ours = written[key + "_scale"]
        assert ours.shape == scale.shape and ours.dtype == torch.bfloat16, key
        assert torch.allclose(ours.float(), scale.float(), rtol=2**-8, atol=0), key  # one bf16 step at most
        assert (ours == scale).float().mean() >= 0.95, key
        same = (written[key].float() == codes.float()).float().mean()
        assert same >= 0.999, key
    raw_in, raw_out = _raw(base / "model.safetensors"), _raw(out / "model.safetensors")
    changed = {k for key in made.deltas for k in (key, key + "_scale")}
    assert all(raw_out[k] == raw_in[k] for k in raw_in if k not in changed)
    dense = made.tmp / f"ct-{strategy}-dense"
    merge_into_base(made.adapter, base, dense, dtype="bfloat16")
    written = load_file(dense / "model.safetensors")
    assert not [k for k in written if k.endswith(("_scale", "input_scale"))]
    assert "quantization_config" not in json.loads((dense / "config.json").read_text())
    for key, delta in made.deltas.items():
        assert_bf16_close(written[key], ct_dequantize(tensors[key], tensors[key + "_scale"]) + delta.double(), key)
    AutoModelForCausalLM.from_pretrained(dense)  # a plain dense Llama


# ----------------------------------------------------------------------------------------------- MXFP4 (gpt-oss)


def tiny_gpt_oss() -> torch.nn.Module:
    return random_model(
        "gpt_oss",
        vocab_size=64,
        hidden_size=64,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        num_local_experts=4,
        num_experts_per_tok=2,
        max_position_embeddings=64,
    )


def write_mxfp4_base(folder: Path, model: torch.nn.Module) -> Path:
    """``model`` stored as gpt-oss ships it: each expert parameter [E, in, out] as ``_blocks`` [E, out, in/32, 16]
    (random E2M1 codes) and ``_scales`` [E, out, in/32] (E8M0 near 2^-6), everything else in bfloat16."""
    folder.mkdir(parents=True)
    gen = torch.Generator().manual_seed(3)
    tensors = {}
    for name, value in model.state_dict().items():
        if name.endswith(("experts.gate_up_proj", "experts.down_proj")):
            experts, inputs, outputs = value.shape
            grid = (experts, outputs, inputs // 32)
            tensors[name + "_blocks"] = torch.randint(0, 256, (*grid, 16), generator=gen, dtype=torch.uint8)
            tensors[name + "_scales"] = torch.randint(119, 124, grid, generator=gen, dtype=torch.uint8)
        else:
            tensors[name] = value.to(torch.bfloat16)
    save_file(tensors, str(folder / "model.safetensors"))
    qc = {"quant_method": "mxfp4", "modules_to_not_convert": ["model.layers.*.self_attn", "model.layers.*.mlp.router"]}
    config = {**model.config.to_dict(), "quantization_config": qc, "dtype": "bfloat16"}
    config["architectures"] = [type(model).__name__]
    (folder / "config.json").write_text(json.dumps(config))
    return folder


@pytest.fixture(scope="module")
def oss(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("mxfp4")
    adapter = make_peft_adapter(tiny_gpt_oss, tmp, "adapter", target_modules=["q_proj", "v_proj"])
    base = write_mxfp4_base(tmp / "base", tiny_gpt_oss())
    return SimpleNamespace(tmp=tmp, adapter=adapter, base=base, tensors=load_file(base / "model.safetensors"))


def test_mxfp4_experts_kept_and_attention_merged(oss):
    """An attention LoRA on gpt-oss: the MXFP4 experts are copied byte for byte, config.json kept; transformers
    loads the result on CPU (dequantizing the experts) and its attention weights are the PEFT merge's."""
    out = oss.tmp / "same"
    report = merge_into_base(oss.adapter.path, oss.base, out)
    assert report.written_as.startswith("MXFP4")
    raw_in, raw_out = _raw(oss.base / "model.safetensors"), _raw(out / "model.safetensors")
    assert all(raw_out[k] == raw_in[k] for k in raw_in if k.endswith(("_blocks", "_scales")))
    assert json.loads((out / "config.json").read_text()) == json.loads((oss.base / "config.json").read_text())
    written = load_file(out / "model.safetensors")
    for name, module in oss.adapter.peft_model.named_modules():
        if name.endswith(("q_proj", "v_proj")) and hasattr(module, "get_delta_weight"):
            key = name.removeprefix("base_model.model.") + ".weight"
            reference = oss.tensors[key].float() + module.get_delta_weight("default").detach()
            assert_bf16_close(written[key], reference, key)
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    experts = model.model.layers[1].mlp.experts.down_proj.detach()
    key = "model.layers.1.mlp.experts.down_proj"
    ours = load_file_dense(oss.base, key)
    assert torch.equal(experts, ours), "transformers' dequantization of the kept experts"


def load_file_dense(base: Path, key: str) -> torch.Tensor:
    from loramix.io.base import open_base

    tensor = open_base(base).dense(key)
    return tensor.rows(0, tensor.shape[0])


def test_mxfp4_dense_output_is_transformers_dequantization(oss):
    mxfp4 = pytest.importorskip("transformers.integrations.mxfp4")
    out = oss.tmp / "dense"
    merge_into_base(oss.adapter.path, oss.base, out, dtype="bfloat16")
    written = load_file(out / "model.safetensors")
    assert not [k for k in written if k.endswith(("_blocks", "_scales"))]
    assert "quantization_config" not in json.loads((out / "config.json").read_text())
    for proj in ("gate_up_proj", "down_proj"):
        key = f"model.layers.0.mlp.experts.{proj}"
        blocks, scales = oss.tensors[key + "_blocks"], oss.tensors[key + "_scales"]
        expected = mxfp4.convert_moe_packed_tensors(blocks, scales, dtype=torch.bfloat16)
        assert torch.equal(written[key], expected), key
    model = AutoModelForCausalLM.from_pretrained(out)
    assert torch.equal(
        model.model.layers[0].mlp.experts.gate_up_proj, written["model.layers.0.mlp.experts.gate_up_proj"]
    )


def test_mxfp4_damaged_scales_are_refused(oss, tmp_path):
    folder = tmp_path / "damaged"
    shutil.copytree(oss.base, folder)
    tensors = dict(oss.tensors)
    key = "model.layers.0.mlp.experts.down_proj_scales"
    tensors[key] = tensors[key][:, :, :1].contiguous()
    save_file(tensors, str(folder / "model.safetensors"))
    with pytest.raises(CheckpointError, match=f"tensor {key}: uint8 \\[4, 64, 1\\], expected uint8 \\[4, 64, 2\\]"):
        merge_into_base(oss.adapter.path, folder, tmp_path / "out")
    assert not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------------------------- GPTQ / AWQ int4

AWQ_ORDER = [0, 2, 4, 6, 1, 3, 5, 7]  # AutoAWQ: nibble i of a word holds output column 8j + AWQ_ORDER[i]


def pack_columns(values: torch.Tensor, order: list[int]) -> torch.Tensor:
    """[n, 8m] 4-bit ints → [n, m] int32, nibble i of word j holding column 8j + order[i] (qzeros; AWQ)."""
    words = torch.zeros(values.shape[0], values.shape[1] // 8, dtype=torch.int64)
    for i, column in enumerate(order):
        words |= values[:, column::8].long() << (4 * i)
    words = torch.where(words >= 2**31, words - 2**32, words)
    return words.to(torch.int32)


def int4_module(
    out: int, inputs: int, group: int, method: str, act_order: bool, gen, offset: int = 1
) -> tuple[dict, torch.Tensor]:
    """One module's GPTQ/AWQ tensors, packed here from the formats' descriptions, and W (float64) they encode:
    W[o, i] = (q[i, o] − z[g(i), o]) · s[g(i), o], GPTQ v1 storing z − 1 (``offset`` 0: v2, z as it is)."""
    q = torch.randint(0, 16, (inputs, out), generator=gen)
    zeros = torch.randint(1, 16, (inputs // group, out), generator=gen)
    scales = (torch.rand(inputs // group, out, generator=gen) * 0.01 + 0.001).to(torch.float16)
    g_idx = torch.arange(inputs) // group
    if act_order:
        g_idx = g_idx[torch.randperm(inputs, generator=gen)]
    W = ((q - zeros[g_idx]).double() * scales.double()[g_idx]).T
    if method == "gptq":
        qweight = torch.where((words := pack_rows_int64(q)) >= 2**31, words - 2**32, words).to(torch.int32)
        parts = {"qweight": qweight, "qzeros": pack_columns(zeros - offset, list(range(8))), "scales": scales}
        parts["g_idx"] = g_idx.to(torch.int32)
    else:
        parts = {"qweight": pack_columns(q, AWQ_ORDER), "qzeros": pack_columns(zeros, AWQ_ORDER), "scales": scales}
    return parts, W


def pack_rows_int64(values: torch.Tensor) -> torch.Tensor:
    words = torch.zeros(values.shape[0] // 8, values.shape[1], dtype=torch.int64)
    for j in range(8):
        words |= values[j::8].long() << (4 * j)
    return words


def write_int4_base(
    folder: Path, model: torch.nn.Module, method: str, act_order: bool, qc: dict | None = None
) -> tuple[Path, dict]:
    """``model``'s decoder Linears as GPTQ (v1 zeros unless ``qc`` says checkpoint_format gptq_v2) or AWQ tensors;
    ``qc`` replaces the default quantization_config."""
    folder.mkdir(parents=True)
    gen = torch.Generator().manual_seed(5)
    tensors, dense = {}, {}
    offset = 0 if (qc or {}).get("checkpoint_format") == "gptq_v2" else 1
    for name, value in model.state_dict().items():
        if name.endswith(".weight") and name.rsplit(".", 2)[-2] in LINEARS:
            parts, W = int4_module(*value.shape, 32, method, act_order, gen, offset)
            module = name.removesuffix(".weight")
            tensors |= {f"{module}.{k}": v for k, v in parts.items()}
            dense[name] = W
        else:
            tensors[name] = value.to(torch.float16)
    save_file(tensors, str(folder / "model.safetensors"))
    if qc is None and method == "gptq":
        qc = {"quant_method": "gptq", "bits": 4, "group_size": 32, "desc_act": act_order, "sym": False}
    elif qc is None:
        qc = {"quant_method": "awq", "bits": 4, "group_size": 32, "zero_point": True, "version": "gemm"}
    config = {**model.config.to_dict(), "quantization_config": qc, "dtype": "float16"}
    (folder / "config.json").write_text(json.dumps(config))
    return folder, dense


@pytest.mark.parametrize("method, act_order", [("gptq", True), ("awq", False)])
def test_int4_bases_read_against_float64_reference_and_written_dense(made, method, act_order):
    base, dense = write_int4_base(made.tmp / f"{method}-base", tiny(), method, act_order)
    from loramix.io.base import open_base

    opened = open_base(base)
    for key, W in dense.items():
        ours = opened.dense(key)
        assert ours.shape == tuple(W.shape)
        assert torch.equal(ours.rows(0, ours.shape[0]).double(), W), key  # (q − z)·s is exact in float32
    out = made.tmp / f"{method}-dense"
    report = merge_into_base(made.adapter, base, out, dtype="bfloat16")
    assert report.written_as.startswith(f"dense bfloat16, dequantized from {method.upper()} int4")
    written = load_file(out / "model.safetensors")
    assert not [k for k in written if k.endswith((".qweight", ".qzeros", ".scales", ".g_idx"))]
    assert "quantization_config" not in json.loads((out / "config.json").read_text())
    for key, W in dense.items():
        if key in made.deltas:
            assert_bf16_close(written[key], W + made.deltas[key].double(), key)
        else:
            assert torch.equal(written[key], W.to(torch.bfloat16)), key
    AutoModelForCausalLM.from_pretrained(out)


# ----------------------------------------------------------------------------------------------- refusals


def _damaged(made, name: str, edit) -> Path:
    folder = made.tmp / name
    shutil.copytree(made.base, folder)
    tensors = dict(made.tensors)
    config = json.loads((folder / "config.json").read_text())
    edit(tensors, config)
    save_file(tensors, str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps(config))
    return folder


Q = "model.layers.0.self_attn.q_proj.weight"


def _drop_scale(tensors, config):
    del tensors[Q + "_scale_inv"]


def _nan_scale(tensors, config):
    tensors[Q + "_scale_inv"] = tensors[Q + "_scale_inv"].clone().fill_(float("nan"))


def _wrong_block(tensors, config):
    config["quantization_config"]["weight_block_size"] = [16, 16]


def _no_config(tensors, config):
    del config["quantization_config"]


def _gptq(tensors, config):
    config["quantization_config"] = {"quant_method": "gptq", "bits": 4, "group_size": 32}
    tensors["model.layers.0.mlp.up_proj.qweight"] = torch.zeros(8, 96, dtype=torch.int32)


def _gptq_8bit(tensors, config):
    config["quantization_config"] = {"quant_method": "gptq", "bits": 8, "group_size": 32}


def _static(tensors, config):
    config["quantization_config"]["activation_scheme"] = "static"


def _per_tensor(tensors, config):
    del config["quantization_config"]["weight_block_size"]


def _ct_int4(tensors, config):
    config["quantization_config"] = {**ct_config("channel", False), "format": "pack-quantized"}


def _ct_missing_scale(tensors, config):
    config["quantization_config"] = ct_config("channel", False)  # its weights' scales are named _scale_inv


@pytest.mark.parametrize(
    "edit, says",
    [
        (_drop_scale, f"tensor {Q}: float8_e4m3fn weight without its scale tensor"),
        (_nan_scale, f"tensor {Q}_scale_inv: scales that are NaN"),
        (_wrong_block, "[2, 3], expected a float [4, 6] for block FP8 (float8_e4m3fn, 16×16 blocks)"),
        (_no_config, "config.json has no quantization_config"),
        (_gptq, "tensor model.layers.0.mlp.up_proj.qzeros: missing, expected [2, 12] (GPTQ int4 (groups of 32)"),
        (_gptq_8bit, "gptq with bits 8, group_size 32, format gptq (loramix reads 4-bit)"),
        (_static, "static activation scales"),
        (_per_tensor, "weight_block_size None (per-tensor FP8)"),
        (_ct_int4, "compressed-tensors format 'pack-quantized'"),
        (_ct_missing_scale, "float8_e4m3fn weight without its scale tensor"),
    ],
)
def test_unsupported_or_damaged_quantized_base_is_one_line_and_writes_nothing(made, edit, says):
    folder = _damaged(made, edit.__name__, edit)
    out = made.tmp / f"out{edit.__name__}"
    result = CliRunner().invoke(main, ["combine", str(made.adapter), "--merge-into", str(folder), "-o", str(out)])
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and says in lines[0], result.output
    assert not out.exists()
    with pytest.raises(CheckpointError, match="dequantize the base first"):
        analyze([str(made.adapter)], base=str(folder))


def test_damaged_gguf_base_file_is_refused(tmp_path, made):
    (tmp_path / "model.gguf").write_bytes(b"GGUF")
    with pytest.raises(CheckpointError, match="model.gguf: not a readable GGUF file"):
        merge_into_base(made.adapter, tmp_path, tmp_path / "out")
    assert not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------------------------- check


def test_check_on_written_checkpoints_names_the_engines(made):
    """`loramix check` on a model folder: the format as recognised, each engine's verdict citing its reader; a
    damaged checkpoint is the reader's one-line error."""
    same, dense = made.tmp / "check-same", made.tmp / "check-dense"
    merge_into_base(made.adapter, made.base, same)
    merge_into_base(made.adapter, made.base, dense, dtype="bfloat16")
    result = CliRunner().invoke(main, ["check", str(same), str(dense)])
    assert result.exit_code == 0, result.output
    blocks = result.output.split("\n\n")
    assert (
        "vLLM          yes    block FP8 (float8_e4m3fn, 32×32 blocks): vllm/model_executor/layers/quantization/fp8.py"
        in blocks[0]
    )
    assert "transformers  yes    block FP8" in blocks[0] and "quantizer_finegrained_fp8.py" in blocks[0]
    assert "llama.cpp     n/a    reads GGUF files; llama.cpp's convert_hf_to_gguf.py converts this folder" in blocks[0]
    assert "  SGLang        yes\n" in blocks[1] + "\n"
    awq, _ = write_int4_base(made.tmp / "check-awq", tiny(), "awq", False)
    result = CliRunner().invoke(main, ["check", str(awq)])
    assert "llama.cpp     no     reads GGUF files" in result.output and "no path for awq" in result.output
    damaged = _damaged(made, "check-damaged", _nan_scale)
    result = CliRunner().invoke(main, ["check", str(damaged)])
    assert result.exit_code == 2 and "scales that are NaN" in result.output
