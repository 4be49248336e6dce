"""Runs end to end, one module per use case, each writing one output folder through `loramix.outputs.Output`:
`combine` (`run_combine`, a `Plan`), `extract`, `search` (`run_search`, `write_search`), `save` (`save_adapter`),
`analyze` (`run_analyze`: the analysis and its JSON file);
`loramix.convert` and `loramix.align` are the other two. `run(plan)` dispatches on the plan's type after checking
every setting against its field, so that a bad value fails before anything is read.
"""

from __future__ import annotations

from collections.abc import Callable

from loramix.align import run_align
from loramix.convert import run_convert
from loramix.errors import ArgumentError
from loramix.pipeline.analyze import run_analyze
from loramix.pipeline.combine import RunReport, run_combine
from loramix.pipeline.extract import EXTRACTION_FILE, extract, run_extract
from loramix.pipeline.save import save_adapter
from loramix.pipeline.search import SEARCH_FILE, SEARCH_RECIPE_FILE, run_search, write_search
from loramix.plans import AlignPlan, AnalyzePlan, ConvertPlan, ExtractPlan, Plan, SearchPlan, Settings
from loramix.recipe import check_plan

__all__ = [
    "EXTRACTION_FILE",
    "SEARCH_FILE",
    "SEARCH_RECIPE_FILE",
    "RunReport",
    "extract",
    "run",
    "save_adapter",
    "write_search",
]

RUNNERS: dict[type[Settings], Callable] = {
    Plan: run_combine,
    ExtractPlan: run_extract,
    ConvertPlan: run_convert,
    AlignPlan: run_align,
    SearchPlan: run_search,
    AnalyzePlan: run_analyze,
}


def run(plan: Settings, *, overwrite: bool = False, progress: bool = False, argv: list[str] | None = None):
    """Run ``plan`` — a `Plan` (combine), `ExtractPlan`, `ConvertPlan`, `AlignPlan`, `SearchPlan` or `AnalyzePlan`,
    built in Python or read from a recipe (`loramix.recipe.load_recipe`) — and write its output with a model card
    and the recipe that repeats it (an analysis: its JSON file, when the plan names one). Returns what the command
    made: a `RunReport` for combine, an `Extraction` for extract and convert, the aligned adapters by name for align,
    a `SearchResult` for search, an `Analysis` for analyze.

    ``argv`` is the command line to record in the card (None: the card says the Python API made it). Every setting
    is checked against its field first (`loramix.recipe.check_plan`): a bad value fails before anything is read."""
    runner = RUNNERS.get(type(plan))
    if runner is None:
        raise ArgumentError(
            f"run takes a Plan (loramix.Plan(adapters=[...]) or a loaded recipe), got {type(plan).__name__}"
        )
    check_plan(plan)
    return runner(plan, overwrite=overwrite, progress=progress, argv=argv)
