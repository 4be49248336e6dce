"""Interference-aware merges: TIES, magnitude prune, DARE (linear and TIES), dense or in Core Space.

Each adapter's task vector is τᵢ = sᵢ·Bᵢ·Aᵢ (its own scale, without its weight wᵢ). The element-wise rules follow
PEFT 0.21 (utils/merge_utils.py), which applies the weights *after* pruning and sign election:

- magnitude_prune: keep the ⌊density·numel⌋ largest |τᵢ| of each task, then Σ wᵢ·τ̂ᵢ.
- ties (Yadav et al. 2023): trim as above; elect per entry the sign of Σ τ̂ᵢ ("total") or of Σ sign(τ̂ᵢ)
  ("frequency"), ties going to +; disjoint merge Σ wᵢ·τ̂ᵢ over the agreeing tasks / their count (at least 1).
- dare_linear / dare_ties (Yu et al. 2023): drop each entry with probability 1 − density and rescale the kept
  ones by 1/density, then Σ wᵢ·τ̂ᵢ, or elect and disjoint-merge as TIES.

``space="dense"`` applies the rule to each module's out×in ΔWᵢ (formed one module at a time) and re-factorises the
result by a full SVD, like PEFT's ``*_svd`` combinations. ``space="core"`` (Panariello et al. 2025, Core Space)
applies it to the small core matrices Mᵢ = U_Bᵀ·τᵢ·V_A, where U_B is an orthonormal basis of the joint column space
of the Bᵢ and V_A of the joint row space of the Aᵢ (left/right singular vectors of the stacked factors, signs
fixed); the
merged ΔW = U_B·M·V_Aᵀ is never formed, and a linear rule there is lossless.
"""

from __future__ import annotations

import hashlib

import torch

from loramix.errors import MethodError
from loramix.linalg import FactorSVD, RankRule, dense_factors, numerical_rank

KINDS = ("ties", "magnitude_prune", "dare_linear", "dare_ties", "linear")
MAJORITY_SIGNS = ("total", "frequency")
SPACES = ("dense", "core")


def check_density(density) -> float:
    if isinstance(density, bool) or not isinstance(density, (int, float)) or not 0 < density <= 1:
        raise MethodError(f"density must be a number in (0, 1], got {density!r}")
    return float(density)


def check_choice(name: str, value, choices: tuple[str, ...]) -> str:
    if value not in choices:
        raise MethodError(f"{name} must be one of {', '.join(choices)}, got {value!r}")
    return value


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


def merge_terms(
    terms,
    *,
    rule: RankRule,
    kind: str,
    density: float = 1.0,
    majority_sign: str = "total",
    seed: int = 0,
    space: str = "dense",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Apply rule ``kind`` to the module's task vectors in ``space`` and return truncated balanced factors."""
    density = check_density(density)
    check_choice("majority_sign", majority_sign, MAJORITY_SIGNS)
    check_choice("space", space, SPACES)
    generator = module_generator(check_seed(seed), terms) if kind.startswith("dare") else None
    scales, weights = split_weights(terms)
    options = dict(kind=kind, density=density, majority_sign=majority_sign, generator=generator)
    if space == "core":
        return _core(terms, scales, weights, rule, options)
    dtype = torch.promote_types(terms[0].B.dtype, torch.float32)
    tasks = [s * (t.B.to(dtype) @ t.A.to(dtype)) for s, t in zip(scales, terms)]
    merged = merge_elementwise(tasks, weights, **options)
    del tasks
    return dense_factors(merged, rule, cap=sum(t.A.shape[0] for t in terms))


def _core(terms, scales, weights, rule: RankRule, options: dict) -> tuple[torch.Tensor, torch.Tensor]:
    dtype = torch.float64
    U_B = joint_basis(torch.cat([t.B.to(dtype) for t in terms], dim=1))
    V_A = joint_basis(torch.cat([t.A.to(dtype) for t in terms], dim=0).T)
    out, inp = terms[0].B.shape[0], terms[0].A.shape[1]
    if U_B.shape[1] == 0 or V_A.shape[1] == 0:
        return U_B.new_zeros(out, 1), U_B.new_zeros(1, inp)
    cores = [s * ((U_B.T @ t.B.to(dtype)) @ (t.A.to(dtype) @ V_A)) for s, t in zip(scales, terms)]
    merged = merge_elementwise(cores, weights, **options)
    u, S, vh = torch.linalg.svd(merged, full_matrices=False)
    return FactorSVD(U_B @ u, S, vh @ V_A.T).factors(rule.choose(S, (out, inp)))


def ties(terms, *, rule: RankRule, density: float = 0.2, majority_sign: str = "total", space: str = "dense"):
    return merge_terms(terms, rule=rule, kind="ties", density=density, majority_sign=majority_sign, space=space)


def magnitude_prune(terms, *, rule: RankRule, density: float = 0.2, space: str = "dense"):
    return merge_terms(terms, rule=rule, kind="magnitude_prune", density=density, space=space)


def dare_linear(terms, *, rule: RankRule, density: float = 0.5, seed: int = 0, space: str = "dense"):
    return merge_terms(terms, rule=rule, kind="dare_linear", density=density, seed=seed, space=space)


def dare_ties(
    terms,
    *,
    rule: RankRule,
    density: float = 0.5,
    majority_sign: str = "total",
    seed: int = 0,
    space: str = "dense",
):
    return merge_terms(
        terms, rule=rule, kind="dare_ties", density=density, majority_sign=majority_sign, seed=seed, space=space
    )
