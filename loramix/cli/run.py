"""`loramix run RECIPE`: any command's recipe (the one written beside its output, or one written by hand) → its plan →
`loramix.run` → the line that command prints."""

from __future__ import annotations

import sys
from dataclasses import replace

import click

from loramix.cli.align import echo_aligned
from loramix.cli.analyze import echo_analysis
from loramix.cli.combine import echo_combined
from loramix.cli.convert import echo_converted
from loramix.cli.extract import echo_extracted
from loramix.cli.options import errors_as_one_line, start_up
from loramix.cli.search import distributed_rank, echo_searched

ECHO = {
    "combine": echo_combined,
    "extract": echo_extracted,
    "convert": echo_converted,
    "align": echo_aligned,
    "search": echo_searched,
    "analyze": echo_analysis,
}


@click.command()
@click.argument("recipe", type=click.Path(dir_okay=False))
@click.option("-o", "--output", type=click.Path(file_okay=False), help="Output folder [default: the recipe's].")
@click.option("--force", is_flag=True, help="Replace a non-empty output folder.")
@click.pass_context
@errors_as_one_line
def run(ctx: click.Context, recipe: str, output: str | None, force: bool) -> None:
    """Run RECIPE: a YAML plan of any command (combine, extract, convert, align, search, analyze; its `command` key,
    none: combine), such as the loramix_recipe.yaml written beside every output, which repeats that output bit for
    bit. An analyze recipe prints the analysis (and writes its JSON file with -o)."""
    with start_up():
        from loramix.pipeline import run as run_plan
        from loramix.recipe import load_recipe
        from loramix.runtime import torch_threads

    plan = load_recipe(recipe)
    plan = replace(plan, output=output or plan.output)
    if not plan.output and plan.writes_folder:
        raise click.UsageError("give -o/--output (or 'output' in the recipe)")
    with torch_threads(1 if plan.command == "combine" else None):
        result = run_plan(plan, overwrite=force, progress=ctx.obj["progress"], argv=sys.argv)
    if distributed_rank() == 0:
        ECHO[plan.command](plan, result)
