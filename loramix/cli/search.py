"""`loramix search`: the weights of several adapters that fit a few examples best (LoRAHub), on one process, several
processes (--gpus) or under torchrun."""

from __future__ import annotations

import sys

import click

from loramix import settings
from loramix.cli.options import DEVICE_HELP, SHARD_SIZE_HELP, bounds, choice, errors_as_one_line, push_output, weights
from loramix.cli.search_subset import split_subset, subset_options, summary

_COMPOSITION = "lorahub: B = Σwᵢ√sᵢBᵢ, A = Σwᵢ√sᵢAᵢ (LoRAHub, equal ranks); delta: exact Σwᵢsᵢ·BᵢAᵢ [default: lorahub]."
_OPTIMIZER = "cobyla (as LoRAHub), cma (CMA-ES, a generation per forward pass), adam (gradients) [default: cobyla]."


@click.command()
@click.argument("adapters", nargs=-1, required=True)
@click.option("--base", required=True, metavar="MODEL", help="Base model folder or Hub id (causal LM or seq2seq).")
@click.option(
    "--examples", required=True, type=click.Path(dir_okay=False), help='JSON lines {"input": ..., "output": ...}.'
)
@click.option("--composition", type=choice(settings.Composition), default="lorahub", help=_COMPOSITION)
@click.option("--optimizer", type=choice(settings.Optimizer), default="cobyla", help=_OPTIMIZER)
@click.option(
    "--objective",
    type=choice(settings.Objective),
    default="cross-entropy",
    show_default=True,
    help="cross-entropy of the outputs, or (AdaMerging, unlabeled) the entropy of the predictions at those positions.",
)
@click.option(
    "--steps",
    type=click.IntRange(min=1),
    default=40,
    show_default=True,
    help="COBYLA evaluations, CMA-ES generations or Adam steps.",
)
@click.option(
    "--l1",
    type=float,
    default=0.05,
    show_default=True,
    help="Weight of the mean|wᵢ| penalty (over the searched numbers).",
)
@click.option(
    "--bounds", default="-1.5,1.5", show_default=True, callback=bounds, help="LOW,HIGH for every searched number."
)
@click.option("--seed", type=click.IntRange(min=0), default=0, show_default=True, help="Seed of CMA-ES and Adam.")
@click.option("--device", default="auto", help=DEVICE_HELP)
@click.option(
    "--gpus",
    type=click.IntRange(min=1),
    help="Search with this many GPUs of this machine (CPU processes where there is none): one process per "
    "--gpus-per-base GPUs, each population split among them (gloo/NCCL). Under torchrun, give none.",
)
@click.option(
    "--gpus-per-base",
    type=click.IntRange(min=1),
    default=1,
    show_default=True,
    help="GPUs holding each process's copy of the base, split over them by layers (accelerate): for a base too "
    "large for one GPU (--gpus 2 --gpus-per-base 2: one process, its base on 2 GPUs).",
)
@click.option(
    "--init",
    callback=weights,
    help="Starting weights, one per adapter, as -w takes them [default: 0 each]; for a gradient, filters or lbw the "
    "search finds that form's numbers.",
)
@click.option("--popsize", type=click.IntRange(min=2), help="CMA-ES candidates per generation [default: 4+3·ln n].")
@click.option("--lr", type=float, default=0.1, show_default=True, help="Adam learning rate.")
@click.option("--max-candidates", type=click.IntRange(min=1), help="At most this many candidates per forward pass.")
@click.option("--chat-template", is_flag=True, help="Wrap each input as a user turn with the tokenizer's template.")
@subset_options
@click.option("-o", "--output", required=True, type=click.Path(file_okay=False), help="Output folder.")
@click.option("--force", is_flag=True, help="Replace a non-empty output folder.")
@click.option("--merge-into", "merge_into", metavar="BASE", help="Write BASE with the result merged instead.")
@click.option(
    "--shard-size",
    help=SHARD_SIZE_HELP,
)
@click.option("--push-to-hub", "push_repo", metavar="REPO_ID", help="Then upload OUTPUT to this Hub repository.")
@click.pass_context
@errors_as_one_line
def search(
    ctx: click.Context, adapters, base, examples, output, force, merge_into, shard_size, push_repo, **options
) -> None:
    """Search the weights of ADAPTERS whose combination fits the --examples best (LoRAHub, batched).

    OUTPUT receives search.json (weights in the order given, loss, history, settings) and the combined PEFT adapter
    (or, with --merge-into BASE, BASE with it merged). An --init weight that varies by layer or module (a gradient,
    filters, lbw) keeps its form: the search finds its numbers, and reports and writes that form. With --subset,
    the search instead keeps or drops each module (or layer) of each adapter before merging them with -m.
    """
    from transformers.utils import logging as transformers_logging

    from loramix.pipeline import run
    from loramix.plans import SearchPlan

    subset = split_subset(ctx, options)
    transformers_logging.disable_progress_bar()  # its per-tensor loading bar is noise here
    if subset:  # a subset search: its own settings, none of the weight search's
        options = {k: v for k, v in options.items() if k not in SearchPlan.WEIGHTS_ONLY}
    else:
        options["bounds"] = list(options["bounds"])
    plan = SearchPlan(
        base=base,
        adapters=list(adapters),
        examples=examples,
        output=output,
        merge_into=merge_into,
        shard_size=shard_size,
        **options,
        **subset,
    )
    result = run(plan, overwrite=force, progress=ctx.obj["progress"], argv=sys.argv)
    if distributed_rank() == 0:  # under torchrun, rank 0 wrote the output and says so
        echo_searched(plan, result)
        push_output(output, push_repo)


def distributed_rank() -> int:
    """This process's rank under torchrun (0 when torchrun did not start it)."""
    from loramix.weight_search import distributed

    place = distributed.torchrun_rank()
    return 0 if place is None else place[0]


def echo_searched(plan, result) -> None:
    """The line `search` prints: the weights found, the loss, the evaluations and the time."""
    from loramix.schedule import parse

    if plan.subset is not None:
        click.echo(summary(plan.output, result))
        return
    weights = ", ".join(parse(w).describe("+.3f") for w in result.weights)
    scored = f"{plan.objective} {result.cross_entropy:.4f}"
    click.echo(
        f"wrote {plan.output}: weights [{weights}], loss {result.loss:.4f} ({scored}), "
        f"{result.evaluations} evaluations in {result.seconds:.1f} s, {plan.composition} composition"
    )
