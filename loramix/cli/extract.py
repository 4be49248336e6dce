"""`loramix extract`: a LoRA from a fully fine-tuned model (flags → `loramix.pipeline.extract` → one printed line)."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from loramix import settings
from loramix.cli.options import (
    choice,
    errors_as_one_line,
    rank_rule_options,
    start_gpu_driver,
    start_up,
    written_lora_options,
)
from loramix.errors import counted


@click.command()
@click.argument("base")
@click.argument("finetuned")
@click.option("-o", "--output", required=True, type=click.Path(file_okay=False), help="Output folder.")
@rank_rule_options
@written_lora_options
@click.option("--dtype", default=None, help="Stored dtype: float32, float16, bfloat16 [default: the fine-tuned's].")
@click.option(
    "--format",
    type=choice(settings.ModelFormat),
    default=None,
    help="A PEFT folder (carries changed norms, biases and resized embeddings as modules_to_save), a kohya/A1111 "
    ".safetensors or a llama.cpp LoRA .gguf (LoRA modules only) [default: peft; kohya for diffusers pipelines].",
)
@click.option("--json", "as_json", is_flag=True, help="Print the report (OUTPUT/extraction.json) instead of a line.")
@click.option("--threads", type=click.IntRange(min=1), help="Intra-op CPU threads [default: torch's, all cores].")
@click.option("--force", is_flag=True, help="Replace a non-empty output folder.")
@click.pass_context
@errors_as_one_line
def extract(ctx: click.Context, base, finetuned, output, as_json, threads, force, **options) -> None:
    """Extract the LoRA that best reproduces FINETUNED on BASE (transformers model folders or Hub ids, llama.cpp GGUF
    files read dequantized, or two diffusers pipeline folders: one kohya file for all their UNet/transformer/
    text-encoder modules) into OUTPUT.

    Per linear, Conv1D, embedding and conv weight, ΔW = W_finetuned − W_base (float32) is truncated by --rank,
    --energy or --rule (the rules of combine; one is needed), with the top of its spectrum computed only as far as the
    rule needs (equal to the truncated SVD). Both models are read one tensor at a time. The card and extraction.json
    give each module's rank, kept energy and measured relative error; changed tensors that are not LoRA targets
    (norms, biases, a resized embedding) are carried whole or listed; identical ones are skipped.
    """
    start_gpu_driver(options["device"])
    with start_up():
        from loramix.pipeline import run
        from loramix.plans import ExtractPlan
        from loramix.runtime import torch_threads

    plan = ExtractPlan(base=base, finetuned=finetuned, output=output, **options)
    with torch_threads(threads):
        result = run(plan, overwrite=force, progress=ctx.obj["progress"], argv=sys.argv)
    echo_extracted(plan, result, as_json)


def echo_extracted(plan, result, as_json: bool = False) -> None:
    """The line `extract` prints for an `Extraction` (or, ``as_json``, the report it wrote)."""
    from loramix.adapter import portable_layout
    from loramix.pipeline import EXTRACTION_FILE
    from loramix.render.card import rank_text

    if as_json:
        click.echo((Path(plan.output) / EXTRACTION_FILE).read_text().rstrip())
        return
    modules = result.modules
    errors = [m.error for m in modules.values()]
    kept = min(m.kept for m in modules.values())
    exact = plan.format == "kohya" or plan.rank_layout == "exact"  # else zero-padded to one rank
    written = result.adapter if exact else portable_layout(result.adapter)
    line = (
        f"wrote {plan.output}: {counted(len(modules), 'module')}, {rank_text(written)}"
        f", energy kept ≥ {kept:.4f}, relative error ≤ {max(errors):.4f}"
    )
    if result.carried:
        where = "not carried" if result.dropped else "carried whole"
        line += f"; {counted(len(result.carried), 'other changed tensor')} {where}"
    click.echo(line + f"; {result.unchanged} unchanged")
