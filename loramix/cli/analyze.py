"""`loramix analyze`: spectra, rank use and overlap of adapters, as text, JSON and heatmaps."""

from __future__ import annotations

import logging
from pathlib import Path

import click

from loramix import settings
from loramix.cli.options import (
    WEIGHTS_HELP,
    choice,
    errors_as_one_line,
    rank_rule_options,
    state_dict_options,
    weights,
)


@click.command()
@click.argument("adapters", nargs=-1, required=True)
@click.option("--base", metavar="MODEL", help="Base model folder or Hub id (its weights give ‖ΔW‖/‖W‖).")
@click.option(
    "--quantized-as",
    type=choice(settings.QuantizedAs),
    help="With --base: also the share of ‖ΔW‖² (float64) in entries with |ΔW| < step/2, step = the base weight's "
    "block absmax × the gap between the NF4/FP4 code values around W/absmax (fp8, mxfp4: the grid's spacing at W's "
    "code × its block's scale) "
    "[default: the base's quantization_config, else none].",
)
@click.option("--blocksize", type=click.IntRange(min=1), help="With --quantized-as: the block size [default: 64].")
@click.option("-w", "--weights", callback=weights, help="Weights of the merged sum: " + WEIGHTS_HELP)
@rank_rule_options
@click.option("--json", "as_json", is_flag=True, help="Print the analysis as JSON instead of text.")
@click.option(
    "--json-file", type=click.Path(dir_okay=False), help="Also write the JSON to FILE (one that exists: with --force)."
)
@click.option("--force", is_flag=True, help="Replace an existing --json-file.")
@click.option("--plot", "plot_dir", type=click.Path(file_okay=False), help="Write PNG heatmaps into this folder.")
@click.option("--top", type=click.IntRange(min=1), default=5, show_default=True, help="Rows per most/least list.")
@click.option("--threads", type=click.IntRange(min=1), default=1, show_default=True, help="Intra-op CPU threads.")
@click.option("--allow-different-bases", is_flag=True, help="Analyse adapters made for different bases.")
@click.option("--allow-nonfinite", is_flag=True, help="Load adapters holding NaN/Inf instead of refusing them.")
@state_dict_options
@click.pass_context
@errors_as_one_line
def analyze(ctx: click.Context, adapters, as_json, json_file, force, plot_dir, top, threads, **options) -> None:
    """Spectra, rank use and pairwise overlap of ADAPTERS (any input `combine` takes), computed in factor space.

    Rank suggestions follow --energy (default 0.99 when no --rule is given) or --rule, capped by --rank: the same
    rule `loramix combine --method svd` takes."""
    from loramix.pipeline import run
    from loramix.plans import AnalyzePlan
    from loramix.runtime import torch_threads

    if as_json:  # the earlier spellings `--json -` (printed) and `--json FILE` (written) read as this flag
        adapters, named = _json_file_given([a for a in adapters if a != "-"], json_file)
        json_file, as_json = named or json_file, not named
    plan = AnalyzePlan(adapters=list(adapters), output=json_file, **options)
    with torch_threads(threads):
        result = run(plan, overwrite=force, progress=ctx.obj["progress"])
    echo_analysis(plan, result, as_json=as_json, top=top)
    if plot_dir:
        from loramix.analysis_files import write_plots

        for path in write_plots(result, plot_dir):
            click.echo(f"wrote {path}", err=as_json)


def echo_analysis(plan, result, *, as_json: bool = False, top: int = 5) -> None:
    """The analysis as text (or JSON), and the JSON file written when the plan names one."""
    from loramix.analysis.report import analysis_json, analysis_text

    click.echo(analysis_json(result) if as_json else analysis_text(result, top=top))
    if plan.output:
        click.echo(f"wrote {Path(plan.output).resolve()}", err=as_json)


def _json_file_given(adapters: list[str], json_file: str | None) -> tuple[list[str], str | None]:
    """``analyze --json FILE.json``, the earlier way to write the JSON: FILE (a .json is never an adapter) taken out
    of the adapters and written as --json-file FILE, with a warning."""
    named = [a for a in adapters if a.endswith(".json")]
    if not named or json_file:
        return adapters, None
    logging.getLogger("loramix.cli").warning("--json FILE is now --json-file FILE: writing %s as that", named[0])
    return [a for a in adapters if a != named[0]], named[0]
