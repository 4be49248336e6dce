"""Element-wise building blocks shared by the interference-aware and subspace families: option checks, per-module
seeded generators, magnitude and random masks, TIES sign election and disjoint merge, canonical singular-vector
signs. The element-wise rules follow PEFT 0.21 (utils/merge_utils.py), which applies the weights *after* pruning
and sign election:

- magnitude_prune: keep the ⌊density·numel⌋ largest |τᵢ| of each task, then Σ wᵢ·τ̂ᵢ.
- ties (Yadav et al. 2023): trim as above; elect per entry the sign of Σ τ̂ᵢ ("total") or of Σ sign(τ̂ᵢ)
  ("frequency"), ties going to +; disjoint merge Σ wᵢ·τ̂ᵢ over the agreeing tasks / their count (at least 1).
- dare_linear / dare_ties (Yu et al. 2023): drop each entry with probability 1 − density and rescale the kept
  ones by 1/density, then Σ wᵢ·τ̂ᵢ, or elect and disjoint-merge as TIES.

`task_space` gives the task vectors in either space and the way back to factors, for every element-wise family.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable

from loramix.errors import MethodError
from loramix.lazy import lazy
from loramix.linalg import Factors, FactorSVD, RankRule, dense_factors, numerical_rank
from loramix.settings import SPACES

torch = lazy("torch")

KINDS = ("ties", "magnitude_prune", "dare_linear", "dare_ties", "linear")


def check_density(density) -> float:
    if isinstance(density, bool) or not isinstance(density, (int, float)) or not 0 < density <= 1:
        raise MethodError(f"density must be a number in (0, 1], got {density!r}")
    return float(density)


def check_choice(name: str, value, choices: tuple[str, ...]) -> str:
    if value not in choices:
        raise MethodError(f"{name} must be one of {', '.join(choices)}, got {value!r}")
    return value


def check_flag(name: str, value) -> bool:
    if not isinstance(value, bool):
        raise MethodError(f"{name} must be true or false, got {value!r}")
    return value


def check_number(name: str, value, low: float = -math.inf, high: float = math.inf) -> float:
    """``value`` as a float when it is a number in [low, high]."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= high:
        span = "" if (low, high) == (-math.inf, math.inf) else f" in [{low:g}, {high:g}]"
        raise MethodError(f"{name} must be a number{span}, got {value!r}")
    return float(value)


def check_seed(seed) -> int:
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise MethodError(f"seed must be a non-negative integer, got {seed!r}")
    return seed


def split_weights(terms) -> tuple[list[float], list[float]]:
    """(scales sᵢ, weights wᵢ) of the terms: coef = wᵢ·sᵢ. Without a recorded weight, wᵢ = 1 and sᵢ = coef.

    A zero-weight term gets scale 0: it contributes nothing and takes no part in sign election.
    """
    weights = [1.0 if getattr(t, "weight", None) is None else float(t.weight) for t in terms]
    scales = [t.coef / w if w != 0 else 0.0 for t, w in zip(terms, weights)]
    return scales, weights


def module_generator(seed: int, terms) -> torch.Generator:
    """A CPU generator seeded from ``seed`` and a fingerprint of the module's factors.

    Modules of equal shape thus get independent drop masks (one seed per module would repeat the same mask in
    every layer), and the same seed gives the same masks on any device.
    """
    digest = hashlib.blake2b(str(seed).encode(), digest_size=8)
    for t in terms:
        digest.update(str((tuple(t.B.shape), tuple(t.A.shape))).encode())
        digest.update(t.A[:1, :16].detach().to("cpu", torch.float64).contiguous().numpy().tobytes())
        digest.update(t.B[:16, :1].detach().to("cpu", torch.float64).contiguous().numpy().tobytes())
    return torch.Generator().manual_seed(int.from_bytes(digest.digest(), "little") >> 1)


def magnitude_mask(task: torch.Tensor, density: float) -> torch.Tensor:
    """True at the ⌊density·numel⌋ entries of largest magnitude (PEFT's top-k; all when density ≥ 1)."""
    if density >= 1:
        return torch.ones_like(task, dtype=torch.bool)
    keep = torch.zeros(task.numel(), dtype=torch.bool, device=task.device)
    keep[task.abs().reshape(-1).topk(int(density * task.numel())).indices] = True
    return keep.view_as(task)


def random_mask(shape: torch.Size, density: float, generator: torch.Generator) -> torch.Tensor:
    """Bernoulli(density) keep-mask drawn on the CPU from ``generator``."""
    return torch.rand(shape, generator=generator, dtype=torch.float64) < density


def merge_elementwise(
    tasks: list[torch.Tensor],
    weights: list[float],
    *,
    kind: str,
    density: float = 1.0,
    majority_sign: str = "total",
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """One element-wise rule of `KINDS` over same-shaped task tensors (unweighted) with weights wᵢ."""
    pruned = []
    for task in tasks:
        if kind in ("ties", "magnitude_prune"):
            task = task * magnitude_mask(task, density)
        elif kind in ("dare_linear", "dare_ties") and density < 1:
            task = task * random_mask(task.shape, density, generator).to(task.device) / density
        pruned.append(task)
    stack = torch.stack(pruned)
    w = torch.tensor(weights, dtype=stack.dtype, device=stack.device).view(-1, *([1] * (stack.dim() - 1)))
    if kind not in ("ties", "dare_ties"):
        return (w * stack).sum(0)
    sign = stack.sign()
    votes = stack.sum(0) if majority_sign == "total" else sign.sum(0)
    agree = sign == torch.where(votes >= 0, 1.0, -1.0).to(stack.dtype)
    return (w * stack * agree).sum(0) / agree.sum(0).clamp(min=1)


def joint_basis(X: torch.Tensor) -> torch.Tensor:
    """Orthonormal basis (left singular vectors) of X's column space, cut to its numerical rank.

    Each column's sign is fixed so that its entry of largest magnitude is positive: element-wise rules with a
    tie-break (frequency election sends 0 votes to +) would otherwise depend on the SVD routine's sign choice.
    """
    U, S, _ = torch.linalg.svd(X, full_matrices=False)
    U = U[:, : numerical_rank(S, tuple(X.shape))]
    return U * column_signs(U)


def column_signs(U: torch.Tensor) -> torch.Tensor:
    """±1 per column making each column's entry of largest magnitude positive (a canonical SVD sign)."""
    signs = U.gather(0, U.abs().argmax(0, keepdim=True)).sign()
    return torch.where(signs == 0, 1.0, signs).to(U.dtype)


def task_space(terms, scales: list[float], space: str) -> tuple[list, Callable[..., Factors]]:
    """The module's task vectors τᵢ = sᵢ·Bᵢ·Aᵢ in ``space`` and ``finish(merged, rule)`` that turns a merged one into
    truncated balanced factors.

    ``dense``: each out×in ΔWᵢ (float32 or wider), finished by a full SVD (`dense_factors`). ``core`` (Panariello et
    al. 2025): the cores Mᵢ = U_Bᵀ·τᵢ·V_A in float64, U_B and V_A orthonormal bases of the joint column space of the
    Bᵢ and row space of the Aᵢ (`joint_basis`), finished as U_B·SVD(M)·V_Aᵀ without an out×in matrix.
    """
    check_choice("space", space, SPACES)
    if space == "dense":
        dtype = torch.promote_types(terms[0].B.dtype, torch.float32)
        return [s * (t.B.to(dtype) @ t.A.to(dtype)) for s, t in zip(scales, terms)], dense_factors
    dtype = torch.float64
    U_B = joint_basis(torch.cat([t.B.to(dtype) for t in terms], dim=1))
    V_A = joint_basis(torch.cat([t.A.to(dtype) for t in terms], dim=0).T)
    shape = (U_B.shape[0], V_A.shape[0])
    if U_B.shape[1] == 0 or V_A.shape[1] == 0:
        zero = Factors(U_B.new_zeros(shape[0], 1), U_B.new_zeros(1, shape[1]))
        return [U_B.new_zeros(1, 1) for _ in terms], lambda merged, rule: zero
    cores = [s * ((U_B.T @ t.B.to(dtype)) @ (t.A.to(dtype) @ V_A)) for s, t in zip(scales, terms)]

    def finish(merged: torch.Tensor, rule: RankRule) -> Factors:
        u, S, vh = torch.linalg.svd(merged, full_matrices=False)
        return FactorSVD(U_B @ u, S, vh @ V_A.T).factors(rule.choose(S, shape))

    return cores, finish
