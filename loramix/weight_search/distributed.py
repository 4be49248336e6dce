"""Search across processes with torch.distributed: one process per GPU (or per group of GPUs holding one copy of
the base), each scoring its slice of every population, the losses gathered to all.

Every rank runs the same optimizer from the same seed on the same gathered losses, so all ranks take the same steps
and the result is one process's. A population of P is cut into contiguous slices of ⌈P/N⌉ candidates (the last
ones shorter or empty), which is exactly how one process cuts it with ``max_candidates = ⌈P/N⌉``: with that setting
the forward passes have the same shapes and the losses the same bits.

`launch` starts N processes on this machine in one process group (NCCL between GPUs, gloo on the CPU) and turns a
failure in any of them into one line (the others are stopped). Optimizers that score one candidate per step
(COBYLA, Adam) gain nothing: rank 0 scores COBYLA's candidate, and every rank takes Adam's gradient step itself.
`torchrun_rank` reads the place torchrun gives a process. `process_group` joins (and leaves) the group; it changes
process-wide state, so only the CLI and `launch`'s children call it.
"""

from __future__ import annotations

import contextlib
import math
import multiprocessing
import os
import pickle
import queue
import socket
from collections.abc import Callable, Iterator
from datetime import timedelta

import torch
import torch.distributed as dist

from loramix.errors import LoramixError, SearchError

_POLL_SECONDS = 0.2
_GROUP_TIMEOUT = timedelta(minutes=30)  # a rank waiting this long at a collective gives up (its peer is gone)


def rank_and_world() -> tuple[int, int]:
    """This process's rank and the world size of the default process group (0, 1 outside one)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def population_slice(size: int, rank: int, world: int) -> slice:
    """The candidates rank ``rank`` of ``world`` scores: a contiguous run of ⌈size/world⌉ (shorter or empty last)."""
    chunk = math.ceil(size / world)
    return slice(min(rank * chunk, size), min((rank + 1) * chunk, size))


def scatter_gather(W: torch.Tensor, score: Callable[[torch.Tensor], torch.Tensor], device: torch.device):
    """``score(W)`` (P,) with each rank of the default group scoring its slice of W's rows; every rank gets all P
    losses (float32, on the CPU). Outside a group, simply ``score(W)``."""
    rank, world = rank_and_world()
    if world == 1:
        return score(W).float().cpu()
    size = W.shape[0]
    part = population_slice(size, rank, world)
    chunk = math.ceil(size / world)
    mine = torch.zeros(chunk, dtype=torch.float32, device=device)
    if part.stop > part.start:
        mine[: part.stop - part.start] = score(W[part]).float().to(device)
    pieces = [torch.empty_like(mine) for _ in range(world)]
    dist.all_gather(pieces, mine)
    return torch.cat(pieces)[:size].cpu()


def torchrun_rank() -> tuple[int, int, int] | None:
    """(rank, local rank, world size) when torchrun (or any env:// launcher) started this process, else None."""
    if "WORLD_SIZE" not in os.environ or "RANK" not in os.environ:
        return None
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    return rank, int(os.environ.get("LOCAL_RANK", rank)), world


def rank_devices(device: str, local_rank: int, per_base: int) -> str:
    """The device(s) of the process at ``local_rank`` on this machine: ``per_base`` GPUs of its own (comma-joined),
    or the CPU. ``device`` is what was asked for all of them: auto, cuda or cpu."""
    if device not in ("auto", "cuda", "cpu"):
        raise SearchError(f"device {device!r}: across processes give auto, cuda or cpu")
    if device == "cpu" or (device == "auto" and not torch.cuda.is_available()):
        if per_base != 1:
            raise SearchError("the base can be split only over GPUs (gpus_per_base > 1 needs CUDA)")
        return "cpu"
    first = local_rank * per_base
    if not torch.cuda.is_available() or first + per_base > torch.cuda.device_count():
        have = torch.cuda.device_count() if torch.cuda.is_available() else 0
        wanted = f"GPU {first}" if per_base == 1 else f"GPUs {first}–{first + per_base - 1}"
        raise SearchError(f"search process {local_rank} needs {wanted}, this machine has {have} GPU(s)")
    return ",".join(f"cuda:{first + j}" for j in range(per_base))


@contextlib.contextmanager
def process_group(device: str, *, rank: int, world: int, address: str | None = None) -> Iterator[None]:
    """Join the default process group (NCCL when ``device`` is a GPU, else gloo) for the block, then leave it.
    ``address`` is ``tcp://host:port``; None reads torchrun's environment (env://)."""
    cuda = device.startswith("cuda")
    if cuda:
        torch.cuda.set_device(torch.device(device.split(",")[0]))
    dist.init_process_group(
        "nccl" if cuda else "gloo",
        init_method=address or "env://",
        rank=rank,
        world_size=world,
        timeout=_GROUP_TIMEOUT,
    )
    try:
        yield
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0][:300]}" if text else type(exc).__name__


def _report(results, rank: int, exc: BaseException) -> None:
    """Send ``exc`` to `launch` and wait until it is in the pipe: a rank that fails reports before it leaves the
    group, so its error arrives ahead of the errors its peers then get at their next collective."""
    if isinstance(exc, LoramixError):
        try:
            message = ("error", rank, pickle.dumps(exc))
        except Exception:  # an unpicklable field: its line still travels
            message = ("line", rank, str(exc))
    else:
        message = ("line", rank, _one_line(exc))
    results.put(message)
    results.close()
    results.join_thread()


def _child(fn: Callable, device: str, rank: int, world: int, address: str, threads: int, results, args) -> None:
    """One process of `launch`: in the group, ``fn(device, *args)``; rank 0 sends back its pickled value, any rank
    its error (a loramix error as it is, anything else as one line), never a traceback."""
    torch.set_num_threads(threads)  # this process is ours: the CPU is shared among the ranks
    try:
        with process_group(device, rank=rank, world=world, address=address):
            try:
                value = fn(device, *args)
            except BaseException as exc:  # noqa: BLE001 — a child ends with one line, never a traceback
                _report(results, rank, exc)
                return
        results.put(("done", rank, pickle.dumps(value) if rank == 0 else None))
    except BaseException as exc:  # noqa: BLE001 — joining or leaving the group failed
        _report(results, rank, exc)


def launch(fn: Callable, devices: list[str], *args):
    """Run ``fn(device, *args)`` in ``len(devices)`` new processes on this machine, rank r on ``devices[r]``, all in
    one process group; return rank 0's value. The first failure stops the others and is raised here as one line
    (a loramix error as the child raised it). ``fn`` and ``args`` must be picklable (``fn`` a module-level function).
    """
    context = multiprocessing.get_context("spawn")  # CUDA cannot be forked
    results = context.Queue()
    address = f"tcp://127.0.0.1:{_free_port()}"
    threads = max(1, (os.cpu_count() or 1) // len(devices))
    processes = [
        context.Process(
            target=_child,
            args=(fn, device, rank, len(devices), address, threads, results, args),
            name=f"loramix-search-{rank}",
        )
        for rank, device in enumerate(devices)
    ]
    for p in processes:
        p.start()
    value, done, failure, finished = None, set(), None, False
    try:
        while len(done) < len(processes) and failure is None:
            try:
                kind, rank, payload = results.get(timeout=_POLL_SECONDS)
            except queue.Empty:  # a child killed outright (out of memory, a signal) sends nothing: look
                crashed = [(r, p.exitcode) for r, p in enumerate(processes) if p.exitcode not in (None, 0)]
                if crashed:
                    r, code = crashed[0]
                    failure = SearchError(f"search process {r} ended without a result (exit status {code})")
                continue
            if kind == "done":
                done.add(rank)
                value = pickle.loads(payload) if rank == 0 else value
            elif kind == "error":
                failure = pickle.loads(payload)
            else:
                failure = SearchError(f"search process {rank} failed: {payload}")
        finished = failure is None
    finally:
        for p in processes:
            if not finished and p.is_alive():  # a failure, or this process interrupted: stop the rest
                p.terminate()
        for p in processes:
            p.join()
    if failure is not None:
        raise failure
    return value
