"""TIES, magnitude prune and DARE, dense and in Core Space: float64 references written from the papers, and PEFT.

References are numpy, written from the papers' definitions (TIES: Yadav et al. 2023 §3; DARE: Yu et al. 2024 §3;
Core Space: Panariello et al. 2025 §3) in PEFT 0.21's order: prune each unweighted τᵢ = sᵢBᵢAᵢ, elect signs on the
unweighted pruned tensors, then weight by wᵢ and take the disjoint mean. Float64 comparisons allow 1e-9 relative
(two SVD implementations on well-conditioned matrices agree to ~1e-13); PEFT comparisons run in float32 and allow
1e-4 relative (PEFT's own float32 SVD reconstruction is accurate to ~1e-6).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from helpers import make_peft_adapter, tiny_convnet, tiny_llama

from loramix import combine
from loramix.cli import main
from loramix.errors import MethodError
from loramix.linalg import RankRule
from loramix.methods import REGISTRY, Term
from loramix.methods._elementwise import module_generator, random_mask

OUT, IN, R = 12, 10, 3
FULL = RankRule(rank=min(OUT, IN))


def make_terms(n=3, *, seed=0, ranks=None, weights=None, scales=None, out=OUT, inp=IN):
    gen = torch.Generator().manual_seed(seed)
    ranks = ranks or [R] * n
    weights = weights or [0.5 + 0.25 * i for i in range(n)]
    scales = scales or [2.0 - 0.5 * i for i in range(n)]
    return [
        Term(
            w * s,
            torch.randn(out, r, generator=gen, dtype=torch.float64),
            torch.randn(r, inp, generator=gen, dtype=torch.float64),
            weight=w,
        )
        for r, w, s in zip(ranks, weights, scales)
    ]


def task_vectors(terms) -> list[np.ndarray]:
    """τᵢ = sᵢ·Bᵢ·Aᵢ, without the weight."""
    return [(t.coef / t.weight) * (t.B.numpy() @ t.A.numpy()) for t in terms]


def trim(x: np.ndarray, density: float) -> np.ndarray:
    """TIES trim: keep the ⌊density·numel⌋ entries of largest magnitude."""
    k = int(density * x.size)
    if density >= 1:
        return x.copy()
    threshold = np.sort(np.abs(x).ravel())[::-1][k - 1] if k else np.inf
    return np.where(np.abs(x) >= threshold, x, 0.0)


def ties_reference(tasks, weights, density, majority="total") -> np.ndarray:
    trimmed = [trim(t, density) for t in tasks]
    if majority == "total":
        elected = np.where(sum(trimmed) >= 0, 1.0, -1.0)
    else:
        elected = np.where(sum(np.sign(t) for t in trimmed) >= 0, 1.0, -1.0)
    total, count = np.zeros_like(tasks[0]), np.zeros_like(tasks[0])
    for w, t in zip(weights, trimmed):
        agrees = np.sign(t) == elected
        total += np.where(agrees, w * t, 0.0)
        count += agrees
    return total / np.maximum(count, 1)


def exact_sum(terms) -> np.ndarray:
    """Σ cᵢ·Bᵢ·Aᵢ: the matrix cat's factors multiply out to."""
    return sum(t.coef * (t.B.numpy() @ t.A.numpy()) for t in terms)


def product(factors) -> np.ndarray:
    B, A = factors
    return (B.double() @ A.double()).numpy()


def close(actual, expected, tol=1e-9):
    scale = max(np.abs(expected).max(), 1e-300)
    assert np.abs(actual - expected).max() <= tol * scale, np.abs(actual - expected).max() / scale


def core_bases(terms):
    """Left singular vectors of [B₁ … B_T] and right singular vectors of [A₁; …; A_T] (the paper's reference bases)."""
    U = np.linalg.svd(np.concatenate([t.B.numpy() for t in terms], axis=1), full_matrices=False)[0]
    V = np.linalg.svd(np.concatenate([t.A.numpy() for t in terms], axis=0), full_matrices=False)[2].T
    return flip(U), flip(V)


def flip(U: np.ndarray) -> np.ndarray:
    """Signs fixed so each column's largest-magnitude entry is positive (frequency election's tie-break needs it)."""
    return U * np.sign(U[np.abs(U).argmax(axis=0), np.arange(U.shape[1])])


# ----------------------------------------------------------------------------------------------- dense


@pytest.mark.parametrize("density", [0.3, 0.7])
@pytest.mark.parametrize("majority", ["total", "frequency"])
def test_ties_dense_matches_paper_reference(density, majority):
    terms = make_terms(3)
    expected = ties_reference(task_vectors(terms), [t.weight for t in terms], density, majority)
    close(product(REGISTRY["ties"].fn(terms, rule=FULL, density=density, majority_sign=majority)), expected)


def test_ties_weights_apply_after_sign_election():
    """A heavy weight on a small task must not win the vote (PEFT elects on the unweighted τᵢ)."""
    terms = make_terms(2, weights=[1.0, 50.0], scales=[3.0, 0.1])
    tasks = task_vectors(terms)
    expected = ties_reference(tasks, [1.0, 50.0], 0.5)
    close(product(REGISTRY["ties"].fn(terms, rule=FULL, density=0.5)), expected)
    weighted_vote = ties_reference([tasks[0], 50 * tasks[1]], [1.0, 1.0], 0.5)
    assert np.abs(expected - weighted_vote).max() > 1e-3 * np.abs(expected).max()


@pytest.mark.parametrize("density", [0.25, 1.0])
def test_magnitude_prune_dense_matches_reference(density):
    terms = make_terms(3, ranks=[2, 3, 4])
    expected = sum(t.weight * trim(x, density) for t, x in zip(terms, task_vectors(terms)))
    close(product(REGISTRY["magnitude_prune"].fn(terms, rule=FULL, density=density)), expected)


def test_dense_truncation_is_the_best_rank_k_of_the_merged_matrix():
    terms = make_terms(3)
    merged = ties_reference(task_vectors(terms), [t.weight for t in terms], 0.4)
    U, S, Vt = np.linalg.svd(merged)
    best = (U[:, :4] * S[:4]) @ Vt[:4]
    close(product(REGISTRY["ties"].fn(terms, rule=RankRule(rank=4), density=0.4)), best)


def test_dense_merge_without_a_rule_keeps_the_full_numerical_rank_and_says_so():
    # no hidden cap at Σrᵢ = 3: the dense TIES matrix of sparsified ΔWs has full rank min(12, 10)
    terms = make_terms(2, ranks=[2, 1])
    factors = REGISTRY["ties"].fn(terms, rule=RankRule(), density=0.5)
    assert (
        factors.B.shape[1]
        == factors.A.shape[0]
        == np.linalg.matrix_rank(ties_reference(task_vectors(terms), [t.weight for t in terms], 0.5))
    )
    assert factors.kept == pytest.approx(1.0, abs=1e-12)


@pytest.mark.parametrize("energy", [0.9, 0.99])
def test_dense_energy_rule_keeps_that_share_and_reports_it(energy):
    terms = make_terms(3)
    merged = ties_reference(task_vectors(terms), [t.weight for t in terms], 0.4)
    S = np.linalg.svd(merged, compute_uv=False)
    shares = np.cumsum(S**2) / np.sum(S**2)
    k = int(np.searchsorted(shares, energy - 1e-12) + 1)  # the smallest k holding the share (float64 oracle)
    factors = REGISTRY["ties"].fn(terms, rule=RankRule(energy=energy), density=0.4)
    assert factors.A.shape[0] == k
    written = product(factors)
    assert factors.kept == pytest.approx(np.sum(written**2) / np.sum(merged**2), rel=1e-9)
    assert factors.kept >= energy
    error = np.linalg.norm(merged - written) / np.linalg.norm(merged)
    assert factors.relative_error == pytest.approx(error, rel=1e-6)


# ----------------------------------------------------------------------------------------------- DARE


def dare_reference(terms, density, seed, kind):
    """DARE with the method's own masks (drawn from its documented generator), merged by the paper's rule."""
    generator = module_generator(seed, terms)
    tasks = task_vectors(terms)
    masks = [random_mask(torch.Size(t.shape), density, generator).numpy() for t in tasks]
    rescaled = [np.where(m, t / density, 0.0) for m, t in zip(masks, tasks)]
    weights = [t.weight for t in terms]
    if kind == "dare_linear":
        return sum(w * x for w, x in zip(weights, rescaled))
    return ties_reference(rescaled, weights, 1.0)


@pytest.mark.parametrize("kind", ["dare_linear", "dare_ties"])
def test_dare_matches_reference_given_its_masks(kind):
    terms = make_terms(3)
    expected = dare_reference(terms, 0.4, 7, kind)
    close(product(REGISTRY[kind].fn(terms, rule=FULL, density=0.4, seed=7)), expected)


def test_dare_is_reproducible_and_seed_dependent():
    terms = make_terms(3)
    first = product(REGISTRY["dare_ties"].fn(terms, rule=FULL, density=0.5, seed=3))
    again = product(REGISTRY["dare_ties"].fn(terms, rule=FULL, density=0.5, seed=3))
    other = product(REGISTRY["dare_ties"].fn(terms, rule=FULL, density=0.5, seed=4))
    assert np.array_equal(first, again)
    assert np.abs(first - other).max() > 1e-3 * np.abs(first).max()


def test_dare_rescales_kept_entries_by_one_over_density():
    """One task, weight 1: every entry is 0 or τ/density, about density of them kept, and E[result] = τ."""
    (term,) = make_terms(1, weights=[1.0], scales=[1.0], out=40, inp=30, ranks=[30])
    tau = task_vectors([term])[0]
    results = [
        product(REGISTRY["dare_linear"].fn([term], rule=RankRule(rank=30), density=0.25, seed=s)) for s in range(64)
    ]
    first = results[0]
    kept = np.abs(first) > 1e-9 * np.abs(tau).max()
    close(first[kept], tau[kept] / 0.25)
    # binomial(1200, 0.25): sd ≈ 15 entries; allow 5 sd
    assert abs(kept.sum() - 0.25 * tau.size) < 5 * np.sqrt(tau.size * 0.25 * 0.75)
    # the mean of 64 draws: per-entry sd = |τ|·√(3/64) ≈ 0.22|τ|; the matrix-wide relative error is about that
    mean = np.mean(results, axis=0)
    assert np.linalg.norm(mean - tau) < 0.3 * np.linalg.norm(tau)
    assert np.linalg.norm(first - tau) > 1.0 * np.linalg.norm(tau)  # one draw alone is far off (sd √3·|τ|)


def test_modules_of_equal_shape_get_different_masks():
    a, b = make_terms(2, seed=1), make_terms(2, seed=2)
    mask_a = random_mask(torch.Size((OUT, IN)), 0.5, module_generator(0, a))
    mask_b = random_mask(torch.Size((OUT, IN)), 0.5, module_generator(0, b))
    assert not torch.equal(mask_a, mask_b)


# ----------------------------------------------------------------------------------------------- core space


@pytest.mark.parametrize("majority", ["total", "frequency"])
def test_ties_core_matches_reference(majority):
    terms = make_terms(3, ranks=[2, 3, 4])
    U, V = core_bases(terms)
    cores = [U.T @ x @ V for x in task_vectors(terms)]
    expected = U @ ties_reference(cores, [t.weight for t in terms], 0.3, majority) @ V.T
    actual = product(REGISTRY["ties"].fn(terms, rule=RankRule(), density=0.3, majority_sign=majority, space="core"))
    close(actual, expected)


@pytest.mark.parametrize("method", ["magnitude_prune", "dare_linear"])
def test_core_linear_merge_equals_cat_exactly(method):
    terms = make_terms(3, ranks=[2, 3, 4])
    exact = exact_sum(terms)  # what cat represents, in float64 (cat itself returns float32 factors)
    close(product(REGISTRY[method].fn(terms, rule=RankRule(), density=1.0, space="core")), exact, tol=1e-12)


def test_core_handles_dependent_factors():
    """Two adapters sharing B: the joint column space is smaller than Σrᵢ and the merge is still exact."""
    a, b = make_terms(2)
    shared = [a, Term(b.coef, a.B, b.A, weight=b.weight)]
    exact = exact_sum(shared)
    close(product(REGISTRY["magnitude_prune"].fn(shared, rule=RankRule(), density=1.0, space="core")), exact, 1e-12)


def test_core_never_forms_an_out_by_in_matrix(monkeypatch):
    """Core space multiplies only thin factors: every matmul has an operand with at most Σrᵢ on its short side."""
    terms = make_terms(3, out=300, inp=200)
    seen = []
    original = torch.Tensor.__matmul__

    def spy(x, y):
        result = original(x, y)
        seen.append(tuple(result.shape))
        return result

    monkeypatch.setattr(torch.Tensor, "__matmul__", spy)
    REGISTRY["ties"].fn(terms, rule=RankRule(rank=4), density=0.3, space="core")
    monkeypatch.undo()
    assert seen and all(min(shape) <= 3 * R for shape in seen)


# ----------------------------------------------------------------------------------------------- PEFT


def _peft_pair(tmp_path, factory, targets, **lora):
    first = make_peft_adapter(factory, tmp_path, "a", seed=1, target_modules=targets, **lora)
    second = make_peft_adapter(factory, tmp_path, "b", seed=2, target_modules=targets, r=6, lora_alpha=3)
    model = first.load_with_peft()
    model.load_adapter(str(second.path), adapter_name="b")
    return first, second, model


@pytest.mark.parametrize(
    ("method", "peft_type", "majority"),
    [
        ("ties", "ties_svd", "total"),
        ("ties", "ties_svd", "frequency"),
        ("magnitude_prune", "magnitude_prune_svd", None),
    ],
)
@pytest.mark.parametrize("kind", ["llama", "convnet"])
def test_matches_peft_at_full_rank(tmp_path, method, peft_type, majority, kind):
    factory, targets, full = (tiny_llama, ["q_proj", "o_proj"], 32) if kind == "llama" else (tiny_convnet, ["conv"], 8)
    first, second, model = _peft_pair(tmp_path, factory, targets)
    weights, density = [0.7, 1.3], 0.4
    extra = {"majority_sign_method": majority} if majority else {}
    model.add_weighted_adapter(
        ["default", "b"], weights, "merged", combination_type=peft_type, density=density, svd_rank=full, **extra
    )
    options = {"majority_sign": majority} if majority else {}
    ours = combine(
        [first.path, second.path],
        weights=weights,
        method=method,
        rank_rule=RankRule(rank=full),
        density=density,
        **options,
    )
    compared = 0
    for name, module in model.named_modules():
        if hasattr(module, "lora_A") and "merged" in module.lora_A:
            key = name.removeprefix("base_model.model.")
            expected = module.get_delta_weight("merged").detach().double().numpy()
            close(ours.modules[key].delta(dtype=torch.float64).numpy(), expected, tol=1e-4)
            compared += 1
    assert compared == (4 if kind == "llama" else 1)


# ----------------------------------------------------------------------------------------------- errors and CLI


@pytest.mark.parametrize(
    "options",
    [
        {"density": 0},
        {"density": 1.5},
        {"density": "half"},
        {"majority_sign": "mean"},
        {"space": "sparse"},
    ],
)
def test_bad_options_raise_method_error(options):
    with pytest.raises(MethodError) as info:
        REGISTRY["ties"].fn(make_terms(2), rule=RankRule(), **options)
    assert "\n" not in str(info.value)


def test_bad_seed_and_unknown_option(tmp_path):
    with pytest.raises(MethodError, match="seed"):
        REGISTRY["dare_ties"].fn(make_terms(2), rule=RankRule(), seed=-1)
    first = make_peft_adapter(tiny_llama, tmp_path, "a", seed=1, target_modules=["q_proj"])
    with pytest.raises(MethodError, match="no option"):
        combine([first.path, first.path], method="ties", seed=3)


def test_cli_flags_feed_method_options(tmp_path):
    first = make_peft_adapter(tiny_llama, tmp_path, "a", seed=1, target_modules=["q_proj"])
    second = make_peft_adapter(tiny_llama, tmp_path, "b", seed=2, target_modules=["q_proj"])
    out = tmp_path / "out"
    args = [str(first.path), str(second.path), "-m", "dare_ties", "--density", "0.5", "--majority-sign", "frequency"]
    result = CliRunner().invoke(
        main, ["combine", *args, "--seed", "5", "--space", "core", "--rank", "4", "-o", str(out)]
    )
    assert result.exit_code == 0, result.output
    expected = combine(
        [first.path, second.path],
        method="dare_ties",
        rank_rule=RankRule(rank=4),
        density=0.5,
        majority_sign="frequency",
        seed=5,
        space="core",
    )
    from loramix.formats import load_adapter

    written = load_adapter(out)
    for name, module in expected.modules.items():
        close(written.modules[name].delta(dtype=torch.float64).numpy(), module.delta(dtype=torch.float64).numpy(), 1e-6)
    refused = CliRunner().invoke(main, ["combine", *args[:2], "-m", "ties", "--seed", "1", "-o", str(tmp_path / "x")])
    assert refused.exit_code == 2 and refused.output.count("\n") == 1 and "no option" in refused.output


# ----------------------------------------------------------------------------------------------- warnings


def small_adapters(out=96, inp=80, r=2, n=2):
    from loramix import LoraAdapter, LoraModule

    gen = torch.Generator().manual_seed(5)
    return [
        LoraAdapter(
            modules={
                "m": LoraModule(A=torch.randn(r, inp, generator=gen), B=torch.randn(out, r, generator=gen), scale=1)
            },
            name=f"a{i}",
            base_model="test/base",
        )
        for i in range(n)
    ]


def test_ranks_above_four_times_the_sum_say_so_in_one_line(caplog):
    with caplog.at_level("WARNING", logger="loramix"):
        merged = combine(small_adapters(), method="ties", density=0.3)
    rank = merged.modules["m"].rank
    assert rank > 4 * 4  # dense TIES of two rank-2 ΔWs at 99% of its energy
    lines = [r.getMessage() for r in caplog.records if "4·Σrᵢ" in r.getMessage()]
    assert len(lines) == 1 and f"up to rank {rank} where Σrᵢ = 4" in lines[0]
    assert f"{merged.num_params():,} parameters" in lines[0]
    caplog.clear()
    with caplog.at_level("WARNING", logger="loramix"):
        combine(small_adapters(), method="ties", density=0.3, rank_rule=RankRule(rank=16))
    assert "4·Σrᵢ" not in caplog.text


def test_long_dense_merges_are_announced_with_the_core_space_alternative(caplog, monkeypatch):
    import loramix.combination

    # one Llama-7B layer (four 4096×4096, three 11008×4096 modules): minutes of full SVDs on a CPU core (the
    # benchmark measured 47 s and 89 s for one of each), but a fraction of the 60 s threshold for a 0.5B layer
    llama = [(4096, 4096)] * 4 + [(11008, 4096), (11008, 4096), (4096, 11008)]
    assert 180 < loramix.combination._dense_seconds(llama, torch.device("cpu")) < 1200
    qwen = [(896, 896), (128, 896), (128, 896), (896, 896), (4864, 896), (4864, 896), (896, 4864)]
    assert loramix.combination._dense_seconds(qwen, torch.device("cpu")) < 20
    monkeypatch.setattr(loramix.combination, "LONG_DENSE_SECONDS", 0.0)
    with caplog.at_level("WARNING", logger="loramix"):
        combine(small_adapters(), method="dare_ties", rank_rule=RankRule(rank=4))
    assert "space='core'" in caplog.text and "dense space" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="loramix"):
        combine(small_adapters(), method="dare_ties", space="core")
    assert "dense space" not in caplog.text
