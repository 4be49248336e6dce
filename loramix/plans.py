"""One plan per command: what its CLI flags and its YAML recipe both build, what `loramix.run` dispatches on, and what
the command writes beside its output as the recipe that re-runs it (`loramix.recipe`).

A plan is frozen and holds its settings whole — the small frozen values of `loramix.settings` (`LoadOptions`,
`Compute`, `MergeTarget` with its `QuantizedBase`, `AdapterOutput`) and a `RankRule` — next to its own inputs and
choices. Their field names are unique across a plan, so a plan also reads *flat*: ``Plan(adapters=[...], rank=8,
merge_into="base")`` builds the groups from their fields' names, ``plan.rank`` reads one, and a recipe names them
flat (`Settings.flat`). The fields' types (the `Literal`s and registries of `loramix.settings`) validate a recipe and
give the CLI its choices; fields marked `loramix.settings.input_field` are inputs (folders, files, Hub ids) that a
recipe names relative to itself and that the output never overwrites. ``unused`` names a group's fields that a command
does not take (they are no settings of its plan), ``narrowed`` the ones that take fewer values there.
"""

from __future__ import annotations

import dataclasses
import functools
import typing
from dataclasses import dataclass, field
from typing import ClassVar

import yaml

from loramix.errors import SettingError
from loramix.linalg import RankRule
from loramix.settings import (
    AdapterOutput,
    Composition,
    Compute,
    Granularity,
    Heads,
    LoadOptions,
    MergeTarget,
    ModelFormat,
    Objective,
    Optimizer,
    QuantizedBase,
    input_field,
)

_plan = dataclass(frozen=True, kw_only=True, init=False)  # a plan's own __init__ takes its settings flat or whole


def _group(hint) -> bool:
    return isinstance(hint, type) and dataclasses.is_dataclass(hint)


def _members(kind: type, path: tuple[str, ...] = ()) -> dict[str, tuple[tuple[str, ...], dataclasses.Field, object]]:
    """Every setting of ``kind`` by its flat name: (the groups it lies in, its field, its type hint)."""
    hints = typing.get_type_hints(kind, include_extras=True)
    found: dict = {}
    for f in dataclasses.fields(kind):
        inner = (
            _members(hints[f.name], (*path, f.name)) if _group(hints[f.name]) else {f.name: (path, f, hints[f.name])}
        )
        clash = set(found) & set(inner)
        if clash:
            raise TypeError(f"{kind.__name__}: setting {sorted(clash)[0]!r} is declared twice")
        found |= inner
    return found


def _default(f: dataclasses.Field):
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return dataclasses.MISSING


def _build(kind: type, given: dict, start):
    """The values of ``kind``'s fields: a group from ``start`` (the object given whole, or the field's default), each
    of its fields replaced by a flat value given for it."""
    hints = typing.get_type_hints(kind, include_extras=True)
    values = {}
    for f in dataclasses.fields(kind):
        if _group(hints[f.name]):
            whole = given.get(f.name, getattr(start, f.name) if start is not None else _default(f))
            values[f.name] = hints[f.name](**_build(hints[f.name], given, whole))
        elif f.name in given:
            values[f.name] = given[f.name]
        elif start is not None:
            values[f.name] = getattr(start, f.name)
        else:
            values[f.name] = _default(f)
    return values


@_plan
class Settings:
    """What every plan shares: its command name, its output, its settings read flat (`flat`), its sources."""

    command: ClassVar[str]
    writes_folder: ClassVar[bool] = True  # its output is a folder (analyze's, an optional JSON file)
    unused: ClassVar[tuple[str, ...]] = ()  # fields of its groups that the command does not take
    narrowed: ClassVar[dict[str, object]] = {}  # fields of its groups that take fewer values here: their type

    output: str | None = None

    def __init__(self, **given) -> None:
        """Build the plan from its settings, each by its flat name, or a group whole by its field's name (flat values
        given too replace the group's)."""
        kind = type(self)
        groups = [f.name for f in dataclasses.fields(kind) if _group(typing.get_type_hints(kind)[f.name])]
        unknown = sorted(set(given) - set(kind.hints()) - set(groups))
        if unknown:
            raise TypeError(f"{kind.__name__} takes no setting {unknown[0]!r}")
        values = _build(kind, given, None)
        missing = [name for name, value in values.items() if value is dataclasses.MISSING]
        if missing:
            raise TypeError(f"{kind.__name__} needs {', '.join(missing)}")
        for name, value in values.items():
            object.__setattr__(self, name, value)

    def __getattr__(self, name: str):
        """A setting that lies in one of the plan's groups, read flat (``plan.rank`` is ``plan.rank_rule.rank``)."""
        found = type(self).members().get(name)
        if found is None or not found[0] or name in type(self).unused:
            raise AttributeError(f"{type(self).__name__} has no setting {name!r}")
        holder = self
        for step in found[0]:
            holder = object.__getattribute__(holder, step)
        return getattr(holder, name)

    @classmethod
    @functools.cache
    def members(cls) -> dict:
        """Every setting of the plan by its flat name, groups expanded: (its groups, its field, its type hint)."""
        return _members(cls)

    @classmethod
    def hints(cls) -> dict:
        """Each setting's type hint by its flat name (what a recipe's value must fit), ``unused`` left out."""
        found = cls.members().items()
        return {name: cls.narrowed.get(name, hint) for name, (_, _, hint) in found if name not in cls.unused}

    @classmethod
    def sources(cls) -> tuple[str, ...]:
        return tuple(name for name in cls.hints() if cls.members()[name][1].metadata.get("source"))

    def flat(self) -> dict:
        """The plan's settings by their flat names, in declaration order (what its recipe holds)."""
        return {name: getattr(self, name) for name in self.hints()}

    def inputs(self) -> list[str]:
        """Every local input this plan names (what its output must never replace), ``path::options`` cut off."""
        found = []
        for name in self.sources():
            value = getattr(self, name)
            items = value if isinstance(value, list) else [value]
            found += [item.partition("::")[0] for item in items if isinstance(item, str)]
        return found

    def check(self) -> None:
        """Refuse settings that do not go together (a plan's own rules; each value fits its field already)."""

    def to_yaml(self) -> str:
        """The plan as a recipe: its command (but for combine), its inputs first (a combine recipe's adapters with
        their weights), then every setting that is set, defaults included, so that the recipe does not depend on
        today's defaults."""
        values = self.flat()
        combine = isinstance(self, Plan)
        data: dict = {} if combine else {"command": self.command}
        if combine:
            weights = self.weights or [None] * len(self.adapters)
            data["adapters"] = [
                {"source": s} | ({} if w is None else {"weight": w}) for s, w in zip(self.adapters, weights)
            ]
        else:
            data.update({name: values[name] for name in self.sources() if values[name] is not None})
        for name, value in values.items():
            if value is not None and name not in data and (name not in ("weights", "adapters") or not combine):
                data[name] = value
        return yaml.safe_dump(data, sort_keys=False, allow_unicode=True)


def _given(group, default) -> str | None:
    """The first field of ``group`` set other than in ``default``."""
    return next((f.name for f in dataclasses.fields(group) if getattr(group, f.name) != getattr(default, f.name)), None)


@_plan
class Plan(Settings):
    """A combine run (`loramix combine`): adapters and weights, a method, its options and rank rule, then an adapter
    file (``written``) or, with ``merge_into`` (``target``), a merged checkpoint."""

    command: ClassVar[str] = "combine"

    adapters: list[str] = input_field()
    weights: list | None = None  # per adapter: a number, or a value varying by layer/module (`loramix.schedule`)
    method: str = "svd"
    rank_rule: RankRule = RankRule()
    compute: Compute = Compute()
    heads: Heads = "refuse"
    load: LoadOptions = LoadOptions()
    options: dict = field(default_factory=dict)
    target: MergeTarget = MergeTarget()
    written: AdapterOutput = AdapterOutput()  # format None: what the inputs' ecosystem loads; rank_layout: portable
    base: str | None = input_field(None)  # DoRA adapters become their effective updates on it (else merge_into)

    def check(self) -> None:
        """Refuse a setting that does not apply to this output (silently ignored, it would mislead): the adapter
        file's format and layout with merge_into, gguf_base without format gguf, the checkpoint's with no merge_into."""
        if self.merge_into:
            unused = _given(self.written, AdapterOutput())
            if unused:
                raise SettingError(
                    f"`{unused}` sets the adapter file written; with `merge_into` a merged checkpoint is written: "
                    f"leave `{unused}` out"
                )
        else:
            key = next((k for k in ("shard_size", "workers") if getattr(self, k) is not None), None)
            if key:
                raise SettingError(
                    f"`{key}` applies to a merged checkpoint: it needs `merge_into`", option="merge_into"
                )
        if self.gguf_base is not None and not self.merge_into and self.format != "gguf":
            raise SettingError(
                "`gguf_base` names the architecture of a GGUF file: it needs `format='gguf'`",
                option="format",
                value="gguf",
            )


@_plan
class ExtractPlan(Settings):
    """`loramix extract`: the LoRA that best reproduces ``finetuned`` on ``base``, under a rank rule."""

    command: ClassVar[str] = "extract"
    unused: ClassVar[tuple[str, ...]] = ("conv_rank",)
    narrowed: ClassVar[dict[str, object]] = {"format": ModelFormat | None}  # a model's LoRA, no diffusion naming

    base: str = input_field()
    finetuned: str = input_field()
    rank_rule: RankRule = RankRule()
    compute: Compute = Compute()
    written: AdapterOutput = AdapterOutput(rank_layout="portable")  # format None: peft; kohya for two pipelines


@_plan
class ConvertPlan(Settings):
    """`loramix convert`: an adapter engines refuse (DoRA, LoHa/LoKr, VeRA, ...) as the plain LoRA closest to it."""

    command: ClassVar[str] = "convert"
    narrowed: ClassVar[dict[str, object]] = {"format": ModelFormat}
    unused: ClassVar[tuple[str, ...]] = (
        *("conv_rank", "scale", "alpha", "base_model", "module_map", "allow_different_bases"),
    )

    source: str = input_field()
    base: str | None = input_field(None)
    rank_rule: RankRule = RankRule()
    compute: Compute = Compute()
    written: AdapterOutput = AdapterOutput(format="peft", rank_layout="portable")
    load: LoadOptions = LoadOptions()


@_plan
class AlignPlan(Settings):
    """`loramix align`: adapters of one base written as a serving set."""

    command: ClassVar[str] = "align"
    unused: ClassVar[tuple[str, ...]] = ("scale", "alpha", "base_model", "module_map", "allow_different_bases")

    adapters: list[str] = input_field()
    load: LoadOptions = LoadOptions()


@_plan
class SearchPlan(Settings):
    """`loramix search`: the weights of ``adapters`` whose combination fits ``examples`` best on ``base``; with
    ``subset``, which modules (or layers) of each to keep before merging them by ``method``, ``weights``, ``options``
    and the rank rule."""

    command: ClassVar[str] = "search"
    unused: ClassVar[tuple[str, ...]] = ("dtype", "workers", "quantized_as", "double_quant", "blocksize", "round_trip")

    base: str = input_field()
    adapters: list[str] = input_field()
    examples: str = input_field()
    composition: Composition = "lorahub"
    optimizer: Optimizer = "cobyla"
    objective: Objective = "cross-entropy"
    steps: int = 40
    l1: float = 0.05
    bounds: list[float] = field(default_factory=lambda: [-1.5, 1.5])
    seed: int = 0
    compute: Compute = Compute()
    init: list | None = None
    popsize: int | None = None
    lr: float = 0.1
    max_candidates: int | None = None
    chat_template: bool = False
    load: LoadOptions = LoadOptions()
    gpus: int | None = None
    gpus_per_base: int = 1
    subset: Granularity | None = None
    method: str | None = None  # with subset: the merge's method (None: cat)
    weights: list | None = None  # with subset: one number per adapter (None: 1/n each)
    options: dict = field(default_factory=dict)  # with subset: the method's options
    rank_rule: RankRule = RankRule()  # with subset: the merge's rank rule
    target: MergeTarget = MergeTarget()

    # what only a weight search takes (a subset search takes its merge's method, weights, options and rank rule)
    WEIGHTS_ONLY: ClassVar[tuple[str, ...]] = ("composition", "l1", "bounds", "init", "gpus", "gpus_per_base")
    SUBSET_ONLY: ClassVar[tuple[str, ...]] = (
        *("subset", "method", "weights", "options"),
        *(f.name for f in dataclasses.fields(RankRule)),
    )

    def check(self) -> None:
        """Refuse a setting that applies only to the other kind of search."""
        defaults = SearchPlan(base="", adapters=[], examples="")
        own = self.SUBSET_ONLY if self.subset is None else self.WEIGHTS_ONLY
        wrong = [name for name in own if self._set(name, defaults)]
        if wrong:
            where = "applies only with `subset`" if self.subset is None else "does not apply with `subset`"
            raise SettingError(f"`{wrong[0]}` {where}")

    def _set(self, name: str, defaults: SearchPlan) -> bool:
        return getattr(self, name) != getattr(defaults, name)

    def flat(self) -> dict:
        """The settings of this kind of search (a subset search's recipe holds no weight-search settings, and the
        other way round)."""
        other = self.WEIGHTS_ONLY if self.subset is not None else self.SUBSET_ONLY
        return {name: value for name, value in super().flat().items() if name not in other}

    def search_options(self) -> dict:
        """The keyword settings of `loramix.weight_search.search` (or, with ``subset``, of `search_subset`)."""
        common = ("optimizer", "objective", "steps", "seed", "device", "popsize", "lr", "max_candidates")
        load = self.load
        loading = {
            "allow_different_bases": load.allow_different_bases,
            "allow_nonfinite": load.allow_nonfinite,
            "load_options": load.per_source(),
        }
        options = {name: getattr(self, name) for name in (*common, "chat_template")} | loading
        if self.subset is not None:
            merge = {"method": self.method or "cat", "weights": self.weights, "options": self.options}
            return options | merge | {"granularity": self.subset, "rank_rule": self.rank_rule}
        searching = {name: getattr(self, name) for name in ("composition", "l1", "init", "gpus", "gpus_per_base")}
        return options | searching | {"bounds": tuple(self.bounds)}


@_plan
class AnalyzePlan(Settings):
    """`loramix analyze`: spectra, rank use and overlap of ``adapters``; ``output``: a JSON file to write (optional)."""

    command: ClassVar[str] = "analyze"
    writes_folder: ClassVar[bool] = False
    unused: ClassVar[tuple[str, ...]] = ("conv_rank", "double_quant", "round_trip")

    adapters: list[str] = input_field()
    weights: list | None = None
    rank_rule: RankRule = RankRule()
    base: str | None = input_field(None)
    quantized: QuantizedBase = QuantizedBase()
    load: LoadOptions = LoadOptions()


PLANS: dict[str, type[Settings]] = {
    p.command: p for p in (Plan, ExtractPlan, ConvertPlan, AlignPlan, SearchPlan, AnalyzePlan)
}
