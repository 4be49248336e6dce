"""Interference-aware merges: TIES, magnitude prune, DARE (linear and TIES), dense or in Core Space.

Each adapter's task vector is τᵢ = sᵢ·Bᵢ·Aᵢ (its own scale, without its weight wᵢ); the element-wise rules are
in `loramix.methods._elementwise`. ``space="dense"`` applies the rule to each module's out×in ΔWᵢ (formed one
module at a time) and re-factorises the result by a full SVD, like PEFT's ``*_svd`` combinations.
``space="core"`` (Panariello et al. 2025, Core Space) applies it to the small core matrices Mᵢ = U_Bᵀ·τᵢ·V_A, where
U_B is an orthonormal basis of the joint column space of the Bᵢ and V_A of the joint row space of the Aᵢ (left/right
singular vectors of the stacked factors, signs fixed); the merged ΔW = U_B·M·V_Aᵀ is never formed, and a linear
rule there is lossless.
"""

from __future__ import annotations

from loramix.linalg import Factors, RankRule
from loramix.methods._elementwise import (
    check_choice,
    check_density,
    check_seed,
    merge_elementwise,
    module_generator,
    split_weights,
    task_space,
)
from loramix.methods.registry import method
from loramix.settings import MAJORITY_SIGNS

CORE = "core: Panariello et al. 2025, arXiv:2509.17786"


def _merge_terms(
    terms,
    *,
    rule: RankRule,
    kind: str,
    density: float = 1.0,
    majority_sign: str = "total",
    seed: int = 0,
    space: str = "dense",
) -> Factors:
    """Apply rule ``kind`` to the module's task vectors in ``space`` and return truncated balanced factors."""
    density = check_density(density)
    check_choice("majority_sign", majority_sign, MAJORITY_SIGNS)
    generator = module_generator(check_seed(seed), terms) if kind.startswith("dare") else None
    scales, weights = split_weights(terms)
    tasks, finish = task_space(terms, scales, space)
    merged = merge_elementwise(
        tasks, weights, kind=kind, density=density, majority_sign=majority_sign, generator=generator
    )
    del tasks
    return finish(merged, rule)


@method(
    name="ties",
    paper=f"Yadav et al. 2023, TIES-Merging, arXiv:2306.01708; {CORE}",
    dense=True,
    truncates=True,
)
def ties(terms, *, rule: RankRule, density: float = 0.2, majority_sign: str = "total", space: str = "dense"):
    """TIES: trim to top-density |ΔWᵢ|, elect signs, disjoint mean (PEFT ties_svd)."""
    return _merge_terms(terms, rule=rule, kind="ties", density=density, majority_sign=majority_sign, space=space)


@method(
    name="magnitude_prune",
    paper=f"Yadav et al. 2023, TIES trim, arXiv:2306.01708; {CORE}",
    dense=True,
    truncates=True,
)
def magnitude_prune(terms, *, rule: RankRule, density: float = 0.2, space: str = "dense"):
    """Keep top-density |ΔWᵢ| of each task, weighted sum (PEFT magnitude_prune_svd)."""
    return _merge_terms(terms, rule=rule, kind="magnitude_prune", density=density, space=space)


@method(name="dare_linear", paper=f"Yu et al. 2024, DARE, arXiv:2311.03099; {CORE}", dense=True, truncates=True)
def dare_linear(terms, *, rule: RankRule, density: float = 0.5, seed: int = 0, space: str = "dense"):
    """DARE: drop entries with p=1-density, rescale by 1/density, weighted sum (seeded)."""
    return _merge_terms(terms, rule=rule, kind="dare_linear", density=density, seed=seed, space=space)


@method(name="dare_ties", paper=f"Yu et al. 2024, DARE, arXiv:2311.03099; {CORE}", dense=True, truncates=True)
def dare_ties(
    terms,
    *,
    rule: RankRule,
    density: float = 0.5,
    majority_sign: str = "total",
    seed: int = 0,
    space: str = "dense",
):
    """DARE drop-and-rescale, then TIES sign election and disjoint mean (seeded)."""
    return _merge_terms(
        terms, rule=rule, kind="dare_ties", density=density, majority_sign=majority_sign, seed=seed, space=space
    )
