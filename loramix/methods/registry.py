"""What a merge method is: a function over one module's terms that returns new factors, registered where it is
defined by `@method`, its options read from its keyword-only parameters.

A term is one adapter's contribution to a module, ``coef·B·A`` with ``coef = weight·scale``. A method returns
`loramix.linalg.Factors`: ``B, A`` whose product (scale 1) is the merged ΔW, and the share of energy kept when it
truncated a spectrum. Methods know nothing of files, names or devices beyond
the tensors they are given. Every method takes ``rule`` (a `loramix.linalg.RankRule`, used by the methods that
truncate); its other keyword-only parameters, with their defaults, are its options. A parameter named after a Python
keyword with a trailing underscore (``lambda_``) is the option without it (``lambda``, as mergekit spells it).
"""

from __future__ import annotations

import inspect
import keyword
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

from loramix.errors import MethodDefinitionError, MethodError
from loramix.linalg import Factors, RankRule

# The rank rule of a dense merge (space="dense") given none: the smallest rank holding 99% of each module's Σσ².
DENSE_ENERGY = 0.99


@dataclass(frozen=True)
class Term:
    """One adapter on one module: ΔW contribution ``coef·B·A`` (``coef = weight·scale``)."""

    coef: float
    B: Any  # torch.Tensor, out×r
    A: Any  # torch.Tensor, r×in
    weight: float | None = None  # the weight alone (coef = weight·scale), for methods that apply it apart
    gram: Any = None  # data-aware methods: the module's input Gram matrix XᵀX/N (in×in) in this adapter's model


@dataclass(frozen=True)
class Method:
    """A registered merge method. ``description`` is the first line of the function's docstring; ``defaults``
    maps each option to its default value."""

    name: str
    fn: Callable[..., tuple[Any, Any]]
    description: str
    paper: str
    exact: bool
    equal_ranks: bool = False
    dense: bool = False
    truncates: bool = False
    every_adapter: bool = False
    data: bool = False
    defaults: dict[str, Any] = field(default_factory=dict)

    @property
    def options(self) -> tuple[str, ...]:
        return tuple(self.defaults)

    @property
    def space(self) -> str | None:
        """Where the method works by default: "dense" (each out×in ΔW) or "core" (the small core matrices of the
        joint factor bases); None for a method in factor space alone (cat, svd, tsv, ...)."""
        return self.defaults.get("space", "dense") if self.dense else None

    def settings(self, options: dict[str, Any]) -> dict[str, Any]:
        """Every option the method runs with: ``options`` over its defaults."""
        return {**self.defaults, **options}

    def rule_for(self, rule: RankRule, options: dict[str, Any]) -> RankRule:
        """The rank rule a combine applies: ``rule`` as given, or, when none is given to a dense merge (its
        ``space`` is "dense"), the smallest rank holding `DENSE_ENERGY` of each module's Σσ²."""
        unset = replace(rule, conv_rank=None) == RankRule()
        if unset and self.dense and self.settings(options).get("space") == "dense":
            return RankRule(energy=DENSE_ENERGY, conv_rank=rule.conv_rank)
        return rule

    def apply(self, terms: list[Term], *, rule, **options) -> Factors:
        """Run the method on one module's terms; a function returning a plain ``(B, A)`` counts as untruncated."""
        result = self.fn(terms, rule=rule, **{_parameter(k): v for k, v in options.items()})
        return result if isinstance(result, Factors) else Factors(*result)

    def check_options(self, options: dict[str, Any]) -> None:
        unknown = sorted(set(options) - set(self.defaults))
        if unknown:
            allowed = ", ".join(self.defaults) or "none"
            raise MethodError(f"method {self.name} has no option(s) {', '.join(unknown)} (it takes: {allowed})")


REGISTRY: dict[str, Method] = {}


def method(
    *,
    name: str,
    paper: str = "",
    exact: bool = False,
    truncates: bool = False,
    dense: bool = False,
    equal_ranks: bool = False,
    every_adapter: bool = False,
    data: bool = False,
) -> Callable:
    """Register the decorated function as merge method ``name``; its keyword-only parameters other than ``rule``
    become the method's options, with their defaults. With ``every_adapter`` a combine gives it a term for every
    adapter, in order, a zero one where an adapter lacks the module (`absent_as_zero`). A ``data`` method needs each
    term's ``gram``, the module's input Gram matrix collected from forward passes over examples: its options name
    the ``base`` and the ``examples`` (`loramix.weight_search.grams` collects them)."""

    def register(fn: Callable) -> Callable:
        if name in REGISTRY:
            raise MethodDefinitionError(f"method {name} is registered twice")
        if data and not every_adapter:
            raise MethodDefinitionError(
                f"method {name}: a data method fits every adapter's model, so it takes every_adapter"
            )
        parameters = inspect.signature(fn).parameters.values()
        named = [p for p in parameters if p.kind is inspect.Parameter.KEYWORD_ONLY]
        if not any(p.name == "rule" for p in named):
            raise MethodDefinitionError(f"method {name}: the function must take a keyword-only 'rule'")
        missing = [p.name for p in named if p.name != "rule" and p.default is inspect.Parameter.empty]
        if missing:
            raise MethodDefinitionError(f"method {name}: option(s) {', '.join(missing)} need a default")
        REGISTRY[name] = Method(
            name=name,
            fn=fn,
            description=(inspect.getdoc(fn) or "").splitlines()[0].rstrip("."),
            paper=paper,
            exact=exact,
            equal_ranks=equal_ranks,
            every_adapter=every_adapter,
            data=data,
            dense=dense,
            truncates=truncates,
            defaults={_option(p.name): p.default for p in named if p.name != "rule"},
        )
        return fn

    return register


def absent_as_zero(terms: list[Term], weights: list[float], has: list[bool]) -> list[Term]:
    """One term per adapter, in order: ``terms`` (those of the adapters with ``has`` true) and, for the others, a zero
    update (rank 1, zero factors) with the adapter's weight — what mergekit sees of a fine-tuned model that left the
    weight alone: ΔWᵢ = 0, its weight still counted where a method normalises by the weights."""
    given = iter(terms)
    B, A = terms[0].B, terms[0].A
    return [
        next(given) if present else Term(w, B.new_zeros(B.shape[0], 1), A.new_zeros(1, A.shape[1]), weight=w)
        for w, present in zip(weights, has)
    ]


def _option(parameter: str) -> str:
    """The option a keyword-only parameter stands for: ``lambda_`` → ``lambda``, any other name as it is."""
    bare = parameter[:-1]
    return bare if parameter.endswith("_") and keyword.iskeyword(bare) else parameter


def _parameter(option: str) -> str:
    """The parameter an option is passed as: ``lambda`` → ``lambda_``."""
    return option + "_" if keyword.iskeyword(option) else option


def get_method(name: str) -> Method:
    try:
        return REGISTRY[name]
    except KeyError:
        raise MethodError(f"unknown method {name!r}; choose from {', '.join(REGISTRY)}") from None
