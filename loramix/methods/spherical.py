"""Spherical and geometric merges of task vectors: SLERP, NuSLERP, Multi-SLERP, the Karcher mean and Model Stock.

Every one of them returns ΔW = Σᵢ diag(rᵢ)·τᵢ·diag(cᵢ) for task vectors τᵢ and coefficients computed from inner
products alone: one scalar per task (the whole matrix as one vector), or one per output row (row vectors), or one per
input column. Inner products of low-rank matrices need no out×in matrix — ⟨τᵢ, τₖ⟩ = tr((BᵢᵀBₖ)(AₖAᵢᵀ)), row j's is
(Bᵢ·AᵢAₖᵀ·Bₖᵀ)ⱼⱼ — and Σ diag(rᵢ)·sᵢBᵢAᵢ·diag(cᵢ) is the factor pair [r₁⊙s₁B₁ …]·[A₁⊙c₁; …] of rank ≤ Σ rᵢ. So
``space="core"`` (the default) is exact: it equals the dense path (each out×in τᵢ formed, ``space="dense"``) to
rounding (and float64 references to 1e-10); the result is re-factorised and truncated by the rank rule as `svd` does.

Definitions (mergekit 0.1, merge_methods/slerp.py, nuslerp.py, multislerp.py, karcher.py, model_stock.py; a LoRA's
task vector is what mergekit computes as fine-tuned − base):

- slerp (Shoemake 1985): two adapters, τ₀ → τ₁ at ``t``: cos θ = ⟨τ₀, τ₁⟩/(‖τ₀‖‖τ₁‖) (a norm ≤ 1e-8 counts as 1),
  ΔW = sin((1−t)θ)/sin θ·τ₀ + sin(tθ)/sin θ·τ₁, linear interpolation when |cos θ| > ``dot_threshold``. The vectors
  are τᵢ = wᵢ·sᵢ·BᵢAᵢ (weights 1 for the plain interpolation). mergekit's ``slerp`` interpolates whole weights, the
  base against the other model (so the result is not a function of the adapters alone), and in recent versions row
  by row; the task-vector slerp over the whole matrix is mergekit's ``nuslerp`` with a base and ``nuslerp_flatten``.
- nuslerp (mergekit): the same on τᵢ = sᵢ·BᵢAᵢ with t = w₁/(w₀ + w₁) (0.5 when the weights sum to 0); the whole
  matrix (``nuslerp_flatten``, default), else each output row, or with ``nuslerp_row_wise`` each input column
  (mergekit's dim 0); collinear when 1 − cos² ≤ 1e-16, then linear.
- multislerp (Goddard 2025, "Multi-SLERP"): barycentric interpolation of the unit τᵢ/‖τᵢ‖ on the sphere: the weighted
  mean direction m, the weighted sum of the tangent vectors at m mapped back by the exponential map, scaled by
  Σ wᵢ‖τᵢ‖; weights normalised to sum 1 with ``normalize_weights``.
- karcher (the weighted Karcher/Fréchet mean on the sphere; Karcher 1977; mergekit ``karcher``): Riemannian gradient
  steps from the normalised weighted mean of the unit τᵢ for ``max_iter`` steps or until the tangent norm is below
  ``tol``, scaled by Σ αᵢ‖τᵢ‖ with α = weights / Σ weights (mergekit uses equal α; weights 1 give its merge).
- model_stock (Jang et al. 2024, arXiv:2403.19522): with the base W₀ and fine-tuned Wᵢ = W₀ + τᵢ, mergekit writes
  t·mean(Wᵢ) + (1 − t)·W₀ with t = N·cos θ/(1 + (N−1)·cos θ), cos θ the mean pairwise cosine of the τᵢ. That is
  W₀ + t·mean(τᵢ), so for adapters the merged ΔW = t·(1/N)·Σ τᵢ, τᵢ = wᵢ·sᵢ·BᵢAᵢ; per output row with
  ``filter_wise``; t = 0 where 1 + (N−1)·cos θ vanishes. mergekit clamps each norm product at 1e-6 (an absolute
  floor that bites for small LoRA updates); loramix only guards a zero product.

A module some adapters lack enters as their zero task vector (``every_adapter``: mergekit's view of a fine-tuned
model that left that weight alone), so slerp from a module only the second adapter has gives sin(tπ/2)·τ₁.
"""

from __future__ import annotations

import math

from loramix.errors import MethodError
from loramix.lazy import lazy
from loramix.linalg import Factors, RankRule, dense_factors, truncated_factors
from loramix.methods._elementwise import check_choice, check_flag, check_number, split_weights
from loramix.methods.registry import method
from loramix.settings import SPACES

torch = lazy("torch")


class TaskVectors:
    """τᵢ = cᵢ·Bᵢ·Aᵢ of one module, as factors (``space="core"``, float64) or formed (``"dense"``, float32 or wider):
    their inner products along an axis, and a coefficient-weighted sum back to factors."""

    def __init__(self, terms, coefs: list[float], space: str):
        self.space = check_choice("space", space, SPACES)
        if space == "core":
            self.B = [c * t.B.to(torch.float64) for c, t in zip(coefs, terms)]
            self.A = [t.A.to(torch.float64) for t in terms]
        else:
            dtype = torch.promote_types(terms[0].B.dtype, torch.float32)
            self.dense = torch.stack([c * (t.B.to(dtype) @ t.A.to(dtype)) for c, t in zip(coefs, terms)])

    def inner(self, axis: str) -> torch.Tensor:
        """(n, n, m) inner products ⟨τᵢ, τₖ⟩ of the whole matrices (m = 1), of each row (m = out) or column (m = in)."""
        if self.space == "dense":
            T = self.dense.to(torch.float64)
            pattern = {"matrix": "iab,kab->ik", "row": "iab,kab->ika", "column": "iab,kab->ikb"}[axis]
            out = torch.einsum(pattern, T, T)
            return out.unsqueeze(-1) if axis == "matrix" else out
        n = len(self.B)
        rows = []
        for i in range(n):
            row = []
            for k in range(n):
                if axis == "matrix":
                    row.append(((self.B[i].T @ self.B[k]) * (self.A[i] @ self.A[k].T)).sum().reshape(1))
                elif axis == "row":
                    row.append(((self.B[i] @ (self.A[i] @ self.A[k].T)) * self.B[k]).sum(1))
                else:
                    row.append((((self.B[i].T @ self.B[k]) @ self.A[k]) * self.A[i]).sum(0))
            rows.append(torch.stack(row))
        return torch.stack(rows)

    def combine(self, coefficients: torch.Tensor, axis: str, rule: RankRule) -> Factors:
        """Σᵢ coefficientsᵢ ⊙ τᵢ (coefficients (n, m) along ``axis``) as truncated balanced factors."""
        if self.space == "dense":
            c = coefficients.to(self.dense.dtype)
            shaped = {"matrix": c[:, :, None], "row": c[:, :, None], "column": c[:, None, :]}[axis]
            return dense_factors((shaped * self.dense).sum(0), rule)
        on_rows = axis != "column"
        B = torch.cat([b * (c[:, None] if on_rows else 1) for b, c in zip(self.B, coefficients)], dim=1)
        A = torch.cat([a * (1 if on_rows else c[None, :]) for a, c in zip(self.A, coefficients)], dim=0)
        return truncated_factors(B, A, rule)


def _interpolation(cos: torch.Tensor, t: float, linear: torch.Tensor) -> torch.Tensor:
    """(2, m) slerp coefficients of v₀, v₁ at t from cos θ, (1 − t, t) where ``linear``."""
    theta = torch.acos(torch.where(linear, torch.zeros_like(cos), cos))
    sin = torch.where(linear, torch.ones_like(theta), torch.sin(theta))
    spherical = torch.stack([torch.sin((1 - t) * theta) / sin, torch.sin(t * theta) / sin])
    flat = torch.stack([torch.full_like(cos, 1 - t), torch.full_like(cos, t)])
    return torch.where(linear, flat, spherical)


def _pair(terms, name: str) -> None:
    if len(terms) != 2:
        raise MethodError(f"method {name} interpolates two adapters, got {len(terms)}")


@method(
    name="slerp", paper="Shoemake 1985; mergekit nuslerp with a base", dense=True, truncates=True, every_adapter=True
)
def slerp(terms, *, rule: RankRule, t: float = 0.5, dot_threshold: float = 0.9995, space: str = "core") -> Factors:
    """Spherical interpolation from the first adapter's ΔW to the second's at t (exact in core space)."""
    _pair(terms, "slerp")
    t, threshold = check_number("t", t, 0, 1), check_number("dot_threshold", dot_threshold, 0, 1)
    vectors = TaskVectors(terms, [term.coef for term in terms], space)
    gram = vectors.inner("matrix")
    norms = gram.diagonal().T.sqrt()  # (n, m)
    norms = torch.where(norms > 1e-8, norms, torch.ones_like(norms))
    cos = (gram[0, 1] / (norms[0] * norms[1])).clamp(-1, 1)
    return vectors.combine(_interpolation(cos, t, cos.abs() > threshold), "matrix", rule)


@method(
    name="nuslerp",
    paper="mergekit nuslerp (Goddard et al. 2024, arXiv:2403.13257)",
    dense=True,
    truncates=True,
    every_adapter=True,
)
def nuslerp(
    terms,
    *,
    rule: RankRule,
    nuslerp_flatten: bool = True,
    nuslerp_row_wise: bool = False,
    space: str = "core",
) -> Factors:
    """mergekit's NuSLERP: slerp of two ΔWᵢ at t = w₁/(w₀+w₁), whole matrix, per row or per column."""
    _pair(terms, "nuslerp")
    flatten, row_wise = check_flag("nuslerp_flatten", nuslerp_flatten), check_flag("nuslerp_row_wise", nuslerp_row_wise)
    scales, weights = split_weights(terms)
    total = sum(weights)
    t = 0.5 if abs(total) < 1e-6 else weights[1] / total
    axis = "matrix" if flatten else "column" if row_wise else "row"
    vectors = TaskVectors(terms, scales, space)
    gram = vectors.inner(axis)
    norms = gram.diagonal().T.sqrt().clamp(min=1e-7)
    cos = (gram[0, 1] / (norms[0] * norms[1])).clamp(-1, 1)
    return vectors.combine(_interpolation(cos, t, 1 - cos.square() <= 1e-16), axis, rule)


def _sphere(gram: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(‖τᵢ‖, Gram matrix of the unit vectors τᵢ/(‖τᵢ‖ + eps)) from the (n, n, 1) inner products."""
    G = gram[..., 0]
    norms = G.diagonal().clamp(min=0).sqrt()
    return norms, G / ((norms + eps)[:, None] * (norms + eps)[None, :])


def _length(a: torch.Tensor, G: torch.Tensor) -> torch.Tensor:
    """‖Σ aᵢ uᵢ‖ for coefficients a over unit vectors with Gram matrix G."""
    return (a @ G @ a).clamp(min=0).sqrt()


@method(
    name="multislerp",
    paper="Goddard 2025, Multi-SLERP (mergekit multislerp)",
    dense=True,
    truncates=True,
    every_adapter=True,
)
def multislerp(
    terms, *, rule: RankRule, normalize_weights: bool = True, eps: float = 1e-8, space: str = "core"
) -> Factors:
    """Multi-SLERP: weighted barycentre of the ΔWᵢ directions on the sphere, scaled by Σ wᵢ‖ΔWᵢ‖."""
    check_flag("normalize_weights", normalize_weights)
    eps = check_number("eps", eps, 0, math.inf)
    scales, weights = split_weights(terms)
    vectors = TaskVectors(terms, scales, space)
    if len(terms) == 1:
        return vectors.combine(torch.ones(1, 1, dtype=torch.float64), "matrix", rule)
    norms, G = _sphere(vectors.inner("matrix"), eps)
    w = torch.tensor(weights, dtype=torch.float64)
    if normalize_weights:
        w = w / w.sum()
    length = _length(w, G)
    if length < eps:
        if len(terms) != 2:
            raise MethodError(
                "multislerp: the weighted mean direction of the adapters' ΔW is zero (antipodal updates with "
                "balancing weights); change the weights"
            )
        return vectors.combine(w[:, None], "matrix", rule)
    mean = w / length
    tangent = w - (w @ (G @ mean)) * mean
    angle = _length(tangent, G) + eps
    unit = mean * torch.cos(angle) + tangent * (torch.sin(angle) / angle)
    return vectors.combine((unit * (w @ norms) / (norms + eps))[:, None], "matrix", rule)


@method(
    name="karcher",
    paper="Karcher 1977, Riemannian centre of mass (mergekit karcher)",
    dense=True,
    truncates=True,
    every_adapter=True,
)
def karcher(terms, *, rule: RankRule, max_iter: int = 10, tol: float = 1e-5, space: str = "core") -> Factors:
    """Weighted Karcher mean of the ΔWᵢ directions on the sphere, scaled by the weighted mean norm."""
    if isinstance(max_iter, bool) or not isinstance(max_iter, int) or max_iter < 0:
        raise MethodError(f"max_iter must be a non-negative integer, got {max_iter!r}")
    tol = check_number("tol", tol, 0, math.inf)
    scales, weights = split_weights(terms)
    vectors = TaskVectors(terms, scales, space)
    if len(terms) == 1:
        return vectors.combine(torch.ones(1, 1, dtype=torch.float64), "matrix", rule)
    norms, G = _sphere(vectors.inner("matrix"), 0.0)
    units = norms > 0
    G = torch.where(units[:, None] & units[None, :], G, torch.zeros_like(G))  # a zero τᵢ has a zero unit vector
    alpha = torch.tensor(weights, dtype=torch.float64)
    alpha = alpha / alpha.sum()
    valid = norms > tol
    if not valid.any():
        return vectors.combine(torch.zeros(len(terms), 1, dtype=torch.float64), "matrix", rule)
    share = torch.where(valid, alpha, torch.zeros_like(alpha))
    share = share / share.sum()
    mean = share.clone()
    length = _length(mean, G)
    mean = torch.eye(len(terms), dtype=torch.float64)[int(valid.nonzero()[0])] if length < tol else mean / length
    for _ in range(max_iter):
        cos = (G @ mean).clamp(-1, 1)
        theta = torch.acos(cos)
        step = valid & (theta >= tol)
        factor = torch.where(step, share * theta / torch.where(step, torch.sin(theta), 1.0), 0.0)
        tangent = factor - (factor * cos).sum() * mean  # Σ factorᵢ (uᵢ − cosᵢ·mean)
        size = _length(tangent, G)
        if size < tol:
            break
        mean = torch.cos(size) * mean + torch.sin(size) * tangent / size
        length = _length(mean, G)
        if length > tol:
            mean = mean / length
    scale = (alpha * norms).sum()
    per_task = torch.where(units, mean * scale / torch.where(units, norms, 1.0), 0.0)
    return vectors.combine(per_task[:, None], "matrix", rule)


@method(
    name="model_stock",
    paper="Jang et al. 2024, Model Stock, arXiv:2403.19522; mergekit",
    dense=True,
    truncates=True,
    every_adapter=True,
)
def model_stock(terms, *, rule: RankRule, filter_wise: bool = False, space: str = "core") -> Factors:
    """Model Stock: t·mean ΔWᵢ with t from the mean pairwise cosine of the ΔWᵢ (whole matrix or per row)."""
    axis = "row" if check_flag("filter_wise", filter_wise) else "matrix"
    n = len(terms)
    if n < 2:
        raise MethodError(f"method model_stock needs at least two adapters, got {n}")
    vectors = TaskVectors(terms, [term.coef for term in terms], space)
    gram = vectors.inner(axis)
    norms = gram.diagonal().T.clamp(min=0).sqrt()  # (n, m)
    cosines = []
    for i in range(n):
        for k in range(i + 1, n):
            product = norms[i] * norms[k]
            safe = torch.where(product > 0, product, torch.ones_like(product))
            cosines.append(torch.where(product > 0, gram[i, k] / safe, 0.0).clamp(-1, 1))
    cos = torch.stack(cosines).mean(0)
    denominator = 1 + (n - 1) * cos
    singular = denominator.abs() < 1e-6
    ratio = torch.where(singular, 0.0, n * cos / torch.where(singular, 1.0, denominator))
    return vectors.combine((ratio / n).expand(n, -1), axis, rule)
