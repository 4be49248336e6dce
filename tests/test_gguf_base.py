"""Merging into a GGUF base file (`loramix.io.gguf_base`, `loramix.merge.gguf`): the merged model written as GGUF
again, each changed tensor re-quantized in its own type by gguf, or stored unquantized with a dtype.

The base is made here as llama.cpp's convert_hf_to_gguf.py makes one from a tiny transformers Llama: names from
gguf's own TensorNameMap, q/k rows permuted as its ``LlamaModel.permute`` does (rebuilt from its definition), each
projection in another type (quantized by gguf). Oracle: PEFT's ``get_delta_weight`` put through the same map and
permutation, and gguf's own dequantize/quantize: the written tensor, dequantized by gguf, against
gguf.quantize(gguf.dequantize(W) + ΔW) dequantized. loramix forms ΔW with its own float32 products, so a block's
scale or a value on a rounding boundary may differ: ≥ 99% of entries equal, all within one block step. Tensors no
module changes, and every metadata key, byte for byte.
"""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from helpers import make_peft_adapter, random_model

from loramix import merge_into_base
from loramix.cli import main
from loramix.errors import CheckpointError

gguf = pytest.importorskip("gguf")

TYPES = {  # the GGUF type of each projection in the test base
    "attn_q": "Q8_0",
    "attn_k": "Q4_0",
    "attn_v": "Q5_1",
    "attn_output": "F16",
    "ffn_gate": "Q4_1",
    "ffn_down": "Q5_0",
    "ffn_up": "BF16",
}
HEADS, KV_HEADS = 4, 2


def tiny() -> torch.nn.Module:
    return random_model(
        "llama",
        vocab_size=64,
        hidden_size=64,
        intermediate_size=256,  # ffn_down's rows one k-quant block (256) long
        num_hidden_layers=2,
        num_attention_heads=HEADS,
        num_key_value_heads=KV_HEADS,
        max_position_embeddings=64,
        tie_word_embeddings=False,
    )


def permute(rows: torch.Tensor, heads: int) -> torch.Tensor:
    """convert_hf_to_gguf.py's LlamaModel.permute, from its definition."""
    return rows.reshape(heads, 2, rows.shape[0] // heads // 2, *rows.shape[1:]).swapaxes(1, 2).reshape(rows.shape)


def gguf_name(name: str) -> str:
    return gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, 2).get_name(name, try_suffixes=(".weight", ".bias"))


def hf_to_gguf(name: str, value: torch.Tensor) -> torch.Tensor:
    if name.endswith("q_proj.weight"):
        return permute(value, HEADS)
    if name.endswith("k_proj.weight"):
        return permute(value, KV_HEADS)
    return value


def write_gguf_base(path, model: torch.nn.Module, types: dict[str, str] = TYPES):
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_type(gguf.GGUFType.MODEL)
    writer.add_block_count(2)
    writer.add_head_count(HEADS)
    writer.add_head_count_kv(KV_HEADS)
    writer.add_embedding_length(64)
    writer.add_context_length(64)
    writer.add_feed_forward_length(256)
    writer.add_rope_dimension_count(64 // HEADS)
    writer.add_layer_norm_rms_eps(1e-6)
    writer.add_token_list([f"t{i}" for i in range(64)])
    for name, value in model.state_dict().items():
        target = gguf_name(name)
        kind = types.get(target.split(".")[-2], "F32")
        data = hf_to_gguf(name, value.detach().float()).numpy()
        qtype = gguf.GGMLQuantizationType[kind]
        writer.add_tensor(target, gguf.quants.quantize(data, qtype), raw_dtype=None if kind == "F32" else qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def read(path) -> dict:
    reader = gguf.GGUFReader(str(path))
    return {t.name: t for t in reader.tensors}


def fields(path) -> dict:
    reader = gguf.GGUFReader(str(path))
    return {f.name: (f.types, f.contents()) for f in reader.fields.values() if not f.name.startswith("GGUF.")}


def dequantized(tensor) -> torch.Tensor:
    return torch.from_numpy(gguf.quants.dequantize(tensor.data, tensor.tensor_type).astype(np.float64))


def block_step(tensor) -> torch.Tensor:
    """Each entry's block step d, read from ggml's block layout (its first ggml_half) by hand (float64)."""
    block, size = gguf.GGML_QUANT_SIZES[tensor.tensor_type]
    d = np.frombuffer(tensor.data.reshape(-1, size)[:, :2].tobytes(), dtype=np.float16).astype(np.float64)
    return torch.from_numpy(np.repeat(d, block)).reshape(tensor.data.shape[0], -1)


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("gguf-base")
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "down_proj", "up_proj"]
    adapter = make_peft_adapter(tiny, tmp, "adapter", target_modules=targets)
    (tmp / "base").mkdir()
    base = write_gguf_base(tmp / "base" / "tiny-llama.gguf", tiny())
    deltas, as_in_hf = {}, {}
    for name, module in adapter.peft_model.named_modules():
        if hasattr(module, "get_delta_weight") and "default" in getattr(module, "lora_A", {}):
            hf = name.removeprefix("base_model.model.") + ".weight"
            as_in_hf[gguf_name(hf)] = module.get_delta_weight("default").detach().double()
            deltas[gguf_name(hf)] = hf_to_gguf(hf, as_in_hf[gguf_name(hf)])
    return SimpleNamespace(tmp=tmp, adapter=adapter.path, base=base, deltas=deltas, as_in_hf=as_in_hf)


def test_gguf_same_types_are_gguf_requantization(made):
    out = made.tmp / "same"
    report = merge_into_base(made.adapter, made.base, out)
    written, original = read(out / "tiny-llama.gguf"), read(made.base)
    assert list(written) == list(original)
    assert fields(out / "tiny-llama.gguf") == fields(made.base)
    assert len(made.deltas) == 14
    for name, delta in made.deltas.items():
        ours, base = written[name], original[name]
        assert ours.tensor_type == base.tensor_type, name
        expected = gguf.quants.quantize((dequantized(base) + delta).float().numpy(), base.tensor_type)
        theirs = torch.from_numpy(gguf.quants.dequantize(expected, base.tensor_type).astype(np.float64))
        mine = dequantized(ours)
        assert (mine == theirs).double().mean() >= 0.99, name
        kind = base.tensor_type.name
        if kind in ("F16", "BF16"):
            ulp = torch.from_numpy(np.spacing(np.abs(theirs.numpy()).astype(np.float16)).astype(np.float64))
            tolerance = ulp * (8 if kind == "BF16" else 1)  # bf16 has 3 fewer mantissa bits than f16
        else:
            tolerance = torch.maximum(block_step(ours).abs(), block_step(base).abs())  # Q4_0 stores d = max / -8
        assert bool(((mine - theirs).abs() <= tolerance * 1.001).all()), name
    untouched = [n for n in original if n not in made.deltas]
    assert untouched and all(bytes(written[n].data) == bytes(original[n].data) for n in untouched)
    assert report.written_as.startswith("GGUF (BF16, F16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0), the merged tensors")
    legacy = [m for m, v in report.below_step.items() if not np.isnan(v)]
    assert len(legacy) == 10 and all(0 <= report.below_step[m] <= 1 for m in legacy)  # Q* types: one step a block
    card = (out / "README.md").read_text()
    assert "## Quantized base" in card and "stored as GGUF" in card


def test_q_and_k_rows_are_permuted_as_llama_cpp_does(made):
    """The same merge without the permutation would be far off: the oracle tells the layouts apart."""
    out = made.tmp / "perm"
    merge_into_base(made.adapter, made.base, out)
    written, original = read(out / "tiny-llama.gguf"), read(made.base)
    for name in ("blk.0.attn_q.weight", "blk.1.attn_k.weight"):
        stored = dequantized(written[name]) - dequantized(original[name])
        delta, unpermuted = made.deltas[name], made.as_in_hf[name]
        assert float((stored - delta).norm() / delta.norm()) < 0.1, name
        assert float((stored - unpermuted).norm() / delta.norm()) > 0.5, name


def test_gguf_k_quants_refused_in_their_type_and_written_unquantized(made):
    """A Q4_K tensor (gguf dequantizes k-quants but cannot quantize them): the same-format merge is one line naming
    the tensor and --dtype; with --dtype float16 the file is a dense GGUF, as convert_hf_to_gguf.py writes one with
    --outtype f16: the merged tensors F16 within one f16 step of gguf's dequantization of the Q4_K base plus ΔW,
    every other tensor of 2 dimensions gguf's dequantization rounded to F16 (exactly), 1-D ones byte for byte."""
    folder = made.tmp / "kquant"
    folder.mkdir()
    base = folder / "k.gguf"
    write_gguf_base(base, tiny())
    _swap_to_q4_k(base, folder / "k4.gguf")
    base.unlink()
    result = CliRunner().invoke(
        main, ["combine", str(made.adapter), "--merge-into", str(folder), "-o", str(made.tmp / "kquant-o")]
    )
    assert result.exit_code == 2 and len(result.output.strip().splitlines()) == 1, result.output
    assert (
        "tensor blk.0.ffn_down.weight is Q4_K, which gguf cannot quantize again; pass `--dtype float16`"
        in result.output
    )
    assert not (made.tmp / "kquant-o").exists()
    report = merge_into_base(made.adapter, folder / "k4.gguf", folder / "dense", dtype="float16")
    assert report.written_as == (
        "a dense GGUF: every tensor of 2 or more dimensions stored as float16 (were BF16, F16, F32, Q4_0, Q4_1, "
        "Q4_K, Q5_0, Q5_1, Q8_0), 1-D ones as they were"
    )
    written, original = read(folder / "dense" / "k4.gguf"), read(folder / "k4.gguf")
    for name, delta in made.deltas.items():
        assert written[name].tensor_type.name == "F16", name
        intended = dequantized(original[name]) + delta
        ulp = torch.from_numpy(np.spacing(np.abs(intended.numpy()).astype(np.float16)).astype(np.float64))
        assert bool(((dequantized(written[name]) - intended).abs() <= ulp).all()), name
    for name in ("token_embd.weight", "output.weight"):  # F32 in the base, untouched
        assert written[name].tensor_type.name == "F16", name
        assert torch.equal(dequantized(written[name]), dequantized(original[name]).half().double()), name
    assert bytes(written["blk.1.ffn_norm.weight"].data) == bytes(original["blk.1.ffn_norm.weight"].data)
    assert {t.tensor_type.name for t in written.values() if len(t.shape) > 1} == {"F16"}
    from transformers import AutoModelForCausalLM

    dense = AutoModelForCausalLM.from_pretrained(folder / "dense", gguf_file="k4.gguf", dtype=torch.float32)
    assert torch.isfinite(dense(torch.arange(8)[None]).logits).all()


def _swap_to_q4_k(source, target) -> None:
    """``source`` with blk.0.ffn_down.weight (64 × 256) replaced by a Q4_K tensor of that shape (random 4-bit codes
    and sub-block scales, d = dmin = 2^-10: gguf dequantizes it; it cannot quantize Q4_K itself)."""
    rng = np.random.default_rng(0)
    blocks = rng.integers(0, 256, size=(64, 144), dtype=np.uint8)  # one 144-byte block_q4_K a row
    blocks[:, 0:4] = np.frombuffer(np.array([2.0**-10, 2.0**-10], dtype=np.float16).tobytes(), np.uint8)
    with_tensor(source, target, "blk.0.ffn_down.weight", blocks, gguf.GGMLQuantizationType.Q4_K)


def with_tensor(
    source, target, name: str | None, stored: np.ndarray | None = None, qtype=None, fields=None, architecture="llama"
) -> None:
    """``source`` written again as ``target`` with tensor ``name`` stored as the raw ``qtype`` bytes ``stored``
    (and ``fields(writer)`` adding metadata keys, which replace the source's of the same names), under
    ``architecture``."""
    reader = gguf.GGUFReader(str(source))
    writer = gguf.GGUFWriter(str(target), architecture)
    if fields is not None:
        fields(writer)
    for f in reader.fields.values():
        if (
            f.name != gguf.Keys.General.ARCHITECTURE
            and not f.name.startswith("GGUF.")
            and f.name not in writer.kv_data[0]
        ):
            kind = f.types[0]
            writer.add_key_value(
                f.name, f.contents(), kind, sub_type=f.types[-1] if kind == gguf.GGUFValueType.ARRAY else None
            )
    for t in reader.tensors:
        if t.name == name:
            writer.add_tensor(t.name, stored, raw_dtype=qtype)
        else:
            writer.add_tensor(t.name, t.data, raw_dtype=None if t.tensor_type.name == "F32" else t.tensor_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@pytest.mark.parametrize(
    "make, says",
    [
        (lambda d: (d / "x.gguf").write_bytes(b"GGUF" + bytes(30)), "x.gguf: not a readable GGUF file"),
        (lambda d: [(d / n).write_bytes(b"") for n in ("a.gguf", "b.gguf")], "2 GGUF files (a.gguf, …)"),
        (lambda d: (d / "m-00001-of-00002.gguf").write_bytes(b""), "one part of a split GGUF"),
    ],
)
def test_damaged_or_ambiguous_gguf_bases_are_one_line(made, tmp_path, make, says):
    (tmp_path / "in").mkdir()
    make(tmp_path / "in")
    args = ["combine", str(made.adapter), "--merge-into", str(tmp_path / "in"), "-o", str(tmp_path / "o")]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 2 and len(result.output.strip().splitlines()) == 1, result.output
    assert says in result.output
    assert not (tmp_path / "o").exists()


def test_gguf_cli_wrote_line(made):
    out = made.tmp / "cli"
    result = CliRunner().invoke(
        main, ["-q", "combine", str(made.adapter), "--merge-into", str(made.base), "-o", str(out)]
    )
    assert result.exit_code == 0, result.output
    assert "written as GGUF (BF16, F16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0)" in result.output
    assert "ΔW below half a quantization step" in result.output
    with pytest.raises(CheckpointError, match="quantized_as and shard_size do not apply"):
        merge_into_base(made.adapter, made.base, made.tmp / "nf4", quantized_as="nf4")
    assert fields(out / "tiny-llama.gguf")["general.type"][1] == "model"


def test_transformers_loads_the_merged_gguf_with_peft_delta(made):
    """transformers reads GGUF files itself (dequantized, Llama's q/k rows permuted back): the merged file loaded
    minus the base loaded is PEFT's ΔW in transformers' own layout, to within the re-quantization (‖·‖ 20%: Q4_0
    on this tiny model adds ~8% noise; a wrong row order would be off by more than 100%)."""
    from transformers import AutoModelForCausalLM

    out = made.tmp / "transformers"
    merge_into_base(made.adapter, made.base, out)
    merged = AutoModelForCausalLM.from_pretrained(out, gguf_file="tiny-llama.gguf", dtype=torch.float32)
    base = AutoModelForCausalLM.from_pretrained(made.base.parent, gguf_file=made.base.name, dtype=torch.float32)
    theirs, before = dict(merged.named_parameters()), dict(base.named_parameters())
    hf_names = {gguf_name(n): n for n in theirs}
    assert len(made.as_in_hf) == 14
    for name, delta in made.as_in_hf.items():
        key = hf_names[name]
        stored = (theirs[key] - before[key]).detach().double()
        assert float((stored - delta).norm() / delta.norm()) < 0.2, key
    assert torch.isfinite(merged(torch.arange(8)[None]).logits).all()


def test_check_on_the_merged_gguf_names_the_engines(made):
    out = made.tmp / "check"
    merge_into_base(made.adapter, made.base, out)
    result = CliRunner().invoke(main, ["check", str(out)])
    assert result.exit_code == 0, result.output
    text = result.output
    assert (
        "llama.cpp     yes    GGUF llama (BF16, F16, F32, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0): src/llama-model-loader.cpp"
        in text
    )
    assert "transformers  yes" in text and "load_gguf_checkpoint" in text
    assert "vLLM          yes" in text and "SGLang        yes" in text
    tq = made.tmp / "check-tq"
    tq.mkdir()
    write_gguf_base(tq / "tq.gguf", tiny(), {**TYPES, "ffn_down": "TQ2_0"})
    verdicts = {
        line.split()[0]: line
        for line in CliRunner().invoke(main, ["check", str(tq)]).output.splitlines()
        if line.strip()
    }
    assert "no kernel for TQ2_0" in verdicts["vLLM"] and "no kernel for TQ2_0" in verdicts["SGLang"]


def test_a_gguf_adapter_is_no_base(made, tmp_path):
    """loramix's own GGUF LoRA (general.type adapter) given as the base: one line, nothing written."""
    from loramix import load_adapter, save_adapter

    config = {"model_type": "llama", "num_attention_heads": HEADS, "num_key_value_heads": KV_HEADS}
    save_adapter(load_adapter(made.adapter), tmp_path / "lora", format="gguf", base=config, card=False)
    with pytest.raises(CheckpointError, match="lora.gguf: a GGUF adapter file \\(general.type adapter\\), not a model"):
        merge_into_base(made.adapter, tmp_path / "lora" / "lora.gguf", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_a_gguf_base_is_merged_in_one_process(made, monkeypatch):
    import loramix.merging

    monkeypatch.setattr(loramix.merging, "place", lambda: (0, 2))  # as under torchrun with two processes
    with pytest.raises(CheckpointError, match="a GGUF base is merged in one process"):
        merge_into_base(made.adapter, made.base, made.tmp / "torchrun")
    assert not (made.tmp / "torchrun").exists()
