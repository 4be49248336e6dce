"""mergekit itself as the oracle for the methods loramix shares with it.

A tiny random Llama (2 layers) is the base; three PEFT adapters (rank 4 on q_proj and v_proj, made with
``init_lora_weights=False``) are merged into it by PEFT (``merge_and_unload``) and saved as model folders — the
"fine-tuned models" mergekit sees, each the base plus ΔWᵢ = sᵢ·Bᵢ·Aᵢ. The third adapter has no v_proj, so mergekit
sees that model leave v_proj alone (ΔW₃ = 0) — what loramix's methods take a module an adapter lacks to be.
mergekit's own ``run_merge`` (in-process, CPU, float32, no tokenizer, nothing downloaded) merges them; its merged
weight minus the base must equal the ΔW of the adapter ``loramix.combine`` writes, module by module.

Tolerance: 2e-6·max|ΔW| + 4e-6 absolute. mergekit works on W₀ + ΔWᵢ in float32, so each ΔWᵢ it sees carries the
rounding of adding it to W₀ (|W₀| ≲ 0.1 here: ulp ≈ 1e-8) and its result another, and it sorts, ranks and divides in
float32; loramix computes in float64 (core) or float32 (dense, re-factorised by a float32 SVD) from the factors.
Measured (max |ΔW| ≈ 0.05–0.1): ≤ 7e-7 for the dense methods, ≤ 1e-7 for the core-space (factor) methods.

Randomness (della, della_linear): mergekit draws its masks with ``torch.bernoulli`` from the global RNG in the order it
visits tensors, loramix from a per-module seeded generator; they cannot draw the same masks. Both draws are replaced
here by one fixed uniform field U (keep entry j iff Uⱼ < pⱼ), so everything but the random source — the
per-row magnitude ranks, the keep probabilities, the L1 rescale, the sign consensus and the normalisation — is
compared exactly.

Methods without a base in mergekit: ``karcher`` averages whole weights, so it runs on "delta models" (a zero model
plus ΔWᵢ). loramix's ``slerp`` (task vectors over the whole matrix) is mergekit's ``nuslerp`` with a base and
``nuslerp_flatten`` at weights (1 − t, t); mergekit's own ``slerp`` interpolates the base against the other model.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import loramix
from tests.helpers import make_peft_adapter, tiny_llama

mergekit_config = pytest.importorskip("mergekit.config")
mergekit_merge = pytest.importorskip("mergekit.merge")
mergekit_options = pytest.importorskip("mergekit.options")

TARGETS = ["q_proj", "v_proj"]
N = 3


def _save_model(model, folder: Path, tensors: dict[str, torch.Tensor] | None = None) -> Path:
    model.config.architectures = [type(model).__name__]  # mergekit picks its architecture from this
    model.config.save_pretrained(str(folder))
    state = tensors if tensors is not None else {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(folder / "model.safetensors"))
    return folder


@pytest.fixture(scope="module")
def setting(tmp_path_factory):
    root = tmp_path_factory.mktemp("mergekit")
    base = _save_model(tiny_llama(), root / "base")
    base_state = tiny_llama().state_dict()
    adapters, models, deltas = [], [], []
    for i in range(N):
        targets = TARGETS if i < 2 else TARGETS[:1]  # the third lacks v_proj: mergekit sees ΔW = 0 there
        made = make_peft_adapter(tiny_llama, root, f"adapter{i}", seed=10 + i, target_modules=targets)
        merged = made.load_with_peft().merge_and_unload().state_dict()
        noise = torch.Generator().manual_seed(i)
        for key, value in merged.items():  # other tensors change too (mergekit's multislerp refuses unchanged ones)
            if not any(t in key for t in TARGETS):
                merged[key] = value + 1e-3 * torch.randn(value.shape, generator=noise)
        adapters.append(made.path)
        models.append(_save_model(tiny_llama(), root / f"model{i}", {k: v.contiguous() for k, v in merged.items()}))
        delta = {k: (merged[k] - base_state[k]).contiguous() for k in merged}
        deltas.append(_save_model(tiny_llama(), root / f"delta{i}", delta))
    zero = _save_model(tiny_llama(), root / "zero", {k: torch.zeros_like(v) for k, v in base_state.items()})
    return dict(root=root, base=base, zero=zero, adapters=adapters, models=models, deltas=deltas)


def _mergekit(config: dict, out: Path) -> dict[str, torch.Tensor]:
    merge_config = mergekit_config.MergeConfiguration.model_validate(config)
    options = mergekit_options.MergeOptions(copy_tokenizer=False, write_model_card=False, quiet=True, device="cpu")
    mergekit_merge.run_merge(merge_config, str(out), options=options)
    tensors = {}
    for shard in sorted(out.glob("*.safetensors")):
        tensors.update(load_file(str(shard)))
    return tensors


def _uniform(shape) -> torch.Tensor:
    return torch.rand(tuple(shape), generator=torch.Generator().manual_seed(7), dtype=torch.float64)


def _same_draws(monkeypatch) -> None:
    """Replace both random sources by keep-iff-U<p with one fixed uniform field U."""
    import loramix.methods.task_arithmetic as task_arithmetic

    monkeypatch.setattr(torch, "bernoulli", lambda p, *a, **k: (_uniform(p.shape) < p.double()).to(p.dtype))
    monkeypatch.setattr(task_arithmetic, "random_mask", lambda shape, probs, generator: _uniform(shape) < probs)


# (loramix method, loramix options, loramix weights, mergekit method, mergekit globals, per-model mergekit params,
#  models: "models" (base + ΔWᵢ with the base) or "deltas" (ΔWᵢ alone, no base), how many adapters)
WEIGHTS = [0.7, 1.3, 0.5]
CASES = {
    "breadcrumbs": ("breadcrumbs", {"density": 0.6, "gamma": 0.05}, WEIGHTS, "breadcrumbs", {}, "bc", "models", 3),
    "breadcrumbs_ties": (
        "breadcrumbs_ties",
        {"density": 0.6, "gamma": 0.05, "rescale": True, "lambda": 0.8},
        WEIGHTS,
        "breadcrumbs_ties",
        {"rescale": True, "lambda": 0.8},
        "bc",
        "models",
        3,
    ),
    "della": ("della", {"density": 0.5, "epsilon": 0.2}, WEIGHTS, "della", {}, "della", "models", 3),
    "della_linear": (
        "della_linear",
        {"density": 0.5, "epsilon": 0.2, "normalize": True},
        WEIGHTS,
        "della_linear",
        {"normalize": True},
        "della",
        "models",
        3,
    ),
    "sce": ("sce", {"select_topk": 0.5}, [1.0] * 3, "sce", {"select_topk": 0.5}, None, "models", 3),
    "slerp": ("slerp", {"t": 0.3}, [1.0, 1.0], "nuslerp", {"nuslerp_flatten": True}, "t", "models", 2),
    "nuslerp_rows": (
        "nuslerp",
        {"nuslerp_flatten": False},
        [0.6, 0.4],
        "nuslerp",
        {"nuslerp_flatten": False},
        "w",
        "models",
        2,
    ),
    "nuslerp_columns_dense": (
        "nuslerp",
        {"nuslerp_flatten": False, "nuslerp_row_wise": True, "space": "dense"},
        [0.6, 0.4],
        "nuslerp",
        {"nuslerp_flatten": False, "nuslerp_row_wise": True},
        "w",
        "models",
        2,
    ),
    "multislerp": ("multislerp", {}, WEIGHTS, "multislerp", {}, "w", "models", 3),
    "karcher": ("karcher", {}, [1.0] * 3, "karcher", {}, None, "deltas", 3),
    "model_stock": ("model_stock", {}, [1.0] * 3, "model_stock", {}, None, "models", 3),
    "model_stock_filter_wise": (
        "model_stock",
        {"filter_wise": True, "space": "dense"},
        [1.0] * 3,
        "model_stock",
        {"filter_wise": True},
        None,
        "models",
        3,
    ),
}


def _model_parameters(kind, i: int, weights: list[float], options: dict) -> dict:
    if kind == "bc":
        return {"weight": weights[i], "density": options["density"], "gamma": options["gamma"]}
    if kind == "della":
        return {"weight": weights[i], "density": options["density"], "epsilon": options["epsilon"]}
    if kind == "w":
        return {"weight": weights[i]}
    if kind == "t":
        return {"weight": [1 - options["t"], options["t"]][i]}
    return {}


@pytest.mark.parametrize("case", list(CASES))
def test_delta_equals_mergekit_merge_minus_base(setting, case, tmp_path, monkeypatch):
    method, options, weights, theirs, shared, per_model, models, n = CASES[case]
    if method.startswith("della"):
        _same_draws(monkeypatch)
    folders = setting[models][:n]
    config = {
        "merge_method": theirs,
        "dtype": "float32",
        "parameters": shared,
        "models": [
            {"model": str(f), "parameters": _model_parameters(per_model, i, weights, options)}
            for i, f in enumerate(folders)
        ],
    }
    if models == "models":
        config["base_model"] = str(setting["base"])
    merged = _mergekit(config, tmp_path / "merged")
    reference = load_file(str((setting["base"] if models == "models" else setting["zero"]) / "model.safetensors"))
    ours = loramix.combine(
        setting["adapters"][:n],
        weights=weights,
        method=method,
        rank_rule=loramix.RankRule(rank=64),
        device="cpu",
        **options,
    )  # rank 64 ≥ min(out, in): nothing truncated
    assert len(ours.modules) == 2 * len(TARGETS)
    for name, module in ours.modules.items():
        key = next(k for k in merged if k.endswith(f"{name.split('model.', 1)[-1]}.weight"))
        expected = merged[key].double() - reference[key].double()
        got = module.delta(dtype=torch.float64)
        tol = 2e-6 * float(expected.abs().max()) + 4e-6
        assert float(expected.abs().max()) > 1e-3, f"{case} {name}: mergekit left the weight unchanged"
        assert torch.allclose(got, expected, rtol=0, atol=tol), (
            f"{case} {name}: max |Δ| {float((got - expected).abs().max()):.3g} > {tol:.3g}"
        )
