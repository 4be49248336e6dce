"""Merged checkpoints (`loramix.merge_into_base`) against PEFT's merge_and_unload, the oracle.

Bases are tiny random-weight models saved in float32 and sharded (20 KB shards); adapters are made by PEFT itself.
Every merged tensor must equal PEFT's float32 merge rounded to bfloat16, allowing 1 bf16 ulp: both sides compute
W + ΔW in float32 but not with the same operations in the same order (PEFT takes ΔW as one matmul and then adds;
loramix works in row chunks, sums several modules on a tied tensor in another order, and computes DoRA's row norm
with another kernel), so the float32 results can differ in their last bits, and where one lies next to a bf16
rounding boundary the two round to neighbouring bf16 values. More than 1 ulp would be a real error.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import shutil
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from helpers import (
    QWEN05_LAYER,
    REAL,
    assert_bf16_close,
    example_inputs,
    make_peft_adapter,
    model_output,
    random_model,
    raw_lora_folder,
    tiny_bert_seqcls,
    tiny_gemma,
    tiny_gpt2,
    tiny_llama,
    tiny_qwen2,
)
from peft import PeftModel
from safetensors import safe_open
from safetensors.torch import save_file

from loramix import load_adapter, merge_into_base
from loramix.errors import CheckpointError, OutputError
from loramix.io.base import read_safetensors_header

SHARD = "20KB"


def save_base(model: torch.nn.Module, folder: Path, **kwargs) -> Path:
    kwargs.setdefault("max_shard_size", SHARD)
    model.save_pretrained(str(folder), **kwargs)
    return folder


def read_checkpoint(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a safetensors checkpoint folder (through its index when sharded), read by safetensors."""
    index = folder / "model.safetensors.index.json"
    files = (
        sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.exists() else ["model.safetensors"]
    )
    tensors = {}
    for name in files:
        with safe_open(str(folder / name), "pt") as f:
            assert f.metadata() == {"format": "pt"}
            tensors.update({k: f.get_tensor(k) for k in f.keys()})
    return tensors


def peft_merged(made, base_factory=None):
    base = (base_factory or made.model_factory)()
    return PeftModel.from_pretrained(base, str(made.path)).eval().merge_and_unload()


def check_against_peft(out: Path, merged: torch.nn.Module, *, tied_absent: tuple[str, ...] = ()) -> None:
    ours = read_checkpoint(out)
    reference = merged.state_dict()
    assert set(ours) == set(reference) - set(tied_absent)
    for name, tensor in ours.items():
        assert_bf16_close(tensor, reference[name], name)


def logits_check(out: Path, merged: torch.nn.Module, factory, auto_class) -> None:
    """Our checkpoint through from_pretrained gives PEFT's merged logits (its weights rounded to bf16 the same way)."""
    inputs = example_inputs(factory)
    ours = model_output(auto_class.from_pretrained(str(out), dtype=torch.float32).eval(), inputs)
    reference = model_output(merged.to(torch.bfloat16).float(), inputs)
    base = model_output(factory(), inputs)
    scale = float(reference.abs().max())
    # the weights agree but for rare 1-ulp flips (see the module docstring), so the logits nearly do
    torch.testing.assert_close(ours, reference, rtol=0, atol=1e-3 * scale)
    assert float((reference - base).abs().max()) > 0.05 * scale  # the adapter really changes the outputs


def folder_digest(folder: Path) -> str:
    digest = hashlib.sha256()
    for path in sorted(folder.rglob("*")):
        digest.update(path.name.encode())
        if path.is_file():
            digest.update(path.read_bytes())
    return digest.hexdigest()


CASES = {
    "llama_rslora": (tiny_llama, {"target_modules": ["q_proj", "v_proj", "down_proj"], "use_rslora": True}),
    "qwen2_lora_bias": (tiny_qwen2, {"target_modules": ["q_proj", "k_proj", "v_proj"], "lora_bias": True}),
    "gemma_dora": (tiny_gemma, {"target_modules": ["q_proj", "v_proj", "o_proj"], "use_dora": True}),
    "gpt2_conv1d": (tiny_gpt2, {"target_modules": ["c_attn", "c_proj", "c_fc"], "fan_in_fan_out": True}),
    "gpt2_dora": (tiny_gpt2, {"target_modules": ["c_attn"], "fan_in_fan_out": True, "use_dora": True}),
    "bert_head": (tiny_bert_seqcls, {"target_modules": ["query", "value"], "task_type": "SEQ_CLS"}),
}


@pytest.mark.parametrize("case", list(CASES))
def test_merge_matches_peft(case, tmp_path):
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    factory, lora = CASES[case]
    base = save_base(factory(), tmp_path / "base")
    assert len(list(base.glob("model-*.safetensors"))) > 2
    before = folder_digest(base)
    made = make_peft_adapter(factory, tmp_path, "adapter", **lora)
    report = merge_into_base(made.path, base, tmp_path / "out", shard_size=SHARD, dtype="bfloat16", progress=False)

    out = tmp_path / "out"
    assert len(report.shards) > 2 and sorted(p.name for p in out.glob("model-*")) == report.shards
    index = json.loads((out / "model.safetensors.index.json").read_text())
    ours = read_checkpoint(out)
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in ours.values())
    assert set(index["weight_map"]) == set(ours)
    config = json.loads((out / "config.json").read_text())
    assert (
        config["dtype"] == "bfloat16"
        and (out / "generation_config.json").exists() == (base / "generation_config.json").exists()
    )
    merged = peft_merged(made)
    tied = ("lm_head.weight",) if "lm_head.weight" not in read_checkpoint(base) else ()
    check_against_peft(out, merged, tied_absent=tied)
    auto = AutoModelForSequenceClassification if case == "bert_head" else AutoModelForCausalLM
    logits_check(out, merged, factory, auto)
    assert folder_digest(base) == before
    assert set(report.survival) == set(load_adapter(made.path).modules)
    assert all(0.9 < v.kept < 1.1 for v in report.survival.values())  # PEFT's random init: ΔW far above bf16 noise
    if case == "bert_head":
        assert {"classifier.weight", "classifier.bias"} <= set(report.replaced)


@pytest.mark.parametrize("case", ["llama_rslora", "qwen2_lora_bias", "gpt2_conv1d"])
def test_row_chunks_match_peft(case, tmp_path, monkeypatch):
    """Large tensors are merged in row chunks: with chunks of a few rows, Linear and Conv1D ΔW rows still line up."""
    import loramix.merge.checkpoint

    monkeypatch.setattr(loramix.merge.checkpoint, "CHUNK_ELEMENTS", 100)  # 3 rows of 32 per chunk
    factory, lora = CASES[case]
    base = save_base(factory(), tmp_path / "base")
    made = make_peft_adapter(factory, tmp_path, "adapter", **lora)
    report = merge_into_base(made.path, base, tmp_path / "out", shard_size=SHARD, dtype="bfloat16", progress=False)
    tied = ("lm_head.weight",) if "lm_head.weight" not in read_checkpoint(base) else ()
    check_against_peft(tmp_path / "out", peft_merged(made), tied_absent=tied)
    assert all(0.9 < v.kept < 1.1 for v in report.survival.values())


def test_gpt2_bare_base_and_fan_in_fan_out_disagreement(tmp_path, caplog):
    """A GPT2LMHeadModel adapter (transformer.h.0...) on a bare GPT2Model checkpoint (h.0...), fan_in_fan_out=false."""
    base_lm = tiny_gpt2()
    base = save_base(base_lm.transformer, tmp_path / "base")
    assert not any(k.startswith("transformer.") for k in read_checkpoint(base))
    made = make_peft_adapter(tiny_gpt2, tmp_path, "adapter", target_modules=["c_attn", "c_proj"], fan_in_fan_out=True)
    config_path = made.path / "adapter_config.json"  # as in several real GPT-2 adapters (PEFT fixes it on load)
    config_path.write_text(json.dumps({**json.loads(config_path.read_text()), "fan_in_fan_out": False}))
    with caplog.at_level(logging.INFO, logger="loramix"):
        merge_into_base(made.path, base, tmp_path / "out", shard_size=SHARD, dtype="bfloat16", progress=False)
    assert "fan_in_fan_out disagreed with the base" in caplog.text  # a note (-v): the reader warned already
    assert sum("fan_in_fan_out" in r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING) == 1
    merged = peft_merged(made).transformer  # PEFT too settles fan_in_fan_out from the Conv1D layers
    check_against_peft(tmp_path / "out", merged)


def test_bare_adapter_on_prefixed_base(tmp_path):
    """An adapter made on a bare GPT2Model (h.0...) merged into a GPT2LMHeadModel checkpoint (transformer.h.0...)."""

    def bare():
        return tiny_gpt2().transformer

    base = save_base(tiny_gpt2(), tmp_path / "base")
    made = make_peft_adapter(bare, tmp_path, "adapter", target_modules=["c_attn"], fan_in_fan_out=True)
    merge_into_base(made.path, base, tmp_path / "out", shard_size=SHARD, dtype="bfloat16", progress=False)
    ours = read_checkpoint(tmp_path / "out")
    reference = peft_merged(made).state_dict()
    for name, tensor in reference.items():
        assert_bf16_close(ours[f"transformer.{name}"], tensor, name)


def test_tied_head_and_embedding(tmp_path, caplog):
    """Gemma ties lm_head to embed_tokens and stores only the latter: ΔW of both goes there, as PEFT does."""
    base = save_base(tiny_gemma(), tmp_path / "base")
    assert "lm_head.weight" not in read_checkpoint(base)
    made = make_peft_adapter(tiny_gemma, tmp_path, "adapter", target_modules=["q_proj", "lm_head", "embed_tokens"])
    with caplog.at_level(logging.WARNING, logger="loramix"):
        merge_into_base(made.path, base, tmp_path / "out", shard_size=SHARD, dtype="bfloat16", progress=False)
    assert "tied to model.embed_tokens.weight" in caplog.text
    assert "changes the output head as well" in caplog.text  # the embedding's own ΔW reaches the head too
    check_against_peft(tmp_path / "out", peft_merged(made), tied_absent=("lm_head.weight",))


@pytest.mark.parametrize("sharded", [False, True])
def test_bin_base_single_shard_and_float32(tmp_path, sharded):
    """A legacy pytorch_model.bin base, whole or sharded with its index (read with torch.load(weights_only=True));
    everything in one output shard gives model.safetensors and no index, as transformers writes it."""
    model = tiny_llama()
    base = tmp_path / "base"
    model.config.save_pretrained(str(base))
    state = model.state_dict()
    if sharded:
        names = list(state)
        parts = {"pytorch_model-00001-of-00002.bin": names[: len(names) // 2]}
        parts["pytorch_model-00002-of-00002.bin"] = names[len(names) // 2 :]
        for file, keys in parts.items():
            torch.save({k: state[k] for k in keys}, base / file)
        weight_map = {k: file for file, keys in parts.items() for k in keys}
        (base / "pytorch_model.bin.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    else:
        torch.save(state, base / "pytorch_model.bin")
    (base / "tokenizer_config.json").write_text("{}")
    made = make_peft_adapter(tiny_llama, tmp_path, "adapter", target_modules=["q_proj"])
    report = merge_into_base(made.path, base, tmp_path / "out", dtype="float32", progress=False)
    out = tmp_path / "out"
    assert report.shards == ["model.safetensors"] and not (out / "model.safetensors.index.json").exists()
    assert (out / "tokenizer_config.json").exists() and not list(out.glob("pytorch_model*"))
    ours = read_checkpoint(out)
    for name, tensor in peft_merged(made).state_dict().items():
        assert ours[name].dtype == torch.float32
        torch.testing.assert_close(ours[name], tensor.detach(), rtol=1e-6, atol=1e-6)  # float32 both: same sums


def test_hub_id_base_through_the_real_hub_client(tmp_path, hub_cache):
    """A Hub id as BASE: huggingface_hub's own snapshot_download finds it in an offline local cache."""
    from helpers import publish

    base = save_base(tiny_llama(), tmp_path / "snapshot")
    publish(hub_cache, "someorg/tiny-llama", base)
    made = make_peft_adapter(tiny_llama, tmp_path, "adapter", target_modules=["q_proj"])
    merge_into_base(
        made.path, "someorg/tiny-llama", tmp_path / "out", shard_size=SHARD, dtype="bfloat16", progress=False
    )
    check_against_peft(tmp_path / "out", peft_merged(made))


def test_header_is_aligned_and_offsets_contiguous(tmp_path):
    """Our own safetensors writer: aligned data start, contiguous offsets, shards within the size; old dtype key."""
    base = save_base(tiny_llama(), tmp_path / "base")
    config = json.loads((base / "config.json").read_text())
    config["torch_dtype"] = config.pop("dtype")  # as transformers 4 writes it
    (base / "config.json").write_text(json.dumps(config))
    made = make_peft_adapter(tiny_llama, tmp_path, "adapter", target_modules=["q_proj"])
    merge_into_base(made.path, base, tmp_path / "out", shard_size="30KB", dtype="bfloat16", progress=False)
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["torch_dtype"] == "bfloat16" and "dtype" not in config
    for path in (tmp_path / "out").glob("model-*.safetensors"):
        header, start = read_safetensors_header(path)
        assert start % 8 == 0 and header.pop("__metadata__") == {"format": "pt"}
        spans = sorted(tuple(v["data_offsets"]) for v in header.values())
        assert spans[0][0] == 0 and all(a[1] == b[0] for a, b in zip(spans, spans[1:]))
        assert start + spans[-1][1] == path.stat().st_size
        assert path.stat().st_size <= 30_000 + start or len(header) == 1


def test_low_survival_warns(tmp_path, caplog):
    """On a bf16 base, a ΔW well under half a bf16 ulp of W is rounded away: survival near 0 and a warning.

    (On a float32 base the figure compares with round(W), and rounding flips there make it noisy.)
    """
    base = save_base(tiny_llama().to(torch.bfloat16), tmp_path / "base")
    made = make_peft_adapter(tiny_llama, tmp_path, "adapter", target_modules=["q_proj", "v_proj"])
    adapter = load_adapter(made.path)
    tiny = {n: m for n, m in adapter.modules.items()}
    for name in list(tiny)[:1]:
        tiny[name].B = tiny[name].B * 1e-6  # ΔW ~1e-7: far under half an ulp of W (~3e-5 at |W| ~ 0.01)
    with caplog.at_level(logging.WARNING, logger="loramix"):
        report = merge_into_base(adapter.with_modules(tiny), base, tmp_path / "out", dtype="bfloat16", progress=False)
    low = [n for n, v in report.survival.items() if v.kept < 0.5]
    assert low == list(tiny)[:1] and report.survival[low[0]].kept < 0.2
    assert all(v.kept > 0.9 for n, v in report.survival.items() if n not in low)
    assert "lose most of their ΔW to bfloat16 rounding" in caplog.text and low[0] in caplog.text


def test_distorted_update_is_measured_and_warned(tmp_path, caplog):
    """The distilgpt2 case: large base weights, a ΔW about one bf16 step of W. Rounding keeps roughly its norm (kept
    near or above 1) but not its entries: the stored update round(W+ΔW)−round(W) is far from ΔW.

    Oracle: the written checkpoint itself, read back, against ΔW from the adapter's factors in float64.
    """
    model = tiny_llama()
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(400.0)  # |W| ~ 8: a bf16 step of 0.03–0.06
    base = save_base(model, tmp_path / "base")
    made = make_peft_adapter(tiny_llama, tmp_path, "adapter", target_modules=["q_proj", "v_proj"])
    adapter = load_adapter(made.path)
    small = {n: replace(m, B=m.B * 0.2) for n, m in adapter.modules.items()}  # |ΔW| about half a bf16 step
    with caplog.at_level(logging.WARNING, logger="loramix"):
        report = merge_into_base(adapter.with_modules(small), base, tmp_path / "out", dtype="bfloat16", progress=False)
    written, original = read_checkpoint(tmp_path / "out"), read_checkpoint(base)
    for name, module in small.items():
        key = name + ".weight"
        stored = written[key].double() - original[key].to(torch.bfloat16).double()
        intended = module.scale * (module.B.double() @ module.A.double())
        error = float((stored - intended).norm() / intended.norm())
        cosine = float((stored * intended).sum() / (stored.norm() * intended.norm()))
        measured = report.survival[name]
        assert measured.error == pytest.approx(error, abs=1e-3) and measured.cosine == pytest.approx(cosine, abs=1e-3)
        assert measured.kept == pytest.approx(float(stored.norm() / intended.norm()), abs=1e-3)
        assert error > 0.5 and cosine < 0.9 and measured.distorted and not measured.lost
    assert "stored distorted in bfloat16" in caplog.text and "lose most" not in caplog.text


def test_errors_name_module_and_base(tmp_path):
    base = save_base(tiny_llama(), tmp_path / "base")
    before = folder_digest(base)
    missing = raw_lora_folder(tmp_path / "missing", shapes={"model.layers.7.self_attn.q_proj": (32, 4, 32)})
    with pytest.raises(CheckpointError, match=r"model\.layers\.7\.self_attn\.q_proj.*no matching tensor.*base"):
        merge_into_base(missing, base, tmp_path / "out", dtype="bfloat16", progress=False)
    wrong = raw_lora_folder(tmp_path / "wrong", shapes={"model.layers.0.self_attn.q_proj": (32, 4, 48)})
    with pytest.raises(
        CheckpointError, match=r"q_proj \(out 32 × in 48\).*model\.layers\.0\.self_attn\.q_proj\.weight"
    ):
        merge_into_base(wrong, base, tmp_path / "out", dtype="bfloat16", progress=False)
    assert not (tmp_path / "out").exists() and folder_digest(base) == before
    assert not list(tmp_path.glob(".out.*"))  # no partial output left beside the target
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "x").write_text("x")
    made = make_peft_adapter(tiny_llama, tmp_path, "adapter", target_modules=["q_proj"])
    with pytest.raises(OutputError):
        merge_into_base(made.path, base, tmp_path / "taken", dtype="bfloat16", progress=False)
    with pytest.raises(OutputError):
        merge_into_base(made.path, base, base, overwrite=True, dtype="bfloat16", progress=False)


def test_ambiguous_names_refused(tmp_path):
    base = tmp_path / "base"
    base.mkdir()
    (base / "config.json").write_text(json.dumps({"model_type": "custom"}))
    gen = torch.Generator().manual_seed(0)
    tensors = {f"{side}.layers.0.q.weight": torch.randn(8, 6, generator=gen) for side in ("encoder", "decoder")}
    save_file(tensors, str(base / "model.safetensors"))
    adapter = raw_lora_folder(tmp_path / "adapter", shapes={"layers.0.q": (8, 4, 6)}, config={"target_modules": ["q"]})
    with pytest.raises(
        CheckpointError, match=r"layers\.0\.q\.weight matches several.*encoder.*decoder|decoder.*encoder"
    ):
        merge_into_base(adapter, base, tmp_path / "out", dtype="bfloat16", progress=False)


def test_cli_merge_into(tmp_path):
    from loramix.cli import main

    base = save_base(tiny_qwen2(), tmp_path / "base")
    made = make_peft_adapter(tiny_qwen2, tmp_path, "adapter", target_modules=["q_proj", "v_proj"])
    out = tmp_path / "out"
    args = ["-q", "combine", str(made.path), "-m", "cat", "--merge-into", str(base), "--shard-size", SHARD]
    result = CliRunner().invoke(main, [*args, "--dtype", "bfloat16", "-o", str(out)])
    assert result.exit_code == 0, result.output
    assert "merged" in result.output and str(out) in result.output
    assert "converted from float32 to bfloat16 (--dtype)" in result.output
    check_against_peft(out, peft_merged(made))
    result = CliRunner().invoke(main, [*args, "-o", str(out)])
    assert result.exit_code == 2 and result.output.startswith("error: ") and result.output.count("\n") == 1


@pytest.mark.parametrize("factory, lora", [CASES["gemma_dora"], CASES["gpt2_dora"]], ids=["gemma", "gpt2"])
def test_cli_merge_into_dora(factory, lora, tmp_path):
    """A single DoRA adapter merges into a base from the command line, as PEFT's merge_and_unload does."""
    from loramix.cli import main

    base = save_base(factory(), tmp_path / "base")
    made = make_peft_adapter(factory, tmp_path, "dora", **lora)
    out = tmp_path / "out"
    args = ["-q", "combine", str(made.path), "--merge-into", str(base), "--dtype", "bfloat16", "-o", str(out)]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    tied = ("lm_head.weight",) if "lm_head.weight" not in read_checkpoint(base) else ()
    check_against_peft(out, peft_merged(made), tied_absent=tied)


def test_a_single_dora_merged_as_it_is_only_when_no_rank_rule_asks_otherwise(tmp_path):
    """A lone DoRA adapter at weight 1 goes into the base as it is; any rank-rule value, conv_rank included, asks for
    the re-factorisation of its effective update instead (it was once left out of that check)."""
    from loramix import load_adapter
    from loramix.pipeline.combine import _is_single_dora
    from loramix.plans import Plan
    from loramix.schedule import Constant

    factory, lora = CASES["gemma_dora"]
    made = make_peft_adapter(factory, tmp_path, "dora", **lora)
    loaded, weights = [load_adapter(made.path)], [Constant(1.0)]
    plain = Plan(adapters=[str(made.path)], merge_into="base")
    assert _is_single_dora(loaded, weights, plain)
    for rule in ({"rank": 2}, {"energy": 0.9}, {"conv_rank": 2}):
        assert not _is_single_dora(loaded, weights, Plan(adapters=[str(made.path)], merge_into="base", **rule)), rule


# ----------------------------------------------------------------------------------------------- real adapters

needs_real = pytest.mark.skipif(not REAL.is_dir(), reason="../shared/real-adapters is absent")


@needs_real
def test_real_gpt2_tigrinya(tmp_path):
    """A real GPT-2 adapter (c_attn and both c_proj, fan_in_fan_out) on a random GPT-2 124M of the real config."""
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config.from_pretrained(str(REAL / "base_gpt2_config_only"))

    def gpt2():
        torch.manual_seed(0)
        return GPT2LMHeadModel(config).eval()

    base = save_base(gpt2(), tmp_path / "base", max_shard_size="200MB")
    for name in ("tokenizer.json", "vocab.json", "merges.txt", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copyfile(REAL / "base_gpt2_config_only" / name, base / name)
    adapter = REAL / "gpt2__tigrinya_clm"
    report = merge_into_base(adapter, base, tmp_path / "out", shard_size="200MB", dtype="bfloat16", progress=False)
    assert len(report.survival) == 36
    for name in ("tokenizer.json", "vocab.json", "merges.txt", "generation_config.json"):
        assert (tmp_path / "out" / name).read_bytes() == (base / name).read_bytes()
    merged = PeftModel.from_pretrained(gpt2(), str(adapter)).merge_and_unload()
    ours = read_checkpoint(tmp_path / "out")
    reference = merged.state_dict()
    for name in ("transformer.h.0.attn.c_attn.weight", "transformer.h.11.mlp.c_proj.weight", "transformer.wte.weight"):
        assert_bf16_close(ours[name], reference[name], name)
    assert set(ours) == set(reference) - {"lm_head.weight"}


@needs_real
def test_real_qwen_two_layers(tmp_path, caplog):
    """A real Qwen2.5-0.5B adapter, its layers 0-1, on a 2-layer random Qwen2 of the real shapes (small vocabulary)."""

    def qwen():
        return random_model("qwen2", vocab_size=512, num_hidden_layers=2, **QWEN05_LAYER)

    base = save_base(qwen(), tmp_path / "base", max_shard_size="10MB")
    source = REAL / "qwen05__posttrain_v1"
    adapter = load_adapter(source)
    two = {n: m for n, m in adapter.modules.items() if n.split(".")[2] in ("0", "1")}
    assert len(two) == 4
    report = merge_into_base(
        adapter.with_modules(two), base, tmp_path / "out", shard_size="10MB", dtype="bfloat16", progress=False
    )
    assert all(not math.isnan(v.kept) for v in report.survival.values())
    merged = PeftModel.from_pretrained(qwen(), str(source)).merge_and_unload()  # PEFT skips layers 2-23 itself
    check_against_peft(tmp_path / "out", merged, tied_absent=("lm_head.weight",))


@needs_real
def test_real_distilbert_heads_added_to_mlm_base(tmp_path):
    """A real DistilBERT seq-cls adapter on a DistilBertForMaskedLM checkpoint (as distilbert-base-uncased is stored):
    the LoRA modules line up, and the heads the base lacks (pre_classifier, classifier) are added."""
    from transformers import AutoModelForSequenceClassification

    base = save_base(random_model("distilbert", task="masked-lm"), tmp_path / "base", max_shard_size="100MB")
    source = REAL / "distilbert__imdb_qv"
    report = merge_into_base(source, base, tmp_path / "out", shard_size="100MB", dtype="bfloat16", progress=False)
    assert {"classifier.weight", "pre_classifier.bias"} <= set(report.added) and len(report.survival) == 12

    def seqcls():
        return AutoModelForSequenceClassification.from_pretrained(str(base)).eval()  # heads: random, then replaced

    merged = PeftModel.from_pretrained(seqcls(), str(source)).eval().merge_and_unload()
    ours = read_checkpoint(tmp_path / "out")
    for name, tensor in merged.state_dict().items():
        assert_bf16_close(ours[name], tensor, name)
    loaded = AutoModelForSequenceClassification.from_pretrained(str(tmp_path / "out"), dtype=torch.float32).eval()
    inputs = {"input_ids": torch.randint(0, 1000, (2, 9), generator=torch.Generator().manual_seed(0))}
    reference = model_output(merged.to(torch.bfloat16).float(), inputs)
    scale = float(reference.abs().max())
    torch.testing.assert_close(model_output(loaded, inputs), reference, rtol=0, atol=1e-3 * scale)
