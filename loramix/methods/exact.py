"""Exact methods: the weighted sum itself (`cat`) and its re-factorised, optionally truncated form (`svd`)."""

from __future__ import annotations

from loramix.lazy import lazy
from loramix.linalg import Factors, RankRule, factor_svd, stacked_factors
from loramix.methods.registry import method

torch = lazy("torch")


@method(name="cat", exact=True)
def cat(terms, *, rule: RankRule) -> Factors:
    """Exact Σ wᵢ·sᵢ·Bᵢ·Aᵢ as concatenated factors (rank Σ rᵢ)."""
    return Factors(*stacked_factors(terms, torch.float32))


@method(name="svd", paper="Eckart & Young 1936", exact=True, truncates=True)
def svd(terms, *, rule: RankRule) -> Factors:
    """The exact sum re-factorised in factor space and truncated (Eckart–Young optimal rank k)."""
    B, A = stacked_factors(terms, torch.float64)
    decomposition = factor_svd(B, A)
    k = rule.choose(decomposition.S, (B.shape[0], A.shape[1]))
    return decomposition.factors(k)
