"""The sharded safetensors writer: shards planned in advance, headers written first, then every tensor written at
its planned place by a few threads at once.

An output tensor is anything with ``name``, ``dtype``, ``shape``, ``nbytes`` and ``raw_copy`` (plus
``source.path``/``source.offset``, a `loramix.io.base.BaseTensor`, when ``raw_copy``). Tensors that change neither
value nor dtype are copied byte for byte, neighbours together, in the kernel where the OS allows
(``copy_file_range``); the others are produced chunk by chunk by the caller's ``produce`` function and written as
they come, so memory holds about one chunk per thread.
"""

from __future__ import annotations

import contextlib
import json
import os
import struct
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch

from loramix.errors import CheckpointError
from loramix.io.base import DTYPE_NAMES

COPY_PIECE = 1 << 28  # unchanged tensors are copied (in the kernel) in pieces of at most this many bytes


def plan_shards(jobs: list, shard_size: int) -> list[list]:
    """Split tensors into shards in order, as transformers does (a new shard when the next tensor would overflow)."""
    shards: list[list] = [[]]
    size = 0
    for job in jobs:
        if shard_size and shards[-1] and size + job.nbytes > shard_size:
            shards.append([])
            size = 0
        shards[-1].append(job)
        size += job.nbytes
    # within a file, larger items first keeps every tensor aligned to its element size (as safetensors does)
    return [sorted(shard, key=lambda j: -j.dtype.itemsize) for shard in shards if shard]


def safetensors_header(jobs: list, metadata: dict[str, str]) -> bytes:
    """The 8-byte length and JSON header for ``jobs`` stored in order, padded so the data starts 8-aligned."""
    header: dict = {"__metadata__": metadata}
    offset = 0
    for job in jobs:
        header[job.name] = {
            "dtype": DTYPE_NAMES[job.dtype],
            "shape": list(job.shape),
            "data_offsets": [offset, offset + job.nbytes],
        }
        offset += job.nbytes
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text


def _pwrite_all(fd: int, data: memoryview, at: int) -> None:
    while data:
        done = os.pwrite(fd, data, at)
        data, at = data[done:], at + done


def _copy_range(src: Path, offset: int, count: int, fd: int, at: int) -> None:
    """Copy ``count`` bytes at ``offset`` of ``src`` to position ``at`` of ``fd``: in the kernel where possible."""
    with open(src, "rb", buffering=0) as f:
        src_fd = f.fileno()
        try:
            while count:
                done = os.copy_file_range(src_fd, fd, count, offset, at)
                if done == 0:
                    raise CheckpointError(f"{src}: truncated file")
                offset, at, count = offset + done, at + done, count - done
            return
        except (AttributeError, OSError):  # no copy_file_range here (or across these file systems): copy by hand
            pass
        buffer = bytearray(min(count, 1 << 24))
        while count:
            got = os.preadv(src_fd, [memoryview(buffer)[: min(count, len(buffer))]], offset)
            if got == 0:
                raise CheckpointError(f"{src}: truncated file")
            _pwrite_all(fd, memoryview(buffer)[:got], at)
            offset, at, count = offset + got, at + got, count - got


@dataclass
class _Task:
    """Work that writes to a known place of an output file: a computed tensor (``job``), or ``count`` bytes copied
    from ``src`` at ``offset`` (one or several unchanged tensors lying end to end in both files)."""

    fd: int
    at: int
    job: object | None = None
    src: Path | None = None
    offset: int = 0
    count: int = 0


def _tasks(fd: int, at: int, jobs: list) -> list[_Task]:
    """Tasks for ``jobs`` stored from ``at`` on; neighbouring unchanged tensors become one copy (in pieces)."""
    tasks: list[_Task] = []
    for job in jobs:
        last = tasks[-1] if tasks else None
        if not job.raw_copy:
            tasks.append(_Task(fd, at, job))
        elif last and last.src == job.source.path and last.offset + last.count == job.source.offset:
            last.count += job.nbytes
        else:
            tasks.append(_Task(fd, at, src=job.source.path, offset=job.source.offset, count=job.nbytes))
        at += job.nbytes
    pieces = []
    for task in tasks:
        if task.job is not None:
            pieces.append(task)
            continue
        for start in range(0, task.count, COPY_PIECE):
            count = min(COPY_PIECE, task.count - start)
            pieces.append(_Task(fd, task.at + start, src=task.src, offset=task.offset + start, count=count))
    return pieces


Produce = Callable[[object], Iterator[torch.Tensor]]


def _run(task: _Task, produce: Produce, bar) -> None:
    job = task.job
    if job is None:
        _copy_range(task.src, task.offset, task.count, task.fd, task.at)
        bar.update(task.count)
        return
    at = task.at
    for chunk in produce(job):
        out = chunk.contiguous()
        if out.numel():
            data = memoryview(out.reshape(-1).view(torch.uint8).numpy())
            _pwrite_all(task.fd, data, at)
            at += len(data)
            bar.update(len(data))


def shard_names(count: int, stem: str = "model") -> list[str]:
    """transformers' file names: ``model.safetensors`` alone, else ``model-0000i-of-0000N.safetensors`` (diffusers':
    the same with the stem ``diffusion_pytorch_model``)."""
    if count == 1:
        return [f"{stem}.safetensors"]
    return [f"{stem}-{i + 1:05d}-of-{count:05d}.safetensors" for i in range(count)]


def write_shards(folder: Path, names: list[str], shards: list[list], *, produce: Produce, bar, workers: int) -> None:
    """Write every shard into ``folder``: headers first (planned in advance), then every tensor at its planned
    place; ``produce(job)`` yields a computed tensor's output rows in order, already in its output dtype."""
    with contextlib.ExitStack() as files:
        tasks: list[_Task] = []
        for name, shard in zip(names, shards):
            fd = files.enter_context(open(folder / name, "wb", buffering=0)).fileno()
            header = safetensors_header(shard, {"format": "pt"})
            _pwrite_all(fd, memoryview(header), 0)
            tasks += _tasks(fd, len(header), shard)
            os.ftruncate(fd, len(header) + sum(job.nbytes for job in shard))
        # one thread copies (a second kernel copy at once gains nothing), the others compute meanwhile
        copies = [t for t in tasks if t.job is None]
        computed = [t for t in tasks if t.job is not None]
        with ThreadPoolExecutor(1) as copier, ThreadPoolExecutor(max(1, workers - 1)) as pool:
            futures = [copier.submit(_run, t, produce, bar) for t in copies]
            futures += [pool.submit(_run, t, produce, bar) for t in computed]
            try:
                for future in futures:
                    future.result()
            except BaseException:
                for future in futures:
                    future.cancel()
                raise


def write_index(folder: Path, names: list[str], shards: list[list], name: str = "model.safetensors.index.json") -> None:
    """The index file ``name`` for several shards (nothing for one)."""
    if len(shards) < 2:
        return
    weight_map = {job.name: file for file, shard in zip(names, shards) for job in shard}
    total = sum(job.nbytes for shard in shards for job in shard)
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (folder / name).write_text(json.dumps(index, indent=2) + "\n")
