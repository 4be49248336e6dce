"""The `loramix` command: parses flags or a recipe, calls the API (`loramix.pipeline` and friends), prints.

No maths and no files here. Each command imports what it needs when it runs, so ``loramix --help`` and
``loramix methods`` start without importing torch. The CLI alone changes process-wide state: the ``loramix``
logger's handler and level, and torch's CPU threads for the length of a command.
"""

from __future__ import annotations

import logging
import os
import sys

import click

from loramix.cli.align import align
from loramix.cli.convert import convert
from loramix.cli.extract import extract
from loramix.cli.options import (
    DEVICE_HELP,
    SHARD_SIZE_HELP,
    WEIGHTS_HELP,
    Group,
    block_weights,
    error_line,
    errors_as_one_line,
    method_options,
    push_output,
    rank_rule_options,
    state_dict_options,
    verbosity_options,
    weights,
)
from loramix.cli.search import search
from loramix.errors import LoramixError, counted


@click.group(cls=Group, context_settings={"help_option_names": ["-h", "--help"]}, params=verbosity_options())
@click.version_option(package_name="loramix")
def main() -> None:
    """Load, analyse and combine LoRA adapters."""


@main.command()
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


@main.command()
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


@main.command()
@click.argument("adapters", nargs=-1)
@click.option("--recipe", type=click.Path(dir_okay=False), help="Run a YAML recipe (see recipes/).")
@click.option("-w", "--weights", callback=weights, help=WEIGHTS_HELP)
@click.option(
    "--lbws",
    callback=block_weights,
    metavar="LISTS",
    help="kohya/A1111 LoRA Block Weight: one list of 12/20 (SDXL) or 17/26 (SD 1.x) block weights per adapter "
    "('[1,0,...],[1,1,...]'), in sd-scripts' block order; each multiplies that adapter's --weights number.",
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
@click.option("--majority-sign", type=click.Choice(["total", "frequency"]), help="TIES sign election [default: total].")
@click.option("--seed", type=click.IntRange(min=0), help="Seed for random methods (dare_*) [default: 0].")
@click.option(
    "--space",
    type=click.Choice(["dense", "core"]),
    help="Where ties/dare_*/magnitude_prune work: on each out×in ΔW, or on the small core matrices of the joint "
    "factor bases (Core Space) [default: dense].",
)
@click.option(
    "--examples",
    type=click.Path(dir_okay=False),
    help='Methods that need data (regmean): JSON lines {"input": ..., "output": ...}, as search reads (labels unused).',
)
@click.option("--device", default=None, help=DEVICE_HELP)
@click.option(
    "--dtype",
    default=None,
    help="Output dtype: float32, float16, bfloat16 [default: the inputs'; with --merge-into, the base's].",
)
@click.option(
    "--heads",
    type=click.Choice(["refuse", "average", "drop"]),
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
    "[default: the --merge-into base]; methods that need data (regmean) run it forward on --examples.",
)
@click.option(
    "--shard-size",
    help=SHARD_SIZE_HELP,
)
@click.option(
    "--workers",
    type=click.IntRange(min=1),
    help="With --merge-into: tensors merged at once (same bytes for any count) [default: one per CPU; 4 on a GPU].",
)
@click.option(
    "--quantized-as",
    type=click.Choice(["nf4", "fp4", "none"]),
    help="With --merge-into: the adapter is a QLoRA trained on this 4-bit base; round-trip the base through "
    "bitsandbytes' 4-bit quantization before adding ΔW [default: the base's/adapter's quantization_config, else none].",
)
@click.option("--double-quant/--no-double-quant", default=None, help="QLoRA's double quantization of block scales.")
@click.option("--blocksize", type=click.IntRange(min=1), help="4-bit quantization block size [default: 64].")
@click.option(
    "--round-trip",
    type=click.Choice(["all", "targeted"]),
    help="Round-trip every weight a 4-bit model quantizes (the model trained) or only targeted ones [default: all].",
)
@click.option(
    "--format",
    type=click.Choice(["peft", "kohya", "comfyui", "diffusers", "gguf"]),
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
    type=click.Choice(["portable", "exact"]),
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
    from loramix.io.early_copy import early_copy  # no torch: the base's untouched bytes copy while torch imports

    alone = "WORLD_SIZE" not in os.environ  # under torchrun each rank writes its own shards: no copy of all
    if alone and not (recipe or flags["dtype"] or flags["shard_size"] or flags["quantized_as"] or flags["format"]):
        ctx.with_resource(early_copy(flags["merge_into"], list(adapters), output))
    from loramix.recipe import Plan, load_recipe
    from loramix.render.card import kept_summary, quantized_summary, rank_text

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
    elif not adapters:
        raise click.UsageError("give ADAPTER... or --recipe FILE")
    else:
        plan = Plan(adapters=list(adapters), **given)
    plan.output = output or plan.output
    if not plan.output:
        raise click.UsageError("give -o/--output (or 'output' in the recipe)")
    if plan.base or plan.options.get(
        "base"
    ):  # a method that runs the base forward: transformers' per-tensor loading bar is noise
        from transformers.utils import logging as transformers_logging

        transformers_logging.disable_progress_bar()
    report = _run_combine(plan, overwrite=force, progress=ctx.obj["progress"])
    if report is None:
        return  # a torchrun rank other than 0: rank 0 reports
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
    else:
        method = report.adapter.provenance.get("method", plan.method)
        kept = kept_summary(report.adapter.provenance)
        click.echo(
            f"wrote {plan.output}: {counted(len(report.adapter.modules), 'module')}, {rank_text(report.adapter)}"
            + f", {method} of {counted(report.sources, 'adapter')}"
            + (f" ({report.format} format)" if report.format in ("kohya", "comfyui", "diffusers", "gguf") else "")
            + (f"; {kept}" if kept else "")
        )
    push_output(plan.output, push_repo)


def _run_combine(plan, *, overwrite: bool, progress: bool):
    """`loramix.pipeline.run` in this process, or under torchrun as one rank of a merge split over the processes
    (`loramix.merge_processes`; gloo, which carries only the ranks' reports); None on ranks other than 0."""
    from dataclasses import replace

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


def _with_block_weights(lbws: list, weights: list | None, count: int) -> list:
    """--lbws with --weights: each adapter's weight becomes {lbw: its list, ratio: its number} (sd-scripts' ratio
    times block weight)."""
    ratios = [1.0] * len(lbws) if weights is None else weights
    if len(lbws) != count or len(ratios) != count:
        raise click.BadParameter(f"give one list per adapter ({count}), and as many --weights", param_hint="--lbws")
    if not all(isinstance(r, (int, float)) for r in ratios):
        raise click.BadParameter("with --lbws, each --weights item is a number (the ratio)", param_hint="--lbws")
    return [{"lbw": lbw, "ratio": ratio} for lbw, ratio in zip(lbws, ratios)]


main.add_command(extract)
main.add_command(convert)
main.add_command(align)


@main.command()
def methods() -> None:
    """List the merge methods."""
    from loramix.methods import REGISTRY

    width = max(len(n) for n in REGISTRY)
    for m in REGISTRY.values():
        tags = [t for t, on in (("exact", m.exact), ("equal ranks", m.equal_ranks), ("needs data", m.data)) if on]
        tags += [{"dense": "dense ΔW", "core": "core space"}[m.space]] if m.space else []
        click.echo(f"{m.name:<{width}}  {m.description}" + (f" [{', '.join(tags)}]" if tags else ""))
        options = ", ".join(f"{k}={v}" for k, v in m.defaults.items())
        details = "; ".join(p for p in (m.paper, f"options (defaults): {options}" if options else "") if p)
        if details:
            click.echo(f"{'':<{width}}    {details}")


@main.command()
@click.argument("name", required=False)
@errors_as_one_line
def examples(name: str | None) -> None:
    """List the bundled examples, or print the folder of example NAME.

    tiny-llama: a tiny random Llama with a character tokenizer; summarize, translate, formal: PEFT adapters made on
    it; dora: a PEFT DoRA adapter on it, for `loramix convert`; few-shot: formal.jsonl, examples for `loramix
    search`; minimind: a hand-made LoRA state dict (.pth) and the module_map.yaml that renames its modules to
    tiny-llama's; tiny-llama-tuned: a "fully fine-tuned" tiny-llama for `loramix extract`.
    """
    from loramix import examples as bundled

    if name:
        click.echo(bundled.path(name))
        return
    for item in bundled.names():
        click.echo(f"{item:<12}{bundled.path(item)}")


@main.command()
@click.argument("adapters", nargs=-1, required=True)
@click.option("--base", metavar="MODEL", help="Base model folder or Hub id (its weights give ‖ΔW‖/‖W‖).")
@click.option(
    "--quantized-as",
    type=click.Choice(["nf4", "fp4", "none"]),
    help="With --base: also the share of ‖ΔW‖² (float64) in entries with |ΔW| < step/2, step = the base weight's "
    "block absmax × the gap between the NF4/FP4 code values around W/absmax "
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
    from loramix.analysis import analyze as run_analyze
    from loramix.analysis.report import analysis_json, analysis_text
    from loramix.analysis_files import write_analysis_json, write_plots
    from loramix.io.files import check_file
    from loramix.recipe import LOAD_OPTIONS
    from loramix.runtime import torch_threads

    if as_json:  # the earlier spellings `--json -` (printed) and `--json FILE` (written) read as this flag
        adapters, named = _json_file_given([a for a in adapters if a != "-"], json_file)
        json_file, as_json = named or json_file, not named
    if json_file:
        check_file(json_file, overwrite=force)  # before the long part
    loading = {key: options.pop(key) for key in LOAD_OPTIONS}
    load_options = {k: v for k, v in loading.items() if v is not None} or None
    with torch_threads(threads):
        result = run_analyze(list(adapters), progress=ctx.obj["progress"], load_options=load_options, **options)
    click.echo(analysis_json(result) if as_json else analysis_text(result, top=top))
    if json_file:
        click.echo(f"wrote {write_analysis_json(result, json_file, overwrite=force)}", err=as_json)
    if plot_dir:
        for path in write_plots(result, plot_dir):
            click.echo(f"wrote {path}", err=as_json)


def _json_file_given(adapters: list[str], json_file: str | None) -> tuple[list[str], str | None]:
    """``analyze --json FILE.json``, the earlier way to write the JSON: FILE (a .json is never an adapter) taken out
    of the adapters and written as --json-file FILE, with a warning."""
    named = [a for a in adapters if a.endswith(".json")]
    if not named or json_file:
        return adapters, None
    logging.getLogger("loramix.cli").warning("--json FILE is now --json-file FILE: writing %s as that", named[0])
    return [a for a in adapters if a != named[0]], named[0]


main.add_command(search)


@main.command()
@click.argument("folder", type=click.Path(exists=True, file_okay=False))
@click.argument("repo_id")
@click.option("--private", is_flag=True, help="Create the repository private (when it does not exist yet).")
@click.option("--revision", help="Branch to upload to (created when missing) [default: main].")
@click.option("--commit-message", help="The commit message [default: Upload FOLDER with loramix VERSION].")
@errors_as_one_line
def push(folder: str, repo_id: str, private: bool, revision: str | None, commit_message: str | None) -> None:
    """Upload FOLDER (an adapter or merged checkpoint loramix wrote) to the Hub repository REPO_ID.

    The repository is created if needed. The token is huggingface_hub's: HF_TOKEN or `hf auth login`.
    """
    from loramix.hub import push_to_hub

    url = push_to_hub(folder, repo_id, private=private, revision=revision, commit_message=commit_message)
    click.echo(f"pushed {folder} to {repo_id}: {url}")
