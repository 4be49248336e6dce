"""YAML recipes: a validated plan (`loramix.plans`), the same plan the CLI flags build, read (`load_recipe`) and
written beside an output (`repeatable`, then the plan's ``to_yaml``) so that `loramix run RECIPE` re-runs the
command. A recipe's ``command`` names its plan (none: ``combine``); a combine recipe looks like this:

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
# quantized_as: nf4           # QLoRA-faithful merge: round-trip the base through 4-bit first (nf4, fp4, fp8, mxfp4;
#                             # double_quant: true, blocksize: 64, round_trip: all | targeted)
# scale: 2.0                  # plain LoRA state dicts only: scale or alpha, base_model, and module_map
# module_map: {"^layers": model.layers}   # (a mapping of regexes, or a YAML/JSON file relative to this file)
```
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import yaml

from loramix.errors import LoramixError, MethodError, RecipeError, SettingError
from loramix.hub import pinned
from loramix.plans import PLANS, Plan, Settings
from loramix.schedule import parse, parse_options
from loramix.settings import fits, wrong
from loramix.sources import parse_hub_id

__all__ = ["Plan", "check_plan", "load_recipe", "repeatable"]


def check_plan(plan: Settings) -> None:
    """Refuse a plan a setting of which does not fit its field (a format no writer has, a rule that is no rule, a
    bool where a number goes): a one-line `SettingError` naming the field, before anything is loaded."""
    for name, hint in plan.hints().items():
        value = getattr(plan, name)
        if value is not None and not fits(value, hint):
            raise SettingError(wrong(name, value, hint))
    if isinstance(plan, Plan):
        parse_options(plan.options)
    plan.check()


def load_recipe(path: str | Path) -> Settings:
    """Read and validate a recipe (a `Plan` unless its ``command`` names another plan); its sources are taken
    relative to the recipe's folder. Every value is checked against its field before anything is loaded."""
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
    command = data.pop("command", "combine")
    if command not in PLANS:
        raise RecipeError(f"{path}: `command` must be one of {', '.join(PLANS)}, got {command!r}")
    kind = PLANS[command]
    hints = kind.hints()
    known = [name for name in hints if name != "weights" or kind is not Plan]
    unknown = sorted(set(data) - set(known))
    if unknown:
        raise RecipeError(f"{path}: unknown key(s) {', '.join(unknown)}; known: {', '.join(known)}")
    fields = {k: v for k, v in data.items() if v is not None}
    if kind is Plan:
        fields["adapters"], fields["weights"] = _adapters(path, data.get("adapters"))
    for name in kind.sources():
        value = fields.get(name)
        if name == "module_map" and isinstance(value, str):  # a file, never a Hub id
            fields[name] = _relative_path(path, value)
        elif isinstance(value, str):
            fields[name] = _relative_source(path, value)
        elif isinstance(value, list) and kind is not Plan:  # a combine recipe's adapters are read above
            fields[name] = [_relative_source(path, s) if isinstance(s, str) else s for s in value]
    if kind is Plan and fields.get("merge_into"):  # earlier recipes of merges recorded the adapter file's defaults
        for key, default in (("format", "peft"), ("rank_layout", "portable")):
            if fields.get(key) == default:
                del fields[key]
    missing = [name for name in hints if name not in fields and _required(kind.members()[name][1])]
    if missing:
        raise RecipeError(f"{path}: a {command} recipe needs {', '.join(missing)}")
    for name, value in fields.items():  # each value against its field first, then the groups' own checks
        if name not in ("adapters", "weights") and not fits(value, hints[name]):
            raise RecipeError(f"{path}: {wrong(name, value, hints[name])}")
    try:
        plan = kind(**fields)
        if kind is Plan:
            parse_options(plan.options)
    except LoramixError as exc:
        raise RecipeError(f"{path}: {exc}") from None
    return plan


def _required(f: dataclasses.Field) -> bool:
    return f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING


def repeatable(plan: Settings, **used) -> Settings:
    """``plan`` as a recipe to publish with its output: its sources relative to the output folder (where the recipe
    lies; a recipe's paths are read relative to it), Hub ids pinned to the commit they resolved to, ``used`` (the
    settings a run settled: weights, method options, dtype, ...) in place of what was asked, no output."""
    folder = Path(plan.output).resolve()

    def portable(item):  # a source's own options (path::scale=0.5) stay with it
        if not isinstance(item, str):
            return item
        path, sep, options = item.partition("::")
        if not Path(path).exists():
            return pinned(path) + sep + options
        return os.path.relpath(Path(path).resolve(), folder) + sep + options

    moved = {}
    for name in plan.sources():
        value = getattr(plan, name)
        moved[name] = [portable(v) for v in value] if isinstance(value, list) else portable(value)
    return dataclasses.replace(plan, **moved, **used, output=None)


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
                weight = parse(weight, what=f"adapters[{i}].weight").data()
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
