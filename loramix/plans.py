"""One plan per command: what its CLI flags and its YAML recipe both build, what `loramix.run` dispatches on, and what
the command writes beside its output as the recipe that re-runs it (`loramix.recipe`).

A plan's fields are the one declaration of its settings: their types (the `Literal`s and registries of
`loramix.settings`) validate a recipe and give the CLI its choices; fields marked `source` are inputs (folders,
files, Hub ids) that a recipe names relative to itself and that the output never overwrites. Each plan hands its
settings on whole: `rank_rule`, `load_options`, `target` (the base merged into), `adapter_output`.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from typing import ClassVar

import yaml

from loramix.errors import MethodError
from loramix.linalg import RankRule
from loramix.settings import (
    AdapterOutput,
    Composition,
    Format,
    Heads,
    KohyaRule,
    LoadOptions,
    MergedFormat,
    MergeTarget,
    ModelFormat,
    Objective,
    Optimizer,
    QuantizedAs,
    RankLayout,
    RoundTrip,
)


def input_field(default=dataclasses.MISSING):
    """A field naming inputs: relative to a recipe's folder when read, to the output folder when written."""
    return field(default=default, metadata={"source": True})


class Settings:
    """What every plan shares: its command name, its fields' hints, its sources, its rank rule."""

    command: ClassVar[str]
    writes_folder: ClassVar[bool] = True  # its output is a folder (analyze's, an optional JSON file)
    output: str | None

    @classmethod
    def hints(cls) -> dict:
        """Each field's type hint (what a recipe's value must fit)."""
        hints = typing.get_type_hints(cls, include_extras=True)
        return {f.name: hints[f.name] for f in dataclasses.fields(cls)}

    @classmethod
    def sources(cls) -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(cls) if f.metadata.get("source"))

    def inputs(self) -> list[str]:
        """Every local input this plan names (what its output must never replace), ``path::options`` cut off."""
        found = []
        for name in self.sources():
            value = getattr(self, name)
            items = value if isinstance(value, list) else [value]
            found += [item.partition("::")[0] for item in items if isinstance(item, str)]
        return found

    def to_yaml(self) -> str:
        """The plan as a recipe: its command (but for combine), its inputs first (a combine recipe's adapters with
        their weights), then every field that is set, defaults included, so that the recipe does not depend on
        today's defaults."""
        data: dict = {} if isinstance(self, Plan) else {"command": self.command}
        if isinstance(self, Plan):
            weights = self.weights or [None] * len(self.adapters)
            data["adapters"] = [
                {"source": s} | ({} if w is None else {"weight": w}) for s, w in zip(self.adapters, weights)
            ]
        else:
            data.update({name: getattr(self, name) for name in self.sources() if getattr(self, name) is not None})
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if value is not None and (f.name not in ("adapters", "weights") or not isinstance(self, Plan)):
                data[f.name] = value
        return yaml.safe_dump(data, sort_keys=False, allow_unicode=True)

    def load_options(self) -> LoadOptions:
        """How the plan's sources are loaded (the `LoadOptions` fields it has; the others at their defaults)."""
        fields = dataclasses.fields(LoadOptions)
        return LoadOptions(**{f.name: getattr(self, f.name, f.default) for f in fields})

    def rank_rule(self) -> RankRule:
        """The plan's truncation as one `RankRule` (checked when built)."""
        names = ("rank", "energy", "rule", "rule_value", "conv_rank")
        return RankRule.of(**{name: getattr(self, name, None) for name in names})


@dataclass
class Plan(Settings):
    """A combine run (`loramix combine`): adapters and weights, a method and its rank rule, then an adapter file
    (``format``, ``rank_layout``) or, with ``merge_into``, a merged checkpoint."""

    command: ClassVar[str] = "combine"

    adapters: list[str] = input_field()
    weights: list | None = None  # per adapter: a number, or a value varying by layer/module (`loramix.schedule`)
    method: str = "svd"
    rank: int | None = None
    conv_rank: int | None = None
    energy: float | None = None
    rule: KohyaRule | None = None
    rule_value: float | None = None
    device: str = "auto"
    dtype: str | None = None
    heads: Heads = "refuse"
    rank_layout: RankLayout | None = None  # None: "portable" for an adapter output
    allow_different_bases: bool = False
    allow_nonfinite: bool = False
    scale: float | None = None
    alpha: float | None = None
    base_model: str | None = None
    module_map: dict | str | None = input_field(None)
    options: dict = field(default_factory=dict)
    output: str | None = None
    merge_into: str | None = input_field(None)
    shard_size: str | None = None
    workers: int | None = None
    quantized_as: QuantizedAs | None = None
    double_quant: bool | None = None
    blocksize: int | None = None
    round_trip: RoundTrip = "all"
    merged_format: MergedFormat | None = None  # None: the base's own files (`loramix.merging.merge_into_base`)
    format: Format | None = None  # None: what the inputs' ecosystem loads (`loramix.formats.default_format`)
    gguf_base: str | None = input_field(None)
    base: str | None = input_field(
        None
    )  # DoRA adapters become their effective updates on it (merge_into serves when absent)

    def check_settings_apply(self) -> None:
        """Refuse a setting that does not apply to this output (silently ignored, it would mislead): the adapter
        file's format and layout with merge_into, gguf_base without format gguf, the checkpoint's with no merge_into."""
        if self.merge_into:
            unused = [key for key in ("format", "rank_layout", "gguf_base") if getattr(self, key) is not None]
            if unused:
                raise MethodError(
                    f"`{unused[0]}` sets the adapter file written; with `merge_into` a merged checkpoint is written: "
                    f"leave `{unused[0]}` out"
                )
        elif any(getattr(self, key) is not None for key in ("shard_size", "workers", "merged_format")):
            key = next(k for k in ("shard_size", "workers", "merged_format") if getattr(self, k) is not None)
            raise MethodError(f"`{key}` applies to a merged checkpoint: it needs `merge_into`", option="merge_into")
        if self.gguf_base is not None and not self.merge_into and self.format != "gguf":
            raise MethodError(
                "`gguf_base` names the architecture of a GGUF file: it needs `format='gguf'`",
                option="format",
                value="gguf",
            )

    def target(self) -> MergeTarget | None:
        """The base merged into and how its checkpoint is written (None: an adapter is written)."""
        if not self.merge_into:
            return None
        merging = {f.name: getattr(self, f.name) for f in dataclasses.fields(MergeTarget) if f.name != "base"}
        return MergeTarget(base=self.merge_into, **merging)

    def adapter_output(self, default_format: str) -> AdapterOutput:
        """The adapter file written (``default_format`` where the plan names none)."""
        return AdapterOutput(
            path=self.output or "",
            format=self.format or default_format,
            rank_layout=self.rank_layout or "portable",
            dtype=self.dtype,
            base=self.gguf_base,
        )


@dataclass(kw_only=True)
class Factored(Settings):
    """What `extract` and `convert` share: a rank rule, where to compute, the stored dtype, the rank layout."""

    output: str | None = None
    rank: int | None = None
    energy: float | None = None
    rule: KohyaRule | None = None
    rule_value: float | None = None
    device: str = "auto"
    dtype: str | None = None
    rank_layout: RankLayout = "portable"


@dataclass(kw_only=True)
class ExtractPlan(Factored):
    """`loramix extract`: the LoRA that best reproduces ``finetuned`` on ``base``, under a rank rule."""

    command: ClassVar[str] = "extract"

    base: str = input_field()
    finetuned: str = input_field()
    format: ModelFormat | None = None  # None: peft; kohya for two diffusers pipelines


@dataclass(kw_only=True)
class ConvertPlan(Factored):
    """`loramix convert`: an adapter engines refuse (DoRA, LoHa/LoKr, VeRA, ...) as the plain LoRA closest to it."""

    command: ClassVar[str] = "convert"

    source: str = input_field()
    base: str | None = input_field(None)
    format: ModelFormat = "peft"
    allow_nonfinite: bool = False


@dataclass
class AlignPlan(Settings):
    """`loramix align`: adapters of one base written as a serving set."""

    command: ClassVar[str] = "align"

    adapters: list[str] = input_field()
    output: str | None = None
    allow_nonfinite: bool = False


@dataclass
class SearchPlan(Settings):
    """`loramix search`: the weights of ``adapters`` whose combination fits ``examples`` best on ``base``."""

    command: ClassVar[str] = "search"

    base: str = input_field()
    adapters: list[str] = input_field()
    examples: str = input_field()
    output: str | None = None
    composition: Composition = "lorahub"
    optimizer: Optimizer = "cobyla"
    objective: Objective = "cross-entropy"
    steps: int = 40
    l1: float = 0.05
    bounds: list[float] = field(default_factory=lambda: [-1.5, 1.5])
    seed: int = 0
    device: str = "auto"
    init: list | None = None
    popsize: int | None = None
    lr: float = 0.1
    max_candidates: int | None = None
    chat_template: bool = False
    allow_different_bases: bool = False
    allow_nonfinite: bool = False
    gpus: int | None = None
    gpus_per_base: int = 1
    merge_into: str | None = input_field(None)
    shard_size: str | None = None

    def search_options(self) -> dict:
        """The keyword settings of `loramix.weight_search.search` (all but the sources and the output's)."""
        skip = ("base", "adapters", "examples", "output", "merge_into", "shard_size")
        options = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name not in skip}
        return {**options, "bounds": tuple(self.bounds)}


@dataclass(kw_only=True)
class AnalyzePlan(Settings):
    """`loramix analyze`: spectra, rank use and overlap of ``adapters``; ``output``: a JSON file to write (optional)."""

    command: ClassVar[str] = "analyze"
    writes_folder: ClassVar[bool] = False

    adapters: list[str] = input_field()
    output: str | None = None
    weights: list | None = None
    rank: int | None = None
    energy: float | None = None
    rule: KohyaRule | None = None
    rule_value: float | None = None
    base: str | None = input_field(None)
    quantized_as: QuantizedAs | None = None
    blocksize: int | None = None
    allow_different_bases: bool = False
    allow_nonfinite: bool = False
    scale: float | None = None
    alpha: float | None = None
    base_model: str | None = None
    module_map: dict | str | None = input_field(None)


PLANS: dict[str, type[Settings]] = {
    p.command: p for p in (Plan, ExtractPlan, ConvertPlan, AlignPlan, SearchPlan, AnalyzePlan)
}
