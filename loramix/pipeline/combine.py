"""`loramix combine` end to end (`run_combine`, a `Plan`): its settings checked and its adapters loaded once, combined
by the core (`loramix.combination.combine_loaded`), then written — an adapter file in the format its writer declares,
or a base with the result merged — with a model card and the recipe that repeats the run."""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

from loramix.adapter import LoraAdapter, portable_layout
from loramix.analysis import Analysis, analyze_loaded
from loramix.combination import check_settings, combine_loaded
from loramix.errors import IncompatibleAdaptersError
from loramix.extraction.conversion import effective_adapters
from loramix.formats import default_format, load_adapters, write_adapter
from loramix.hub import revisions
from loramix.linalg import RankRule
from loramix.merge.checkpoint import MergeReport
from loramix.methods import get_method
from loramix.outputs import Output, recipe_file
from loramix.plans import Plan
from loramix.render.card import CARD_FILE, model_card
from loramix.schedule import Constant
from loramix.weight_search.grams import method_grams

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


def _cheap_analysis(loaded: list[LoraAdapter], weights: list) -> Analysis | None:
    """The sources' analysis for a card, when there are 2–8 small sources."""
    if not 2 <= len(loaded) <= CHEAP_ANALYSIS_SOURCES or sum(a.num_params() for a in loaded) > CHEAP_ANALYSIS_PARAMS:
        return None
    return analyze_loaded(loaded, weights)


def run_combine(plan: Plan, *, overwrite: bool = False, progress: bool = False, argv: list[str] | None = None):
    """Combine ``plan.adapters``, then write ``plan.output``: an adapter in ``plan.format`` (None: the format the
    inputs' own ecosystem loads, `loramix.formats.default_format`), or with ``plan.merge_into`` that base with the
    result merged; with a model card and the recipe. A single DoRA adapter is merged into a base as it is; otherwise
    each DoRA adapter is its effective update on ``plan.base`` (or ``plan.merge_into``), exact at full rank."""
    if not plan.output:
        raise IncompatibleAdaptersError("the plan names no output folder (output)")
    if plan.quantized_as not in (None, "none") and not plan.merge_into:
        raise IncompatibleAdaptersError(
            "`quantized_as` round-trips a base through 4-bit before merging: it needs a base", option="merge_into"
        )
    out = Output.of(plan, overwrite=overwrite)
    target = plan.target if plan.merge_into else None
    options = dict(plan.options)
    if plan.base and "base" not in options and get_method(plan.method).data:
        options["base"] = plan.base  # a method that needs data runs the run's base forward
    settings = check_settings(  # a merge keeps the factors' precision (plan.dtype is the checkpoint's), exact ranks
        method=plan.method,
        options=options,
        heads=plan.heads,
        rule=plan.rank_rule,
        rank_layout="exact" if target else plan.rank_layout or "portable",
        device=plan.device,
        dtype=None if target else plan.dtype,
    )
    load = plan.load
    loaded, weights = load_adapters(
        plan.adapters,
        weights=plan.weights,
        allow_different_bases=load.allow_different_bases,
        allow_nonfinite=load.allow_nonfinite,
        load_options=load.per_source(),
    )
    if target is None:  # the format the inputs' own ecosystem loads unless one was asked for
        plan = replace(plan, format=plan.format or default_format(loaded), rank_layout=plan.rank_layout or "portable")
    if target and _is_single_dora(loaded, weights, plan):
        adapter = loaded[0]
    else:  # DoRA adapters become their effective updates on the base, which combine as LoRAs do
        loaded = effective_adapters(loaded, plan.base or plan.merge_into, device=plan.device, progress=progress)
        adapter = combine_loaded(loaded, weights, settings, grams=method_grams(settings, loaded), progress=progress)
    written = None if target else plan.written
    if written and written.writer.laid_out and written.rank_layout == "portable":
        adapter = portable_layout(adapter)  # what the file holds, for the card and the report
    provenance = adapter.provenance
    used = {
        "weights": list(provenance.get("weights") or plan.weights or []) or None,
        **settings.rule.keywords(conv=True),
        "options": provenance.get("options", plan.options),
        "dtype": plan.dtype or (None if target else str(adapter.dtype).removeprefix("torch.")),  # None: the base's
    }
    files = recipe_file(plan, **used)
    files[CARD_FILE] = model_card(
        adapter,
        argv=argv,
        merged_into=plan.merge_into,
        analysis=_cheap_analysis(loaded, weights),
        revisions=revisions(plan.adapters),
        output_format=plan.format,
        recipe=True,
        dtype=(plan.dtype or "the base's dtype") if target else None,
    )
    if target:
        merge = out.merge(adapter, target, files, dtype=plan.dtype, device=plan.device, progress=progress)
        return RunReport(Path(plan.output), adapter, len(loaded), "checkpoint", merge)
    out.protect.append(adapter.source)
    out.write(files, lambda tmp: write_adapter(adapter, tmp, **written.write_options(plan.output)))
    return RunReport(Path(plan.output), adapter, len(loaded), plan.format)


def _is_single_dora(loaded: list[LoraAdapter], weights: list, plan: Plan) -> bool:
    """One DoRA adapter at weight 1 with nothing to re-factorise: merged into the base exactly as it is."""
    untouched = plan.rank_rule == RankRule() and not plan.options  # conv_rank too asks for a re-factorisation
    alone = len(loaded) == 1 and loaded[0].has_dora and weights == [Constant(1.0)]
    return alone and plan.method in ("cat", "svd") and untouched
