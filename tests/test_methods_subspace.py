"""TSV, Iso-C, Iso-CTS and KnOTS in factor form against dense float64 references written from the papers.

Each reference forms the out×in matrices and follows the paper's algorithm with numpy's SVD (TSV: Gargiulo et al.
2025 Alg. 1; Iso-C/Iso-CTS: Marczak et al. 2025 §4 and their released code's subspace split; KnOTS: Stoica et al.
2025 §4 with the official code's ΣVᵢᵀ representation). Where loramix deliberately restricts a paper's dense rule to
the numerical rank (Iso-C/Iso-CTS flatten σ only over directions the sum has), the reference does the same and a
separate test checks the property. Tolerance 1e-9 relative: float64 factor-space vs dense SVD of well-conditioned
random matrices agree to ~1e-13.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import make_peft_adapter, tiny_llama
from test_methods_interference import close, exact_sum, make_terms, product, task_vectors, ties_reference

from loramix import combine
from loramix.errors import MethodError
from loramix.linalg import RankRule
from loramix.methods import REGISTRY, Term


def dense(terms) -> list[np.ndarray]:
    """cᵢ·Bᵢ·Aᵢ: each term with its weight applied."""
    return [t.coef * (t.B.numpy() @ t.A.numpy()) for t in terms]


def polar(X: np.ndarray) -> np.ndarray:
    P, _, Qt = np.linalg.svd(X, full_matrices=False)
    return P @ Qt


def rank_of(X: np.ndarray) -> int:
    return int(np.linalg.matrix_rank(X))


# ----------------------------------------------------------------------------------------------- TSV


def tsv_reference(mats, keep) -> np.ndarray:
    Us, Ss, Vs = [], [], []
    for M in mats:
        U, S, Vt = np.linalg.svd(M, full_matrices=False)
        Us.append(U[:, :keep])
        Ss.append(S[:keep])
        Vs.append(Vt[:keep].T)
    return polar(np.concatenate(Us, 1)) @ np.diag(np.concatenate(Ss)) @ polar(np.concatenate(Vs, 1)).T


def test_tsv_matches_paper_reference():
    """12×10, T=3: the paper keeps ⌊10/3⌋ = 3 of each task's singular triplets (each LoRA has rank 4)."""
    terms = make_terms(3, ranks=[4, 4, 5])
    close(product(REGISTRY["tsv"].fn(terms, rule=RankRule())), tsv_reference(dense(terms), 3))


def test_tsv_keeps_only_live_directions_of_low_rank_tasks():
    """Rank-2 LoRAs with ⌊10/3⌋ = 3 slots: only the 2 nonzero triplets are stacked (a third would be arbitrary)."""
    terms = make_terms(3, ranks=[2, 2, 2])
    expected = tsv_reference(dense(terms), 2)
    actual = product(REGISTRY["tsv"].fn(terms, rule=RankRule()))
    close(actual, expected)
    assert rank_of(actual) == 6


def test_tsv_single_task_is_the_task_itself():
    (term,) = make_terms(1, ranks=[4])
    close(product(REGISTRY["tsv"].fn([term], rule=RankRule())), dense([term])[0])


# ----------------------------------------------------------------------------------------------- Iso-C


def iso_c_reference(total: np.ndarray, k: int | None = None) -> np.ndarray:
    U, S, Vt = np.linalg.svd(total, full_matrices=False)
    k = rank_of(total) if k is None else k
    return S[:k].mean() * U[:, :k] @ Vt[:k]


@pytest.mark.parametrize("rank", [None, 4])
def test_iso_c_matches_reference(rank):
    terms = make_terms(3)
    actual = product(REGISTRY["iso_c"].fn(terms, rule=RankRule(rank=rank)))
    close(actual, iso_c_reference(exact_sum(terms), rank))


def test_iso_c_spectrum_is_flat_and_rank_no_higher_than_the_sum():
    """Two adapters share B and a third repeats the first: the sum has rank 5 < Σrᵢ = 9; Iso-C must not exceed it."""
    a, b, _ = make_terms(3)
    terms = [a, Term(b.coef, a.B, b.A, weight=b.weight), Term(0.3, a.B, a.A, weight=1.0)]
    total = exact_sum(terms)
    actual = product(REGISTRY["iso_c"].fn(terms, rule=RankRule()))
    S = np.linalg.svd(actual, compute_uv=False)
    r = rank_of(total)
    assert r == 3 and rank_of(actual) == r
    assert np.allclose(S[:r], S[0], rtol=1e-10) and S[r:].max() < 1e-10 * S[0]
    # the flat value is the mean of the sum's live singular values, and nothing leaves the sum's spaces
    assert S[0] == pytest.approx(np.linalg.svd(total, compute_uv=False)[:r].mean(), rel=1e-10)
    Ut = np.linalg.svd(total)[0][:, :r]
    close(Ut @ (Ut.T @ actual), actual)


# ----------------------------------------------------------------------------------------------- Iso-CTS


def iso_cts_reference(terms, fraction) -> np.ndarray:
    """The released code's split with d = numerical rank of the sum instead of min(out, in)."""
    mats, total = dense(terms), exact_sum(terms)
    T, d = len(mats), rank_of(total)
    common = int(d * fraction)
    specific = round((d - common) / T) * T
    common, per_task = d - specific, specific // T
    U, S, Vt = np.linalg.svd(total, full_matrices=False)
    Us, Ss, Vs = [U[:, :common]], [S[:common]], [Vt[:common].T]
    for M in mats:
        residual = M - U[:, :common] @ (U[:, :common].T @ M)
        u, s, vt = np.linalg.svd(residual, full_matrices=False)
        Us.append(u[:, :per_task])
        Ss.append(s[:per_task])
        Vs.append(vt[:per_task].T)
    flat = np.concatenate(Ss).mean()
    return flat * polar(np.concatenate(Us, 1)) @ polar(np.concatenate(Vs, 1)).T


@pytest.mark.parametrize("fraction", [0.8, 0.5])
def test_iso_cts_matches_reference(fraction):
    terms = make_terms(3)
    actual = product(REGISTRY["iso_cts"].fn(terms, rule=RankRule(), common_fraction=fraction))
    close(actual, iso_cts_reference(terms, fraction))
    S = np.linalg.svd(actual, compute_uv=False)
    r = rank_of(exact_sum(terms))
    assert rank_of(actual) <= r and np.allclose(S[:r], S[0], rtol=1e-10)


def test_iso_cts_with_all_common_is_iso_c():
    terms = make_terms(3)
    close(
        product(REGISTRY["iso_cts"].fn(terms, rule=RankRule(), common_fraction=1.0)),
        product(REGISTRY["iso_c"].fn(terms, rule=RankRule())),
    )


# ----------------------------------------------------------------------------------------------- KnOTS


def knots_reference(terms, density, majority="total") -> np.ndarray:
    tasks = task_vectors(terms)
    U, S, Vt = np.linalg.svd(np.concatenate(tasks, axis=1), full_matrices=False)
    k = rank_of(np.concatenate(tasks, axis=1))
    signs = np.sign(U[np.abs(U[:, :k]).argmax(axis=0), np.arange(k)])  # canonical: largest entry of uᵢ positive
    U, Vt = U[:, :k] * signs, Vt[:k] * signs[:, None]
    reps = [S[:k, None] * block for block in np.split(Vt, len(tasks), axis=1)]
    return U @ ties_reference(reps, [t.weight for t in terms], density, majority)


@pytest.mark.parametrize("majority", ["total", "frequency"])
def test_knots_ties_matches_reference(majority):
    terms = make_terms(3)
    actual = product(REGISTRY["knots"].fn(terms, rule=RankRule(), density=0.3, majority_sign=majority))
    close(actual, knots_reference(terms, 0.3, majority))


def test_knots_linear_is_the_exact_sum():
    terms = make_terms(3, ranks=[2, 3, 4])
    close(product(REGISTRY["knots"].fn(terms, rule=RankRule(), merge="linear")), exact_sum(terms), 1e-12)


def test_knots_dare_is_reproducible():
    terms = make_terms(3)
    runs = [
        product(REGISTRY["knots"].fn(terms, rule=RankRule(), merge="dare_ties", density=0.5, seed=s)) for s in (1, 1, 2)
    ]
    assert np.array_equal(runs[0], runs[1]) and not np.allclose(runs[0], runs[2])


# ----------------------------------------------------------------------------------------------- errors, combine


@pytest.mark.parametrize(
    ("method", "options"),
    [("iso_cts", {"common_fraction": 1.5}), ("iso_cts", {"common_fraction": "most"}), ("knots", {"merge": "max"})],
)
def test_bad_options(method, options):
    with pytest.raises(MethodError) as info:
        REGISTRY[method].fn(make_terms(2), rule=RankRule(), **options)
    assert "\n" not in str(info.value)


def test_all_zero_inputs_give_a_zero_adapter():
    zero = [Term(1.0, torch.zeros(6, 2, dtype=torch.float64), torch.zeros(2, 5, dtype=torch.float64), 1.0)] * 2
    for name in ("tsv", "iso_c", "iso_cts", "knots", "star", "wudi", "compressed_sum", "ties", "dare_ties"):
        assert np.abs(product(REGISTRY[name].fn(zero, rule=RankRule()))).max() == 0, name
    assert np.abs(product(REGISTRY["ties"].fn(zero, rule=RankRule(), space="core"))).max() == 0


@pytest.mark.parametrize("method", ["tsv", "iso_c", "iso_cts", "knots", "star", "wudi", "compressed_sum"])
def test_through_combine(tmp_path, method):
    first = make_peft_adapter(tiny_llama, tmp_path, "a", seed=1, target_modules=["q_proj", "v_proj"])
    second = make_peft_adapter(tiny_llama, tmp_path, "b", seed=2, target_modules=["q_proj"], r=6)
    merged = combine([first.path, second.path], weights=[1.0, 1.0], method=method, rank_rule=RankRule(rank=5))
    assert len(merged.modules) == 4  # q_proj and v_proj of both layers; v_proj from the first adapter alone
    assert all(m.rank <= 5 for m in merged.modules.values())
    assert merged.provenance["method"] == method


# ----------------------------------------------------------------------------------------------- STAR


def star_reference(mats, weights, eta: float) -> np.ndarray:
    """The authors' `star` (merger/STAR.py) per task in numpy — k = searchsorted(cumsum σ, eta·Σσ) + 1, kept σ
    times Σσ/Σ kept σ — then their weighted_merge Σ αᵢ·STAR(τᵢ)."""
    total = np.zeros_like(mats[0])
    for w, M in zip(weights, mats):
        U, S, Vt = np.linalg.svd(M, full_matrices=False)
        k = int(np.searchsorted(np.cumsum(S), S.sum() * eta)) + 1
        total += w * (U[:, :k] * (S[:k] * S.sum() / S[:k].sum())) @ Vt[:k]
    return total


@pytest.mark.parametrize("eta", [0.0, 0.4, 0.8, 1.0])
def test_star_matches_the_authors_algorithm(eta):
    """Rank 4, 4, 5 tasks: the truncation point and nuclear-norm rescale of each, then the weighted sum (weights
    0.5, 0.75, 1.0 applied after STAR, as the authors' alphas are)."""
    terms = make_terms(3, ranks=[4, 4, 5])
    weights = [t.weight for t in terms]
    tasks = [(t.coef / t.weight) * (t.B.numpy() @ t.A.numpy()) for t in terms]
    close(product(REGISTRY["star"].fn(terms, rule=RankRule(), eta=eta)), star_reference(tasks, weights, eta))


def test_star_keeps_each_task_nuclear_norm_and_is_exact_in_core_space(monkeypatch):
    """One task: the result has the task's nuclear norm at a lower rank; and no out×in matrix is ever formed."""
    (term,) = make_terms(1, ranks=[5])
    original = torch.Tensor.__matmul__

    def guarded(a, b):
        result = original(a, b)
        assert tuple(result.shape[-2:]) != (12, 10), "an out×in matrix was formed"
        return result

    monkeypatch.setattr(torch.Tensor, "__matmul__", guarded)
    factors = REGISTRY["star"].fn([term], rule=RankRule(), eta=0.5)
    monkeypatch.undo()
    merged = product(factors)
    task = dense([term])[0]
    assert np.linalg.svd(merged, compute_uv=False).sum() == pytest.approx(np.linalg.svd(task, compute_uv=False).sum())
    assert rank_of(merged) < rank_of(task)


def test_star_rejects_an_eta_outside_0_1():
    with pytest.raises(MethodError, match="eta must be a number in"):
        REGISTRY["star"].fn(make_terms(2), rule=RankRule(), eta=40)


# ----------------------------------------------------------------------------------------------- compressed_sum


def truncated(M: np.ndarray, k: int) -> np.ndarray:
    U, S, Vt = np.linalg.svd(M, full_matrices=False)
    return (U[:, :k] * S[:k]) @ Vt[:k]


def test_compressed_sum_truncates_each_task_before_the_sum(monkeypatch):
    """rank 7 over 3 tasks: each keeps its best rank 2 (Eckart–Young, numpy's SVD), the sum has rank ≤ 6; energy
    0.9: each keeps the smallest rank holding 90% of its own Σσ². No out×in matrix is formed."""
    terms = make_terms(3, ranks=[4, 4, 5])
    mats = dense(terms)
    original = torch.Tensor.__matmul__

    def guarded(a, b):
        result = original(a, b)
        assert tuple(result.shape[-2:]) != (12, 10), "an out×in matrix was formed"
        return result

    monkeypatch.setattr(torch.Tensor, "__matmul__", guarded)
    by_rank = REGISTRY["compressed_sum"].fn(terms, rule=RankRule(rank=7))
    by_energy = REGISTRY["compressed_sum"].fn(terms, rule=RankRule(energy=0.9))
    monkeypatch.undo()
    close(product(by_rank), sum(truncated(M, 2) for M in mats))
    assert rank_of(product(by_rank)) == 6

    def energy_rank(M):
        S = np.linalg.svd(M, compute_uv=False)
        return int(np.searchsorted(np.cumsum(S**2) / np.sum(S**2), 0.9 - 1e-12)) + 1

    close(product(by_energy), sum(truncated(M, energy_rank(M)) for M in mats))


def test_compressed_sum_without_a_rule_is_the_exact_sum():
    terms = make_terms(3, ranks=[4, 4, 5])
    close(product(REGISTRY["compressed_sum"].fn(terms, rule=RankRule())), exact_sum(terms))
