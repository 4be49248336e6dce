"""`loramix analyze` as a plan (`run_analyze`, an `AnalyzePlan`): the analysis of its adapters, and its JSON file when
the plan names one (checked before the long part, written atomically, never over an input)."""

from __future__ import annotations

from loramix.analysis import Analysis, analyze
from loramix.analysis_files import write_analysis_json
from loramix.io.files import check_file
from loramix.plans import AnalyzePlan


def run_analyze(
    plan: AnalyzePlan, *, overwrite: bool = False, progress: bool = False, argv: list[str] | None = None
) -> Analysis:
    """Run an `AnalyzePlan` (``argv`` is not recorded: an analysis has no card)."""
    if plan.output:
        check_file(plan.output, overwrite=overwrite)
    load = plan.load
    result = analyze(
        list(plan.adapters),
        weights=plan.weights,
        rank_rule=plan.rank_rule,
        base=plan.base,
        allow_different_bases=load.allow_different_bases,
        allow_nonfinite=load.allow_nonfinite,
        progress=progress,
        load_options=load.per_source(),
        quantized_as=plan.quantized.quantized_as,
        blocksize=plan.quantized.blocksize,
    )
    if plan.output:
        write_analysis_json(result, plan.output, overwrite=overwrite)
    return result
