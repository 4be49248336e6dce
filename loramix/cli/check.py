"""`loramix check`: which consumers load an adapter (or a merged checkpoint) and read it right, and the fixes."""

from __future__ import annotations

import click

from loramix.cli.options import (
    errors_as_one_line,
    state_dict_options,
)


@click.command()
@click.argument("adapters", nargs=-1, required=True)
@click.option("--json", "as_json", is_flag=True, help="Print a JSON array, one object per adapter.")
@state_dict_options
@errors_as_one_line
def check(adapters: tuple[str, ...], as_json: bool, **load_options) -> None:
    """Which consumers (PEFT, transformers, vLLM, SGLang, LoRAX/TGI, llama.cpp, diffusers) load ADAPTERS and
    read every module's scale right; for each "no" or "wrong", why and the loramix command that fixes it. A model
    folder (a merged checkpoint) gets which engines load it as stored, its quantized format included."""
    from loramix.compat import check_source
    from loramix.render.compat import check_json, check_text

    reports = [check_source(a, **load_options) for a in adapters]
    click.echo(check_json(reports) if as_json else check_text(reports))
