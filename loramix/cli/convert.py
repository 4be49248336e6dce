"""`loramix convert`: an adapter engines refuse (DoRA; PEFT LoHa/LoKr) as the plain LoRA closest to it (flags →
`loramix.convert.convert` → one printed line)."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from loramix import settings
from loramix.cli.options import choice, errors_as_one_line, rank_rule_options, written_lora_options


@click.command()
@click.argument("source")
@click.option(
    "--base", metavar="MODEL", help="Base model folder, Hub id or GGUF file (needed for DoRA: its update depends on W)."
)
@click.option("-o", "--output", required=True, type=click.Path(file_okay=False), help="Output folder.")
@rank_rule_options
@written_lora_options
@click.option("--dtype", default=None, help="Stored dtype: float32, float16, bfloat16 [default: the source's].")
@click.option(
    "--format",
    type=choice(settings.ModelFormat),
    default="peft",
    help="A PEFT folder, a kohya/A1111 .safetensors or a llama.cpp LoRA .gguf [default: peft].",
)
@click.option("--allow-nonfinite", is_flag=True, help="Load an adapter holding NaN/Inf instead of refusing it.")
@click.option("--json", "as_json", is_flag=True, help="Print the report (OUTPUT/conversion.json) instead of a line.")
@click.option("--threads", type=click.IntRange(min=1), help="Intra-op CPU threads [default: torch's, all cores].")
@click.option("--force", is_flag=True, help="Replace a non-empty output folder.")
@click.pass_context
@errors_as_one_line
def convert(ctx: click.Context, source, output, as_json, threads, force, **options) -> None:
    """Convert SOURCE (a DoRA, VeRA, (IA)³, OFT or FourierFT adapter, with --base; a PEFT LoHa/LoKr adapter) into
    the plain LoRA closest to what it does, in OUTPUT.

    Each module's effective update (DoRA: m·(W + sBA)/‖W + sBA‖ − W on the base weight, in float64) is
    re-factorised as B·A, truncated by --rank, --energy or --rule (none: its full numerical rank, exact to float
    rounding). The base is read one tensor at a time. The card and conversion.json give each module's rank, kept
    energy and measured relative error.
    """
    from loramix.pipeline import run
    from loramix.plans import ConvertPlan
    from loramix.runtime import torch_threads

    plan = ConvertPlan(source=source, output=output, **options)
    with torch_threads(threads):
        result = run(plan, overwrite=force, progress=ctx.obj["progress"], argv=sys.argv)
    echo_converted(plan, result, as_json)


def echo_converted(plan, result, as_json: bool = False) -> None:
    """The line `convert` prints for its `Extraction` (or, ``as_json``, the report it wrote)."""
    from loramix.convert import CONVERSION_FILE
    from loramix.render.card import rank_span

    if as_json:
        click.echo((Path(plan.output) / CONVERSION_FILE).read_text().rstrip())
        return
    modules = result.modules
    kept = min(m.kept for m in modules.values())
    error = max(m.error for m in modules.values())
    ranks = rank_span(sorted({m.rank for m in modules.values()}))
    click.echo(
        f"wrote {plan.output}: {len(modules)} modules, {ranks}, energy kept ≥ {kept:.4f}, relative error ≤ {error:.4f}"
    )
