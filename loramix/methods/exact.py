"""Exact methods: the weighted sum itself (`cat`) and its re-factorised, optionally truncated form (`svd`)."""

from __future__ import annotations

import torch

from loramix.linalg import RankRule, factor_svd


def stacked(terms, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """[c₁B₁ … cₙBₙ] and [A₁; …; Aₙ]: their product is Σ cᵢ·Bᵢ·Aᵢ exactly."""
    B = torch.cat([t.B.to(dtype) * t.coef for t in terms], dim=1)
    A = torch.cat([t.A.to(dtype) for t in terms], dim=0)
    return B, A


def cat(terms, *, rule: RankRule) -> tuple[torch.Tensor, torch.Tensor]:
    return stacked(terms, torch.float32)


def svd(terms, *, rule: RankRule) -> tuple[torch.Tensor, torch.Tensor]:
    B, A = stacked(terms, torch.float64)
    decomposition = factor_svd(B, A)
    k = rule.choose(decomposition.S, (B.shape[0], A.shape[1]))
    return decomposition.factors(k)
