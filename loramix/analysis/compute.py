"""The factor-space work behind `analyze`, one module at a time: each (adapter, module) ΔW = s·B·A is factorised
once from the Grams of its factors (`gram_svd`, float64) and only its numerically non-zero directions are kept.
Stacking every adapter's factors for the module gives all pairs' cross-Gram blocks in one product; cosines, φ,
principal angles, shares and the merged sum's spectrum all come from those small blocks. Cost per module
O((out+in)·(Σk)²), memory one module's bases at a time. No out×in matrix is ever formed.
"""

from __future__ import annotations

import math

import torch

from loramix.adapter import LoraModule
from loramix.analysis.names import layer_of, natural_key, type_of
from loramix.analysis.results import (
    ENERGIES,
    AdapterAnalysis,
    GroupOverlap,
    MergeModule,
    ModuleOverlap,
    ModuleSpectrum,
    PairAnalysis,
    energy_key,
)
from loramix.linalg import (
    GramSVD,
    RankRule,
    effective_rank,
    principal_angles,
    projected_share,
    stable_rank,
    stacked_singular_values,
    subspace_similarity,
    svd_inner,
)


def _stacked(parts: list[torch.Tensor], dim: int, buffers: dict) -> torch.Tensor:
    """``torch.cat(parts, dim)`` in float64, written into a buffer reused across modules of the same shape (fresh
    multi-megabyte tensors per module cost more in page faults than the copy itself)."""
    shape = list(parts[0].shape)
    shape[dim] = sum(p.shape[dim] for p in parts)
    out = buffers.get(tuple(shape))
    if out is None:
        out = buffers[tuple(shape)] = torch.empty(shape, dtype=torch.float64)
    start = 0
    for p in parts:
        out.narrow(dim, start, p.shape[dim]).copy_(p)
        start += p.shape[dim]
    return out


def factor_grams(modules: list[LoraModule], buffers: dict) -> tuple[torch.Tensor, torch.Tensor, list[slice]]:
    """BᵀB and A·Aᵀ of all adapters' stacked factors for one module (float64), and each adapter's slice."""
    B = _stacked([m.B for m in modules], 1, buffers)
    gram_b = B.T @ B
    A = _stacked([m.A for m in modules], 0, buffers)
    gram_a = A @ A.T
    slices, start = [], 0
    for m in modules:
        slices.append(slice(start, start + m.rank))
        start += m.rank
    return gram_b, gram_a, slices


def spectrum(module: LoraModule, svd: GramSVD, rule: RankRule) -> ModuleSpectrum:
    shape = (module.out_features, module.in_features)
    count = min(module.rank, *shape)
    S = torch.cat([svd.S, svd.S.new_zeros(max(count - svd.S.numel(), 0))])
    nonzero = svd.rank > 0
    return ModuleSpectrum(
        shape=shape,
        rank=module.rank,
        singular_values=S.tolist(),
        numerical_rank=svd.rank,
        effective_rank=effective_rank(S),
        stable_rank=stable_rank(S),
        energy_rank={energy_key(e): RankRule(energy=e).choose(S, shape) if nonzero else 0 for e in ENERGIES},
        norm=float(S.square().sum().sqrt()),
        suggested_rank=rule.choose(S, shape) if nonzero else 0,
    )


def _padded_cross(gram: torch.Tensor, bases: list[torch.Tensor], slices: list[slice], width: int) -> torch.Tensor:
    """All cross-Grams Q_iᵀQ_j of the orthonormal bases Q_i = F_i·bases[i] (F the stacked factor, ``gram = FᵀF``),
    zero-padded to width×width: shape (n, n, width, width). One product over the stacked factors' Gram."""
    n = len(bases)
    lift = gram.new_zeros(gram.shape[0], n * width)
    for i, (basis, rows) in enumerate(zip(bases, slices)):
        lift[rows, i * width : i * width + basis.shape[1]] = basis
    return (lift.T @ gram @ lift).reshape(n, width, n, width).permute(0, 2, 1, 3)


def overlaps(svds: list[GramSVD], gram_b, gram_a, slices, shape) -> dict[tuple[int, int], ModuleOverlap]:
    """Every pair (i < j, positions in ``svds``) on one module, computed batched from the padded cross-Grams."""
    n, width = len(svds), max(s.rank for s in svds)
    ranks = torch.tensor([s.rank for s in svds])
    empty = ModuleOverlap(None, None, None, [], [], None, None, 0.0, 0, None, None)
    if width == 0:
        return {(i, j): empty for i in range(n) for j in range(i + 1, n)}
    cross_u = _padded_cross(gram_b, [s.M for s in svds], slices, width)
    cross_v = _padded_cross(gram_a, [s.N for s in svds], slices, width)
    S = torch.stack([torch.cat([s.S[: s.rank], s.S.new_zeros(width - s.rank)]) for s in svds])
    norms = S.square().sum(-1).sqrt()
    low, high = torch.minimum(ranks[:, None], ranks[None, :]), torch.maximum(ranks[:, None], ranks[None, :])
    inner = svd_inner(S[:, None], cross_u, cross_v, S[None, :])
    figures = {
        "inner": inner,
        "cosine": inner / (norms[:, None] * norms[None, :]),
        "phi_a": subspace_similarity(cross_v, low, low),
        "phi_b": subspace_similarity(cross_u, low, low),
        "share": projected_share(S[:, None], cross_u, cross_v),
        "chance_a": high.double() / shape[1],
        "chance_b": high.double() / shape[0],
    }
    values = {key: value.tolist() for key, value in figures.items()}
    angles_a = torch.rad2deg(principal_angles(cross_v)).tolist()
    angles_b = torch.rad2deg(principal_angles(cross_u)).tolist()
    out = {}
    for i in range(n):
        for j in range(i + 1, n):
            k = int(low[i, j])
            if k == 0:
                out[i, j] = empty
                continue
            out[i, j] = ModuleOverlap(
                cosine=values["cosine"][i][j],
                phi_a=values["phi_a"][i][j],
                phi_b=values["phi_b"][i][j],
                angles_a=angles_a[i][j][:k],
                angles_b=angles_b[i][j][:k],
                share_a_in_b=values["share"][i][j],
                share_b_in_a=values["share"][j][i],
                inner=values["inner"][i][j],
                min_rank=k,
                phi_a_chance=values["chance_a"][i][j],
                phi_b_chance=values["chance_b"][i][j],
            )
    return out


def merge_module(modules: list[LoraModule], coefs: list[float], gram_b, gram_a, rule: RankRule) -> MergeModule:
    """The spectrum of Σ cᵢ·Bᵢ·Aᵢ (cᵢ = wᵢ·sᵢ) from the stacked factors' Grams: what `combine --method svd` cuts."""
    coef = torch.cat([torch.full((m.rank,), c, dtype=torch.float64) for m, c in zip(modules, coefs)])
    S = stacked_singular_values(gram_b, coef, gram_a)
    shape = (modules[0].out_features, modules[0].in_features)
    S = S[: min(S.numel(), *shape)]
    total = float(S.square().sum())
    reference = max(m.rank for m in modules)
    nonzero = total > 0
    return MergeModule(
        singular_values=S.tolist(),
        energy_rank={energy_key(e): RankRule(energy=e).choose(S, shape) if nonzero else 0 for e in ENERGIES},
        suggested_rank=rule.choose(S, shape) if nonzero else 0,
        reference_rank=reference,
        truncation_loss=float(S[reference:].square().sum()) / total if nonzero else None,
        norm=math.sqrt(total),
    )


def _group(names: list[str], a: AdapterAnalysis, b: AdapterAnalysis, overlaps: dict[str, ModuleOverlap]):
    inner = sum(overlaps[n].inner for n in names if n in overlaps)
    energy_a = sum(a.modules[n].norm ** 2 for n in names if n in a.modules)
    energy_b = sum(b.modules[n].norm ** 2 for n in names if n in b.modules)
    both = [(n, overlaps[n]) for n in names if n in overlaps and overlaps[n].min_rank > 0]
    weight = sum(o.min_rank for _, o in both)

    def phi(side: str) -> float | None:
        return sum(getattr(o, side) * o.min_rank for _, o in both) / weight if weight else None

    def share(side: str, owner: AdapterAnalysis, energy: float) -> float | None:
        if energy <= 0:
            return None
        return sum(getattr(o, side) * owner.modules[n].norm ** 2 for n, o in both) / energy

    return GroupOverlap(
        cosine=inner / math.sqrt(energy_a * energy_b) if energy_a > 0 and energy_b > 0 else None,
        phi_a=phi("phi_a"),
        phi_b=phi("phi_b"),
        share_a_in_b=share("share_a_in_b", a, energy_a),
        share_b_in_a=share("share_b_in_a", b, energy_b),
        modules=len(both),
        phi_a_chance=phi("phi_a_chance"),
        phi_b_chance=phi("phi_b_chance"),
    )


def _grouped(names: list[str], key) -> dict[str, list[str]]:
    groups: dict[str, list[str]] = {}
    for n in names:
        groups.setdefault(key(n), []).append(n)
    return {k: groups[k] for k in sorted(groups, key=natural_key)}


def pair(a: AdapterAnalysis, b: AdapterAnalysis, overlaps: dict[str, ModuleOverlap], names: list[str]):
    union = [n for n in names if n in a.modules or n in b.modules]
    return PairAnalysis(
        a=a.name,
        b=b.name,
        overall=_group(union, a, b, overlaps),
        modules=overlaps,
        by_layer={k: _group(v, a, b, overlaps) for k, v in _grouped(union, layer_of).items()},
        by_type={k: _group(v, a, b, overlaps) for k, v in _grouped(union, type_of).items()},
    )
