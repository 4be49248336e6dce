"""`loramix align`: adapters of one base as a serving set (flags → `loramix.align.align` → one printed line)."""

from __future__ import annotations

import sys

import click

from loramix.cli.options import errors_as_one_line


@click.command()
@click.argument("adapters", nargs=-1, required=True)
@click.option("-o", "--output", required=True, type=click.Path(file_okay=False), help="Output folder (of folders).")
@click.option("--allow-nonfinite", is_flag=True, help="Load adapters holding NaN/Inf instead of refusing them.")
@click.option("--force", is_flag=True, help="Replace a non-empty output folder.")
@errors_as_one_line
def align(adapters: tuple[str, ...], output: str, allow_nonfinite: bool, force: bool) -> None:
    """Write ADAPTERS (of one base) into OUTPUT as a serving set: OUTPUT/NAME/, a PEFT folder per adapter, every one
    at one rank and one scale on the union of their target modules (zero factors where an adapter has none), each
    describing its own ΔW unchanged. PEFT's hotswap_adapter swaps them into one torch.compile'd model, and vLLM's and
    SGLang's adapter slots take all of them; `loramix check OUTPUT` says so."""
    from loramix.pipeline import run
    from loramix.plans import AlignPlan

    plan = AlignPlan(adapters=list(adapters), output=output, allow_nonfinite=allow_nonfinite)
    echo_aligned(plan, run(plan, overwrite=force, argv=sys.argv))


def echo_aligned(plan, aligned: dict) -> None:
    """The line `align` prints: the set's adapters, rank and modules, and the vLLM slot rank that takes them."""
    from loramix.compat import VLLM_MAX_RANKS

    first = next(iter(aligned.values()))
    rank = first.ranks[0]
    served = next((r for r in VLLM_MAX_RANKS if r >= rank), None)
    click.echo(
        f"wrote {plan.output}: {len(aligned)} adapters ({', '.join(aligned)}), rank {rank}, the same "
        f"{len(first.modules)} modules" + (f"; vLLM --max-lora-rank {served}" if served else "")
    )
