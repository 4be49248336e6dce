"""`loramix extract`: a LoRA from a fine-tuned model, checked against float64 dense SVDs and PEFT itself.

Models are tiny random transformers models saved with ``save_pretrained``; a fine-tune is planted by editing a copy's
tensors (a known low-rank ΔW, full-rank noise, changed norms and biases, a resized vocabulary).
"""

from __future__ import annotations

import json
import math
import tracemalloc
import weakref

import pytest
import torch
from click.testing import CliRunner
from helpers import example_inputs, model_output, random_model, tiny_gpt2, tiny_qwen2
from peft import PeftModel
from safetensors.torch import load_file, save_file

import loramix
from loramix.cli import main
from loramix.errors import CheckpointError, MethodError
from loramix.extraction import extract_lora, read_ahead, tensors
from loramix.extraction.spectrum import dense, top_singular
from loramix.extraction.staging import Staging
from loramix.linalg import RankRule
from loramix.runtime import torch_threads

# Shapes wide enough that the subspace iteration runs (block r+8 ≤ a quarter of min(out, in)), small enough for CI.
SIZES = dict(vocab_size=96, hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4)
LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _llama(seed: int = 0):
    return random_model("llama", seed=seed, num_key_value_heads=2, tie_word_embeddings=False, **SIZES)


def _plant(state: dict, *, rank: int, noise: float = 0.0, seed: int = 1, names=LINEAR) -> dict[str, torch.Tensor]:
    """Add a rank-``rank`` ΔW (norm about that of W) plus ``noise``·(full-rank noise) to the named 2-D weights, in
    place; returns the ΔWs as stored (float64, the tensors' own layout)."""
    generator = torch.Generator().manual_seed(seed)
    deltas = {}
    for key, weight in state.items():
        if weight.ndim == 2 and any(f"{n}.weight" in key for n in names):
            out, inp = weight.shape
            spread = torch.logspace(0, -1, rank)  # distinct singular values: a unique truncated SVD
            low = (torch.randn(out, rank, generator=generator) * spread) @ torch.randn(rank, inp, generator=generator)
            delta = 0.02 * low / math.sqrt(inp) + noise * 0.02 * torch.randn(out, inp, generator=generator) / inp
            state[key] = (weight.double() + delta.double()).to(weight.dtype)
            deltas[key] = state[key].double() - weight.double()
    return deltas


def _save(model, folder, state=None, **options):
    model.save_pretrained(folder, state_dict=state, **options)
    return folder


def _pair(tmp_path, *, rank=4, noise=0.0, factory=_llama, edit=None, **options):
    """(base folder, fine-tuned folder, the planted ΔWs) of a model and a planted fine-tune, float32."""
    model = factory()
    base = _save(model, tmp_path / "base", **options)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    deltas = _plant(state, rank=rank, noise=noise)
    if edit is not None:
        edit(state)
    tuned = _save(model, tmp_path / "tuned", state=state, **options)
    return base, tuned, deltas


def _truncated(delta: torch.Tensor, k: int) -> torch.Tensor:
    U, S, Vh = torch.linalg.svd(delta, full_matrices=False)
    return (U[:, :k] * S[:k]) @ Vh[:k]


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


@pytest.fixture(autouse=True)
def one_thread():
    """Small products are latency-bound: one thread, as the CLI's other commands run (a shared 2-core CI machine
    slows two-thread LAPACK calls on these sizes by 20× and more)."""
    with torch_threads(1):
        yield


# ----------------------------------------------------------------------------------------------- the spectrum


def _noisy(m: int, n: int, k: int, gap: float, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    U = torch.linalg.qr(torch.randn(m, k, generator=generator, dtype=torch.float64)).Q
    V = torch.linalg.qr(torch.randn(n, k, generator=generator, dtype=torch.float64)).Q
    signal = (U * torch.linspace(10, 5, k, dtype=torch.float64)) @ V.T
    return signal + gap * torch.randn(m, n, generator=generator, dtype=torch.float64) / math.sqrt(max(m, n))


@pytest.mark.parametrize(
    "rule",
    [
        RankRule(rank=6),
        RankRule(energy=0.8),
        RankRule(rule="sv_ratio", rule_value=1.2),
        RankRule(rule="sv_fro", rule_value=0.9),
    ],
)
def test_partial_spectrum_equals_the_truncated_dense_svd(rule):
    """Low rank plus full-rank noise: each rule settles on the same rank as a float64 dense SVD of the same float32
    matrix, and U·S·Vh agrees with its truncation to 1e-5 relative (float32 rounding of products of length ≤ 400,
    amplified by σ₁ over the gap at the cut, here about 2). Two matrices in one batch; one needs a grown block."""
    matrices = [_noisy(300, 400, 6, 0.5, seed=1), _noisy(300, 400, 6, 0.5, seed=2)]
    M = torch.stack(matrices).float()
    totals = [float(m.double().square().sum()) for m in M]
    for exact, found in zip(M.double(), top_singular(M, rule, totals)):
        S64 = torch.linalg.svdvals(exact)
        k = rule.choose(S64.float(), tuple(exact.shape))
        assert found.S.numel() == k
        assert "subspace" in found.solver
        assert _relative((found.U * found.S) @ found.Vh, _truncated(exact, k)) < 1e-5


def test_energy_rule_grows_the_block_and_a_flat_spectrum_falls_back_to_the_dense_svd():
    """An energy target beyond the first block (40 strong directions) doubles the block; pure noise has no gap, so
    the dense SVD answers; both equal the float64 truncation."""
    wide = _noisy(400, 400, 40, 0.1, seed=3).float()
    (found,) = top_singular(wide[None], RankRule(energy=0.99), [float(wide.double().square().sum())])
    k = RankRule(energy=0.99).choose(torch.linalg.svdvals(wide.double()).float(), (400, 400))
    assert found.S.numel() == k > 24 and "block 48" in found.solver
    assert _relative((found.U * found.S) @ found.Vh, _truncated(wide.double(), k)) < 1e-5
    flat = torch.randn(200, 200, generator=torch.Generator().manual_seed(4))
    (found,) = top_singular(flat[None], RankRule(rank=10), [float(flat.double().square().sum())])
    reference = dense(flat, RankRule(rank=10))
    assert torch.allclose(found.S, reference.S, rtol=1e-5)
    assert _relative((found.U * found.S) @ found.Vh, _truncated(flat.double(), 10)) < 1e-4


# ----------------------------------------------------------------------------------------------- models


def test_planted_low_rank_update_is_recovered_to_float_rounding(tmp_path):
    """A rank-4 ΔW on every linear module, float32 models: --rank 4 gives B·A = ΔW to float32 rounding (1e-5
    relative; W_tuned − W_base itself carries rounding of W at about eps·‖W‖/‖ΔW‖ ≈ 1e-6), found by the subspace
    iteration, and the measured error says so."""
    base, tuned, deltas = _pair(tmp_path, rank=4)
    result = extract_lora(base, tuned, rank_rule=RankRule(rank=4), device="cpu")
    assert sorted(result.modules) == sorted(k.removesuffix(".weight") for k in deltas)
    for key, delta in deltas.items():
        name = key.removesuffix(".weight")
        module = result.adapter.modules[name]
        assert module.rank == 4 and module.A.dtype == torch.float32
        assert _relative(module.delta(dtype=torch.float64), delta) < 1e-5
        report = result.modules[name]
        assert report.error < 1e-5 and report.kept == pytest.approx(1.0, abs=1e-6)
        assert "subspace" in report.solver
    assert result.unchanged == 7  # the embedding, the head and 5 norms
    assert not result.carried and not result.noise


def test_with_noise_each_module_is_the_truncated_dense_svd(tmp_path):
    """Planted rank 4 plus full-rank noise: at --rank 4 each module's B·A is the float64 truncated SVD of its ΔW
    (from the stored float32 tensors) to 1e-5 relative, its kept energy the float64 share and its error the float64
    residual to 1e-4 relative."""
    base, tuned, _ = _pair(tmp_path, rank=4, noise=0.5)
    result = extract_lora(base, tuned, rank_rule=RankRule(rank=4), device="cpu")
    old, new = load_file(str(base / "model.safetensors")), load_file(str(tuned / "model.safetensors"))
    assert len(result.modules) == 14
    for name, module in result.adapter.modules.items():
        delta = new[f"{name}.weight"].double() - old[f"{name}.weight"].double()
        best = _truncated(delta, 4)
        assert _relative(module.delta(dtype=torch.float64), best) < 1e-5, name
        S = torch.linalg.svdvals(delta)
        assert result.modules[name].kept == pytest.approx(float(S[:4].square().sum() / S.square().sum()), rel=1e-5)
        assert result.modules[name].error == pytest.approx(_relative(best, delta), rel=1e-4)


def _edit_extras(state: dict) -> None:
    state["model.norm.weight"] = state["model.norm.weight"] * 1.5
    state["model.layers.0.self_attn.q_proj.bias"] = state["model.layers.0.self_attn.q_proj.bias"] + 0.1
    key = "model.layers.1.input_layernorm.weight"
    state[key] = state[key] + torch.finfo(torch.float32).eps * state[key]  # one ulp: rounding, not a change


def test_changed_norms_and_biases_are_carried_and_peft_reproduces_the_fine_tune(tmp_path):
    """Qwen2 (q/k/v biases): an exact planted rank-4 ΔW, a changed final norm and q bias, and a norm moved by one
    float32 ulp. The norm goes to modules_to_save, the bias rides as a bias="all" tensor, the ulp is reported as
    rounding; PEFT loads the written adapter onto the base and its logits equal the fine-tuned model's (float32
    forward passes: 1e-4)."""
    base, tuned, _ = _pair(tmp_path, factory=tiny_qwen2, edit=_edit_extras)
    result = loramix.extract(base, tuned, tmp_path / "out", rank_rule=RankRule(rank=4), device="cpu")
    assert result.carried.keys() == {"model.norm.weight", "model.layers.0.self_attn.q_proj.bias"}
    assert result.noise == ["model.layers.1.input_layernorm.weight"]
    config = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    assert config["modules_to_save"] == ["model.norm"]
    assert result.adapter.extra["model.layers.0.self_attn.q_proj.bias"].kind == "base_layer"
    report = json.loads((tmp_path / "out" / "extraction.json").read_text())
    assert report["modules"].keys() == result.modules.keys() and report["carried"] == result.carried
    card = (tmp_path / "out" / "README.md").read_text()
    assert "model.norm.weight" in card and "relative error" in card
    inputs = example_inputs(tiny_qwen2)
    tuned_model = type(tiny_qwen2()).from_pretrained(tuned).eval()
    peft_model = PeftModel.from_pretrained(type(tiny_qwen2()).from_pretrained(base), tmp_path / "out").eval()
    expected = model_output(tuned_model, inputs)
    base_output = model_output(type(tiny_qwen2()).from_pretrained(base).eval(), inputs)
    assert (expected - base_output).abs().max() > 0.01  # the fine-tune shows in the logits
    torch.testing.assert_close(model_output(peft_model, inputs), expected, atol=1e-4, rtol=1e-4)


def test_gpt2_conv1d_embeddings_and_a_resized_vocabulary(tmp_path):
    """GPT-2: Conv1D weights (stored in×out), a retrained position embedding (wpe, low rank: an embedding LoRA) and
    a token embedding resized by 3 rows (carried whole, reported as resized). On a base resized the same way, PEFT
    reproduces the fine-tune's logits within the truncation error (rank 4 of an exact rank-4 ΔW: 1e-4) for inputs
    using the new tokens; the logits of the new tokens themselves differ, since PEFT leaves the tied output head on
    the resized base's rows rather than the modules_to_save copy."""

    def edit(state):
        generator = torch.Generator().manual_seed(5)
        wpe = state["transformer.wpe.weight"]
        state["transformer.wpe.weight"] = wpe + 0.05 * torch.randn(wpe.shape[0], 2, generator=generator) @ torch.randn(
            2, wpe.shape[1], generator=generator
        )
        wte = state["transformer.wte.weight"]
        state["transformer.wte.weight"] = torch.cat([wte, torch.randn(3, wte.shape[1], generator=generator)])
        state["lm_head.weight"] = state["transformer.wte.weight"]

    model = tiny_gpt2()
    base = _save(model, tmp_path / "base")
    state = {k: v.clone() for k, v in model.state_dict().items()}
    _plant(state, rank=4, names=("c_attn", "c_fc"))
    edit(state)
    tuned_model = tiny_gpt2()
    tuned_model.resize_token_embeddings(state["transformer.wte.weight"].shape[0])
    tuned_model.load_state_dict(state)
    tuned = _save(tuned_model, tmp_path / "tuned")
    result = loramix.extract(base, tuned, tmp_path / "out", rank_rule=RankRule(rank=4), device="cpu")
    layouts = {name: m.layout for name, m in result.adapter.modules.items()}
    assert layouts["transformer.h.0.attn.c_attn"] == "conv1d_fan_in_fan_out"
    assert layouts["transformer.wpe"] == "embedding" and result.modules["transformer.wpe"].rank == 2
    assert result.carried["transformer.wte.weight"].startswith("resized (64, 32) → (67, 32)")
    resized_base = tiny_gpt2()
    resized_base.resize_token_embeddings(67)
    resized_base.transformer.wte.weight.data[:64] = tiny_gpt2().transformer.wte.weight.data
    inputs = {"input_ids": torch.tensor([[64, 3, 65, 17, 66, 5]])}
    expected = model_output(tuned_model, inputs)[..., :64]
    assert (model_output(resized_base, inputs)[..., :64] - expected).abs().max() > 0.01  # before PEFT wraps it
    peft_model = PeftModel.from_pretrained(resized_base, tmp_path / "out").eval()
    torch.testing.assert_close(model_output(peft_model, inputs)[..., :64], expected, atol=1e-4, rtol=0)


def test_sharded_and_bin_inputs_give_the_same_adapter(tmp_path):
    """The same pair as one safetensors file, as safetensors shards and as .bin pickles (read only with
    weights_only=True): the same factors bit for bit."""
    base, tuned, _ = _pair(tmp_path / "single", rank=4, noise=0.2)
    model = _llama()
    sharded = [
        _save(model, tmp_path / "sharded" / n, state=load_file(str(f / "model.safetensors")), max_shard_size="200KB")
        for n, f in (("base", base), ("tuned", tuned))
    ]
    assert len(list(sharded[0].glob("*.safetensors"))) > 3
    pickled = []
    for name, folder in (("base", base), ("tuned", tuned)):
        target = tmp_path / "bin" / name
        target.mkdir(parents=True)
        (target / "config.json").write_text((folder / "config.json").read_text())
        torch.save(load_file(str(folder / "model.safetensors")), target / "pytorch_model.bin")
        pickled.append(target)
    results = [
        extract_lora(b, t, rank_rule=RankRule(rank=4), device="cpu") for b, t in ((base, tuned), sharded, pickled)
    ]
    for other in results[1:]:
        assert other.adapter.modules.keys() == results[0].adapter.modules.keys()
        for name, module in results[0].adapter.modules.items():
            assert torch.equal(other.adapter.modules[name].A, module.A), name
            assert torch.equal(other.adapter.modules[name].B, module.B), name


def test_memory_stays_a_few_tensors_of_a_sharded_model(tmp_path, monkeypatch):
    """A 10-layer model in 100 KB shards, read through the streaming base reader (io.base, which the checkpoint writer
    uses): at most 2 tensors read from the files (one of each model) are alive at once, and the peak of
    Python-allocated memory (the reader's buffers) stays under 4 of the largest tensors; the model is 30 times that."""
    sizes = {**SIZES, "num_hidden_layers": 10}
    model = random_model("llama", num_key_value_heads=2, tie_word_embeddings=False, **sizes)
    base = _save(model, tmp_path / "base", max_shard_size="100KB")
    state = {k: v.clone() for k, v in model.state_dict().items()}
    _plant(state, rank=2, noise=0.1)
    largest = max(v.numel() * v.element_size() for v in state.values())
    total = sum(v.numel() * v.element_size() for v in state.values())
    tuned = _save(model, tmp_path / "tuned", state=state, max_shard_size="100KB")
    alive, peak = set(), [0]
    read = tensors.CheckpointTensors.read

    def counted(self, name):
        tensor = read(self, name)
        key = object()
        alive.add(key)
        peak[0] = max(peak[0], len(alive))
        weakref.finalize(tensor, alive.discard, key)
        return tensor

    monkeypatch.setattr(tensors.CheckpointTensors, "read", counted)
    tracemalloc.start()
    extract_lora(base, tuned, rank_rule=RankRule(rank=2), device="cpu")
    _, high = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert total > 30 * largest
    assert peak[0] <= 2
    assert high < 4 * largest, (high, largest)


# ----------------------------------------------------------------------------------------------- CLI and errors


def test_cli_writes_the_adapter_and_prints_the_report(tmp_path):
    base, tuned, _ = _pair(tmp_path, rank=4, noise=0.1)
    runner = CliRunner()
    result = runner.invoke(main, ["extract", str(base), str(tuned), "--energy", "0.9", "-o", str(tmp_path / "a")])
    assert result.exit_code == 0, result.output
    assert result.output.startswith(f"wrote {tmp_path / 'a'}: 14 modules, rank 2") and "7 unchanged" in result.output
    result = runner.invoke(main, ["extract", str(base), str(tuned), "--rank", "4", "--json", "-o", str(tmp_path / "b")])
    report = json.loads(result.output)
    assert {m["rank"] for m in report["modules"].values()} == {4}
    loaded = loramix.load_adapter(tmp_path / "b")
    assert loaded.ranks == [8] and len(loaded.modules) == 14  # the portable layout: rank 4 zero-padded to 8
    result = runner.invoke(main, ["extract", str(base), str(tuned), "-o", str(tmp_path / "c")])
    assert result.exit_code == 2 and result.output.startswith(
        "error: give --rank, --energy or --rule with --rule-value"
    )
    result = runner.invoke(
        main, ["extract", str(base), str(tuned), "--rank", "4", "--format", "gguf", "-o", str(tmp_path / "d")]
    )
    assert result.exit_code == 0, result.output
    assert (tmp_path / "d" / "d.gguf").is_file()


def test_kohya_output_lists_the_tensors_it_cannot_carry(tmp_path, caplog):
    base, tuned, _ = _pair(tmp_path, edit=lambda s: s.update({"model.norm.weight": s["model.norm.weight"] * 2}))
    result = loramix.extract(base, tuned, tmp_path / "k", rank_rule=RankRule(rank=4), device="cpu", format="kohya")
    assert result.dropped == {"model.norm.weight": "kohya files cannot hold it"}
    assert "not carried" in caplog.text and "model.norm.weight" in (tmp_path / "k" / "README.md").read_text()
    assert (tmp_path / "k" / "k.safetensors").is_file()


def test_mismatched_models_are_one_line_errors_naming_the_file(tmp_path):
    base, tuned, _ = _pair(tmp_path)
    state = {k: v.clone() for k, v in load_file(str(tuned / "model.safetensors")).items()}  # not views of the file
    state["model.layers.0.mlp.up_proj.weight"] = state["model.layers.0.mlp.up_proj.weight"][:, :64].contiguous()
    save_file(state, str(tuned / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(
        CheckpointError, match=r"tuned/model.safetensors: tensor model.layers.0.mlp.up_proj.weight has "
    ):
        extract_lora(base, tuned, rank_rule=RankRule(rank=4))
    del state["model.layers.0.mlp.up_proj.weight"]
    save_file(state, str(tuned / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"tuned: no tensor model.layers.0.mlp.up_proj.weight \(the base has it"):
        extract_lora(base, tuned, rank_rule=RankRule(rank=4))
    with pytest.raises(CheckpointError, match="no linear, embedding or conv weight differs"):
        loramix.extract(base, base, tmp_path / "same", rank_rule=RankRule(rank=4))
    with pytest.raises(MethodError, match="energy must be in"):
        extract_lora(base, base, rank_rule=RankRule(energy=2.0))


@pytest.mark.parametrize("depth", [0, 1, 2, 9])
@pytest.mark.parametrize("workers", [1, 2])
def test_reading_ahead_keeps_the_order(depth, workers):
    names = [f"t{i}" for i in range(7)]
    assert list(read_ahead(names, lambda n: n.upper(), depth, workers)) == [(n, n.upper()) for n in names]


GPU = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=GPU)])
@pytest.mark.parametrize("chunk", [100, 1000, 1 << 26])
def test_staged_reads_are_the_stored_tensors(tmp_path, device, chunk):
    """Every tensor of a bf16 model (and of a legacy .bin one, which is not read as stored) read through `Staging`
    equals safetensors' / torch's own reading, dtype, shape and bits: chunks of a few rows cycling through the two
    buffers (1000 bytes), rows wider than a chunk (100 bytes; the 128-wide bf16 rows are 256), and whole tensors."""
    model = _llama().to(torch.bfloat16)
    stored = _save(model, tmp_path / "safe")
    expected = load_file(str(stored / "model.safetensors"))
    legacy = tmp_path / "bin"
    legacy.mkdir()
    (legacy / "config.json").write_text((stored / "config.json").read_text())
    torch.save(expected, legacy / "pytorch_model.bin")
    staging = Staging(torch.device(device), chunk=chunk)
    for folder in (stored, legacy):
        source = tensors.open_model(folder)
        assert (source.stored(next(iter(expected))) is None) == (folder == legacy)
        for name, tensor in expected.items():
            got = staging.read(source, name)
            assert got.device.type == device and got.dtype == tensor.dtype and got.shape == tensor.shape, name
            assert torch.equal(got.cpu(), tensor), name


@GPU
def test_on_a_gpu_the_extraction_equals_the_cpu_one(tmp_path):
    """The GPU path (two reading threads, pinned staging, batched spectra) gives the CPU path's adapter: each ΔW
    = B·A to 1e-4 relative (float32 products on two devices), the same ranks, and the same account of every other
    tensor (a changed norm carried whole, bit for bit)."""
    edit = lambda s: s.update({"model.norm.weight": s["model.norm.weight"] * 2})  # noqa: E731
    base, tuned, _ = _pair(tmp_path, rank=4, noise=0.5, edit=edit)
    cpu, gpu = (extract_lora(base, tuned, rank=4, device=d) for d in ("cpu", "cuda"))
    assert sorted(gpu.adapter.modules) == sorted(cpu.adapter.modules) and gpu.unchanged == cpu.unchanged
    for name, module in cpu.adapter.modules.items():
        other = gpu.adapter.modules[name]
        assert other.rank == module.rank and other.A.device.type == "cpu"
        assert _relative(other.delta(dtype=torch.float64), module.delta(dtype=torch.float64)) < 1e-4, name
    assert gpu.carried == cpu.carried and gpu.adapter.extra["model.norm.weight"].tensor.device.type == "cpu"
    assert torch.equal(gpu.adapter.extra["model.norm.weight"].tensor, cpu.adapter.extra["model.norm.weight"].tensor)
