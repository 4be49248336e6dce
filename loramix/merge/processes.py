"""One merge into a base split over processes (torchrun, one machine or many sharing a file system).

Output shard i depends only on base shard i, so rank r of N writes the shards i ≡ r (mod N) into one temporary
folder that rank 0 made beside the output; the ranks' reports are gathered, rank 0 writes the index, config, card
and the other files last and puts the folder in place. Every rank merges rank 0's adapter (a combination computed
on each rank could differ in its last bits between machines). A failure on any rank fails the run on every rank,
and the output folder is never left half written.

The process group is the caller's: the CLI joins one under torchrun (joining changes process-wide state, so the
library never does); outside one, `place` is (0, 1) and everything runs in this process as before.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import TypeVar

import torch.distributed as dist

from loramix.errors import CheckpointError, LoramixError
from loramix.io.files import atomic_output
from loramix.merge.checkpoint import MergeReport

T = TypeVar("T")


def place() -> tuple[int, int]:
    """(rank, world size) of this process in the default process group; (0, 1) outside one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _agree(value: object, failure: BaseException | None) -> list:
    """Every rank's ``value``, gathered on every rank; when any rank failed, every rank raises (the failed rank its
    own error, the others one line naming the rank and its error)."""
    gathered: list = [None] * place()[1]
    line = None if failure is None else (str(failure).strip().splitlines() or [type(failure).__name__])[0]
    dist.all_gather_object(gathered, (line, value))
    for rank, (error, _) in enumerate(gathered):
        if error is not None:
            if failure is not None:
                raise failure
            raise CheckpointError(f"rank {rank} of the merge failed: {error}")
    return [value for _, value in gathered]


def shared(value: T) -> T:
    """Rank 0's ``value`` on every rank (itself outside a process group)."""
    if place()[1] == 1:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


@contextlib.contextmanager
def shared_output(
    target: str | Path, *, overwrite: bool, protect: Iterable[str | Path], made: Path | None = None
) -> Iterator[Path]:
    """`loramix.io.files.atomic_output` for all ranks at once: rank 0 makes the temporary folder and every rank
    writes into it; rank 0 puts it in place after the block, once every rank's block has succeeded. ``made``: a
    temporary folder made already, for one process (`atomic_output`'s)."""
    rank, world = place()
    if world == 1:  # finite=False: the merge checks its values as it writes them
        with atomic_output(target, overwrite=overwrite, protect=protect, finite=False, made=made) as tmp:
            yield tmp
        return
    failure: BaseException | None = None
    try:
        with contextlib.ExitStack() as stack:
            made = None
            if rank == 0:
                try:
                    output = atomic_output(target, overwrite=overwrite, protect=protect, finite=False)
                    made = stack.enter_context(output)
                except LoramixError as exc:
                    failure = exc
            yield Path(_agree(made and str(made), failure)[0])
    except BaseException as exc:
        failure = failure or exc
        raise
    finally:
        _agree(None, failure)  # no rank returns before the folder is in place (or every rank knows it is not)


def write_in_parts(write: Callable[[tuple[int, int]], MergeReport]) -> MergeReport:
    """``write((rank, world))`` on each rank, then the whole merge's report on every rank: each rank measured only
    the modules of its own shards."""
    rank, world = place()
    if world == 1:
        return write((0, 1))
    report, failure = None, None
    try:
        report = write((rank, world))
    except Exception as exc:  # every rank must reach the gather, to fail together
        failure = exc
    reports = _agree(report, failure)
    survival = {name: s for r in reports for name, s in r.survival.items()}
    below = {name: share for r in reports for name, share in r.below_step.items()}
    return replace(reports[rank], survival=dict(sorted(survival.items())), below_step=below)
