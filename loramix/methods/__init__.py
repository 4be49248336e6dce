"""Merge methods. Each is one function over one module's terms returning new factors, plus one registry line.

A term is one adapter's contribution to a module: ``coef·B·A`` with ``coef = weight·scale``. A method returns
factors ``(B, A)`` whose product (scale 1) is the merged ΔW. Methods know nothing of files, names or devices
beyond the tensors they are given.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from loramix.errors import MethodError
from loramix.methods import exact, interference, mixing, subspace


@dataclass(frozen=True)
class Term:
    coef: float
    B: torch.Tensor
    A: torch.Tensor
    weight: float | None = None  # the weight alone (coef = weight·scale), for methods that apply it apart


@dataclass(frozen=True)
class Method:
    name: str
    fn: Callable[..., tuple[torch.Tensor, torch.Tensor]]
    description: str
    paper: str
    exact: bool
    equal_ranks: bool = False
    dense: bool = False
    truncates: bool = False
    options: tuple[str, ...] = ()


REGISTRY: dict[str, Method] = {
    m.name: m
    for m in (
        Method("cat", exact.cat, "exact Σ wᵢ·sᵢ·Bᵢ·Aᵢ as concatenated factors (rank Σ rᵢ)", "", exact=True),
        Method(
            "svd",
            exact.svd,
            "the exact sum re-factorised in factor space and truncated (Eckart–Young optimal rank k)",
            "Eckart & Young 1936",
            exact=True,
            truncates=True,
        ),
        Method(
            "linear",
            mixing.linear,
            "PEFT's A/B mixing (the form LoRAHub searches over); inexact: cross terms Bᵢ·Aⱼ",
            "Huang et al. 2023, LoRAHub, arXiv:2307.13269",
            exact=False,
            equal_ranks=True,
        ),
        Method(
            "ties",
            interference.ties,
            "TIES: trim to top-density |ΔWᵢ|, elect signs, disjoint mean (PEFT ties_svd)",
            "Yadav et al. 2023, TIES-Merging, arXiv:2306.01708; core: Panariello et al. 2025, arXiv:2509.17786",
            exact=False,
            dense=True,
            truncates=True,
            options=("density", "majority_sign", "space"),
        ),
        Method(
            "magnitude_prune",
            interference.magnitude_prune,
            "keep top-density |ΔWᵢ| of each task, weighted sum (PEFT magnitude_prune_svd)",
            "Yadav et al. 2023, TIES trim, arXiv:2306.01708; core: Panariello et al. 2025, arXiv:2509.17786",
            exact=False,
            dense=True,
            truncates=True,
            options=("density", "space"),
        ),
        Method(
            "dare_linear",
            interference.dare_linear,
            "DARE: drop entries with p=1-density, rescale by 1/density, weighted sum (seeded)",
            "Yu et al. 2024, DARE, arXiv:2311.03099; core: Panariello et al. 2025, arXiv:2509.17786",
            exact=False,
            dense=True,
            truncates=True,
            options=("density", "seed", "space"),
        ),
        Method(
            "dare_ties",
            interference.dare_ties,
            "DARE drop-and-rescale, then TIES sign election and disjoint mean (seeded)",
            "Yu et al. 2024, DARE, arXiv:2311.03099; core: Panariello et al. 2025, arXiv:2509.17786",
            exact=False,
            dense=True,
            truncates=True,
            options=("density", "majority_sign", "seed", "space"),
        ),
        Method(
            "tsv",
            subspace.tsv,
            "Task Singular Vectors: each task's top singular vectors, decorrelated (orthonormalised)",
            "Gargiulo et al. 2025, TSV-Merge, arXiv:2412.00081",
            exact=False,
            truncates=True,
        ),
        Method(
            "iso_c",
            subspace.iso_c,
            "Iso-C: SVD of the sum with a flat spectrum (mean σ) within its numerical rank",
            "Marczak et al. 2025, Iso-C, arXiv:2502.04959",
            exact=False,
            truncates=True,
        ),
        Method(
            "iso_cts",
            subspace.iso_cts,
            "Iso-CTS: common subspace of the sum plus task-specific directions, flat spectrum",
            "Marczak et al. 2025, Iso-CTS, arXiv:2502.04959",
            exact=False,
            truncates=True,
            options=("common_fraction",),
        ),
        Method(
            "knots",
            subspace.knots,
            "KnOTS: SVD of the concatenated updates, TIES/DARE on the task-specific ΣVᵢᵀ",
            "Stoica et al. 2025, KnOTS, arXiv:2410.19735",
            exact=False,
            truncates=True,
            options=("merge", "density", "majority_sign", "seed"),
        ),
    )
}


def get_method(name: str) -> Method:
    try:
        return REGISTRY[name]
    except KeyError:
        raise MethodError(f"unknown method {name!r}; choose from {', '.join(REGISTRY)}") from None
