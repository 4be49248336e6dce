"""`loramix combine`: flags or a recipe → a `Plan` → `loramix.run` → one printed line."""

from __future__ import annotations

import os
import sys
from dataclasses import replace

import click

from loramix import settings
from loramix.cli.options import (
    DEVICE_HELP,
    SHARD_SIZE_HELP,
    WEIGHTS_HELP,
    block_weights,
    choice,
    errors_as_one_line,
    method_options,
    push_output,
    rank_rule_options,
    start_gpu_driver,
    start_up,
    state_dict_options,
    weights,
)
from loramix.errors import counted


@click.command()
@click.argument("adapters", nargs=-1)
@click.option("--recipe", type=click.Path(dir_okay=False), help="Run a YAML recipe (see recipes/).")
@click.option("-w", "--weights", callback=weights, help=WEIGHTS_HELP)
@click.option(
    "--lbws",
    callback=block_weights,
    metavar="LISTS",
    help="kohya/A1111 LoRA Block Weight: one list of 12/20 (SDXL) or 17/26 (SD 1.x) block weights per adapter "
    "('[1,0,...],[1,1,...]'), in sd-scripts' block order, or 57 (Flux.1: 19 double then 38 single blocks), 24/38 "
    "(SD3/SD3.5 joint blocks); each multiplies that adapter's --weights number.",
)
@click.option("-m", "--method", default=None, help="Merge method (see `loramix methods`) [default: svd].")
@rank_rule_options
@click.option(
    "--conv-rank",
    type=click.IntRange(min=1),
    help="At most this rank for conv modules with a kernel other than 1×1, in place of --rank (kohya's "
    "--new_conv_rank).",
)
@click.option(
    "--option",
    "options",
    multiple=True,
    callback=method_options,
    metavar="KEY=VALUE",
    help="A method option; numeric ones take the forms of --weights too (density='[0.2,0.8]').",
)
@click.option("--density", type=click.FloatRange(0, 1, min_open=True), help="Share of entries kept (ties, dare…).")
@click.option("--majority-sign", type=choice(settings.MajoritySign), help="TIES sign election [default: total].")
@click.option("--seed", type=click.IntRange(min=0), help="Seed for random methods (dare_*) [default: 0].")
@click.option(
    "--space",
    type=choice(settings.Space),
    help="Where ties/dare_*/magnitude_prune work: on each out×in ΔW, or on the small core matrices of the joint "
    "factor bases (Core Space) [default: dense].",
)
@click.option(
    "--examples",
    type=click.Path(dir_okay=False),
    help='Methods that need data (regmean, lot): JSON lines {"input": ..., "output": ...}, as search reads (labels '
    "unused).",
)
@click.option("--device", default=None, help=DEVICE_HELP)
@click.option(
    "--dtype",
    default=None,
    help="Output dtype: float32, float16, bfloat16 [default: the inputs'; with --merge-into, the base's].",
)
@click.option(
    "--heads",
    type=choice(settings.Heads),
    help="Heads (modules_to_save) that several adapters carry: refuse, their weighted average, or drop them (the "
    "base's own stay) [default: refuse].",
)
@click.option("--allow-different-bases", is_flag=True, default=None, help="Combine adapters made for different bases.")
@click.option("--allow-nonfinite", is_flag=True, default=None, help="Accept NaN/Inf in the inputs.")
@state_dict_options
@click.option("-o", "--output", type=click.Path(file_okay=False), help="Output folder (adapter or merged model).")
@click.option("--force", is_flag=True, help="Replace a non-empty output folder.")
@click.option("--merge-into", "merge_into", metavar="BASE", help="Write BASE (a folder or Hub id) merged.")
@click.option(
    "--base",
    metavar="MODEL",
    help="Base model folder or Hub id: DoRA adapters become their effective updates on it, so that they combine "
    "[default: the --merge-into base]; methods that need data (regmean, lot) run it forward on --examples.",
)
@click.option(
    "--shard-size",
    help=SHARD_SIZE_HELP,
)
@click.option(
    "--workers",
    type=click.IntRange(min=1),
    help="With --merge-into: tensors merged at once (same bytes for any count) [default: one per CPU; on a GPU 8, "
    "4 where a tensor is merged whole].",
)
@click.option(
    "--quantized-as",
    type=choice(settings.QuantizedAs),
    help="With --merge-into: the adapter is a QLoRA trained on this quantized base; round-trip the base through "
    "bitsandbytes' 4-bit quantization (nf4, fp4), transformers' block FP8 (fp8) or gpt-oss experts' MXFP4 (mxfp4) "
    "before adding ΔW [default: the base's/adapter's quantization_config, else none].",
)
@click.option("--double-quant/--no-double-quant", default=None, help="QLoRA's double quantization of block scales.")
@click.option(
    "--blocksize",
    type=click.IntRange(min=1),
    help="Quantization block size [default: 64; fp8: 128 (128×128); mxfp4: 32].",
)
@click.option(
    "--round-trip",
    type=choice(settings.RoundTrip),
    help="Round-trip every weight a 4-bit model quantizes (the model trained) or only targeted ones [default: all].",
)
@click.option(
    "--merged-format",
    type=choice(settings.MergedFormat),
    help="With --merge-into: the merged checkpoint's files; safetensors writes a GGUF base as a transformers model "
    "folder (transformers' names, config.json and tokenizer from the GGUF metadata, dequantized: in --dtype, else "
    "F32/F16/BF16 tensors as stored and quantized ones as float32) [default: the base's own, GGUF for a GGUF base].",
)
@click.option(
    "--format",
    type=choice(settings.Format),
    help="Adapter output format: a PEFT folder, a kohya/A1111 .safetensors (comfyui: in ComfyUI's diffusion_model. "
    "names), a diffusers pytorch_lora_weights.safetensors or a llama.cpp LoRA .gguf in the folder [default: kohya for "
    "kohya/diffusers/LyCORIS inputs (comfyui for Wan), else peft].",
)
@click.option(
    "--gguf-base",
    metavar="BASE",
    help="With --format gguf: the base (folder or Hub id) whose config.json gives the architecture "
    "[default: the adapter's base].",
)
@click.option(
    "--rank-layout",
    type=choice(settings.RankLayout),
    help="portable: one rank for every module, read right by every engine; exact: per-module ranks and scales "
    "(PEFT only) [default: portable].",
)
@click.option("--push-to-hub", "push_repo", metavar="REPO_ID", help="Then upload OUTPUT to this Hub repository.")
@click.pass_context
@errors_as_one_line
def combine(ctx: click.Context, adapters, recipe, output, force, push_repo, **flags) -> None:
    """Combine ADAPTERS (PEFT or AdaLoRA folders; kohya/A1111, diffusers or LyCORIS .safetensors files; LoRA state
    dicts; Hub ids) into one PEFT adapter written to OUTPUT.

    With --merge-into BASE, OUTPUT is instead BASE with the result merged in (sharded safetensors, in the base's
    dtype unless --dtype says otherwise).
    """
    from loramix.io.disk.early_copy import early_copy  # no torch: the base's untouched bytes copy while torch imports

    alone = "WORLD_SIZE" not in os.environ  # under torchrun each rank writes its own shards: no copy of all
    if alone and not (recipe or flags["dtype"] or flags["shard_size"] or flags["quantized_as"] or flags["format"]):
        ctx.with_resource(early_copy(flags["merge_into"], list(adapters), output))
    if alone and not recipe:
        start_gpu_driver(flags["device"])
    with start_up():
        from loramix.plans import Plan
        from loramix.recipe import load_recipe

    for key in ("density", "majority_sign", "seed", "space", "examples"):  # flags for method options
        if flags[key] is not None:
            flags["options"] = {**flags["options"], key: flags[key]}
        del flags[key]
    lbws = flags.pop("lbws")
    if lbws is not None:
        flags["weights"] = _with_block_weights(lbws, flags["weights"], len(adapters))
    given = {k: v for k, v in flags.items() if v not in (None, {})}
    if recipe:
        if adapters or given:
            raise click.UsageError("with --recipe, give only -o/--output and --force")
        plan = load_recipe(recipe)
        if not isinstance(plan, Plan):
            raise click.UsageError(f"{recipe} is a {plan.command} recipe: run it with `loramix run {recipe}`")
    elif not adapters:
        raise click.UsageError("give ADAPTER... or --recipe FILE")
    else:
        plan = Plan(adapters=list(adapters), **given)
    plan = replace(plan, output=output or plan.output)
    if not plan.output:
        raise click.UsageError("give -o/--output (or 'output' in the recipe)")
    if plan.base or plan.options.get("base"):  # a method that runs the base forward: transformers' loading bar
        from transformers.utils import logging as transformers_logging

        transformers_logging.disable_progress_bar()
    report = _run_combine(plan, overwrite=force, progress=ctx.obj["progress"])
    if report is None:
        return  # a torchrun rank other than 0: rank 0 reports
    echo_combined(plan, report)
    push_output(plan.output, push_repo)


def _run_combine(plan, *, overwrite: bool, progress: bool):
    """`loramix.run` in this process, or under torchrun as one rank of a merge split over the processes
    (`loramix.merge.processes`; gloo, which carries only the ranks' reports); None on ranks other than 0."""
    from loramix.pipeline import run
    from loramix.runtime import torch_threads
    from loramix.weight_search import distributed

    place = distributed.torchrun_rank()  # (rank, local rank, world) when torchrun started this process
    with torch_threads(1):
        if place is None:
            return run(plan, overwrite=overwrite, progress=progress, argv=sys.argv)
        if not plan.merge_into:
            raise click.UsageError("under torchrun, combine splits a --merge-into over the processes: give one")
        rank, local_rank, world = place
        if plan.device in ("auto", "cuda") and distributed.rank_devices(plan.device, local_rank, 1) != "cpu":
            plan = replace(plan, device=f"cuda:{local_rank}")  # one GPU per process
        with distributed.process_group("cpu", rank=rank, world=world):
            report = run(plan, overwrite=overwrite, progress=progress and rank == 0, argv=sys.argv)
    return report if rank == 0 else None


def echo_combined(plan, report) -> None:
    """The line `combine` prints for a `RunReport`: what was written, merged or combined, and how."""
    from loramix.render.card import kept_summary, quantized_summary, rank_text

    if report.merge is not None:
        merge = report.merge
        worst = max(merge.survival.items(), key=lambda kv: kv[1].error, default=None)
        names = [str(d).removeprefix("torch.") for d in (merge.base_dtype, merge.dtype)]
        converted = names[0] != names[1] and merge.written_as is None  # else quantized_summary says how it was
        click.echo(
            f"wrote {plan.output}: {plan.merge_into} with {counted(len(merge.survival), 'module')} merged, "
            f"{counted(merge.tensors, 'tensor')} in {counted(len(merge.shards), 'shard')}"
            + (f", converted from {names[0]} to {names[1]} (--dtype)" if converted else "")
            + (
                f"; stored ΔW vs intended: error ≤ {worst[1].error:.3f}, cosine {worst[1].cosine:.3f} ({worst[0]})"
                if worst
                else ""
            )
            + quantized_summary(merge)
        )
        return
    method = report.adapter.provenance.get("method", plan.method)
    kept = kept_summary(report.adapter.provenance)
    click.echo(
        f"wrote {plan.output}: {counted(len(report.adapter.modules), 'module')}, {rank_text(report.adapter)}"
        + f", {method} of {counted(report.sources, 'adapter')}"
        + (f" ({report.format} format)" if report.format != "peft" else "")
        + (f"; {kept}" if kept else "")
    )


def _with_block_weights(lbws: list, weights: list | None, count: int) -> list:
    """--lbws with --weights: each adapter's weight becomes {lbw: its list, ratio: its number} (sd-scripts' ratio
    times block weight)."""
    ratios = [1.0] * len(lbws) if weights is None else weights
    if len(lbws) != count or len(ratios) != count:
        raise click.BadParameter(f"give one list per adapter ({count}), and as many --weights", param_hint="--lbws")
    if not all(isinstance(r, (int, float)) for r in ratios):
        raise click.BadParameter("with --lbws, each --weights item is a number (the ratio)", param_hint="--lbws")
    return [{"lbw": lbw, "ratio": ratio} for lbw, ratio in zip(lbws, ratios)]
