"""Typed settings, one source: every closed choice a run takes as a `Literal` (its tuple is the library's registry of
it, the CLI's `click.Choice` and a recipe's check alike), and the small frozen values a run passes whole — how sources
are loaded (`LoadOptions`), where it computes (`Compute`), the base a result is merged into (`MergeTarget`, its
`QuantizedBase`), the adapter file written (`AdapterOutput`). Their field names are unique across them: a plan
(`loramix.plans`) holds them whole, and its recipe and flags name their fields flat. Torch-free: ``loramix --help``
builds its choices from here.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated, Literal, get_args

from loramix import writers
from loramix.errors import SettingError

Heads = Literal["refuse", "average", "drop"]  # heads (modules_to_save) several adapters carry
RankLayout = Literal["portable", "exact"]  # one rank every engine reads, or each module's own
KohyaRule = Literal["sv_ratio", "sv_fro", "sv_cumulative"]  # kohya-ss resize_lora's rank rules
QuantizedAs = Literal["nf4", "fp4", "fp8", "mxfp4", "none"]  # the quantized base's round trip ("none": no round trip)
RoundTrip = Literal["all", "targeted"]  # which weights a quantized round trip touches
MergedFormat = Literal["gguf", "safetensors"]  # a merged checkpoint's files: a llama.cpp GGUF or a transformers folder
Space = Literal["dense", "core"]  # where element-wise methods work
MajoritySign = Literal["total", "frequency"]  # TIES' sign election
Composition = Literal["lorahub", "delta"]  # how a search composes adapters
Optimizer = Literal["cobyla", "cma", "adam"]
Objective = Literal["cross-entropy", "entropy"]
Granularity = Literal["module", "layer"]  # what a subset search keeps or drops (`loramix.weight_search.subset`)

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


def input_field(default=dataclasses.MISSING):
    """A field naming inputs (folders, files, Hub ids): relative to a recipe's folder when read, to the output folder
    when written, and never overwritten by an output."""
    return dataclasses.field(default=default, metadata={"source": True})


@dataclass(frozen=True)
class Compute:
    """Where a run computes (``device``) and the dtype it stores (None: the inputs', or a merge's base's)."""

    device: str = "auto"
    dtype: str | None = None


@dataclass(frozen=True)
class LoadOptions:
    """How every source of a run is loaded: what a plain LoRA state dict does not say (``scale`` or ``alpha``,
    ``base_model``, ``module_map``), whether NaN/Inf is accepted, and whether adapters of different bases combine."""

    scale: float | None = None
    alpha: float | None = None
    base_model: str | None = None
    module_map: dict | str | None = input_field(None)
    allow_nonfinite: bool = False
    allow_different_bases: bool = False

    def per_source(self) -> dict | None:
        """The state-dict options `loramix.formats.load_adapter` takes for each source (None: none given)."""
        given = {"scale": self.scale, "alpha": self.alpha, "base_model": self.base_model, "module_map": self.module_map}
        return {k: v for k, v in given.items() if v is not None} or None


@dataclass(frozen=True)
class QuantizedBase:
    """How a QLoRA's base was quantized while it trained (None: the base's or adapter's quantization_config): the
    4-bit or FP8 round trip of a merge (``round_trip``: every quantized weight or the targeted ones only)."""

    quantized_as: QuantizedAs | None = None
    double_quant: bool | None = None
    blocksize: int | None = None
    round_trip: RoundTrip = "all"


@dataclass(frozen=True)
class MergeTarget:
    """The base a result is merged into (``merge_into``; None: an adapter is written) and how its checkpoint is
    written: shards, merge workers, the quantized base's round trip, and ``merged_format`` (None: the base's own
    files; "safetensors": a GGUF base written as the transformers folder it holds)."""

    merge_into: str | None = input_field(None)
    shard_size: str | None = None
    workers: int | None = None
    quantized: QuantizedBase = QuantizedBase()
    merged_format: MergedFormat | None = None

    def __post_init__(self) -> None:
        workers = self.workers
        if workers is not None and (isinstance(workers, bool) or not isinstance(workers, int) or workers < 1):
            raise SettingError(f"workers must be a positive int (tensors merged at once), got {workers!r}")
        if self.merged_format not in (None, *MERGED_FORMATS):
            raise SettingError(f"merged_format must be one of {', '.join(MERGED_FORMATS)}, got {self.merged_format!r}")


@dataclass(frozen=True)
class AdapterOutput:
    """The adapter file written into an output folder: its ``format`` (`loramix.writers`; None: the command's
    default), ``rank_layout`` (for the formats that lay ranks out; None: portable) and, for GGUF, ``gguf_base``, the
    base whose config names the architecture."""

    format: Format | None = None
    rank_layout: RankLayout | None = None
    gguf_base: str | None = input_field(None)

    @property
    def writer(self) -> writers.Writer:
        return writers.get(self.format or "peft")

    def write_options(self, path: str, base: str | None = None) -> dict:
        """The keyword options of `loramix.formats.write_adapter` for this output written to ``path`` (format,
        layout, file name, and the GGUF base: ``gguf_base``, else ``base``)."""
        layout = self.rank_layout or "portable"
        return {"format": self.format or "peft", **self.writer.options(path, layout, self.gguf_base or base)}
