"""`loramix inspect`: what each adapter is (base, dtype, modules, ranks, scale, warnings), as text or JSON."""

from __future__ import annotations

import sys

import click

from loramix.cli.options import (
    error_line,
    errors_as_one_line,
    state_dict_options,
)
from loramix.errors import LoramixError


@click.command()
@click.argument("adapters", nargs=-1, required=True)
@click.option("--json", "as_json", is_flag=True, help="Print a JSON array, one object per adapter.")
@click.option("--allow-nonfinite", is_flag=True, help="Load adapters holding NaN/Inf instead of refusing them.")
@state_dict_options
@errors_as_one_line
def inspect(adapters: tuple[str, ...], as_json: bool, allow_nonfinite: bool, **load_options) -> None:
    """Describe ADAPTERS (folders, state dict files or Hub ids): base, dtype, modules, ranks, scale, warnings.

    One that cannot be read gets its error line (on stderr; in --json an object with "source" and "error"), the
    others their full report; the exit status is 2 when any failed."""
    from loramix.formats import load_adapter
    from loramix.render.inspect import adapter_summary, inspect_json, inspect_text

    summaries, failed = [], 0
    for source in adapters:
        try:
            adapter = load_adapter(source, allow_nonfinite=allow_nonfinite, log_warnings=False, **load_options)
        except LoramixError as exc:
            failed += 1
            click.echo(error_line(exc), err=True)
            summaries.append({"source": source, "error": error_line(exc).removeprefix("error: ")})
            continue
        summaries.append(adapter_summary(adapter))
        if not as_json:
            click.echo(("\n" if len(summaries) - failed > 1 else "") + inspect_text(summaries[-1:]))
    if as_json:
        click.echo(inspect_json(summaries))
    if failed:
        sys.exit(2)
