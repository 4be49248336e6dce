"""The top of a dense ΔW's spectrum, as far as a `RankRule` needs it, equal to the truncated dense SVD.

Block subspace iteration with Rayleigh–Ritz (Halko, Martinsson & Tropp 2011, Algorithm 4.4 with a convergence test):
Q spans M·Ω for a random Ω with l = k + `OVERSAMPLE` columns; each step forms QᵀM, the small SVD of it gives Ritz
triplets (σᵢ, uᵢ = Q·ũᵢ, vᵢ), and M·V, which serves both as the residual ‖M·vᵢ − σᵢ·uᵢ‖ (Mᵀuᵢ = σᵢvᵢ holds by
construction) and as the next iterate. A triplet is trusted once its residual is at float32 rounding of M·v
(`tolerance`); the rule decides from the leading trusted values and ‖M‖²_F, which is known without any SVD: an
energy target, kohya's sv_fro and sv_ratio stop as soon as the trusted part settles them, and the block doubles
when it does not. Two matrix products of m·n·l per step instead of an m·n·min(m, n) SVD. When the rule needs the
whole spectrum (sv_cumulative's Σσ, the full numerical rank), or the block would pass `DENSE_SHARE` of min(m, n), or
`MAX_STEPS` do not converge (no gap near the cut), the dense SVD answers instead. Batched: several modules of one
shape go through every product together (on a GPU, one launch for all).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from loramix.linalg import RankRule

OVERSAMPLE = 8  # extra block columns: convergence goes as (σ_{l+1}/σ_k)² per step
FIRST_BLOCK = 16  # block to start an energy/ratio rule with (doubling while the rule is not settled)
DENSE_SHARE = 0.25  # a block wider than this share of min(m, n): the dense SVD costs less
MAX_STEPS = 8  # subspace steps per block size before giving up on a gap and taking the dense SVD


@dataclass
class Spectrum:
    """ΔW ≈ U·diag(S)·Vh truncated to the rule's rank; ``solver`` says how it was found."""

    U: torch.Tensor
    S: torch.Tensor
    Vh: torch.Tensor
    solver: str


def tolerance(shape: tuple[int, int], top: float) -> float:
    """The residual below which a Ritz triplet is exact to float32 rounding: 8·√max(m, n)·eps·σ₁, a few times the
    rounding of a float32 product M·v of that length."""
    return 8 * math.sqrt(max(shape)) * torch.finfo(torch.float32).eps * top


def decided(rule: RankRule, S: torch.Tensor, total: float, shape: tuple[int, int]) -> int | None:
    """The rank ``rule`` keeps when the leading singular values ``S`` (descending, trusted, in M's dtype: the
    numerical rank's tolerance is that dtype's) and the total energy ``total`` = ‖M‖²_F already settle it; None
    when more of the spectrum is needed.

    The unknown rest of the spectrum is stood in for by values no larger than the last known one whose squares sum to
    the energy left: `RankRule.choose` then counts exactly as it would on the full spectrum up to the known part, and
    a rank short of the known values is final."""
    if needs_whole(rule) or not S.numel():
        return None
    rest = total - float(S.double().square().sum())
    k = rule.choose(_padded(S, rest, shape), shape)
    if k < S.numel() or (k == S.numel() and _settled_at_last(rule, S, rest)):
        return k
    return None


def _padded(S: torch.Tensor, rest: float, shape: tuple[int, int]) -> torch.Tensor:
    """``S`` followed by values no larger than its last whose squares sum to ``rest`` (at most min(shape) in all)."""
    last = float(S[-1])
    if rest <= 0 or last <= 0:
        return S
    count = max(0, min(max(1, math.ceil(rest / last**2)), min(shape) - S.numel()))
    return torch.cat([S, torch.full((count,), min(last, math.sqrt(rest / max(count, 1))), dtype=S.dtype)])


def _settled_at_last(rule: RankRule, S: torch.Tensor, rest: float) -> bool:
    """Whether a rank equal to the number of known values is final: the rank cap, a share of Σσ² reached only with
    the last known value, or a ratio no unknown value can pass (each σ² is at most the energy left)."""
    if rule.rank is not None and S.numel() == rule.rank:
        return True
    if rule.energy is not None or rule.rule == "sv_fro":
        return True
    return rule.rule == "sv_ratio" and rest <= (float(S[0]) / rule.rule_value) ** 2


def dense(M: torch.Tensor, rule: RankRule) -> Spectrum:
    """The truncated dense SVD of one matrix (float32 on its device)."""
    U, S, Vh = torch.linalg.svd(M, full_matrices=False)
    k = rule.choose(S, tuple(M.shape))
    return Spectrum(U[:, :k], S[:k], Vh[:k], "dense SVD")


def needs_whole(rule: RankRule) -> bool:
    """Whether ``rule`` needs every singular value: sv_cumulative (Σσ), or no rule at all (the numerical rank)."""
    return rule.rule == "sv_cumulative" or rule == RankRule()


def _first_block(rule: RankRule, small: int) -> int | None:
    """The block to start with; None when the rule needs the whole spectrum."""
    if needs_whole(rule):
        return None
    wanted = rule.rank if rule.energy is None and rule.rule is None else min(rule.rank or FIRST_BLOCK, FIRST_BLOCK)
    return min(wanted, small) + OVERSAMPLE


def _orthonormal(Y: torch.Tensor) -> torch.Tensor:
    return torch.linalg.qr(Y).Q


def top_singular(M: torch.Tensor, rule: RankRule, totals: list[float], *, seed: int = 0) -> list[Spectrum]:
    """The truncated SVD of each matrix of the batch ``M`` (b×m×n, float32) under ``rule``; ``totals`` are their
    ‖·‖²_F in float64. Equal to `dense` to float32 rounding where the cut has a gap; the dense SVD where it has not."""
    b, m, n = M.shape
    small = min(m, n)
    block = _first_block(rule, small)
    if block is None or block > DENSE_SHARE * small:
        return [dense(M[i], rule) for i in range(b)]
    generator = torch.Generator(device=M.device).manual_seed(seed)

    def sketch(columns: int) -> torch.Tensor:
        return M @ torch.randn(b, n, columns, generator=generator, device=M.device, dtype=M.dtype)

    results: list[Spectrum | None] = [None] * b
    Q, steps = _orthonormal(sketch(block)), 0
    while True:
        steps += 1
        V, S, Uh = torch.linalg.svd(M.mT @ Q, full_matrices=False)  # (QᵀM)ᵀ = V·S·Ũᵀ
        U = Q @ Uh.mT
        MV = M @ V
        residual = torch.linalg.vector_norm(MV - U * S[:, None, :], dim=1).cpu()
        grow = False
        for i in range(b):
            if results[i] is not None:
                continue
            values = S[i].cpu()
            if values[0] <= 0:  # a zero matrix: one zero direction, as the dense rule gives
                results[i] = Spectrum(U[i, :, :1], values[:1].to(M.device), V[i, :, :1].mT, "zero")
                continue
            trusted = residual[i] <= tolerance((m, n), float(values[0]))
            count = int(trusted.int().cumprod(0).sum())
            k = decided(rule, values[:count], totals[i], (m, n))
            if k is not None:
                solver = f"subspace iteration (block {block}, {steps} step{'s' if steps > 1 else ''})"
                results[i] = Spectrum(U[i, :, :k], S[i, :k], V[i, :, :k].mT, solver)
            elif count >= block - OVERSAMPLE:  # all target columns converged: the rule needs more of them
                grow = True
            elif steps > 1:  # or, past the first rough sketch, even the whole block's values point beyond it
                rest = totals[i] - float(values.double().square().sum())
                grow |= rule.choose(_padded(values, rest, (m, n)), (m, n)) >= block
        if all(r is not None for r in results):
            return results
        if steps >= MAX_STEPS or (grow and 2 * block > DENSE_SHARE * small):
            return [r if r is not None else dense(M[i], rule) for i, r in enumerate(results)]
        if grow:  # the converged part does not settle the rule: twice the block, keeping what has converged
            MV, block, steps = torch.cat([MV, sketch(block)], dim=2), 2 * block, 0
        Q = _orthonormal(MV)
