"""YAML recipes: a validated combine plan, the same plan the CLI flags build.

```yaml
adapters:                     # sources: folders (relative to this file), Hub ids; weight per adapter
  - {source: ../loramix/examples/math, weight: 0.5}
  - {source: org/name@rev, weight: 0.5}
method: svd                   # see `loramix methods`
rank: 16                      # optional truncation: rank, energy, or rule + rule_value
output: out/merged            # relative to the current directory; -o overrides
# merge_into: ../loramix/examples/tiny-llama   # write this base (folder or Hub id) with the result merged
# scale: 2.0                  # plain LoRA state dicts only: scale or alpha, base_model, and module_map
# module_map: names.yaml      # (a mapping of regexes, or a YAML/JSON file relative to this file)
```
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

import torch
import yaml

from loramix.errors import LoramixError
from loramix.sources import parse_hub_id

DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float16": torch.float16,
    "fp16": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
}


class RecipeError(LoramixError):
    """A recipe file is unreadable or invalid."""


def parse_dtype(name: str | None) -> torch.dtype | None:
    if name is None:
        return None
    try:
        return DTYPES[name]
    except KeyError:
        raise LoramixError(f"unknown dtype {name!r}; choose from {', '.join(DTYPES)}") from None


@dataclass
class Plan:
    """Everything a combine run needs."""

    adapters: list[str]
    weights: list[float] | None = None
    method: str = "svd"
    rank: int | None = None
    energy: float | None = None
    rule: str | None = None
    rule_value: float | None = None
    device: str = "cpu"
    dtype: str | None = None
    heads: str = "refuse"
    allow_different_bases: bool = False
    allow_nonfinite: bool = False
    scale: float | None = None
    alpha: float | None = None
    base_model: str | None = None
    module_map: dict | str | None = None
    options: dict = field(default_factory=dict)
    output: str | None = None
    merge_into: str | None = None

    def combine_kwargs(self) -> dict:
        """Keyword arguments for `loramix.combine`."""
        kwargs = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        for key in ("adapters", "options", "output", "dtype", "merge_into"):
            kwargs.pop(key)
        loading = {key: kwargs.pop(key) for key in LOAD_OPTIONS}
        load_options = {k: v for k, v in loading.items() if v is not None} or None
        return {**kwargs, **self.options, "dtype": parse_dtype(self.dtype), "load_options": load_options}

    def to_yaml(self) -> str:
        data = {"adapters": [{"source": s, "weight": w} for s, w in zip(self.adapters, self.weights or [])]}
        defaults = Plan(adapters=[])
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name not in ("adapters", "weights") and value != getattr(defaults, f.name):
                data[f.name] = value
        return yaml.safe_dump(data, sort_keys=False, allow_unicode=True)


LOAD_OPTIONS = ("scale", "alpha", "base_model", "module_map")  # for `load_adapter`, not for the method
_TYPES = {
    "method": str,
    "rank": int,
    "energy": (int, float),
    "rule": str,
    "rule_value": (int, float),
    "device": str,
    "dtype": str,
    "heads": str,
    "allow_different_bases": bool,
    "allow_nonfinite": bool,
    "scale": (int, float),
    "alpha": (int, float),
    "base_model": str,
    "module_map": (dict, str),
    "options": dict,
    "output": str,
    "merge_into": str,
}


def load_recipe(path: str | Path) -> Plan:
    """Read and validate a recipe; adapter paths are taken relative to the recipe's folder."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise RecipeError(f"{path}: no such recipe file") from None
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise RecipeError(f"{path}: not valid YAML ({str(exc).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise RecipeError(f"{path}: a recipe is a mapping with at least 'adapters'")
    unknown = sorted(set(data) - set(_TYPES) - {"adapters"})
    if unknown:
        raise RecipeError(f"{path}: unknown key(s) {', '.join(unknown)}; known: adapters, {', '.join(_TYPES)}")
    for key, kind in _TYPES.items():
        if data.get(key) is not None and not isinstance(data[key], kind):
            raise RecipeError(f"{path}: {key} has the wrong type ({data[key]!r})")
    sources, weights = _adapters(path, data.get("adapters"))
    fields = {k: v for k, v in data.items() if k != "adapters" and v is not None}
    if isinstance(fields.get("module_map"), str):
        fields["module_map"] = str(path.parent / fields["module_map"])
    if "merge_into" in fields:
        fields["merge_into"] = _relative_source(path, fields["merge_into"])
    return Plan(adapters=sources, weights=weights, **fields)


def _adapters(path: Path, items) -> tuple[list[str], list[float] | None]:
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
        if weight is not None and (isinstance(weight, bool) or not isinstance(weight, (int, float))):
            raise RecipeError(f"{path}: adapters[{i}].weight must be a number, got {weight!r}")
        sources.append(_relative_source(path, entry["source"]))
        weights.append(weight)
    given = [w is not None for w in weights]
    if any(given) and not all(given):
        raise RecipeError(f"{path}: give a weight for every adapter or for none")
    return sources, [float(w) for w in weights] if all(given) else None


def _relative_source(recipe: Path, source: str) -> str:
    local = recipe.parent / source
    if Path(source).is_absolute() or (parse_hub_id(source) is not None and not local.exists()):
        return source
    return str(local)
