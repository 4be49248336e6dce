"""Factor mixing: A and B combined separately (PEFT's `linear`).

B = Σ √|cᵢ|·Bᵢ and A = Σ sign(cᵢ)·√|cᵢ|·Aᵢ, so B·A = Σ cᵢ·Bᵢ·Aᵢ + Σ_{i≠j} √|cᵢcⱼ|·sign(cⱼ)·Bᵢ·Aⱼ: the cross terms
make it inexact whenever more than one adapter touches a module. LoRAHub's own composition (`lorahub`, the
search's default) mixes √-scaled factors with the weights outside the root: B = Σ wᵢ·√sᵢ·Bᵢ, A = Σ wᵢ·√sᵢ·Aᵢ.
"""

from __future__ import annotations

import math

from loramix.errors import IncompatibleAdaptersError
from loramix.lazy import lazy
from loramix.linalg import Factors, RankRule
from loramix.methods._elementwise import split_weights
from loramix.methods.registry import method

torch = lazy("torch")


def mixing_coefficients(coefs: list[float]) -> tuple[list[float], list[float]]:
    """Per-term multipliers (for B, for A) of LoRAHub/PEFT mixing."""
    roots = [math.sqrt(abs(c)) for c in coefs]
    return roots, [r if c >= 0 else -r for r, c in zip(roots, coefs)]


@method(name="linear", equal_ranks=True)
def linear(terms, *, rule: RankRule) -> Factors:
    """PEFT's add_weighted_adapter A/B mixing; inexact: cross terms Bᵢ·Aⱼ."""
    _check_equal_ranks("linear", terms)
    b_mult, a_mult = mixing_coefficients([t.coef for t in terms])
    B = sum(m * t.B.float() for m, t in zip(b_mult, terms))
    A = sum(m * t.A.float() for m, t in zip(a_mult, terms))
    return Factors(B, A)


@method(name="lorahub", paper="Huang et al. 2023, LoraHub, arXiv:2307.13269", equal_ranks=True)
def lorahub(terms, *, rule: RankRule) -> Factors:
    """LoRAHub's composition (what `loramix search` finds weights for): B = Σ wᵢ√sᵢBᵢ, A = Σ wᵢ√sᵢAᵢ; inexact."""
    _check_equal_ranks("lorahub", terms)
    scales, weights = split_weights(terms)
    B = sum(w * math.copysign(math.sqrt(abs(s)), s) * t.B.float() for w, s, t in zip(weights, scales, terms))
    A = sum(w * math.sqrt(abs(s)) * t.A.float() for w, s, t in zip(weights, scales, terms))
    return Factors(B, A)


def _check_equal_ranks(name: str, terms) -> None:
    ranks = {t.A.shape[0] for t in terms}
    if len(ranks) > 1:
        raise IncompatibleAdaptersError(f"method {name} needs equal ranks, got {sorted(ranks)}; use cat or svd")
