"""Fused projections in factor space: one weight whose rows are several modules' weights.

Flux's ``img_attn.qkv`` is diffusers' ``to_q``, ``to_k``, ``to_v`` stacked by rows; its single-block ``linear1`` is
``to_q``, ``to_k``, ``to_v`` and ``proj_mlp``; its final ``adaLN_modulation.1`` is diffusers' ``norm_out.linear``
with the two halves swapped. A `Piece` says which rows of the fused weight a part is made of (one or more row
segments, in the part's order). A LoRA ΔW = s·B·A on the fused weight is, on each part, s·B[rows]·A: the part keeps
A and takes its row block of B (`split`). LoRAs on the parts are, on the fused weight, one LoRA whose A stacks the
parts' A's and whose B is block-structured — each part's s·B in its own rows and column block, zeros elsewhere —
of rank Σ rᵢ; parts that share one A and one scale (a split fused LoRA) share one column block, so the rank stays
(`join`). Both are exact: no ΔW is formed.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from loramix.adapter import LoraModule


@dataclass(frozen=True)
class Piece:
    """A part of a fused weight: its module name and the fused weight's rows it is made of, as (start, length)
    segments in the part's own row order."""

    name: str
    segments: tuple[tuple[int, int], ...]

    @property
    def rows(self) -> int:
        return sum(length for _, length in self.segments)

    def index(self) -> torch.Tensor:
        """The fused weight's row numbers of this part's rows, in order."""
        return torch.cat([torch.arange(start, start + length) for start, length in self.segments])


def split(module: LoraModule, pieces: list[Piece]) -> dict[str, LoraModule]:
    """The LoRA of each part of a fused ``module``: its rows of B, the same A and scale."""
    return {p.name: replace(module, B=module.B[p.index()].contiguous()) for p in pieces}


def join(parts: dict[str, LoraModule], pieces: list[Piece], out_features: int) -> LoraModule:
    """One LoRA on the fused weight (``out_features`` rows) equal to the parts' LoRAs in their rows (absent parts:
    zero rows). Parts with one A (equal values) and one scale share a column block; the others get one each. The
    first part's scale is kept; a part with another scale has the ratio folded into its B (in float32)."""
    present = [p for p in pieces if p.name in parts]
    first = parts[present[0].name]
    groups: list[tuple[LoraModule, list[Piece]]] = []
    for piece in present:
        module = parts[piece.name]
        same = next((g for g in groups if _same_factor(g[0], module)), None)
        if same is None:
            groups.append((module, [piece]))
        else:
            same[1].append(piece)
    dtype = first.B.dtype
    B = torch.zeros(out_features, sum(g[0].rank for g in groups), dtype=dtype)
    column = 0
    for module, members in groups:
        for piece in members:
            up = parts[piece.name].B
            if module.scale != first.scale:
                up = (up.float() * (module.scale / first.scale)).to(dtype)
            B[piece.index(), column : column + module.rank] = up.to(dtype)
        column += module.rank
    A = torch.cat([g[0].A.to(first.A.dtype) for g in groups])
    return LoraModule(A=A, B=B, scale=first.scale)


def _same_factor(a: LoraModule, b: LoraModule) -> bool:
    return a.scale == b.scale and a.A.shape == b.A.shape and (a.A is b.A or torch.equal(a.A, b.A))
