"""mergekit's generalized task arithmetic family: Model Breadcrumbs, DELLA (with or without TIES sign consensus) and
SCE, dense or in Core Space.

Each adapter's task vector is τᵢ = sᵢ·Bᵢ·Aᵢ (its own scale; the weight wᵢ apart), what mergekit calls the fine-tuned
model minus the base. Following mergekit's ``GeneralizedTaskArithmeticMerge`` (mergekit 0.1, merge_methods/
generalized_task_arithmetic.py and sparsify.py):

1. sparsify each τᵢ (method-specific, below); with ``rescale``, multiply what is kept so its L1 norm equals τᵢ's
   (mergekit's ``RescaleNorm.l1``; the DELLA paper rescales each entry by 1/pᵢ instead);
2. weight: δᵢ = wᵢ·τ̂ᵢ;
3. TIES variants: per entry elect the sign of Σ δᵢ (+ on ties) and keep the δᵢ of that sign; the merge is Σ kept δᵢ,
   divided, with ``normalize``, by the sum of the kept weights (1 where none); the linear variants sum all δᵢ, divided
   by Σ wᵢ with ``normalize``;
4. multiply by ``lambda``.

Sparsifiers: breadcrumbs (Davari & Belilovsky 2023, arXiv:2312.06795) drops the largest ⌊gamma·n⌋ and the smallest
entries so that ⌊density·n⌋ remain (fewer outliers dropped when needed to keep that many); DELLA's MagPrune (Deep et
al. 2024, arXiv:2406.11617) ranks each row's entries by magnitude and keeps entry j with probability
pⱼ = density − epsilon + 2·epsilon·(rankⱼ − 1)/(in − 1), so larger entries survive more often. The draws are seeded
per module (`module_generator`), so the same seed gives the same merge on any device. ``density`` ≥ 1 keeps every
entry (no outlier removal either, as in mergekit).

SCE (Wan et al. 2024, FuseChat, arXiv:2408.07990; mergekit merge_methods/sce.py): Select the entries whose variance
across the task vectors is in the top ``select_topk`` share (of the entries with non-zero variance), Calculate each
task's weight as its mean of squares over the sum of all tasks', Erase the entries whose sign disagrees with the sum's,
and average the rest with those weights. Weights wᵢ multiply the task vectors before all of it (mergekit's SCE has
none; with weights 1 it is mergekit's). mergekit falls back to equal task weights when the mean squares sum below
1e-6, a threshold ordinary LoRA updates fall under; loramix only when they are all zero.

A module some adapters lack enters as their zero task vector (``every_adapter``), as mergekit sees a model that
left the weight alone: it takes no part in sign election, and its weight still counts in a linear ``normalize``.

In ``space="core"`` every rule runs on the small cores U_Bᵀ·τᵢ·V_A instead of the out×in ΔWᵢ (`task_space`): linear
steps are exact there, but which entries are kept is decided on different coordinates, so a core merge is a
different (and much cheaper) merge, not an approximation of the dense one.
"""

from __future__ import annotations

from loramix.errors import MethodError
from loramix.lazy import lazy
from loramix.linalg import Factors, RankRule
from loramix.methods._elementwise import (
    check_density,
    check_flag,
    check_number,
    check_seed,
    module_generator,
    random_mask,
    split_weights,
    task_space,
)
from loramix.methods.registry import method

torch = lazy("torch")

CORE = "core: Panariello et al. 2025, arXiv:2509.17786"
BREADCRUMBS = f"Davari & Belilovsky 2023, Model Breadcrumbs, arXiv:2312.06795; mergekit; {CORE}"
DELLA = f"Deep et al. 2024, DELLA-Merging, arXiv:2406.11617; mergekit; {CORE}"


def l1_rescaled(task: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """``task`` where ``keep``, times ‖task‖₁/‖kept‖₁ (unscaled when either is 0)."""
    kept = task * keep
    before, after = task.abs().sum(), kept.abs().sum()
    return kept * (before / after) if before > 0 and after > 0 else kept


def outlier_mask(task: torch.Tensor, density: float, gamma: float) -> torch.Tensor:
    """Breadcrumbs: keep ⌊density·n⌋ entries just below the ⌊gamma·n⌋ largest magnitudes (all when density ≥ 1)."""
    if density >= 1:
        return torch.ones_like(task, dtype=torch.bool)
    n = task.numel()
    target = int(density * n)
    bottom = max(0, n - target - int(gamma * n))
    keep = torch.zeros(n, dtype=torch.bool, device=task.device)
    keep[task.abs().reshape(-1).argsort()[bottom : bottom + target]] = True
    return keep.view_as(task)


def magprune_mask(task: torch.Tensor, density: float, epsilon: float, generator) -> torch.Tensor:
    """DELLA MagPrune: per row, keep-probability rising linearly with magnitude rank from density − ε to density + ε."""
    if density >= 1:
        return torch.ones_like(task, dtype=torch.bool)
    rows = task.reshape(1, -1) if task.dim() < 2 else task
    ranks = rows.abs().argsort(dim=1).argsort(dim=1).to(torch.float64)  # 0 = smallest
    span = max(rows.shape[1] - 1, 1)
    probs = (density - epsilon) + ranks / span * (2 * epsilon)
    return random_mask(rows.shape, probs.cpu(), generator).to(task.device).view_as(task)


def task_arithmetic(
    tasks: list[torch.Tensor],
    weights: list[float],
    *,
    keep,
    consensus: bool,
    normalize: bool,
    rescale: bool,
    scale: float,
) -> torch.Tensor:
    """Steps 1–4 of the module docstring over same-shaped task tensors, ``keep(τ)`` giving each one's keep-mask."""
    deltas = []
    for w, task in zip(weights, tasks):
        mask = keep(task)
        deltas.append(w * (l1_rescaled(task, mask) if rescale else task * mask))
    stack = torch.stack(deltas)
    w = torch.tensor(weights, dtype=stack.dtype, device=stack.device).view(-1, *([1] * (stack.dim() - 1)))
    if consensus:
        agree = stack.sign() == torch.where(stack.sum(0) >= 0, 1.0, -1.0).to(stack.dtype)
        merged = (stack * agree).sum(0)
        divisor = (w * agree).sum(0)
        divisor = torch.where(divisor == 0, torch.ones_like(divisor), divisor)
    else:
        merged = stack.sum(0)
        divisor = w.sum()
        divisor = divisor if divisor.abs() >= 1e-8 else torch.ones_like(divisor)
    if normalize:
        merged = merged / divisor
    return merged * scale


def _merge(terms, rule: RankRule, keep, *, consensus: bool, normalize, rescale, lambda_, space: str) -> Factors:
    settings = dict(
        consensus=consensus,
        normalize=check_flag("normalize", normalize),
        rescale=check_flag("rescale", rescale),
        scale=check_number("lambda", lambda_),
    )
    scales, weights = split_weights(terms)
    tasks, finish = task_space(terms, scales, space)
    merged = task_arithmetic(tasks, weights, keep=keep, **settings)
    del tasks
    return finish(merged, rule)


def _outliers(density, gamma):
    density, gamma = check_density(density), check_number("gamma", gamma, 0, 1)
    return lambda task: outlier_mask(task, density, gamma)


def _magprune(terms, density, epsilon, seed):
    density, epsilon = check_density(density), check_number("epsilon", epsilon, 0, 1)
    if density < 1 and not (0 < density - epsilon and density + epsilon < 1):
        raise MethodError(
            f"epsilon must keep density ± epsilon inside (0, 1), got density {density}, epsilon {epsilon}"
        )
    generator = module_generator(check_seed(seed), terms)
    return lambda task: magprune_mask(task, density, epsilon, generator)


@method(name="breadcrumbs", paper=BREADCRUMBS, dense=True, truncates=True, every_adapter=True)
def breadcrumbs(
    terms,
    *,
    rule: RankRule,
    density: float = 0.9,
    gamma: float = 0.01,
    normalize: bool = False,
    rescale: bool = False,
    lambda_: float = 1.0,
    space: str = "dense",
) -> Factors:
    """Model Breadcrumbs: drop each ΔWᵢ's largest (gamma) and smallest entries, keep density, weighted sum."""
    keep = _outliers(density, gamma)
    flags = dict(normalize=normalize, rescale=rescale, lambda_=lambda_, space=space)
    return _merge(terms, rule, keep, consensus=False, **flags)


@method(name="breadcrumbs_ties", paper=BREADCRUMBS, dense=True, truncates=True, every_adapter=True)
def breadcrumbs_ties(
    terms,
    *,
    rule: RankRule,
    density: float = 0.9,
    gamma: float = 0.01,
    normalize: bool = False,
    rescale: bool = False,
    lambda_: float = 1.0,
    space: str = "dense",
) -> Factors:
    """Breadcrumbs sparsification, then TIES sign consensus (mergekit breadcrumbs_ties)."""
    keep = _outliers(density, gamma)
    flags = dict(normalize=normalize, rescale=rescale, lambda_=lambda_, space=space)
    return _merge(terms, rule, keep, consensus=True, **flags)


@method(name="della", paper=DELLA, dense=True, truncates=True, every_adapter=True)
def della(
    terms,
    *,
    rule: RankRule,
    density: float = 0.5,
    epsilon: float = 0.15,
    normalize: bool = True,
    rescale: bool = True,
    lambda_: float = 1.0,
    seed: int = 0,
    space: str = "dense",
) -> Factors:
    """DELLA: magnitude-ranked random drop (MagPrune), L1 rescale, TIES sign consensus, normalised (seeded)."""
    keep = _magprune(terms, density, epsilon, seed)
    flags = dict(normalize=normalize, rescale=rescale, lambda_=lambda_, space=space)
    return _merge(terms, rule, keep, consensus=True, **flags)


@method(name="della_linear", paper=DELLA, dense=True, truncates=True, every_adapter=True)
def della_linear(
    terms,
    *,
    rule: RankRule,
    density: float = 0.5,
    epsilon: float = 0.15,
    normalize: bool = False,
    rescale: bool = True,
    lambda_: float = 1.0,
    seed: int = 0,
    space: str = "dense",
) -> Factors:
    """DELLA's MagPrune and L1 rescale, then a weighted sum without sign consensus (seeded)."""
    keep = _magprune(terms, density, epsilon, seed)
    flags = dict(normalize=normalize, rescale=rescale, lambda_=lambda_, space=space)
    return _merge(terms, rule, keep, consensus=False, **flags)


def sce_merge(tasks: list[torch.Tensor], select_topk: float) -> torch.Tensor:
    """SCE over same-shaped task tensors (weights already applied): select, calculate, erase, weighted mean."""
    stack = torch.stack(tasks)
    if select_topk < 1:
        variance = stack.var(0, unbiased=False)
        k = int(int(torch.count_nonzero(variance)) * select_topk)
        keep = torch.zeros(variance.numel(), dtype=torch.bool, device=stack.device)
        if k:
            keep[variance.reshape(-1).topk(k).indices] = True
        stack = stack * keep.view_as(variance)
    energy = stack.square().reshape(len(tasks), -1).mean(1)
    total = energy.sum()
    shares = energy / total if total > 0 else torch.full_like(energy, 1 / len(tasks))
    agree = stack.sign() == torch.where(stack.sum(0) >= 0, 1.0, -1.0).to(stack.dtype)
    w = shares.view(-1, *([1] * (stack.dim() - 1))) * agree
    return (stack * w).sum(0) / w.sum(0).clamp(min=1e-6)


@method(
    name="sce",
    paper=f"Wan et al. 2024, FuseChat (SCE), arXiv:2408.07990; mergekit; {CORE}",
    dense=True,
    truncates=True,
    every_adapter=True,
)
def sce(terms, *, rule: RankRule, select_topk: float = 1.0, space: str = "dense") -> Factors:
    """SCE: keep the top-variance entries, weight tasks by mean square, erase sign conflicts, weighted mean."""
    select_topk = check_density(select_topk)
    tasks, finish = task_space(terms, [t.coef for t in terms], space)
    merged = sce_merge(tasks, select_topk)
    del tasks
    return finish(merged, rule)
