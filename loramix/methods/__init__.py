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
from loramix.methods import exact, mixing


@dataclass(frozen=True)
class Term:
    coef: float
    B: torch.Tensor
    A: torch.Tensor


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
    )
}


def get_method(name: str) -> Method:
    try:
        return REGISTRY[name]
    except KeyError:
        raise MethodError(f"unknown method {name!r}; choose from {', '.join(REGISTRY)}") from None
