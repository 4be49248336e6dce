"""QLoRA-faithful merges (`merge_into_base(..., quantized_as=...)`, `combine --quantized-as`) and the below-4-bit-step
share of `analyze(..., quantized_as=...)`.

Oracles: bitsandbytes itself, called here independently (quantize_4bit → dequantize_4bit of the base weight), and
the 4-bit model transformers + bitsandbytes build (``BitsAndBytesConfig``) with PEFT's adapter on top, whose
Linear4bit layers run on CPU with bitsandbytes ≥ 0.47 (checked with 0.47.0, 0.48.2, 0.50.2). Tolerances:

- merged weights, written in float32: W' must equal dequant(quant(W)) + ΔW to float32 rounding. loramix adds ΔW
  with a fused multiply-add in row chunks and the test with one matmul, so the two can differ by a few float32 ulps
  of values below 1 (≤ 1e-6); the 4-bit round trip moves weights by ~1e-3 (4-bit steps of 0.02-scale weights), so a
  missing or wrong round trip fails by three orders of magnitude. Weights no adapter changes are compared bit for bit.
- logits, everything in float32 (base stored in float32, 4-bit model loaded with dtype and compute dtype float32):
  the 4-bit model computes x·W_qᵀ + s·(x·Aᵀ)·Bᵀ, the merged one x·(W_q + ΔW)ᵀ: the same maths in another order, so
  they agree to float32 rounding accumulated over two layers (measured ≤ 2e-7; bound 1e-5), while the plain merge
  is ~4e-2 away (the 4-bit noise the adapter was trained against).
"""

from __future__ import annotations

import json
import math
import sys

import pytest
import torch
from click.testing import CliRunner
from helpers import example_inputs, make_peft_adapter, model_output, tiny_llama
from safetensors.torch import load_file

from loramix import analyze, load_adapter, merge_into_base
from loramix.cli import main
from loramix.errors import MissingPackageError

bnb_functional = pytest.importorskip("bitsandbytes.functional")

TARGETS = ["q_proj", "v_proj", "down_proj"]
LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
ULPS = 1e-5  # a few float32 ulps of the merged values (see the module docstring)
LOGITS = 1e-5


@pytest.fixture(scope="module")
def qlora(tmp_path_factory):
    """A tiny Llama saved in bfloat16 and in float32, and a PEFT LoRA (q, v, down) made on it."""
    tmp = tmp_path_factory.mktemp("qlora")
    tiny_llama().to(torch.bfloat16).save_pretrained(tmp / "base-bf16")
    tiny_llama().save_pretrained(tmp / "base-fp32")
    made = make_peft_adapter(tiny_llama, tmp, "adapter", target_modules=TARGETS)
    return tmp, made


def _round_trip(W: torch.Tensor, quant_type: str, double_quant: bool) -> torch.Tensor:
    """bitsandbytes' own quantize_4bit → dequantize_4bit, block 64, as transformers' Linear4bit does."""
    packed, state = bnb_functional.quantize_4bit(
        W, blocksize=64, quant_type=quant_type, compress_statistics=double_quant
    )
    return bnb_functional.dequantize_4bit(packed, state)


def _deltas(made) -> dict[str, torch.Tensor]:
    """ΔW = s·B·A per base weight key (in the stored layout), from PEFT's own maths (get_delta_weight), float32."""
    model = made.load_with_peft()
    deltas = {}
    for name, module in model.base_model.model.named_modules():
        if hasattr(module, "get_delta_weight") and "default" in getattr(module, "lora_A", {}):
            deltas[f"{name}.weight"] = module.get_delta_weight("default").float()
    return deltas


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("double_quant", [False, True])
def test_faithful_merge_is_the_round_tripped_base_plus_delta(qlora, quant_type, double_quant):
    tmp, made = qlora
    base = load_file(tmp / "base-bf16" / "model.safetensors")
    out = tmp / f"merged-{quant_type}-{double_quant}"
    report = merge_into_base(
        made.path, tmp / "base-bf16", out, quantized_as=quant_type, double_quant=double_quant, dtype="float32"
    )
    plain = merge_into_base(made.path, tmp / "base-bf16", tmp / f"plain-{quant_type}-{double_quant}", dtype="float32")
    merged = load_file(out / "model.safetensors")
    plain_merged = load_file(plain.path / "model.safetensors")
    deltas = _deltas(made)
    assert len(deltas) == 2 * len(TARGETS)
    linears = sorted(k for k in base if k.split(".")[-2] in LINEARS)
    assert sorted(report.round_tripped) == linears and report.quantization.quant_type == quant_type
    for key, W in base.items():
        expected = _round_trip(W, quant_type, double_quant).float() if key in linears else W.float()
        if key in deltas:
            torch.testing.assert_close(merged[key], expected + deltas[key], rtol=0, atol=ULPS)
            gap = (plain_merged[key] - (expected + deltas[key])).abs().max()
            assert gap > 100 * ULPS, key  # the plain merge is not the trained model
        else:
            assert torch.equal(merged[key], expected), key  # round-tripped (Linear) or untouched (norms, embeddings)
    assert "lm_head.weight" not in report.round_tripped and "model.embed_tokens.weight" not in report.round_tripped


def test_targeted_round_trip_leaves_other_weights_alone(qlora):
    tmp, made = qlora
    base = load_file(tmp / "base-bf16" / "model.safetensors")
    report = merge_into_base(made.path, tmp / "base-bf16", tmp / "targeted", quantized_as="nf4", round_trip="targeted")
    merged = load_file(tmp / "targeted" / "model.safetensors")
    assert sorted(report.round_tripped) == sorted(_deltas(made))
    untargeted = [k for k in base if k.split(".")[-2] in ("k_proj", "o_proj", "gate_proj", "up_proj")]
    assert untargeted and all(torch.equal(merged[k], base[k]) for k in untargeted)


def test_row_chunks_give_the_same_checkpoint(qlora, monkeypatch):
    """The round trip takes the whole tensor (blocks and double quantization's mean span rows): chunks of one row
    (32 entries, half a block) must write the same bytes as one chunk per tensor."""
    import loramix.merge.checkpoint

    tmp, made = qlora
    merge_into_base(made.path, tmp / "base-bf16", tmp / "whole", quantized_as="nf4", double_quant=True)
    monkeypatch.setattr(loramix.merge.checkpoint, "CHUNK_ELEMENTS", 32)
    merge_into_base(made.path, tmp / "base-bf16", tmp / "rows", quantized_as="nf4", double_quant=True)
    whole, rows = (load_file(tmp / d / "model.safetensors") for d in ("whole", "rows"))
    assert whole.keys() == rows.keys() and all(torch.equal(whole[k], rows[k]) for k in whole)


@pytest.mark.parametrize(("quant_type", "double_quant"), [("nf4", False), ("nf4", True), ("fp4", True)])
def test_logits_match_the_4bit_model_with_the_adapter(qlora, quant_type, double_quant):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    tmp, made = qlora
    config = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=quant_type,
        bnb_4bit_use_double_quant=double_quant,
        bnb_4bit_compute_dtype=torch.float32,
    )
    four_bit = AutoModelForCausalLM.from_pretrained(
        tmp / "base-fp32", dtype=torch.float32, quantization_config=config, device_map="cpu"
    )
    assert type(four_bit.model.layers[0].self_attn.q_proj).__name__ == "Linear4bit"
    for module in four_bit.modules():
        # On CPUs with AVX512-BF16, bitsandbytes ≥ 0.48 repacks Linear4bit weights for a bfloat16-only kernel at the
        # first inference forward (and fails on in_features < blocksize): the oracle is its float32 path on every CPU.
        if type(module).__name__ == "Linear4bit":
            module.support_avx512bf16_for_cpu = False
    inputs = example_inputs(tiny_llama)
    trained = model_output(PeftModel.from_pretrained(four_bit, str(made.path)).eval(), inputs)
    logits = {}
    for mode in (quant_type, "none"):
        out = tmp / f"logits-{quant_type}-{double_quant}-{mode}"
        merge_into_base(
            made.path, tmp / "base-fp32", out, quantized_as=mode, double_quant=double_quant, dtype="float32"
        )
        logits[mode] = model_output(AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32), inputs)
    torch.testing.assert_close(logits[quant_type], trained, rtol=0, atol=LOGITS)
    assert (logits["none"] - trained).abs().max() > 100 * LOGITS


def test_settings_come_from_the_base_config_and_flags_override(qlora, tmp_path):
    tmp, made = qlora
    base = tmp_path / "base"
    base.mkdir()
    for item in (tmp / "base-bf16").iterdir():
        (base / item.name).write_bytes(item.read_bytes())
    config = json.loads((base / "config.json").read_text())
    config["quantization_config"] = {
        "load_in_4bit": True,
        "bnb_4bit_quant_type": "fp4",
        "bnb_4bit_use_double_quant": True,
        "bnb_4bit_compute_dtype": "bfloat16",
        "llm_int8_skip_modules": ["down_proj"],
    }
    (base / "config.json").write_text(json.dumps(config))
    read = merge_into_base(made.path, base, tmp_path / "from-config")
    assert read.quantization.quant_type == "fp4" and read.quantization.double_quant
    assert read.round_tripped and not any("down_proj" in k for k in read.round_tripped)  # skipped, as in the model
    W = load_file(base / "model.safetensors")["model.layers.0.self_attn.k_proj.weight"]
    written = load_file(tmp_path / "from-config" / "model.safetensors")["model.layers.0.self_attn.k_proj.weight"]
    assert torch.equal(written, _round_trip(W, "fp4", True))
    flagged = merge_into_base(made.path, base, tmp_path / "flags", quantized_as="nf4", double_quant=False)
    assert (flagged.quantization.quant_type, flagged.quantization.double_quant) == ("nf4", False)
    assert merge_into_base(made.path, base, tmp_path / "plain", quantized_as="none").quantization is None


def test_a_failure_inside_bitsandbytes_is_one_line_naming_its_version(qlora, tmp_path, monkeypatch):
    """What a user saw with a bitsandbytes release whose CPU kernel is missing: a traceback from the README's own
    example. Now one line naming the package, its version and what to do, exit status 2, nothing written."""
    from importlib.metadata import version

    def missing_kernel(*args, **kwargs):
        raise NotImplementedError(
            "Could not run 'bitsandbytes::quantize_4bit' with arguments from the 'CPU' backend.\nThis could be..."
        )

    tmp, made = qlora
    monkeypatch.setattr(bnb_functional, "quantize_4bit", missing_kernel)
    out = tmp_path / "out"
    result = CliRunner().invoke(
        main,
        ["combine", str(made.path), "--merge-into", str(tmp / "base-bf16"), "--quantized-as", "nf4", "-o", str(out)],
    )
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: bitsandbytes {version('bitsandbytes')} failed while ")
    assert "NotImplementedError: Could not run 'bitsandbytes::quantize_4bit'" in lines[0]
    assert "constraints.txt" in lines[0] and "Traceback" not in result.output
    assert not out.exists() and not list(tmp_path.glob(".*"))


def test_missing_bitsandbytes_names_the_extra(qlora, tmp_path, monkeypatch):
    tmp, made = qlora
    monkeypatch.setitem(sys.modules, "bitsandbytes.functional", None)
    with pytest.raises(MissingPackageError, match=r"loramix\[qlora\]"):
        merge_into_base(made.path, tmp / "base-bf16", tmp_path / "out", quantized_as="nf4")
    assert not (tmp_path / "out").exists()
    result = CliRunner().invoke(
        main,
        ["-q", "combine", str(made.path), "--merge-into", str(tmp / "base-bf16"), "--quantized-as", "nf4", "-o",
         str(tmp_path / "cli")],
    )  # fmt: skip
    assert result.exit_code == 2 and "pip install 'loramix[qlora]'" in result.output


def _brute_force_share(delta: torch.Tensor, weight: torch.Tensor, quant_type: str) -> float:
    """The definition, entry by entry in float64 Python: block absmax a over 64 consecutive entries of the flattened
    weight, c⁻/c⁺ the code-book neighbours of W/a (the top gap for W/a at the largest code), step a·(c⁺ − c⁻)."""
    codes = sorted(set(bnb_functional.get_4bit_type(quant_type, device="cpu").double().tolist()))
    flat_w = weight.double().reshape(-1).tolist()
    flat_d = delta.double().reshape(-1).tolist()
    below = total = 0.0
    for i, (w, d) in enumerate(zip(flat_w, flat_d)):
        block = flat_w[i // 64 * 64 : i // 64 * 64 + 64]
        a = max(abs(v) for v in block)
        x = w / a if a else 0.0
        if x >= codes[-1]:
            lower, upper = codes[-2], codes[-1]
        else:
            upper = min(c for c in codes if c > x)
            lower = max(c for c in codes if c <= x)
        step = a * (upper - lower)
        total += d * d
        below += d * d if abs(d) < step / 2 else 0.0
    return below / total


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_below_step_share_follows_its_definition(qlora, quant_type):
    tmp, made = qlora
    result = analyze([made.path], base=tmp / "base-bf16", quantized_as=quant_type)
    modules = result.adapters[0].modules
    base = load_file(tmp / "base-bf16" / "model.safetensors")
    adapter = load_adapter(made.path)
    for name, spectrum in modules.items():
        expected = _brute_force_share(
            adapter.modules[name].delta(dtype=torch.float64), base[f"{name}.weight"], quant_type
        )
        assert math.isclose(spectrum.below_step, expected, rel_tol=1e-9), name
    shares = [m.below_step for m in modules.values()]
    assert all(0 <= s <= 1 for s in shares) and len(set(shares)) > 1
    assert analyze([made.path], base=tmp / "base-bf16").adapters[0].below_step is None  # no 4-bit base: no figure


def test_cli_end_to_end(qlora, tmp_path):
    tmp, made = qlora
    out = tmp_path / "merged"
    args = ["-q", "combine", str(made.path), "--merge-into", str(tmp / "base-bf16"), "-o", str(out)]
    result = CliRunner().invoke(main, [*args, "--quantized-as", "fp4", "--double-quant", "--blocksize", "128"])
    assert result.exit_code == 0, result.output
    card = (out / "README.md").read_text()
    assert "## QLoRA-faithful merge" in card and "FP4, block 128, double-quantized scales" in card
    assert "6 weight(s) the adapter changes" in card and "8 other weight(s)" in card
    assert "quantized_as: fp4" in (out / "loramix_recipe.yaml").read_text()
    W = load_file(tmp / "base-bf16" / "model.safetensors")["model.layers.1.mlp.up_proj.weight"]
    packed, state = bnb_functional.quantize_4bit(W, blocksize=128, quant_type="fp4", compress_statistics=True)
    written = load_file(out / "model.safetensors")["model.layers.1.mlp.up_proj.weight"]
    assert torch.equal(written, bnb_functional.dequantize_4bit(packed, state))
    again = CliRunner().invoke(
        main, ["-q", "combine", "--recipe", str(out / "loramix_recipe.yaml"), "-o", str(tmp_path / "again")]
    )
    assert again.exit_code == 0, again.output
    assert (tmp_path / "again" / "model.safetensors").read_bytes() == (out / "model.safetensors").read_bytes()
    analysis = CliRunner().invoke(
        main, ["-q", "analyze", str(made.path), "--base", str(tmp / "base-bf16"), "--quantized-as", "nf4"]
    )
    assert analysis.exit_code == 0, analysis.output
    assert "Below the 4-bit grid (NF4, block 64, float scales)" in analysis.output
    alone = CliRunner().invoke(
        main, ["-q", "combine", str(made.path), "--quantized-as", "nf4", "-o", str(tmp_path / "x")]
    )
    assert alone.exit_code == 2 and "it needs a base (pass --merge-into BASE)" in alone.output
    assert not (tmp_path / "x").exists()


def test_gpt2_conv1d_weights_are_quantized_as_out_by_in(tmp_path):
    """GPT-2 stores c_attn/c_proj/c_fc in×out; transformers transposes them to out×in before quantize_4bit, so
    blocks run along the other axis: the written weight is dequant(quant(Wᵀ))ᵀ + ΔW."""
    from helpers import tiny_gpt2

    tiny_gpt2().to(torch.bfloat16).save_pretrained(tmp_path / "base")
    made = make_peft_adapter(tiny_gpt2, tmp_path, "adapter", target_modules=["c_attn"], fan_in_fan_out=True)
    report = merge_into_base(made.path, tmp_path / "base", tmp_path / "out", quantized_as="nf4", dtype="float32")
    base = load_file(tmp_path / "base" / "model.safetensors")
    merged = load_file(tmp_path / "out" / "model.safetensors")
    key = "transformer.h.0.mlp.c_fc.weight"  # untargeted: the round trip alone, bit for bit
    assert key in report.round_tripped and "transformer.wte.weight" not in report.round_tripped
    assert torch.equal(merged[key], _round_trip(base[key].T.contiguous(), "nf4", False).T.float())
    assert not torch.equal(merged[key], _round_trip(base[key], "nf4", False).float())
    deltas = _deltas(made)
    key = "transformer.h.1.attn.c_attn.weight"
    expected = _round_trip(base[key].T.contiguous(), "nf4", False).T.float() + deltas[key]
    torch.testing.assert_close(merged[key], expected, rtol=0, atol=ULPS)
