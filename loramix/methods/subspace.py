"""Subspace merges in factor form: TSV, Iso-C, Iso-CTS, KnOTS, STAR and the compress-then-merge sum. None forms an
out×in matrix.

Each term is cᵢ·Bᵢ·Aᵢ (cᵢ = wᵢ·sᵢ); SVDs of sums and of single terms come from `factor_svd` (QR both factors, SVD
of the small core). Results are re-factorised and truncated by the rank rule.

- tsv (Gargiulo et al. 2025, arXiv:2412.00081, TSV-Merge): keep each task's top ⌊min(out, in)/T⌋ singular triplets
  (all of a LoRA's r when r is smaller), stack the U's and V's, replace each stack by its nearest orthonormal matrix
  (UᵀU = I via the polar factor P·Qᵀ of its SVD), and keep the σ's: ΔW = U⊥·diag(σ)·V⊥ᵀ.
- iso_c (Marczak et al. 2025, arXiv:2502.04959): the SVD of Σ cᵢ·τᵢ with its spectrum replaced by the mean
  singular value, within the numerical rank of the sum (or the rank the rule keeps) only.
- iso_cts (same paper): the top k = common_fraction of that rank from the sum, the rest split evenly among tasks as
  each task's top directions outside the common left subspace; both stacks orthonormalised as in TSV and the
  spectrum flattened to the mean of the kept σ's.
- knots (Stoica et al. 2025, arXiv:2410.19735): SVD of the concatenation [τ₁ … τ_T] = U·Σ·[V₁ᵀ … V_Tᵀ]; the
  task-specific ΣVᵢᵀ are merged element-wise (TIES by default, as the paper's KnOTS-TIES) and ΔW = U·merged.
  Singular vectors get canonical signs (largest entry of each uᵢ positive) so the merge is reproducible.
- star (Lee et al. 2025, STAR, NAACL 2025; the authors' code: IBM/STAR, merger/STAR.py): each task's spectrum cut
  to the smallest k whose σ's sum to at least ``eta`` of its nuclear norm Σσ (the authors'
  ``searchsorted(cumsum(σ), eta·Σσ) + 1``, their ``--eta 40`` being eta 0.4), the kept σ's rescaled by
  Σσ/Σ_{j<k}σⱼ so that the nuclear norm is unchanged, then the weighted sum (the authors average: weights 1/n,
  combine's default). Compress each task, then merge: exact in core space (each task's SVD from its factors), the
  sum then cut by the rank rule.
- compressed_sum (the per-task low-rank compression of Gargiulo et al. 2025's TSV-C, arXiv:2412.00081, summed
  without their decorrelation): the rank rule compresses each task before the sum instead of the sum after it.
  With a rank r each task keeps its best rank ⌊r/T⌋ (at least 1), so the sum has rank ≤ r and every task keeps a
  share of it, where `svd --rank r` keeps the sum's own top r directions (Eckart–Young best for the sum, which a
  task of small norm may lose entirely); with energy or a kohya rule each task keeps what the rule keeps of its own
  spectrum. Exact in core space.
"""

from __future__ import annotations

from dataclasses import replace

from loramix.lazy import lazy
from loramix.linalg import Factors, RankRule, factor_svd, numerical_rank, stacked_factors, truncated_factors
from loramix.methods._elementwise import (
    check_choice,
    check_density,
    check_number,
    check_seed,
    column_signs,
    merge_elementwise,
    module_generator,
    split_weights,
)
from loramix.methods.registry import method
from loramix.settings import MAJORITY_SIGNS

torch = lazy("torch")

KNOTS_MERGES = ("ties", "dare_ties", "linear")


def _shape(terms) -> tuple[int, int]:
    return terms[0].B.shape[0], terms[0].A.shape[1]


def nearest_orthonormal(X: torch.Tensor) -> torch.Tensor:
    """The orthonormal-column matrix nearest to X (n×k, k ≤ n) in Frobenius norm: P·Qᵀ from X = P·Σ·Qᵀ."""
    P, _, Qh = torch.linalg.svd(X, full_matrices=False)
    return P @ Qh


def _joined(triplets) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """Stack (U, S, Vh) triplets side by side; None when nothing is left (all-zero input)."""
    U, S = torch.cat([u for u, _, _ in triplets], dim=1), torch.cat([s for _, s, _ in triplets])
    Vh = torch.cat([v for _, _, v in triplets], dim=0)
    return (U, S, Vh) if S.numel() else None


def _top(d, k: int):
    return d.U[:, :k], d.S[:k], d.Vh[:k]


def _zero(shape, like: torch.Tensor) -> Factors:
    return Factors(like.new_zeros(shape[0], 1), like.new_zeros(1, shape[1]))


def _flat(U: torch.Tensor, S: torch.Tensor, Vh: torch.Tensor) -> Factors:
    """Balanced factors of U·(mean σ)·I·Vh."""
    root = S.mean().sqrt() if S.numel() else S.new_zeros(())
    return Factors(U * root, root * Vh)


@method(name="tsv", paper="Gargiulo et al. 2025, TSV-Merge, arXiv:2412.00081", truncates=True)
def tsv(terms, *, rule: RankRule) -> Factors:
    """Task Singular Vectors: each task's top singular vectors, decorrelated (orthonormalised)."""
    shape = _shape(terms)
    per_task = max(min(shape) // len(terms), 1)
    triplets = []
    for t in terms:
        d = factor_svd(t.B * t.coef, t.A)
        triplets.append(_top(d, min(per_task, numerical_rank(d.S, shape))))
    joined = _joined(triplets)
    if joined is None:
        return _zero(shape, terms[0].B.double())
    U, S, Vh = joined
    return truncated_factors(nearest_orthonormal(U) * S, nearest_orthonormal(Vh.T).T, rule)


@method(name="iso_c", paper="Marczak et al. 2025, Iso-C, arXiv:2502.04959", truncates=True)
def iso_c(terms, *, rule: RankRule) -> Factors:
    """Iso-C: SVD of the sum with a flat spectrum (mean σ) within its numerical rank."""
    B, A = stacked_factors(terms, torch.float64)
    d = factor_svd(B, A)
    k = rule.choose(d.S, _shape(terms))
    return _flat(d.U[:, :k], d.S[:k], d.Vh[:k])


@method(name="iso_cts", paper="Marczak et al. 2025, Iso-CTS, arXiv:2502.04959", truncates=True)
def iso_cts(terms, *, rule: RankRule, common_fraction: float = 0.8) -> Factors:
    """Iso-CTS: common subspace of the sum plus task-specific directions, flat spectrum."""
    common_fraction = check_number("common_fraction", common_fraction, 0, 1)
    shape = _shape(terms)
    B, A = stacked_factors(terms, torch.float64)
    d = factor_svd(B, A)
    budget = rule.choose(d.S, shape)
    T = len(terms)
    # the paper's split: common k, then the rest rounded to a multiple of T so each task gets the same share
    common = int(budget * common_fraction)
    specific = min(round((budget - common) / T) * T, budget)
    common, per_task = budget - specific, specific // T
    triplets = [_top(d, common)]
    Uc = triplets[0][0]
    tol = d.S[0] * max(shape) * torch.finfo(d.S.dtype).eps if d.S.numel() else 0.0
    for t in terms:
        Bt = t.B.to(torch.float64) * t.coef
        dt = factor_svd(Bt - Uc @ (Uc.T @ Bt), t.A)
        triplets.append(_top(dt, min(per_task, int((dt.S > tol).sum()))))  # never a direction the task lacks
    joined = _joined(triplets)
    if joined is None:
        return _zero(shape, B)
    U, S, Vh = joined
    return _flat(nearest_orthonormal(U), S, nearest_orthonormal(Vh.T).T)


@method(name="knots", paper="Stoica et al. 2025, KnOTS, arXiv:2410.19735", truncates=True)
def knots(
    terms,
    *,
    rule: RankRule,
    merge: str = "ties",
    density: float = 0.2,
    majority_sign: str = "total",
    seed: int = 0,
) -> Factors:
    """KnOTS: SVD of the concatenated updates, TIES/DARE on the task-specific ΣVᵢᵀ."""
    check_choice("merge", merge, KNOTS_MERGES)
    density = check_density(density)
    check_choice("majority_sign", majority_sign, MAJORITY_SIGNS)
    generator = module_generator(check_seed(seed), terms) if merge == "dare_ties" else None
    scales, weights = split_weights(terms)
    dtype = torch.float64
    out = terms[0].B.shape[0]
    # [τ₁ … τ_T] = [s₁B₁ … s_TB_T]·blockdiag(A₁ … A_T); QR both sides, SVD the small core
    q_b, r_b = torch.linalg.qr(torch.cat([t.B.to(dtype) * s for s, t in zip(scales, terms)], dim=1))
    q_as, r_as = zip(*(torch.linalg.qr(t.A.to(dtype).T) for t in terms))
    u, S, vh = torch.linalg.svd(r_b @ torch.block_diag(*r_as).T, full_matrices=False)
    k = numerical_rank(S, (out, sum(t.A.shape[1] for t in terms)))
    if k == 0:
        return _zero((out, terms[0].A.shape[1]), q_b)
    U = q_b @ u[:, :k]
    signs = column_signs(U)  # canonical signs: frequency election's tie-break is not sign-symmetric
    blocks = torch.split(signs.T * vh[:k], [r.shape[0] for r in r_as], dim=1)
    reps = [S[:k, None] * (block @ q_a.T) for block, q_a in zip(blocks, q_as)]  # Σ·Vᵢᵀ, k×in each
    merged = merge_elementwise(
        reps, weights, kind=merge, density=density, majority_sign=majority_sign, generator=generator
    )
    return truncated_factors(U * signs, merged, rule)


@method(name="star", paper="Lee et al. 2025, STAR: Spectral Truncation and Rescale, NAACL 2025", truncates=True)
def star(terms, *, rule: RankRule, eta: float = 0.4) -> Factors:
    """STAR: each task cut to eta of its nuclear norm, the kept σ's rescaled to the whole norm, then summed."""
    eta = check_number("eta", eta, 0, 1)
    shape = _shape(terms)
    cut = RankRule(rule="sv_cumulative", rule_value=eta) if eta > 0 else RankRule(rank=1)
    Bs, As = [], []
    for t in terms:
        d = factor_svd(t.B * t.coef, t.A)
        if numerical_rank(d.S, shape) == 0:
            continue
        k = cut.choose(d.S, shape)
        Bs.append(d.U[:, :k] * (d.S[:k] * (d.S.sum() / d.S[:k].sum())))
        As.append(d.Vh[:k])
    if not Bs:
        return _zero(shape, terms[0].B.double())
    return truncated_factors(torch.cat(Bs, dim=1), torch.cat(As, dim=0), rule)


@method(name="compressed_sum", paper="Gargiulo et al. 2025, TSV-C compression, arXiv:2412.00081", truncates=True)
def compressed_sum(terms, *, rule: RankRule) -> Factors:
    """Compress, then merge: each task cut by the rank rule (a rank r: r/T each), then the exact sum."""
    shape = _shape(terms)
    each = rule if rule.rank is None else replace(rule, rank=max(rule.rank // len(terms), 1))
    kept = [factor_svd(t.B * t.coef, t.A) for t in terms]
    kept = [d.factors(each.choose(d.S, shape)) for d in kept if numerical_rank(d.S, shape)]
    if not kept:
        return _zero(shape, terms[0].B.double())
    return Factors(torch.cat([f.B for f in kept], dim=1), torch.cat([f.A for f in kept], dim=0))
