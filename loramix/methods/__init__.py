"""Merge methods. Each is one function decorated with `@method` in its family's module (see `methods.registry`);
importing this package registers them all. Families: exact (`cat`, `svd`), mixing (`linear`), interference
(`ties`, `magnitude_prune`, `dare_linear`, `dare_ties`), subspace (`tsv`, `iso_c`, `iso_cts`, `knots`, `star`),
regression (`regmean`, `lot`, `wudi`), mergekit's task arithmetic (`breadcrumbs`, `breadcrumbs_ties`, `della`,
`della_linear`, `sce`) and spherical (`slerp`, `nuslerp`, `multislerp`, `karcher`, `model_stock`).
"""

from loramix.methods import (  # noqa: F401 — each registers its methods
    exact,
    interference,
    mixing,
    regression,
    spherical,
    subspace,
    task_arithmetic,
)
from loramix.methods.registry import REGISTRY, Method, Term, absent_as_zero, get_method, method

__all__ = ["REGISTRY", "Method", "Term", "absent_as_zero", "get_method", "method"]
