"""Factor-space linear algebra: SVD of B·A without forming it, rank choices, subspace measures.

For ΔW = B·A with B out×R and A R×in: QR both factors (B = Q_B R_B, Aᵀ = Q_A R_A), take the SVD of the R×R core
R_B R_Aᵀ = U Σ Vᵀ; then ΔW = (Q_B U) Σ (Q_A V)ᵀ. Cost O((out+in)·R²). Cores are computed in float64.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from loramix.errors import MethodError

KOHYA_RULES = ("sv_ratio", "sv_fro", "sv_cumulative")


@dataclass
class FactorSVD:
    """ΔW = U · diag(S) · Vh with orthonormal U (out×k) and Vh (k×in), S descending."""

    U: torch.Tensor
    S: torch.Tensor
    Vh: torch.Tensor

    def factors(self, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Balanced rank-k factors (B, A) with B·A the best rank-k approximation (Eckart–Young)."""
        root = self.S[:k].sqrt()
        return self.U[:, :k] * root, root[:, None] * self.Vh[:k]


def factor_svd(B: torch.Tensor, A: torch.Tensor, *, dtype: torch.dtype = torch.float64) -> FactorSVD:
    """Thin SVD of B·A (B out×R, A R×in) from the factors alone."""
    q_b, r_b = torch.linalg.qr(B.to(dtype))
    q_a, r_a = torch.linalg.qr(A.to(dtype).T)
    u, s, vh = torch.linalg.svd(r_b @ r_a.T, full_matrices=False)
    return FactorSVD(q_b @ u, s, vh @ q_a.T)


def numerical_rank(S: torch.Tensor, shape: tuple[int, int]) -> int:
    """Singular values above max(shape)·eps·σ₁ (numpy's matrix_rank rule) for S's dtype."""
    if S.numel() == 0 or S[0] <= 0:
        return 0
    tol = S[0] * max(shape) * torch.finfo(S.dtype).eps
    return int((S > tol).sum())


@dataclass(frozen=True)
class RankRule:
    """How to truncate a spectrum: a fixed ``rank``, an ``energy`` share of Σσ², or a kohya rule.

    Kohya rules (from kohya-ss resize_lora): ``sv_ratio`` keeps σᵢ > σ₁/value; ``sv_fro`` keeps the smallest k
    whose retained Frobenius norm is ≥ value·‖ΔW‖_F (i.e. energy value²); ``sv_cumulative`` keeps the smallest k
    with Σ_{i≤k} σᵢ ≥ value·Σσ. ``rank`` also caps the rule-chosen rank. With no rule and no rank, all nonzero
    directions are kept (the numerical rank).
    """

    rank: int | None = None
    energy: float | None = None
    rule: str | None = None
    value: float | None = None

    def __post_init__(self) -> None:
        if self.rank is not None and self.rank < 1:
            raise MethodError(f"rank must be at least 1, got {self.rank}")
        if self.energy is not None and not 0 < self.energy <= 1:
            raise MethodError(f"energy must be in (0, 1], got {self.energy}")
        if self.energy is not None and self.rule is not None:
            raise MethodError("give either energy or a kohya rule, not both")
        if self.rule is not None:
            if self.rule not in KOHYA_RULES:
                raise MethodError(f"unknown rank rule {self.rule!r}; choose from {', '.join(KOHYA_RULES)}")
            if self.value is None or self.value <= 0:
                raise MethodError(f"rule {self.rule} needs a positive value")
            if self.rule != "sv_ratio" and self.value > 1:
                raise MethodError(f"rule {self.rule} takes a value in (0, 1], got {self.value}")

    def choose(self, S: torch.Tensor, shape: tuple[int, int]) -> int:
        """The rank to keep for spectrum ``S`` (descending) of a matrix of ``shape``; at least 1."""
        live = max(numerical_rank(S, shape), 1)
        if self.energy is not None:
            k = _share_rank(S.square(), self.energy)
        elif self.rule == "sv_ratio":
            k = int((S > S[0] / self.value).sum())
        elif self.rule == "sv_fro":
            k = _share_rank(S.square(), self.value**2)
        elif self.rule == "sv_cumulative":
            k = _share_rank(S, self.value)
        else:
            k = live
        k = min(max(k, 1), live)
        return k if self.rank is None else min(k, self.rank)

    def describe(self) -> str:
        parts = []
        if self.energy is not None:
            parts.append(f"energy {self.energy:g}")
        if self.rule is not None:
            parts.append(f"{self.rule} {self.value:g}")
        if self.rank is not None:
            parts.append(f"rank ≤ {self.rank}" if parts else f"rank {self.rank}")
        return ", ".join(parts) or "full numerical rank"


def _share_rank(values: torch.Tensor, share: float) -> int:
    """Smallest k with Σ_{i<k} values ≥ share·Σ values (values descending, non-negative)."""
    total = values.sum()
    if total <= 0:
        return 1
    cumulative = values.cumsum(0) / total
    # a relative slack of a few ulps so that share=1 keeps exactly the nonzero part
    return int((cumulative < share - 4 * torch.finfo(values.dtype).eps).sum()) + 1


def effective_rank(S: torch.Tensor) -> float:
    """Roy–Vetterli effective rank: exp of the entropy of σᵢ/Σσ."""
    p = S[S > 0] / S.sum()
    return float(torch.exp(-(p * p.log()).sum())) if p.numel() else 0.0


def stable_rank(S: torch.Tensor) -> float:
    """Σσ² / σ₁²."""
    return float(S.square().sum() / S[0].square()) if S.numel() and S[0] > 0 else 0.0


def truncated_factors(B: torch.Tensor, A: torch.Tensor, rule: RankRule) -> tuple[torch.Tensor, torch.Tensor]:
    """Balanced factors of B·A re-factorised in factor space and truncated to ``rule.choose`` of its spectrum."""
    decomposition = factor_svd(B, A)
    return decomposition.factors(rule.choose(decomposition.S, (B.shape[0], A.shape[1])))


def dense_factors(
    delta: torch.Tensor, rule: RankRule, *, cap: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Balanced factors (B, A) of a dense out×in ΔW by its full SVD, truncated to ``rule.choose`` of its spectrum.

    ``cap`` bounds the rank when the rule sets none (a dense merge of sparsified matrices is full-rank, and an
    adapter of rank min(out, in) is rarely what anyone wants). Computes in ΔW's dtype.
    """
    U, S, Vh = torch.linalg.svd(delta, full_matrices=False)
    k = rule.choose(S, (delta.shape[0], delta.shape[1]))
    if cap is not None and rule.rank is None:
        k = min(k, max(cap, 1))
    return FactorSVD(U, S, Vh).factors(k)
