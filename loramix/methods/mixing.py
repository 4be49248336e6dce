"""Factor mixing: A and B combined separately (PEFT's `linear`).

B = Σ √|cᵢ|·Bᵢ and A = Σ sign(cᵢ)·√|cᵢ|·Aᵢ, so B·A = Σ cᵢ·Bᵢ·Aᵢ + Σ_{i≠j} √|cᵢcⱼ|·sign(cⱼ)·Bᵢ·Aⱼ: the cross terms
make it inexact whenever more than one adapter touches a module. (LoRAHub's own composition mixes √-scaled
factors with the weights outside the root; it is `loramix.weight_search`'s ``lorahub`` composition, not this method.)
"""

from __future__ import annotations

import math

from loramix.errors import IncompatibleAdaptersError
from loramix.lazy import lazy
from loramix.linalg import Factors, RankRule
from loramix.methods.base import method

torch = lazy("torch")


def mixing_coefficients(coefs: list[float]) -> tuple[list[float], list[float]]:
    """Per-term multipliers (for B, for A) of LoRAHub/PEFT mixing."""
    roots = [math.sqrt(abs(c)) for c in coefs]
    return roots, [r if c >= 0 else -r for r, c in zip(roots, coefs)]


@method(name="linear", equal_ranks=True)
def linear(terms, *, rule: RankRule) -> Factors:
    """PEFT's add_weighted_adapter A/B mixing; inexact: cross terms Bᵢ·Aⱼ."""
    ranks = {t.A.shape[0] for t in terms}
    if len(ranks) > 1:
        raise IncompatibleAdaptersError(f"method linear needs equal ranks, got {sorted(ranks)}; use cat or svd")
    b_mult, a_mult = mixing_coefficients([t.coef for t in terms])
    B = sum(m * t.B.float() for m, t in zip(b_mult, terms))
    A = sum(m * t.A.float() for m, t in zip(a_mult, terms))
    return Factors(B, A)
