"""Merge methods. Each is one function decorated with `@method` in its family's module (see `methods.base`);
importing this package registers them all. Families: exact (`cat`, `svd`), mixing (`linear`), interference
(`ties`, `magnitude_prune`, `dare_linear`, `dare_ties`), subspace (`tsv`, `iso_c`, `iso_cts`, `knots`).
"""

from loramix.methods import exact, interference, mixing, subspace  # noqa: F401 — each registers its methods
from loramix.methods.base import REGISTRY, Method, Term, get_method, method

__all__ = ["REGISTRY", "Method", "Term", "get_method", "method"]
