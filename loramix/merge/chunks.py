"""One chunk of a merged tensor, W + ΔW in float32 rounded once to the output dtype, at memory speed.

`merged_chunks` yields a tensor's output rows chunk by chunk for `loramix.merge.checkpoint`'s writer. The arithmetic
is the same on every device and for every setting, so the bytes are too: W widened to float32, ΔW one float32
product per update (its scale already in B), W + ΔW, one rounding to the output dtype.

On a GPU each writer thread has its own CUDA stream and two pinned host buffers: the base rows are read from the file
straight into the first and sent as stored (bfloat16), widened to float32 on the device, and the rounded rows come
back into the second, from which they are written: no float32 copy of any chunk on the host. The stored-update
figures (`loramix.merge.kernels.Survival`) stay on the device until the tensor is done (one wait per tensor). On the CPU
the figures are taken on every `STATS_EVERY`-th chunk of a tensor (its first always; a tensor of one chunk whole):
over the rows of a weight, rounding loss is spread alike, and the other chunks are only checked for values that are
or would round to NaN/Inf (one pass: the least and greatest of W + ΔW), which saves about half of
the passes over memory that the CPU spends per chunk. On either device a base tensor's file is opened once for all of
its chunks, and each thread reads into a buffer it keeps; on the CPU each thread also keeps its float32 and output
buffers, and finds them by the chunk's shape without a call into torch (`Buffers`): the writer threads' calls into
torch contend for Python's lock (on a 2-core machine two threads of short torch calls ran no faster than one), so
a chunk makes as few calls as it can.
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
import threading
from collections.abc import Iterator

import torch

from loramix.io.base import BaseTensor
from loramix.merge.kernels import Survival, delta_rows, dora_merge, not_finite
from loramix.merge.quantized_base import whole_delta

STATS_EVERY = 4  # on the CPU: the stored-update figures from every 4th chunk of a tensor


class Buffers(threading.local):
    """Per thread: host buffers kept from chunk to chunk (pinned, with the thread's own CUDA stream, for a GPU) for
    the rows read ("read"), the rows written ("write") and, on the CPU, the float32 steps between; with their typed
    views by shape, so that a chunk of a shape seen before takes no call into torch to find its buffers (on the CPU
    two threads' calls into torch contend for Python's lock, at tens of microseconds a call on a 2-core machine)."""

    def __init__(self, pinned: bool) -> None:
        self.pinned = pinned
        self.stream: torch.cuda.Stream | None = None
        self.held: dict[str, torch.Tensor] = {}  # bytes, by purpose
        self.views: dict[tuple, tuple[torch.Tensor, memoryview]] = {}  # (purpose, shape, dtype) → typed, bytes

    def buffer(self, which: str, nbytes: int) -> torch.Tensor:
        """The first ``nbytes`` of the ``which`` buffer (grown when smaller)."""
        held = self.held.get(which)
        if held is None or held.numel() < nbytes:
            held = self.held[which] = torch.empty(nbytes, dtype=torch.uint8, pin_memory=self.pinned)
            self.views = {key: view for key, view in self.views.items() if key[0] != which}
        return held[:nbytes]

    def typed(self, which: str, shape: tuple[int, ...], dtype: torch.dtype) -> tuple[torch.Tensor, memoryview]:
        """The ``which`` buffer as a contiguous ``shape`` of ``dtype``, and its bytes (to read a file into)."""
        key = (which, shape, dtype)
        found = self.views.get(key)
        if found is None:
            raw = self.buffer(which, math.prod(shape) * dtype.itemsize)
            found = self.views[key] = raw.view(dtype).view(shape), memoryview(raw.numpy())
        return found

    def scratch(self, which: str, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """A tensor to compute into, its contents undefined: on the CPU the thread's kept ``which`` buffer (a fresh
        allocation there costs a page fault per 4 KB touched), elsewhere a fresh one from the device's caching
        allocator."""
        if device.type != "cpu":
            return torch.empty(shape, dtype=dtype, device=device)
        return self.typed(which, shape, dtype)[0]


def merged_chunks(job, chunks: Iterator[tuple[int, int]], device: torch.device, stats: Survival, buffers: Buffers):
    """The output rows of ``job`` (a `loramix.merge.checkpoint.Job` with its factors on ``device``) for each
    (start, stop) of ``chunks``, as CPU tensors; each chunk yielded must be used before the next is asked for (they
    share the thread's buffers). A base tensor's file is opened once for all of its chunks. Raises
    `CheckpointError` when W + ΔW holds NaN/Inf."""
    with _opened(job.source) as fd:
        if device.type != "cuda":
            for index, (start, stop) in enumerate(chunks):
                rows = _read(job.source, start, stop, buffers, fd)
                yield _merged(job, rows, start, stop, device, stats, buffers, measure=index % STATS_EVERY == 0)
            _check(job, stats)
            return
        if buffers.stream is None:
            buffers.stream = torch.cuda.Stream(device)
        with torch.cuda.stream(buffers.stream):
            for start, stop in chunks:
                rows = _read(job.source, start, stop, buffers, fd)
                out = _merged(
                    job, rows.to(device, non_blocking=True), start, stop, device, stats, buffers, measure=True
                )
                if out.device.type == "cpu":
                    yield out
                    continue
                host = buffers.typed("write", out.shape, out.dtype)[0]
                host.copy_(out, non_blocking=True)
                buffers.stream.synchronize()  # the rows are on the host, and the read buffer is free again
                yield host
            _check(job, stats)


@contextlib.contextmanager
def _opened(source) -> Iterator[int | None]:
    """The file descriptor of a base tensor's file, open for the block (None for other sources)."""
    if not isinstance(source, BaseTensor) or source.tensor is not None or not source.shape:
        yield None
        return
    with open(source.path, "rb", buffering=0) as f:
        if hasattr(os, "posix_fadvise"):  # the kernel reads the tensor ahead while its first chunks are merged
            os.posix_fadvise(f.fileno(), source.offset, source.nbytes, os.POSIX_FADV_WILLNEED)
        yield f.fileno()


def _read(source, start: int, stop: int, buffers: Buffers, fd: int | None) -> torch.Tensor:
    """Rows [start, stop) of a base tensor in a file, read from ``fd`` (`_opened`'s) into the thread's read buffer;
    other sources (no ``fd``) as they are."""
    if fd is None:
        return source.rows(start, stop)
    rows, memory = buffers.typed("read", (stop - start, *source.shape[1:]), source.dtype)
    source.read_into(start, memory, fd)
    return rows


def _check(job, stats: Survival) -> None:
    if not math.isfinite(stats.settle()):
        raise not_finite(job.name)


def _fits(merged: torch.Tensor, dtype: torch.dtype) -> bool:
    """Whether every value of ``merged`` (float32) is finite and stays finite rounded to ``dtype``: one pass for its
    least and greatest value (NaN spreads to both), compared with the largest value that does (the formats are
    symmetric in sign)."""
    if not merged.numel():
        return True
    lo, hi = torch.aminmax(merged)
    top = _largest_fitting(dtype)
    return -top <= float(lo) and float(hi) <= top


@functools.cache
def _largest_fitting(dtype: torch.dtype) -> float:
    """The largest float32 value that torch rounds to a finite ``dtype`` value (float16: just below 65520; float8,
    which torch saturates: float32's largest), found once per dtype by bisecting the float32 values above the dtype's
    largest (positive float32 values order as their bits do)."""

    def value(bits: int) -> torch.Tensor:
        return torch.tensor([bits], dtype=torch.int32).view(torch.float32)

    def fits(bits: int) -> bool:
        return bool(torch.isfinite(value(bits).to(dtype).float()))

    low, high = (int(torch.tensor([torch.finfo(d).max]).view(torch.int32)) for d in (dtype, torch.float32))
    if fits(high):
        return float(value(high))
    while high - low > 1:  # value(low) rounds to a finite value, value(high) does not
        middle = (low + high) // 2
        low, high = (middle, high) if fits(middle) else (low, middle)
    return float(value(low))


def _merged(
    job, chunk: torch.Tensor, start: int, stop: int, device: torch.device, stats: Survival, buffers: Buffers, *, measure
):
    """The output values of rows [start, stop) from the base rows ``chunk`` (stored dtype, any device): W + ΔW (or
    DoRA) in float32 on ``device``, cast once to the output dtype; the stored-update figures when ``measure``,
    else a NaN/Inf check only. On the CPU every step of a plain LoRA chunk computes into the thread's kept buffers
    (the result too: it must be used before the thread's next chunk)."""
    if not job.updates and not job.bias:
        return chunk.to(job.dtype).cpu()
    W = buffers.scratch("wide", chunk.shape, torch.float32, device).copy_(chunk)
    if any(u.module.magnitude is not None for u in job.updates):  # DoRA: the only update, on the whole tensor
        merged, _ = dora_merge(W, job.updates[0], device)
        intended = merged - W
    elif job.updates and job.updates[0].rows is not None:  # experts stored fused: one whole chunk, W as (E·a, b)
        intended = whole_delta(job.updates, W.shape, device)
        merged = W + intended
    else:
        intended = None
        for update in job.updates:
            if intended is None:
                kept = buffers.scratch("delta", W.shape, torch.float32, device)
                intended = delta_rows(update.module, update.layout, start, stop, device, out=kept)
            else:
                intended.add_(delta_rows(update.module, update.layout, start, stop, device))
        for _, bias in job.bias:
            intended = bias.clone() if intended is None else intended.add_(bias)
        # W + ΔW; in place over W unless W is needed below (for the figures)
        merged = (
            torch.add(W, intended, out=buffers.scratch("merged", W.shape, torch.float32, device))
            if measure
            else W.add_(intended)
        )
    out = buffers.scratch("write", W.shape, job.dtype, device).copy_(merged)
    if not measure:
        if not _fits(merged, job.dtype):
            raise not_finite(job.name)
        return out
    base = W if chunk.dtype == job.dtype else W.to(job.dtype).float()  # round(W) is W when W is in the out dtype
    stored = merged.copy_(out).sub_(base)  # round(W + ΔW) − round(W) in float32 (float8 is not promoted by torch)
    stats.add_later(stored, intended)  # NaN/Inf in W + ΔW shows in the norms: no extra pass
    return out
