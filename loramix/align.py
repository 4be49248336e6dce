"""`loramix align`: adapters of one base written as a serving set — one folder holding a PEFT folder per adapter, all
with the same tensor names and shapes and the same config (`loramix.adapter.serving_set`), so that PEFT's
``hotswap_adapter`` under one ``torch.compile``d model and the engines' fixed adapter slots take every one of them —
and `SET_FILE`, what the set is (rank, scale, modules, the adapters' folders)."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

from loramix.adapter import LoraAdapter, serving_set
from loramix.formats import load_adapters, write_adapter
from loramix.merging import write_files
from loramix.outputs import Output, recipe_file
from loramix.plans import AlignPlan
from loramix.render.card import CARD_FILE, model_card
from loramix.runtime import require_path

SET_FILE = "serving_set.json"


def align(
    sources: list[str | Path],
    output: str | Path,
    *,
    allow_nonfinite: bool = False,
    overwrite: bool = False,
    argv: list[str] | None = None,
) -> dict[str, LoraAdapter]:
    """Write ``sources`` (adapters of one base) into ``output`` as a serving set: ``output/<name>/``, one PEFT folder
    per adapter (named after its source; repeats numbered), each describing its own ΔW unchanged at the set's one
    rank and scale on the union of the set's modules, with a model card; `SET_FILE`; and the recipe that repeats it.
    Returns the aligned adapters by folder name."""
    require_path(output, "output (the output folder)")
    plan = AlignPlan(adapters=[str(s) for s in sources], output=str(output), allow_nonfinite=allow_nonfinite)
    return run_align(plan, overwrite=overwrite, argv=argv)


def run_align(
    plan: AlignPlan, *, overwrite: bool = False, progress: bool = False, argv: list[str] | None = None
) -> dict[str, LoraAdapter]:
    """Run an `AlignPlan` (see `align`; nothing here shows progress)."""
    out = Output.of(plan, overwrite=overwrite)
    loaded, _ = load_adapters(list(plan.adapters), allow_nonfinite=plan.allow_nonfinite)
    aligned = dict(zip(_folder_names(loaded), serving_set(loaded)))
    first = next(iter(aligned.values()))
    description = {
        "rank": first.ranks[0],
        "scale": next(iter(first.modules.values())).scale,
        "modules": sorted(first.modules),
        "adapters": {name: str(source) for name, source in zip(aligned, plan.adapters)},
    }

    def fill(tmp: Path) -> None:
        for name, adapter in aligned.items():
            (tmp / name).mkdir()
            write_adapter(adapter, tmp / name)
            write_files(tmp / name, {CARD_FILE: model_card(adapter, argv=argv, output_format="peft")})

    out.write({SET_FILE: json.dumps(description, indent=2) + "\n", **recipe_file(plan)}, fill)
    return aligned


def _folder_names(adapters: list[LoraAdapter]) -> list[str]:
    """Each adapter's name as a folder name; names that repeat get ``-2``, ``-3``… in order."""
    counts = Counter(a.name for a in adapters)
    seen: Counter[str] = Counter()
    names = []
    for a in adapters:
        seen[a.name] += 1
        names.append(a.name if counts[a.name] == 1 else f"{a.name}-{seen[a.name]}")
    return names
