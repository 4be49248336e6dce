"""`loramix search` end to end (`run_search`, a `SearchPlan`): the search on this process, on torchrun's ranks or on
processes it starts (`loramix.weight_search.search`), then `write_search`: the searched adapter (or a base with it
merged), `SEARCH_FILE`, a card, the recipe of the searched combination and `SEARCH_RECIPE_FILE`, the search's own
plan, which `loramix run` repeats."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from loramix.errors import SearchError
from loramix.formats import write_adapter
from loramix.hub import revisions
from loramix.linalg import RankRule
from loramix.outputs import Output, recipe_file
from loramix.plans import Plan, SearchPlan
from loramix.recipe import repeatable
from loramix.render.card import CARD_FILE, model_card
from loramix.settings import MergeTarget
from loramix.weight_search import SearchResult, distributed, search, search_subset

SEARCH_FILE = "search.json"
SEARCH_RECIPE_FILE = "search_recipe.yaml"


def run_search(
    plan: SearchPlan, *, overwrite: bool = False, progress: bool = False, argv: list[str] | None = None
) -> SearchResult:
    """Run a `SearchPlan` and write its output. Under torchrun each process is one rank of the search (give no
    ``gpus``): every rank searches its share of each population, rank 0 writes."""
    place = distributed.torchrun_rank()  # (rank, local rank, world) when torchrun started this process
    rank = 0 if place is None else place[0]
    out = Output.of(plan, overwrite=overwrite) if rank == 0 else None  # checked before the long part
    options = plan.search_options()
    if plan.subset is not None and place is not None:
        raise SearchError("a subset search runs on one process, not under torchrun")
    searching = search if plan.subset is None else search_subset
    result = searching(plan.base, list(plan.adapters), plan.examples, progress=progress and rank == 0, **options)
    if out is not None:
        device = plan.device.split(",")[0]
        _write(result, out, plan.target, device=device, progress=progress, argv=argv, plan=plan)
    return result


def write_search(
    result: SearchResult,
    folder: str | Path,
    *,
    overwrite: bool = False,
    merge_into: str | None = None,
    shard_size: int | str | None = None,
    device: str | torch.device = "auto",
    progress: bool = False,
    argv: list[str] | None = None,
) -> Path:
    """Write a search's output folder atomically: the searched adapter (PEFT) — or, with ``merge_into``, that base
    with it merged — plus ``search.json`` (weights, loss, history, settings), a model card, and a recipe.

    The recipe repeats the searched combination, not the search: the sources with the weights found and the method
    of the search's composition (``lorahub``, or ``cat`` for ``delta``); `loramix combine --recipe` rebuilds the
    same adapter (or merged checkpoint) bit for bit without the base, the examples or the optimiser."""
    protect = [*result.adapter.provenance.get("sources", []), result.settings.get("base", "")]
    out = Output(folder, overwrite=overwrite, protect=protect)
    target = MergeTarget(merge_into, shard_size=None if shard_size is None else str(shard_size))
    return _write(result, out, target, device=device, progress=progress, argv=argv)


def _write(
    result: SearchResult,
    out: Output,
    target: MergeTarget,
    *,
    device: str | torch.device,
    progress: bool,
    argv: list[str] | None,
    plan: SearchPlan | None = None,
) -> Path:
    """`write_search` into a checked output; with the search's ``plan``, `SEARCH_RECIPE_FILE` too."""
    adapter, merge_into = result.adapter, target.merge_into
    combination = Plan(
        adapters=list(adapter.provenance.get("sources", [])),
        weights=list(result.weights),
        method=adapter.provenance["method"],
        rank_rule=RankRule(**result.settings.get("rank_rule", {})),  # a subset search's merge: its rank rule
        device=str(device),
        target=target,
        output=str(out.folder),
    )
    dtype = None if merge_into else str(adapter.dtype).removeprefix("torch.")  # None: the base's
    files = {
        SEARCH_FILE: json.dumps(result.to_json(), indent=2) + "\n",
        **recipe_file(
            combination,
            weights=list(adapter.provenance.get("weights") or result.weights),
            options=adapter.provenance.get("options", {}),
            dtype=dtype,
        ),
        CARD_FILE: model_card(
            adapter,
            argv=argv,
            merged_into=merge_into,
            revisions=revisions(adapter.provenance.get("sources", [])),
            recipe=True,
            searched=True,
        ),
    }
    if plan is not None:
        files[SEARCH_RECIPE_FILE] = repeatable(plan).to_yaml()
    if merge_into:
        out.merge(adapter, target, files, device=device, progress=progress)
    else:
        out.write(files, lambda tmp: write_adapter(adapter, tmp))
    return out.folder
