"""Typed settings, one source: every closed choice a run takes as a `Literal` (its tuple is the library's registry of
it, the CLI's `click.Choice` and a recipe's check alike), and the small frozen values a run passes whole — how
sources are loaded (`LoadOptions`), the base a result is merged into (`MergeTarget`), the adapter file written
(`AdapterOutput`). Torch-free: ``loramix --help`` builds its choices from here.
"""

from __future__ import annotations

import math
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated, Literal, get_args

from loramix import writers

Heads = Literal["refuse", "average", "drop"]  # heads (modules_to_save) several adapters carry
RankLayout = Literal["portable", "exact"]  # one rank every engine reads, or each module's own
KohyaRule = Literal["sv_ratio", "sv_fro", "sv_cumulative"]  # kohya-ss resize_lora's rank rules
QuantizedAs = Literal["nf4", "fp4", "fp8", "none"]  # the quantized base's round trip ("none": no round trip)
RoundTrip = Literal["all", "targeted"]  # which weights a quantized round trip touches
MergedFormat = Literal["gguf", "safetensors"]  # a merged checkpoint's files: a llama.cpp GGUF or a transformers folder
Space = Literal["dense", "core"]  # where element-wise methods work
MajoritySign = Literal["total", "frequency"]  # TIES' sign election
Composition = Literal["lorahub", "delta"]  # how a search composes adapters
Optimizer = Literal["cobyla", "cma", "adam"]
Objective = Literal["cross-entropy", "entropy"]

HEADS: tuple[str, ...] = get_args(Heads)
RANK_LAYOUTS: tuple[str, ...] = get_args(RankLayout)
KOHYA_RULES: tuple[str, ...] = get_args(KohyaRule)
QUANTIZED_AS: tuple[str, ...] = get_args(QuantizedAs)
ROUND_TRIPS: tuple[str, ...] = get_args(RoundTrip)
MERGED_FORMATS: tuple[str, ...] = get_args(MergedFormat)
SPACES: tuple[str, ...] = get_args(Space)
MAJORITY_SIGNS: tuple[str, ...] = get_args(MajoritySign)
COMPOSITIONS: tuple[str, ...] = get_args(Composition)
OPTIMIZERS: tuple[str, ...] = get_args(Optimizer)
OBJECTIVES: tuple[str, ...] = get_args(Objective)


@dataclass(frozen=True)
class OneOf:
    """A choice whose names a registry holds and may grow (output formats): ``Annotated[str, OneOf(names)]``."""

    names: Callable[[], tuple[str, ...]]


Format = Annotated[str, OneOf(writers.names)]  # an output format (`loramix.writers`)
ModelFormat = Annotated[str, OneOf(lambda: writers.names(diffusion=False))]  # a format for a model's LoRA


def choices(hint) -> tuple[str, ...] | None:
    """The closed choices of a field's type hint (a `Literal`, a `OneOf`, either of them or None), else None."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        found = [c for h in get_args(hint) if (c := choices(h)) is not None]
        return found[0] if found else None
    if typing.get_origin(hint) is Literal:
        return get_args(hint)
    if typing.get_origin(hint) is Annotated:
        return next((m.names() for m in hint.__metadata__ if isinstance(m, OneOf)), None)
    return None


def fits(value, hint) -> bool:
    """Whether ``value`` (as YAML or a keyword gives it) fits a type hint: a `Literal`/`OneOf` one of its choices, a
    bool no number, numbers finite, containers of fitting items."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return any(fits(value, h) for h in get_args(hint))
    if origin in (Literal, Annotated):
        return value in choices(hint)
    if hint is type(None):
        return value is None
    if origin is list:
        (item,) = get_args(hint)
        return isinstance(value, list) and all(fits(v, item) for v in value)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is typing.Any:
        return True
    return isinstance(value, origin or hint)


def wrong(name: str, value, hint) -> str:
    """The one-line reason ``value`` does not fit field ``name``: its choices when it has some, else its type."""
    named = choices(hint)
    if named is not None:
        return f"{name} must be one of {', '.join(named)}, got {value!r}"
    return f"{name} has the wrong type ({value!r})"


def named(value):
    """A dtype or device object as the name a plan and its recipe hold (torch.float16 → "float16"); plain values
    (text, numbers, lists, mappings, None) as they are."""
    plain = (str, int, float, bool, list, dict, type(None))
    return value if isinstance(value, plain) else str(value).removeprefix("torch.")


@dataclass(frozen=True)
class LoadOptions:
    """How every source of a run is loaded: what a plain LoRA state dict does not say (``scale`` or ``alpha``,
    ``base_model``, ``module_map``), whether NaN/Inf is accepted, and whether adapters of different bases combine."""

    scale: float | None = None
    alpha: float | None = None
    base_model: str | None = None
    module_map: dict | str | None = None
    allow_nonfinite: bool = False
    allow_different_bases: bool = False

    def per_source(self) -> dict | None:
        """The state-dict options `loramix.formats.load_adapter` takes for each source (None: none given)."""
        given = {"scale": self.scale, "alpha": self.alpha, "base_model": self.base_model, "module_map": self.module_map}
        return {k: v for k, v in given.items() if v is not None} or None


@dataclass(frozen=True)
class MergeTarget:
    """The base a result is merged into and how its checkpoint is written: ``dtype`` (None: the base's), shards,
    merge workers, a QLoRA's 4-bit round trip (``quantized_as``, ``double_quant``, ``blocksize``, ``round_trip``;
    None: the base's or adapter's quantization_config), and ``merged_format`` (None: the base's own files; a GGUF
    base written as a transformers safetensors folder with "safetensors")."""

    base: str
    dtype: str | None = None
    shard_size: str | None = None
    workers: int | None = None
    quantized_as: QuantizedAs | None = None
    double_quant: bool | None = None
    blocksize: int | None = None
    round_trip: RoundTrip = "all"
    merged_format: MergedFormat | None = None


@dataclass(frozen=True)
class AdapterOutput:
    """The adapter file written into an output folder: its ``format`` (`loramix.writers`), ``rank_layout`` (for the
    formats that lay ranks out), ``dtype`` (None: the adapter's) and, for GGUF, the ``base`` naming the architecture."""

    path: str
    format: str = "peft"
    rank_layout: RankLayout = "portable"
    dtype: str | None = None
    base: str | None = None

    @property
    def writer(self) -> writers.Writer:
        return writers.get(self.format)

    def write_options(self) -> dict:
        """The keyword options of `loramix.formats.write_adapter` for this output (format, layout, file name, base)."""
        return {"format": self.format, **self.writer.options(self.path, self.rank_layout, self.base)}
