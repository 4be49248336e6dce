"""Mixture-of-experts adapters (PEFT target_parameters on fused 3-D expert tensors): read per expert, combined per
expert, written back as PEFT loads them; layouts not recognised are refused. Oracle: PEFT 0.21 on a tiny
Qwen3-MoE (its get_delta_weight and forward), and float64 sums of its per-expert updates."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
import torch
from helpers import read_folder, write_folder
from llm_layouts import (
    EXPERTS,
    MOE,
    expert_adapter,
    peft_deltas,
    peft_logits,
    reference_logits,
    tiny_gpt_oss,
    tiny_qwen3_moe,
)
from peft import PeftModel
from safetensors.torch import load_file

from loramix import combine, extract, load_adapter, merge_into_base, save_adapter
from loramix.errors import ExpertLayoutError
from loramix.formats import write_adapter
from loramix.linalg import RankRule

GATE_UP = "model.layers.0.mlp.experts.gate_up_proj"


@pytest.fixture(scope="module")
def adapters(tmp_path_factory):
    root = tmp_path_factory.mktemp("moe")
    return expert_adapter(root / "a", 1), expert_adapter(root / "b", 2, r=2, alpha=3)


@pytest.mark.parametrize("kind", ["qwen3_moe", "mixtral", "gpt_oss"])
def test_read_per_expert_equals_peft(adapters, tmp_path, kind):
    """Each expert module's ΔW (out × in) is PEFT's ΔW of that expert (get_delta_weight's slice e; gpt-oss keeps its
    experts transposed, (E, in, out)); ranks are r, not r·E."""
    folder = adapters[0] if kind == "qwen3_moe" else expert_adapter(tmp_path / kind, 1, kind=kind)
    a = load_adapter(folder)
    deltas = peft_deltas(folder, kind)
    assert a.ranks == [4] and not a.warnings
    for param in ("gate_up_proj", "down_proj"):
        for layer in range(2):
            full = f"model.layers.{layer}.mlp.experts.{param}"
            for e in range(EXPERTS):
                m = a.modules[f"model.layers.{layer}.mlp.experts.{e}.{param}"]
                assert (m.expert.param, m.expert.index, m.expert.count) == (full, e, EXPERTS)
                theirs = deltas[full][e].T if kind == "gpt_oss" else deltas[full][e]
                torch.testing.assert_close(m.delta(dtype=torch.float64), theirs, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(
        a.modules["model.layers.1.self_attn.q_proj"].delta(dtype=torch.float64),
        deltas["model.layers.1.self_attn.q_proj.weight"],
    )


def test_written_back_loads_in_peft_bit_for_bit(adapters, tmp_path):
    """PEFT's own nesting (gate_up_proj inside down_proj whatever the config's order) and block layout round-trip."""
    out = tmp_path / "out"
    save_adapter(load_adapter(adapters[0]), out, rank_layout="exact")
    ours, theirs = load_file(out / "adapter_model.safetensors"), load_file(adapters[0] / "adapter_model.safetensors")
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    assert torch.equal(peft_logits(out), peft_logits(adapters[0]))


@pytest.mark.parametrize("options", [{"method": "cat"}, {"method": "svd", "rank_rule": RankRule(rank=6)}])
def test_combine_per_expert_equals_float64_sum(adapters, tmp_path, options):
    """PEFT's logits with the combined adapter = the float64 base plus Σ wᵢ·ΔWᵢ of PEFT's own per-expert updates
    (cat, and svd at the summed rank 4+2: both exact; factors stored in float32: 1e-5)."""
    weights = [0.7, -0.4]
    out = tmp_path / "out"
    save_adapter(combine(list(adapters), weights=weights, **options), out)
    deltas = [peft_deltas(path) for path in adapters]
    total = {name: sum(w * d[name] for w, d in zip(weights, deltas)) for name in deltas[0]}
    torch.testing.assert_close(peft_logits(out), reference_logits(total), rtol=0, atol=1e-5)
    assert json.loads((out / "adapter_config.json").read_text())["target_parameters"][0].endswith("down_proj")
    assert "Experts: 4 fused expert parameters with 4 experts each" in (out / "README.md").read_text()


def test_svd_truncates_each_expert_on_its_own(adapters, tmp_path):
    """svd at rank k: every expert's ΔW is the best rank-k approximation of that expert's own sum (float64
    Eckart–Young per expert), not of a sum over experts."""
    out = tmp_path / "out"
    save_adapter(
        combine(list(adapters), weights=[1.0, 1.0], method="svd", rank_rule=RankRule(rank=3)), out, rank_layout="exact"
    )
    deltas = [peft_deltas(path) for path in adapters]
    written = peft_deltas(out)
    for e in range(EXPERTS):
        U, S, Vh = torch.linalg.svd(deltas[0][GATE_UP][e] + deltas[1][GATE_UP][e])
        best = U[:, :3] @ torch.diag(S[:3]) @ Vh[:3]
        torch.testing.assert_close(written[GATE_UP][e], best, rtol=0, atol=1e-5)


def test_unequal_expert_ranks_are_padded_for_peft(adapters, tmp_path):
    """An energy rule gives each expert its own rank; PEFT needs one r per parameter: padded with zero blocks,
    ΔW unchanged."""
    combined = combine(
        list(adapters), weights=[1.0, 0.5], method="svd", rank_rule=RankRule(energy=0.9), rank_layout="exact"
    )
    ranks = {m.rank for n, m in combined.modules.items() if m.expert is not None}
    out = tmp_path / "out"
    save_adapter(combined, out, rank_layout="exact")
    written = peft_deltas(out)
    for m in combined.modules.values():
        if m.expert is not None:
            torch.testing.assert_close(
                written[m.expert.param][m.expert.index], m.delta(dtype=torch.float64), rtol=0, atol=1e-6
            )
    assert len(ranks) > 1


def test_inspect_shows_experts(adapters):
    out = subprocess.run(
        [sys.executable, "-m", "loramix", "inspect", str(adapters[0])], capture_output=True, text=True, check=True
    ).stdout
    assert "experts       4 fused parameters (down_proj ×2, gate_up_proj ×2): 4 experts each, rank 4 per expert" in out
    assert "rank 16" not in out and "using rank" not in out


def test_formats_without_experts_refuse_in_one_line(adapters, tmp_path):
    adapter = load_adapter(adapters[0])
    with pytest.raises(ExpertLayoutError, match="does not support expert adapters yet"):
        write_adapter(adapter, tmp_path, format="kohya")
    run = subprocess.run(
        [sys.executable, "-m", "loramix", "combine", str(adapters[0]), "--format", "kohya", "-o", str(tmp_path / "k")],
        capture_output=True,
        text=True,
    )
    assert run.returncode == 2 and len(run.stderr.strip().splitlines()) == 1, run.stderr
    assert "mixture-of-experts adapter" in run.stderr


def test_nested_pairs_without_target_parameters_are_refused(adapters, tmp_path):
    config, tensors = read_folder(adapters[0])
    del config["target_parameters"]
    with pytest.raises(ExpertLayoutError, match="nested .base_layer. LoRA pair.*refused rather than read as a dense"):
        load_adapter(write_folder(tmp_path / "x", config, tensors))


def test_rank_not_a_multiple_of_r_is_refused(adapters, tmp_path):
    config, tensors = read_folder(adapters[0])
    config["r"] = 3
    with pytest.raises(ExpertLayoutError, match="not a multiple of r=3"):
        load_adapter(write_folder(tmp_path / "x", config, tensors))


def test_unknown_parameter_order_is_refused(adapters, tmp_path):
    config, tensors = read_folder(adapters[0])
    config["target_parameters"] = ["mlp.experts.w_in", "mlp.experts.w_out"]
    with pytest.raises(ExpertLayoutError, match="nests them in the order the module registers them"):
        load_adapter(write_folder(tmp_path / "x", config, tensors))


def test_router_as_modules_to_save_is_merged(tmp_path):
    """A router trained whole (modules_to_save=["gate"]) replaces the base's: equal to PEFT's merged save."""
    folder = expert_adapter(tmp_path / "a", 3, modules_to_save=["gate"])
    tiny_qwen3_moe().save_pretrained(tmp_path / "base")
    merge_into_base(folder, tmp_path / "base", tmp_path / "ours", dtype="float32")
    PeftModel.from_pretrained(tiny_qwen3_moe(), folder).merge_and_unload().save_pretrained(tmp_path / "peft")
    ours, theirs = (load_file(tmp_path / d / "model.safetensors") for d in ("ours", "peft"))
    for key in ours:
        torch.testing.assert_close(ours[key], theirs[key], rtol=0, atol=1e-6, msg=key)
    router = "model.layers.0.mlp.gate.weight"
    assert not torch.equal(ours[router], load_file(tmp_path / "base" / "model.safetensors")[router])


@pytest.mark.parametrize(
    ("kind", "stored"),
    [
        ("qwen3_moe", "model.layers.1.mlp.experts.3.up_proj.weight"),
        ("mixtral", "model.layers.1.block_sparse_moe.experts.3.w3.weight"),
    ],
)
def test_merge_into_equals_peft_merge_and_save(adapters, tmp_path, kind, stored):
    """The fused experts' ΔW lands on the per-expert tensors the checkpoint stores (gate_up split into gate_proj and
    up_proj, or Mixtral's w1/w3 under block_sparse_moe, through transformers' own conversion mapping): equal to PEFT
    merge_and_unload + save_pretrained, tensor for tensor (float32; 1e-6)."""
    folder = adapters[0] if kind == "qwen3_moe" else expert_adapter(tmp_path / kind, 1, kind=kind)
    MOE[kind]().save_pretrained(tmp_path / "base")
    merge_into_base(folder, tmp_path / "base", tmp_path / "ours", dtype="float32")
    PeftModel.from_pretrained(MOE[kind](), folder).merge_and_unload().save_pretrained(tmp_path / "peft")
    ours, theirs = (load_file(tmp_path / d / "model.safetensors") for d in ("ours", "peft"))
    assert ours.keys() == theirs.keys() and stored in ours
    for key in ours:
        torch.testing.assert_close(ours[key], theirs[key], rtol=0, atol=1e-6, msg=key)
    assert not torch.equal(ours[stored], load_file(tmp_path / "base" / "model.safetensors")[stored])


def test_merge_into_a_fused_checkpoint_equals_peft(tmp_path):
    """gpt-oss keeps its experts transposed, (E, in, out), and stores them fused as they are: each expert's ΔWᵀ
    lands on its slab, equal to PEFT merge_and_unload + save_pretrained tensor for tensor (float32; 1e-6)."""
    tiny_gpt_oss().save_pretrained(tmp_path / "base")
    folder = expert_adapter(tmp_path / "a", 1, kind="gpt_oss")
    merge_into_base(folder, tmp_path / "base", tmp_path / "ours", dtype="float32")
    PeftModel.from_pretrained(tiny_gpt_oss(), folder).merge_and_unload().save_pretrained(tmp_path / "peft")
    ours, theirs = (load_file(tmp_path / d / "model.safetensors") for d in ("ours", "peft"))
    assert ours.keys() == theirs.keys()
    for key in ours:
        torch.testing.assert_close(ours[key], theirs[key], rtol=0, atol=1e-6, msg=key)
    stored = "model.layers.1.mlp.experts.gate_up_proj"
    assert not torch.equal(ours[stored], load_file(tmp_path / "base" / "model.safetensors")[stored])


def test_a_gpu_merge_keeps_four_threads_where_fused_experts_are_one_chunk(tmp_path, monkeypatch):
    """A fused 3-D experts tensor is merged as one chunk (on a GPU, several float32 copies of it per feeding thread):
    the default is `GPU_WORKERS_WHOLE` threads where a chunk is larger than `GPU_CHUNK_ELEMENTS`, else `GPU_WORKERS`."""
    from loramix.io.base import open_base
    from loramix.merge import checkpoint

    tiny_gpt_oss().save_pretrained(tmp_path / "base")
    folder = expert_adapter(tmp_path / "a", 1, kind="gpt_oss")
    jobs = checkpoint.plan_merge(load_adapter(folder), open_base(tmp_path / "base"), None, [])
    fused = max(math.prod(j.shape) for j in jobs if len(j.shape) == 3 and j.updates)
    cuda = torch.device("cuda")  # only its type is read: no GPU needed
    monkeypatch.setattr(checkpoint, "GPU_CHUNK_ELEMENTS", fused - 1)
    assert checkpoint.gpu_workers(jobs, cuda) == checkpoint.GPU_WORKERS_WHOLE == 4
    monkeypatch.setattr(checkpoint, "GPU_CHUNK_ELEMENTS", fused)
    assert checkpoint.gpu_workers(jobs, cuda) == checkpoint.GPU_WORKERS == 8
    assert checkpoint.gpu_workers([j for j in jobs if len(j.shape) < 3], cuda) == 8


def test_check_verdicts(adapters, tmp_path):
    """PEFT loads it from 0.20 (0.17–0.19 read (E, out, in) experts as (E, in, out)); vLLM, SGLang and LoRAX drop
    the expert pairs, llama.cpp's converter cannot map them: each names --merge-into as the fix."""
    from loramix.compat import check_source

    verdicts = {v.consumer: v for v in check_source(adapters[0]).verdicts}
    assert verdicts["PEFT"].status == "yes" and verdicts["PEFT"].note.startswith("PEFT 0.20+")
    for name, status in (("vLLM", "wrong"), ("SGLang", "wrong"), ("LoRAX/TGI", "wrong"), ("llama.cpp", "no")):
        assert verdicts[name].status == status and "--merge-into BASE" in verdicts[name].fix
    out = tmp_path / "out"
    save_adapter(combine(list(adapters), method="cat"), out)
    assert {v.consumer: v.status for v in check_source(out).verdicts}["PEFT"] == "yes"


def test_extract_from_a_finetuned_moe_checkpoint(adapters, tmp_path):
    """The fine-tuned checkpoint stores its experts one by one (experts.{e}.gate_proj …): extraction reads them as the
    fused parameters transformers builds and writes target_parameters pairs (one LoRA per expert, rank 4): PEFT's
    logits with the extracted adapter are the fine-tuned model's (float32; 1e-5)."""
    from llm_layouts import INPUT_IDS, tiny_qwen3_moe
    from transformers import Qwen3MoeForCausalLM

    tiny_qwen3_moe().save_pretrained(tmp_path / "base")
    PeftModel.from_pretrained(tiny_qwen3_moe(), adapters[0]).merge_and_unload().save_pretrained(tmp_path / "tuned")
    extract(tmp_path / "base", tmp_path / "tuned", tmp_path / "out", rank_rule=RankRule(rank=4), device="cpu")
    config = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    assert config["target_parameters"] == sorted(
        f"model.layers.{i}.mlp.experts.{p}" for i in (0, 1) for p in ("down_proj", "gate_up_proj")
    )
    tuned = Qwen3MoeForCausalLM.from_pretrained(tmp_path / "tuned", experts_implementation="eager").eval()
    extracted = PeftModel.from_pretrained(tiny_qwen3_moe(), tmp_path / "out").eval()
    with torch.no_grad():
        torch.testing.assert_close(
            extracted(input_ids=INPUT_IDS).logits, tuned(input_ids=INPUT_IDS).logits, rtol=0, atol=1e-5
        )


def test_analyze_reports_per_expert(adapters):
    """Which experts each adapter changes most and how alike two adapters' updates of one expert are, each expert
    over its gate_up and down ΔW: the cosines against float64 ones of PEFT's per-expert updates (printed to 3
    decimals: 1e-3)."""
    from loramix import analyze
    from loramix.analysis.experts import expert_lines

    deltas = [peft_deltas(path) for path in adapters]
    lines = expert_lines(analyze(list(adapters)), top=8)
    shown = {line.split()[0]: float(line.split()[1].rstrip("%")) for line in lines if line.startswith("  ")}
    for layer in range(2):
        for e in range(EXPERTS):
            parts = [
                (d[f"model.layers.{layer}.mlp.experts.{p}"][e]) for d in deltas for p in ("gate_up_proj", "down_proj")
            ]
            a, b = (
                torch.cat([parts[0].flatten(), parts[1].flatten()]),
                torch.cat([parts[2].flatten(), parts[3].flatten()]),
            )
            cosine = float(a @ b / (a.norm() * b.norm()))
            assert shown[f"model.layers.{layer}.mlp.experts.{e}"] == pytest.approx(cosine, abs=1e-3)
    first = [line for line in lines if line.startswith("Experts a changes most")]
    assert first and "8 experts" in first[0]


def test_ties_runs_on_each_expert(adapters):
    """An element-wise method sees each expert's ΔW on its own: TIES on the expert adapters equals PEFT's own
    merge_utils.ties on each expert's pair of float64 updates (rank 16 keeps the result whole; 1e-5)."""
    from peft.utils.merge_utils import ties

    weights = [0.6, 0.9]
    combined = combine(list(adapters), weights=weights, method="ties", density=0.5, rank_rule=RankRule(rank=16))
    deltas = [peft_deltas(path) for path in adapters]
    for e in range(EXPERTS):
        tasks = torch.stack([d[GATE_UP][e] for d in deltas])
        expected = ties(tasks, torch.tensor(weights, dtype=torch.float64), density=0.5, majority_sign_method="total")
        got = combined.modules[f"model.layers.0.mlp.experts.{e}.gate_up_proj"].delta(dtype=torch.float64)
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)
