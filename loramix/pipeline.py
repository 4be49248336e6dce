"""Runs end to end, each writing one atomic output folder: `run` (a `Plan`: combine, then write an adapter or a
merged checkpoint with its card and recipe), `save_adapter`, `merge_into_base`, `write_search`, and the analysis
outputs (`write_analysis_json`, `write_plots`).

Every output is assembled in a temporary folder beside the target and renamed into place at the end
(`loramix.io.files.atomic_output`): a failure leaves no partial output and never touches an input.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from loramix.adapter import LoraAdapter
from loramix.analysis import Analysis, analyze
from loramix.checkpoint import MergeReport, write_merged
from loramix.combination import check_settings, combine
from loramix.errors import IncompatibleAdaptersError
from loramix.formats import load_adapter, load_adapters, write_adapter
from loramix.hub import revisions
from loramix.io.base import open_base, resolve_base
from loramix.io.files import atomic_output, check_output, refuse_inputs, write_text_atomic
from loramix.recipe import Plan
from loramix.render.analysis import analysis_json
from loramix.render.card import CARD_FILE, RECIPE_FILE, model_card
from loramix.render.plots import analysis_plots
from loramix.runtime import parse_dtype, resolve_device
from loramix.weight_search import SearchResult

SEARCH_FILE = "search.json"
# The sources' overlap goes into a card only when it is cheap: few sources, at most this many LoRA parameters.
CHEAP_ANALYSIS_PARAMS = 5_000_000
CHEAP_ANALYSIS_SOURCES = 8


@dataclass
class RunReport:
    """What `run` wrote: the folder, the combined adapter, and for a merge the checkpoint's `MergeReport`."""

    path: Path
    adapter: LoraAdapter
    sources: int
    format: str
    merge: MergeReport | None = None


def _cheap_analysis(loaded: list[LoraAdapter], weights: list[float]) -> Analysis | None:
    """The sources' analysis for a card, when there are 2–8 small sources."""
    if not 2 <= len(loaded) <= CHEAP_ANALYSIS_SOURCES or sum(a.num_params() for a in loaded) > CHEAP_ANALYSIS_PARAMS:
        return None
    return analyze(loaded, weights=weights, allow_different_bases=True)


def _repeatable(plan: Plan, adapter: LoraAdapter) -> Plan:
    """``plan`` as a recipe that repeats the run from anywhere: local paths made absolute, the weights used."""

    def anchored(item):
        return str(Path(item).resolve()) if isinstance(item, str) and Path(item).exists() else item

    weights = adapter.provenance.get("weights") or plan.weights
    return replace(
        plan,
        adapters=[anchored(a) for a in plan.adapters],
        weights=list(weights) if weights else None,
        module_map=anchored(plan.module_map),
        merge_into=anchored(plan.merge_into),
        output=None,
    )


def _write_files(folder: Path, files: dict[str, str]) -> None:
    for name, text in files.items():
        (folder / name).write_text(text)


def run(plan: Plan, *, overwrite: bool = False, progress: bool = False, argv: list[str] | None = None) -> RunReport:
    """Run ``plan``: combine its adapters, then write ``plan.output`` — a PEFT or kohya adapter, or with
    ``plan.merge_into`` that base with the result merged — with a model card and the recipe that repeats the run.

    ``argv`` is the command line to record in the card (None: the card says the Python API made it). A single
    DoRA adapter is merged into a base as it is (DoRA is exact only there); DoRA adapters cannot be combined.
    """
    if not plan.output:
        raise IncompatibleAdaptersError("the plan names no output folder (output)")
    protect = [*plan.adapters, *([plan.merge_into] if plan.merge_into else [])]
    check_output(plan.output, overwrite=overwrite, protect=protect)
    kwargs = plan.combine_kwargs()
    load_options = kwargs.pop("load_options")
    settings = ("method", "heads", "rank", "energy", "rule", "rule_value")
    check_settings(options=plan.options, **{key: getattr(plan, key) for key in settings})
    loaded, weights = load_adapters(
        plan.adapters,
        weights=plan.weights,
        allow_different_bases=plan.allow_different_bases,
        allow_nonfinite=plan.allow_nonfinite,
        load_options=load_options,
    )
    if plan.merge_into:  # keep the factors' precision; plan.dtype is the checkpoint's
        kwargs["dtype"] = None
    if plan.merge_into and _is_single_dora(loaded, weights, plan):
        adapter = loaded[0]
    else:
        adapter = combine(loaded, progress=progress, **{**kwargs, "weights": weights})
    files = {RECIPE_FILE: _repeatable(plan, adapter).to_yaml()}
    files[CARD_FILE] = model_card(
        adapter,
        argv=argv,
        merged_into=plan.merge_into,
        analysis=_cheap_analysis(loaded, weights),
        revisions=revisions(plan.adapters),
        output_format=plan.format,
        recipe=True,
    )
    if plan.merge_into:
        merge = merge_into_base(
            adapter,
            plan.merge_into,
            plan.output,
            dtype=parse_dtype(plan.dtype) or torch.bfloat16,
            shard_size=plan.shard_size,
            device=plan.device,
            overwrite=overwrite,
            progress=progress,
            files=files,
        )
        return RunReport(Path(plan.output), adapter, len(loaded), "checkpoint", merge)
    with atomic_output(plan.output, overwrite=overwrite, protect=[*protect, adapter.source]) as tmp:
        write_adapter(adapter, tmp, **_format_options(plan.format, plan.output))
        _write_files(tmp, files)
    return RunReport(Path(plan.output), adapter, len(loaded), plan.format)


def _is_single_dora(loaded: list[LoraAdapter], weights: list[float], plan: Plan) -> bool:
    """One DoRA adapter at weight 1 with nothing to re-factorise: merged into the base exactly as it is."""
    if not any(a.has_dora for a in loaded):
        return False
    untouched = plan.rank is None and plan.energy is None and plan.rule is None and not plan.options
    if len(loaded) == 1 and weights == [1.0] and plan.method in ("cat", "svd") and untouched:
        return True
    raise IncompatibleAdaptersError(
        f"{next(a.source for a in loaded if a.has_dora)}: a DoRA adapter can be merged into a base only alone, at "
        "weight 1, with method cat or svd and no truncation (its magnitude rescales W+ΔW, so it cannot be combined "
        "with other adapters or re-weighted)"
    )


def _format_options(fmt: str, output: str | Path) -> dict:
    options: dict = {"format": fmt}
    if fmt == "kohya":
        options["file_name"] = Path(output).resolve().name + ".safetensors"
    return options


def save_adapter(
    adapter: LoraAdapter,
    folder: str | Path,
    *,
    format: str = "peft",
    dtype: torch.dtype | str | None = None,
    overwrite: bool = False,
    card: bool = True,
) -> Path:
    """Write ``adapter`` to ``folder`` (atomically) as a PEFT folder or a kohya file, with a README.md model card
    unless ``card`` is false; refuses to replace any of the adapter's own inputs. Returns the folder."""
    protect = [adapter.source, *adapter.provenance.get("sources", [])]
    files = {CARD_FILE: model_card(adapter, revisions=revisions(protect), output_format=format)} if card else {}
    with atomic_output(folder, overwrite=overwrite, protect=protect) as tmp:
        write_adapter(adapter, tmp, dtype=parse_dtype(dtype), **_format_options(format, folder))
        _write_files(tmp, files)
    return Path(folder)


def merge_into_base(
    adapter: LoraAdapter | str | Path,
    base: str | Path,
    out: str | Path,
    *,
    dtype: torch.dtype | str = torch.bfloat16,
    shard_size: int | str = "5GB",
    device: str | torch.device = "cpu",
    overwrite: bool = False,
    progress: bool = False,
    workers: int | None = None,
    files: dict[str, str] | None = None,
) -> MergeReport:
    """Merge ``adapter`` (a `LoraAdapter` or a source) into the ``base`` checkpoint (a folder or Hub id) and write the
    merged checkpoint to ``out``, atomically, without touching any input (see `loramix.checkpoint.write_merged` for
    the layout and the report). ``files`` (name → text: card, recipe) go into the same folder; without them a
    README.md model card says what is known."""
    adapter = load_adapter(adapter)
    target_dtype = parse_dtype(dtype)
    target = resolve_device(device)
    folder = resolve_base(base)
    checkpoint = open_base(folder)
    if files is None:
        files = {CARD_FILE: model_card(adapter, merged_into=str(base))}
    protect = [folder, adapter.source, *adapter.provenance.get("sources", [])]
    with atomic_output(out, overwrite=overwrite, protect=protect, finite=False) as tmp:  # write_merged checks
        report = write_merged(
            adapter,
            checkpoint,
            tmp,
            dtype=target_dtype,
            shard_size=shard_size,
            device=target,
            progress=progress,
            workers=workers,
        )
        _write_files(tmp, files)
    report.path = Path(out)
    return report


def write_search(
    result: SearchResult,
    folder: str | Path,
    *,
    overwrite: bool = False,
    merge_into: str | None = None,
    shard_size: int | str = "5GB",
    device: str | torch.device = "cpu",
    progress: bool = False,
    argv: list[str] | None = None,
) -> Path:
    """Write a search's output folder atomically: the searched adapter (PEFT) — or, with ``merge_into``, that base
    with it merged — plus ``search.json`` (weights, loss, history, settings) and a model card."""
    adapter = result.adapter
    files = {
        SEARCH_FILE: json.dumps(result.to_json(), indent=2) + "\n",
        CARD_FILE: model_card(
            adapter, argv=argv, merged_into=merge_into, revisions=revisions(adapter.provenance.get("sources", []))
        ),
    }
    if merge_into:
        merge_into_base(
            adapter,
            merge_into,
            folder,
            shard_size=shard_size,
            device=device,
            overwrite=overwrite,
            progress=progress,
            files=files,
        )
        return Path(folder)
    protect = [*adapter.provenance.get("sources", []), result.settings.get("base", "")]
    with atomic_output(folder, overwrite=overwrite, protect=[p for p in protect if p]) as tmp:
        write_adapter(adapter, tmp)
        _write_files(tmp, files)
    return Path(folder)


def write_analysis_json(analysis: Analysis, path: str | Path) -> Path:
    """The analysis as JSON in the file ``path`` (atomically; never over one of the analysed adapters)."""
    return write_text_atomic(path, analysis_json(analysis) + "\n", protect=[a.source for a in analysis.adapters])


def write_plots(analysis: Analysis, folder: str | Path) -> list[Path]:
    """The analysis' heatmaps as PNG files in ``folder`` (created if needed; never inside an input); returns their
    paths."""
    folder = refuse_inputs(folder, [a.source for a in analysis.adapters])
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for name, figure in analysis_plots(analysis).items():
        figure.savefig(folder / name, dpi=110, bbox_inches="tight")
        written.append(folder / name)
    return written
