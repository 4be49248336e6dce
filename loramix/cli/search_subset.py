"""`loramix search --subset`: which modules or layers of each adapter to keep before a merge by any method
(`loramix.weight_search.search_subset`) — its flags and the check that each flag applies to the mode given; a
`SearchPlan` runs it.
"""

from __future__ import annotations

import click
from click.core import ParameterSource

from loramix.cli.options import choice, method_options, option_group, rank_rule_options, weights
from loramix.plans import SearchPlan
from loramix.settings import Granularity

_SUBSET = (
    "Search which modules (or layers) of each adapter to keep before merging with -m, instead of weights: a binary "
    "choice per adapter and module/layer (LwPTV's layer-wise task-vector masks, arXiv:2506.09093, chosen on the "
    "--examples); dropped ones get weight 0 (the base stays for that adapter). Works with every --optimizer and "
    "--objective, on one process; -m, -w, --option and the rank flags (--rank, --energy, --rule) set its merge."
)
_RANK_RULE = ("rank", "energy", "rule", "rule_value")
_OWN = ("subset", "method", "weights", "method_options", *_RANK_RULE)

subset_options = option_group(
    click.option("--subset", type=choice(Granularity), help=_SUBSET),
    click.option("-m", "--method", help="With --subset: the merge method (see `loramix methods`) [default: cat]."),
    click.option(
        "-w", "--weights", callback=weights, help="With --subset: one weight per adapter [default: 1/n each]."
    ),
    click.option(
        "--option",
        "method_options",
        multiple=True,
        callback=method_options,
        metavar="KEY=VALUE",
        help="With --subset: a method option (density=0.5).",
    ),
    rank_rule_options,
)


def _spelled(ctx: click.Context, name: str) -> str:
    param = next(p for p in ctx.command.params if p.name == name)
    return "/".join(param.opts)


def split_subset(ctx: click.Context, options: dict) -> dict:
    """Take the subset flags out of ``options`` (what the weight search gets); refuse, as a usage error, a flag
    given on the command line that does not apply to the mode asked for. Returns the `SearchPlan` settings of a
    subset search (none without --subset)."""
    own = {key: options.pop(key) for key in _OWN}
    given = [
        key for key in (*_OWN, *SearchPlan.WEIGHTS_ONLY) if ctx.get_parameter_source(key) is not ParameterSource.DEFAULT
    ]
    if own["subset"]:
        wrong = [key for key in given if key in SearchPlan.WEIGHTS_ONLY]
        if wrong:
            raise click.UsageError(f"{_spelled(ctx, wrong[0])} does not apply with --subset")
    else:
        wrong = [key for key in given if key in _OWN]
        if wrong:
            raise click.UsageError(f"{_spelled(ctx, wrong[0])} applies only with --subset")
        return {}
    own["options"] = own.pop("method_options")
    return {key: value for key, value in own.items() if value is not None}


def summary(output: str, result) -> str:
    """The line the command prints: what was dropped, the loss against keeping everything, the merge."""
    dropped = [
        f"{', '.join(labels)} of {source}"
        for labels, source in zip(result.settings["dropped"], result.settings["adapters"])
        if labels
    ]
    what = "dropped " + "; ".join(dropped) if dropped else "kept every module"
    settings = result.settings
    return (
        f"wrote {output}: {what}; {settings['objective']} {result.loss:.4f} ({settings['loss_keeping_all']:.4f} "
        f"keeping all), {settings['merges']} merges scored in {result.seconds:.1f} s, {settings['method']} merge"
    )
