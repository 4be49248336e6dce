"""YAML recipes: a validated combine plan, the same plan the CLI flags build.

```yaml
adapters:                     # sources: folders (relative to this file), Hub ids; weight per adapter
  - {source: ../loramix/examples/summarize, weight: 0.5}
  - {source: ../loramix/examples/translate, weight: 0.5}   # or a Hub id: org/name@revision
# weight may vary: [0.0, 1.0] (a gradient across layers), {self_attn: 1.0, default: 0.2} (name filters, first
# match wins), {lbw: [17 numbers], ratio: 1.0} (SD block weights); method options take the same forms
method: svd                   # see `loramix methods`
rank: 16                      # optional truncation: rank, energy, or rule + rule_value
# conv_rank: 8                # the rank cap of k×k conv modules (kohya's --new_conv_rank); rank caps the others
output: out/merged            # relative to the current directory; -o overrides
# merge_into: ../loramix/examples/tiny-llama   # write this base (folder or Hub id) with the result merged
# base: ../loramix/examples/tiny-llama   # DoRA adapters combine as their effective updates on this base
# format: kohya               # a kohya/A1111 file, a PEFT folder (peft), a llama.cpp LoRA (gguf), a diffusion
#                             # LoRA in ComfyUI's or diffusers' names (comfyui, diffusers); default: the file
#                             # diffusers and ComfyUI load for kohya/diffusers/LyCORIS inputs, else peft
# gguf_base: ../loramix/examples/tiny-llama   # format gguf: the base whose config.json names the architecture
# rank_layout: exact          # per-module ranks and scales (PEFT only) instead of one rank every engine reads
# quantized_as: nf4           # QLoRA-faithful merge: round-trip the base through 4-bit first (nf4 or fp4;
#                             # double_quant: true, blocksize: 64, round_trip: all | targeted)
# scale: 2.0                  # plain LoRA state dicts only: scale or alpha, base_model, and module_map
# module_map: {"^layers": model.layers}   # (a mapping of regexes, or a YAML/JSON file relative to this file)
```
"""

from __future__ import annotations

import dataclasses
import math
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from loramix.errors import MethodError, RecipeError
from loramix.methods import get_method
from loramix.runtime import parse_dtype
from loramix.schedule import parse, parse_options
from loramix.sources import parse_hub_id

LOAD_OPTIONS = ("scale", "alpha", "base_model", "module_map")  # for `load_adapter`, not for the method


@dataclass
class Plan:
    """Everything a combine run needs: what the CLI's flags and a YAML recipe both build (`loramix.run` runs it)."""

    adapters: list[str]
    weights: list | None = None  # per adapter: a number, or a value varying by layer/module (`loramix.schedule`)
    method: str = "svd"
    rank: int | None = None
    conv_rank: int | None = None
    energy: float | None = None
    rule: str | None = None
    rule_value: float | None = None
    device: str = "auto"
    dtype: str | None = None
    heads: str = "refuse"
    rank_layout: str | None = None  # None: "portable" for an adapter output
    allow_different_bases: bool = False
    allow_nonfinite: bool = False
    scale: float | None = None
    alpha: float | None = None
    base_model: str | None = None
    module_map: dict | str | None = None
    options: dict = field(default_factory=dict)
    output: str | None = None
    merge_into: str | None = None
    shard_size: str | None = None
    workers: int | None = None
    quantized_as: str | None = None
    double_quant: bool | None = None
    blocksize: int | None = None
    round_trip: str = "all"
    format: str | None = None  # None: what the inputs' ecosystem loads (`loramix.formats.default_format`)
    gguf_base: str | None = None
    base: str | None = None  # DoRA adapters become their effective updates on it (merge_into serves when absent)

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
        elif any(getattr(self, key) is not None for key in ("shard_size", "workers")):
            key = "shard_size" if self.shard_size is not None else "workers"
            raise MethodError(f"`{key}` applies to a merged checkpoint: it needs `merge_into`", option="merge_into")
        if self.gguf_base is not None and not self.merge_into and self.format != "gguf":
            raise MethodError(
                "`gguf_base` names the architecture of a GGUF file: it needs `format='gguf'`",
                option="format",
                value="gguf",
            )

    def combine_kwargs(self) -> dict:
        """Keyword arguments for `loramix.combine`."""
        kwargs = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        merge_only = ("merge_into", "shard_size", "workers", "quantized_as", "double_quant", "blocksize", "round_trip")
        for key in ("adapters", "options", "output", "dtype", *merge_only, "format", "gguf_base", "base"):
            kwargs.pop(key)
        loading = {key: kwargs.pop(key) for key in LOAD_OPTIONS}
        load_options = {k: v for k, v in loading.items() if v is not None} or None
        options = dict(self.options)
        if self.base and "base" not in options and get_method(self.method).data:
            options["base"] = self.base  # a method that needs data runs the run's base forward
        kwargs["rank_layout"] = self.rank_layout or "portable"
        return {**kwargs, **options, "dtype": parse_dtype(self.dtype), "load_options": load_options}

    def to_yaml(self) -> str:
        """The plan as a recipe: every field that is set, defaults included, so that the recipe does not depend on
        today's defaults."""
        if self.weights:
            data = {"adapters": [{"source": s, "weight": w} for s, w in zip(self.adapters, self.weights)]}
        else:
            data = {"adapters": [{"source": s} for s in self.adapters]}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name not in ("adapters", "weights") and value is not None:
                data[f.name] = value
        return yaml.safe_dump(data, sort_keys=False, allow_unicode=True)


_HINTS = typing.get_type_hints(Plan)


def _fits(value, hint) -> bool:
    """Whether a YAML value fits a `Plan` field's type hint (bool is no number; numbers are finite)."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_fits(value, h) for h in typing.get_args(hint))
    if hint is type(None):
        return value is None
    if origin is list:
        (item,) = typing.get_args(hint)
        return isinstance(value, list) and all(_fits(v, item) for v in value)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, origin or hint)


def load_recipe(path: str | Path) -> Plan:
    """Read and validate a recipe; adapter paths are taken relative to the recipe's folder."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise RecipeError(f"{path}: no such recipe file") from None
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise RecipeError(f"{path}: not valid YAML ({str(exc).splitlines()[0]})") from None
    except RecursionError:
        raise RecipeError(f"{path}: not valid YAML (nested too deeply)") from None
    if not isinstance(data, dict):
        raise RecipeError(f"{path}: a recipe is a mapping with at least 'adapters'")
    known = [name for name in _HINTS if name not in ("adapters", "weights")]
    unknown = sorted(set(data) - set(known) - {"adapters"})
    if unknown:
        raise RecipeError(f"{path}: unknown key(s) {', '.join(unknown)}; known: adapters, {', '.join(known)}")
    for key in known:
        if data.get(key) is not None and not _fits(data[key], _HINTS[key]):
            raise RecipeError(f"{path}: {key} has the wrong type ({data[key]!r})")
    try:
        parse_options(data.get("options") or {})
    except MethodError as exc:
        raise RecipeError(f"{path}: {exc}") from None
    sources, weights = _adapters(path, data.get("adapters"))
    fields = {k: v for k, v in data.items() if k != "adapters" and v is not None}
    if isinstance(fields.get("module_map"), str):
        fields["module_map"] = _relative_path(path, fields["module_map"])
    for key in ("merge_into", "gguf_base", "base"):
        if key in fields:
            fields[key] = _relative_source(path, fields[key])
    if fields.get("merge_into"):  # earlier recipes of merges recorded the adapter file's defaults: no setting
        for key, default in (("format", "peft"), ("rank_layout", "portable")):
            if fields.get(key) == default:
                del fields[key]
    return Plan(adapters=sources, weights=weights, **fields)


def _adapters(path: Path, items) -> tuple[list[str], list | None]:
    if not isinstance(items, list) or not items:
        raise RecipeError(f"{path}: 'adapters' must be a non-empty list")
    sources, weights = [], []
    for i, item in enumerate(items):
        entry = {"source": item} if isinstance(item, str) else item
        if not isinstance(entry, dict) or not isinstance(entry.get("source"), str):
            raise RecipeError(f"{path}: adapters[{i}] needs a 'source' string")
        extra = set(entry) - {"source", "weight"}
        if extra:
            raise RecipeError(f"{path}: adapters[{i}] has unknown key(s) {', '.join(sorted(extra))}")
        weight = entry.get("weight")
        if weight is not None:
            try:
                weight = parse(weight, what=f"adapters[{i}].weight")
            except MethodError as exc:
                raise RecipeError(f"{path}: {exc}") from None
        sources.append(_relative_source(path, entry["source"]))
        weights.append(weight)
    given = [w is not None for w in weights]
    if any(given) and not all(given):
        raise RecipeError(f"{path}: give a weight for every adapter or for none")
    return sources, weights if all(given) else None


def _relative_path(recipe: Path, item: str) -> str:
    """``item`` relative to the recipe's folder, normalised (``recipes/../x`` → ``x``) and kept relative."""
    return os.path.normpath(recipe.parent / item)


def _relative_source(recipe: Path, source: str) -> str:
    local = recipe.parent / source
    if Path(source).is_absolute() or (parse_hub_id(source) is not None and not local.exists()):
        return source
    return _relative_path(recipe, source)
