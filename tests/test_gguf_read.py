"""A GGUF base read as the transformers model it holds (`loramix.io.gguf_model`): extract, analyze --base and the
safetensors output of a merge take a GGUF file as they take a model folder.

The GGUF files are the tiny Llama of test_gguf_base, written as llama.cpp's convert_hf_to_gguf.py writes one (gguf's
TensorNameMap, q/k rows permuted). Oracles: extraction from the same weights in a safetensors folder (exact for F32;
F16 against the float16-rounded weights), transformers' own GGUF loading (``from_pretrained(..., gguf_file=)``,
dequantized by gguf, its q/k rows permuted back) saved as safetensors for the quantized types (Q8_0, Q4_K), and
float64 norms of those weights.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from helpers import make_peft_adapter
from safetensors.torch import save_file
from test_gguf_base import TYPES, _swap_to_q4_k, tiny, with_tensor, write_gguf_base

from loramix import analyze
from loramix.cli import main
from loramix.extraction import extract_lora
from loramix.linalg import RankRule

gguf = pytest.importorskip("gguf")


def tuned() -> torch.nn.Module:
    """The tiny Llama with a rank-2 change on every projection (and one norm), in float32."""
    model = tiny()
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 2 and "embed" not in name and "lm_head" not in name:
                p += 0.05 * torch.randn(p.shape[0], 2, generator=gen) @ torch.randn(2, p.shape[1], generator=gen)
        model.model.layers[1].input_layernorm.weight += 0.5
    return model


def deltas(result) -> dict[str, torch.Tensor]:
    return {name: m.delta(dtype=torch.float64) for name, m in result.adapter.modules.items()}


def as_transformers_loads(gguf_file, folder) -> torch.nn.Module:
    """transformers' own reading of ``gguf_file`` (float32), saved as a safetensors model folder ``folder``."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name, dtype=torch.float32)
    folder.mkdir()
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, folder / "model.safetensors")
    config = {k: v for k, v in model.config.to_dict().items() if k != "quantization_config"}
    (folder / "config.json").write_text(json.dumps(config))
    return model


@pytest.mark.parametrize("kind", ["F32", "F16"])
def test_extract_from_a_float_gguf_base_is_extraction_from_the_same_weights(tmp_path, kind):
    """A GGUF base of float tensors holds the weights themselves: the adapter extracted from it equals the one
    extracted from the same weights in a safetensors folder (F16: the weights rounded to float16), to float32
    rounding of the same arithmetic (1e-6 of ‖ΔW‖); the changed norm is carried in both."""
    model, tuned_model = tiny(), tuned()
    write_gguf_base(tmp_path / "base.gguf", model, dict.fromkeys(TYPES, kind))
    if kind == "F16":
        for name, p in model.named_parameters():
            if name.endswith("proj.weight"):  # write_gguf_base stores the projections in the asked type, the rest F32
                p.data = p.data.half().float()
    model.save_pretrained(tmp_path / "base")
    tuned_model.save_pretrained(tmp_path / "tuned")
    ours = extract_lora(tmp_path / "base.gguf", tmp_path / "tuned", rank_rule=RankRule(rank=4))
    oracle = extract_lora(tmp_path / "base", tmp_path / "tuned", rank_rule=RankRule(rank=4))
    mine, theirs = deltas(ours), deltas(oracle)
    assert len(theirs) == 14 and mine.keys() == theirs.keys()
    for name, delta in theirs.items():
        assert float((mine[name] - delta).norm()) <= 1e-6 * float(delta.norm()), name
    assert ours.adapter.extra.keys() == oracle.adapter.extra.keys() == {"model.layers.1.input_layernorm.weight"}


def test_extract_between_quantized_ggufs_is_extraction_from_their_dequantized_weights(tmp_path):
    """Base and fine-tuned both GGUF in Q8_0 (q, k, gate, …) and Q4_K (one down projection, which gguf reads but
    cannot write): the adapter equals the one extracted from transformers' own dequantization of the two files
    saved as safetensors (1e-6 of ‖ΔW‖: the same float32 values either way)."""
    for name, model in (("base", tiny()), ("tuned", tuned())):
        folder = tmp_path / f"{name}-gguf"
        folder.mkdir()
        write_gguf_base(folder / "plain.gguf", model, dict.fromkeys(TYPES, "Q8_0"))
        _swap_to_q4_k(folder / "plain.gguf", folder / f"{name}.gguf")
        (folder / "plain.gguf").unlink()
        as_transformers_loads(folder / f"{name}.gguf", tmp_path / f"{name}-st")
    ours = extract_lora(tmp_path / "base-gguf", tmp_path / "tuned-gguf" / "tuned.gguf", rank_rule=RankRule(rank=4))
    oracle = extract_lora(tmp_path / "base-st", tmp_path / "tuned-st", rank_rule=RankRule(rank=4))
    mine, theirs = deltas(ours), deltas(oracle)
    assert len(theirs) == 13 and mine.keys() == theirs.keys()  # blk.0.ffn_down: the same Q4_K codes in both
    for name, delta in theirs.items():
        assert float((mine[name] - delta).norm()) <= 1e-6 * float(delta.norm()), name


def test_analyze_with_a_gguf_base_gives_the_norms_of_its_dequantized_weights(tmp_path):
    """‖W‖ of each module's base weight from a GGUF base (Q8_0, Q4_0, Q5_1 … and a Q4_K tensor) equals the float64
    norm of transformers' own dequantization of that weight (relative 1e-12: the same float32 values)."""
    folder = tmp_path / "k"
    folder.mkdir()
    write_gguf_base(folder / "plain.gguf", tiny())
    _swap_to_q4_k(folder / "plain.gguf", folder / "k4.gguf")
    (folder / "plain.gguf").unlink()
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "down_proj", "up_proj"]
    adapter = make_peft_adapter(tiny, tmp_path, "adapter", target_modules=targets)
    reference = dict(as_transformers_loads(folder / "k4.gguf", tmp_path / "st").named_parameters())
    modules = analyze([adapter.path], base=folder / "k4.gguf").adapters[0].modules
    assert len(modules) == 14
    for name, module in modules.items():
        expected = float(reference[f"{name}.weight"].detach().double().norm())
        assert module.base_norm == pytest.approx(expected, rel=1e-12), name
    result = CliRunner().invoke(main, ["analyze", str(adapter.path), "--base", str(folder)])
    assert result.exit_code == 0, result.output


def _truncated(source, target) -> None:
    data = source.read_bytes()
    target.write_bytes(data[: len(data) - 1000])


def _with_q8_1(source, target) -> None:
    """``source`` with blk.0.attn_v.weight (32 × 64) stored as Q8_1 (two 40-byte blocks a row), a type gguf 0.19
    cannot dequantize."""
    q8_1 = gguf.GGMLQuantizationType.Q8_1
    with_tensor(source, target, "blk.0.attn_v.weight", np.zeros((32, 80), dtype=np.uint8), q8_1)


def _as_gemma(source, target) -> None:
    """``source``'s keys and tensors under another architecture name, one that loramix does not read as a
    transformers model (Gemma: llama.cpp stores its norms as weight + 1)."""
    with_tensor(source, target, None, architecture="gemma")


@pytest.mark.parametrize(
    "damage, says",
    [
        (_truncated, "base.gguf: not a readable GGUF file"),
        (_as_gemma, "base.gguf: GGUF architecture gemma; loramix reads llama, qwen2 GGUF bases"),
        (_with_q8_1, "base.gguf: tensor blk.0.attn_v.weight is Q8_1, which gguf cannot dequantize"),
    ],
)
def test_a_damaged_or_unreadable_gguf_base_is_one_line_with_nothing_written(tmp_path, damage, says):
    write_gguf_base(tmp_path / "whole.gguf", tiny())
    (tmp_path / "in").mkdir()
    damage(tmp_path / "whole.gguf", tmp_path / "in" / "base.gguf")
    tuned().save_pretrained(tmp_path / "tuned")
    args = ["extract", str(tmp_path / "in" / "base.gguf"), str(tmp_path / "tuned"), "--rank", "4"]
    result = CliRunner().invoke(main, [*args, "-o", str(tmp_path / "out")])
    assert result.exit_code == 2 and len(result.output.strip().splitlines()) == 1, result.output
    assert says in result.output
    assert not (tmp_path / "out").exists()


def test_convert_dora_with_a_gguf_base_is_conversion_on_its_dequantized_weights(tmp_path):
    """A DoRA adapter's effective update depends on W: converted with a Q8_0 GGUF base it equals the conversion with
    transformers' dequantization of that file as the base (1e-6 of ‖ΔW‖)."""
    from loramix import load_adapter
    from loramix.extraction.conversion import convert_lora

    folder = tmp_path / "q8"
    folder.mkdir()
    write_gguf_base(folder / "q8.gguf", tiny(), dict.fromkeys(TYPES, "Q8_0"))
    as_transformers_loads(folder / "q8.gguf", tmp_path / "st")
    dora = load_adapter(
        make_peft_adapter(tiny, tmp_path, "dora", target_modules=["q_proj", "k_proj"], use_dora=True).path
    )
    mine = deltas(convert_lora(dora, base=folder / "q8.gguf", rank_rule=RankRule(rank=8)))
    theirs = deltas(convert_lora(dora, base=tmp_path / "st", rank_rule=RankRule(rank=8)))
    assert len(theirs) == 4 and mine.keys() == theirs.keys()
    for name, delta in theirs.items():
        assert float((mine[name] - delta).norm()) <= 1e-6 * float(delta.norm()), name


def bf16_step(values: torch.Tensor) -> torch.Tensor:
    """The spacing of bfloat16 numbers at ``values`` (8 significant bits): 2^(⌊log2 |x|⌋ − 7)."""
    return torch.exp2(torch.floor(torch.log2(values.abs().clamp(min=2.0**-126))) - 7)


@pytest.fixture(scope="module")
def merged(tmp_path_factory):
    """A GGUF base of every legacy type (test_gguf_base's TYPES), a PEFT LoRA on every projection and PEFT's ΔW,
    and the base as transformers' own GGUF loading reads it (float32)."""
    from transformers import AutoModelForCausalLM

    tmp = tmp_path_factory.mktemp("gguf-to-safetensors")
    (tmp / "base").mkdir()
    base = write_gguf_base(tmp / "base" / "tiny-llama.gguf", tiny())
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "down_proj", "up_proj"]
    adapter = make_peft_adapter(tiny, tmp, "adapter", target_modules=targets)
    delta = {
        name.removeprefix("base_model.model.") + ".weight": module.get_delta_weight("default").detach().double()
        for name, module in adapter.peft_model.named_modules()
        if hasattr(module, "get_delta_weight") and "default" in getattr(module, "lora_A", {})
    }
    loaded = AutoModelForCausalLM.from_pretrained(base.parent, gguf_file=base.name, dtype=torch.float32)
    before = {k: v.detach().double() for k, v in loaded.state_dict().items()}
    return tmp, adapter.path, base, delta, before


def test_a_gguf_base_merged_as_safetensors_loads_in_transformers_with_peft_delta(merged):
    """``--merged-format safetensors --dtype bfloat16``: a transformers folder (config.json from the GGUF metadata)
    that ``AutoModelForCausalLM.from_pretrained`` loads; each merged weight is transformers' own dequantization of
    the GGUF base plus PEFT's ΔW within one bfloat16 step of the float64 sum (rounded once to bfloat16: at most
    half a step apart), every other tensor that dequantization rounded to bfloat16 exactly; the "wrote" line and the
    card say what was written."""
    from transformers import AutoModelForCausalLM

    tmp, adapter, base, delta, before = merged
    out = tmp / "bf16"
    args = ["-q", "combine", str(adapter), "--merge-into", str(base), "--merged-format", "safetensors"]
    result = CliRunner().invoke(main, [*args, "--dtype", "bfloat16", "-o", str(out)])
    assert result.exit_code == 0, result.output
    assert (
        "written as a transformers safetensors folder (LlamaForCausalLM, bfloat16): the GGUF base (BF16, F16, F32, "
        "Q4_0, Q4_1, Q5_0, Q5_1, Q8_0) dequantized by gguf under transformers' names" in result.output
    )
    assert "config.json from its metadata, no tokenizer files (transformers builds none" in result.output
    assert sorted(p.name for p in out.iterdir()) == [
        "README.md",
        "config.json",
        "loramix_recipe.yaml",
        "model.safetensors",
    ]
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and config["dtype"] == "bfloat16"
    assert "quantization_config" not in config and config["num_key_value_heads"] == 2
    assert "stored as a transformers safetensors folder" in (out / "README.md").read_text()
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.dtype == torch.bfloat16
    after = {k: v.detach().double() for k, v in model.state_dict().items()}
    assert after.keys() == before.keys() and len(delta) == 14
    for name, weight in before.items():
        expected = weight + delta.get(name, 0)
        assert bool(((after[name] - expected).abs() <= bf16_step(expected)).all()), name
        if name not in delta:
            assert torch.equal(after[name], weight.to(torch.bfloat16).double()), name
    assert torch.isfinite(model(torch.arange(8)[None]).logits).all()


def test_without_a_dtype_the_safetensors_output_keeps_the_dequantized_values(merged):
    """No --dtype: quantized tensors as float32 (gguf's dequantized values, exactly), F16/BF16 ones in their own
    dtype; a merged float32 weight is the float64 sum W + ΔW to float32 rounding (2⁻²³ relative, 2 steps)."""
    from safetensors.torch import load_file

    from loramix import merge_into_base

    tmp, adapter, base, delta, before = merged
    report = merge_into_base(adapter, base, tmp / "f32", merged_format="safetensors")
    assert "(LlamaForCausalLM, F32/F16/BF16 as they were, quantized types as float32)" in report.written_as
    stored = load_file(tmp / "f32" / "model.safetensors")
    assert stored["model.layers.0.self_attn.o_proj.weight"].dtype == torch.float16  # attn_output is F16
    assert stored["model.layers.0.mlp.up_proj.weight"].dtype == torch.bfloat16  # ffn_up is BF16
    assert stored["model.layers.0.self_attn.q_proj.weight"].dtype == torch.float32  # attn_q is Q8_0
    for name, weight in before.items():
        if stored[name].dtype == torch.float32:
            expected = weight + delta.get(name, 0)
            assert bool(((stored[name].double() - expected).abs() <= 2.0**-22 * expected.abs()).all()), name


def test_merged_format_gguf_needs_a_gguf_base(merged):
    tmp, adapter, base, delta, before = merged
    from loramix import merge_into_base
    from loramix.errors import SettingError

    with pytest.raises(SettingError, match="merged_format must be one of gguf, safetensors, got 'gguff'"):
        merge_into_base(adapter, base, tmp / "typo", merged_format="gguff")  # a typo is no silent default
    assert not (tmp / "typo").exists()
    dense = tmp / "dense-base"
    tiny().save_pretrained(dense)
    args = ["combine", str(adapter), "--merge-into", str(dense), "--merged-format", "gguf", "-o", str(tmp / "x")]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 2 and len(result.output.strip().splitlines()) == 1, result.output
    assert "--merged-format gguf writes a GGUF base as GGUF again" in result.output
    assert "(pass --merged-format" not in result.output  # no flag avoids it: the hint would mislead
    assert not (tmp / "x").exists()
    result = CliRunner().invoke(main, ["combine", str(adapter), "--merged-format", "safetensors", "-o", str(tmp / "x")])
    assert (
        result.exit_code == 2
        and "--merged-format applies to a merged checkpoint" in result.output
        and not (tmp / "x").exists()
    )


def _with_tokenizer(writer) -> None:
    """A byte-level BPE tokenizer as llama.cpp stores one (tokenizer.ggml.model gpt2: tokens, types, merges)."""
    tokens = [chr(c) for c in range(ord("a"), ord("a") + 26)] + ["<s>", "</s>", "ab", "abc"]
    tokens += [f"x{i}" for i in range(64 - len(tokens))]
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(tokens)
    writer.add_token_types([1] * len(tokens))
    writer.add_token_merges(["a b", "ab c"])
    writer.add_bos_token_id(26)
    writer.add_eos_token_id(27)


def test_the_safetensors_output_carries_the_tokenizer_transformers_builds_from_the_gguf(merged, tmp_path):
    """A GGUF base with llama.cpp's tokenizer metadata: the folder holds the tokenizer transformers' own GGUF
    converter builds, which encodes as ``AutoTokenizer.from_pretrained(..., gguf_file=...)`` does."""
    from transformers import AutoTokenizer

    from loramix import merge_into_base

    tmp, adapter, base, delta, before = merged
    (tmp_path / "tok").mkdir()
    with_tensor(base, tmp_path / "tok" / "tok.gguf", None, fields=_with_tokenizer)
    report = merge_into_base(adapter, tmp_path / "tok" / "tok.gguf", tmp_path / "out", merged_format="safetensors")
    assert "the tokenizer transformers builds from it (tokenizer.json, tokenizer_config.json)" in report.written_as
    theirs = AutoTokenizer.from_pretrained(tmp_path / "tok", gguf_file="tok.gguf")
    ours = AutoTokenizer.from_pretrained(tmp_path / "out")
    for text in ("abcab", "zab abc"):
        assert ours(text)["input_ids"] == theirs(text)["input_ids"], text


def test_a_k_quant_gguf_base_merged_as_safetensors(merged, tmp_path):
    """A Q4_K tensor (which gguf cannot quantize again, so a GGUF output refuses it without --dtype) merges into a
    safetensors folder: its merged weight is transformers' dequantization of the Q4_K tensor plus PEFT's ΔW to
    float32 rounding (2⁻²² relative)."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from loramix import merge_into_base

    tmp, adapter, base, delta, before = merged
    (tmp_path / "k").mkdir()
    _swap_to_q4_k(base, tmp_path / "k" / "k4.gguf")
    merge_into_base(adapter, tmp_path / "k" / "k4.gguf", tmp_path / "out", merged_format="safetensors")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "k", gguf_file="k4.gguf", dtype=torch.float32)
    name = "model.layers.0.mlp.down_proj.weight"  # blk.0.ffn_down: Q4_K
    expected = loaded.state_dict()[name].double() + delta[name]
    stored = load_file(tmp_path / "out" / "model.safetensors")[name].double()
    assert bool(((stored - expected).abs() <= 2.0**-22 * expected.abs()).all())
