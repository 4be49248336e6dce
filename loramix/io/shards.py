"""The sharded safetensors writer: shards planned in advance (anew, or the base's own files), headers written first,
then every tensor written at its planned place by a few threads at once.

An output tensor is anything with ``name``, ``dtype``, ``shape``, ``nbytes``, ``raw_copy`` and ``home`` (the base
file it comes from, or None), plus ``source`` (a `loramix.io.base.BaseTensor`: its ``path``/``offset`` are where
a ``raw_copy`` tensor's bytes lie). Tensors that change neither value nor dtype are copied byte for byte,
neighbours together, in the kernel where the OS allows (``copy_file_range``, else ``sendfile``, else a buffered
copy); the others are produced chunk by chunk by the caller's ``produce`` function and written as they come, so
memory holds about one chunk per thread. When the output keeps the base's files and no tensor changes dtype or
shape, every offset stays the same and the base's header is copied as it is.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import torch

from loramix.io import tensorfile
from loramix.io.base import BIN_INDEX, SAFE_INDEX, BaseCheckpoint, read_safetensors_header
from loramix.io.disk.early_copy import EarlyCopy
from loramix.io.disk.rawcopy import COPY_PIECE, copy_range, copy_threads, pwrite_all

log = logging.getLogger(__name__)
DIFFUSERS_CONFIG = "_diffusers_version"  # a key only diffusers' model configs have
# Files a model folder holds weights in (never copied beside a merged checkpoint's own shards).
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".gguf", ".onnx")
_TIMES = threading.Lock()  # the writer's threads widen one record of phase times


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


def _unchanged_size(job) -> bool:
    return job.home is not None and job.dtype == job.source.dtype and tuple(job.shape) == tuple(job.source.shape)


def base_layout(jobs: list, files: list[Path]) -> tuple[list[str], list[list]] | None:
    """The base's own shard files as the output's (names and tensors per file): each tensor in the file it came
    from, in its order there (by size of element first when some tensor changes size, which keeps every tensor
    aligned), tensors the base lacks in the last file. None when the base has no safetensors files (a .bin base)."""
    by_file: dict[Path, list] = {path: [] for path in files}
    extra = []
    for job in jobs:
        if job.home is None:
            extra.append(job)
        elif job.home in by_file:
            by_file[job.home].append(job)
        else:
            return None
    shards = [shard for shard in by_file.values() if shard]
    if not shards:
        return None
    shards[-1] += extra
    for i, shard in enumerate(shards):
        if not all(_unchanged_size(job) for job in shard):
            shards[i] = sorted(shard, key=lambda j: -j.dtype.itemsize)
    names = [path.name for path in files if by_file[path]]
    return names, shards


def kept_header(shard: list) -> bytes | None:
    """The base file's header bytes, when ``shard`` is that file's tensors in its order with unchanged dtypes and
    shapes (every offset is then the same): the output file starts with the very same bytes."""
    home = shard[0].home
    if not all(job.home == home and _unchanged_size(job) for job in shard):
        return None
    header, start = read_safetensors_header(home)
    header.pop("__metadata__", None)
    if len(header) != len(shard):
        return None
    offset = 0
    for job in shard:
        entry = header.get(job.name)
        if entry is None or entry["data_offsets"] != [offset, offset + job.nbytes]:
            return None
        offset += job.nbytes
    with open(home, "rb") as f:
        return f.read(start)


@dataclass
class _Task:
    """Work that writes to a known place of output file ``out`` (open as ``fd``): a computed tensor (``job``), or
    ``count`` bytes copied from ``src`` at ``offset`` (one or several unchanged tensors lying end to end in both
    files)."""

    out: Path
    fd: int
    at: int
    job: object | None = None
    src: Path | None = None
    offset: int = 0
    count: int = 0


def _tasks(out: Path, fd: int, at: int, jobs: list, copied: frozenset[str] = frozenset()) -> list[_Task]:
    """Tasks for ``jobs`` stored from ``at`` on; neighbouring unchanged tensors become one copy (in pieces); the
    unchanged tensors ``copied`` already (by an early copy) get none."""
    tasks: list[_Task] = []
    for job in jobs:
        last = tasks[-1] if tasks else None
        if job.raw_copy and job.name in copied:
            pass
        elif not job.raw_copy:
            tasks.append(_Task(out, fd, at, job))
        elif last and last.src == job.source.path and last.offset + last.count == job.source.offset:
            last.count += job.nbytes
        else:
            tasks.append(_Task(out, fd, at, src=job.source.path, offset=job.source.offset, count=job.nbytes))
        at += job.nbytes
    pieces = []
    for task in tasks:
        if task.job is not None:
            pieces.append(task)
            continue
        for start in range(0, task.count, COPY_PIECE):
            count = min(COPY_PIECE, task.count - start)
            pieces.append(_Task(out, fd, task.at + start, src=task.src, offset=task.offset + start, count=count))
    return pieces


Produce = Callable[[object], Iterator[torch.Tensor]]


def _run(task: _Task, produce: Produce, bar, early: EarlyCopy | None = None) -> None:
    job = task.job
    if job is None:
        copy_range(task.src, task.offset, task.count, task.out, task.at)
        bar.update(task.count)
        return
    if early is not None:
        early.take(job.name)  # its prefill with the base's bytes, if any, is over or never begins
    at = task.at
    for chunk in produce(job):
        data = memoryview(chunk.contiguous().reshape(-1).view(torch.uint8).numpy())
        if data:  # an empty chunk writes nothing
            pwrite_all(task.fd, data, at)
            at += len(data)
            bar.update(len(data))


def shard_names(count: int, stem: str = "model") -> list[str]:
    """transformers' file names: ``model.safetensors`` alone, else ``model-0000i-of-0000N.safetensors`` (diffusers':
    the same with the stem ``diffusion_pytorch_model``)."""
    if count == 1:
        return [f"{stem}.safetensors"]
    return [f"{stem}-{i + 1:05d}-of-{count:05d}.safetensors" for i in range(count)]


def write_shards(
    folder: Path,
    names: list[str],
    shards: list[list],
    *,
    produce: Produce,
    bar,
    workers: int,
    headers: list[bytes | None] | None = None,
    early: EarlyCopy | None = None,
    order: Callable[[object], int] | None = None,
) -> dict[str, float]:
    """Write every shard into ``folder``: headers first (``headers[i]`` as given, else planned from the tensors),
    then every tensor at its planned place; ``produce(job)`` yields a computed tensor's output rows in order, in its
    output dtype. `copy_threads` threads copy unchanged bytes, ``workers`` threads compute meanwhile, the files taken
    in turn. ``early``: the CLI's copy (`loramix.io.disk.early_copy`), staged in ``folder``: used when the output
    keeps the base's files as they are, else stopped and its files removed. Returns the wall-clock times
    (time.time()) at which the copy and the computed tensors started and ended, and the bytes ``copied early`` and
    ``prefilled early``. ``order(job)``: the computed tensors are started in that order (e.g. codes before scales:
    two workers never wait on one weight's parts)."""
    headers = headers or [None] * len(shards)
    kept = all(h is not None for h in headers) and early is not None and early.files == names
    if early is not None and not kept:
        early.discard()
    early = early if kept else None
    copied = early.names if early else frozenset()
    times: dict[str, float] = {}
    with contextlib.ExitStack() as files:
        keyed: list[tuple[tuple[int, int, int], _Task]] = []
        for file, (name, shard, header) in enumerate(zip(names, shards, headers)):
            path = folder / name
            fd = files.enter_context(open(path, "r+b" if early else "wb", buffering=0)).fileno()
            header = header or tensorfile.header(shard, {"format": "pt"})
            if not early:  # the early copy wrote the base's header and sized the file
                pwrite_all(fd, memoryview(header), 0)
                os.ftruncate(fd, len(header) + sum(job.nbytes for job in shard))
            tasks = _tasks(path, fd, len(header), shard, copied)
            keyed += [((order(t.job) if t.job is not None and order else 0, at, file), t) for at, t in enumerate(tasks)]
        tasks = [t for _, t in sorted(keyed, key=lambda kt: kt[0])]  # writes at once go to different files
        copies, computed = [t for t in tasks if t.job is None], [t for t in tasks if t.job is not None]
        if early and any(t.job.name in copied for t in computed):  # predicted untouched, but merged: after the copy
            early.join()
        with ThreadPoolExecutor(copy_threads(len(names))) as copier, ThreadPoolExecutor(max(1, workers)) as pool:
            futures = [copier.submit(_timed, times, "copy", _run, t, produce, bar) for t in copies]
            futures += [pool.submit(_timed, times, "computed", _run, t, produce, bar, early) for t in computed]
            try:
                for future in futures:
                    future.result()
            except BaseException:
                for future in futures:
                    future.cancel()
                raise
        if early:
            early.join()
            bar.update(sum(job.nbytes for shard in shards for job in shard if job.name in copied))
            times["copy start"] = min(early.started, times.get("copy start", early.started))
            times["copy end"] = max(early.finished, times.get("copy end", early.finished))
            times["copied early"] = early.copied
            times["prefilled early"] = early.prefilled
    return times


def _timed(times: dict[str, float], phase: str, run: Callable, *args) -> None:
    """``run(*args)``, widening ``times``' ``phase start``/``phase end`` to cover it."""
    started = time.time()
    run(*args)
    ended = time.time()
    with _TIMES:
        times[f"{phase} start"] = min(started, times.get(f"{phase} start", started))
        times[f"{phase} end"] = max(ended, times.get(f"{phase} end", ended))


def write_index(folder: Path, names: list[str], shards: list[list], name: str = "model.safetensors.index.json") -> None:
    """The index file ``name`` for several shards (nothing for one)."""
    if len(shards) < 2:
        return
    weight_map = {job.name: file for file, shard in zip(names, shards) for job in shard}
    total = sum(job.nbytes for shard in shards for job in shard)
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (folder / name).write_text(json.dumps(index, indent=2) + "\n")


def config_dtype_keys(config: dict) -> list[str]:
    """The keys of a transformers config.json that name its dtype (``torch_dtype`` before transformers 5)."""
    keys = [k for k in ("dtype", "torch_dtype") if k in config]
    if keys:
        return keys
    try:
        major = int(version("transformers").split(".")[0])
    except (PackageNotFoundError, ValueError):
        major = 5
    return ["dtype"] if major >= 5 else ["torch_dtype"]


def copy_other_files(base: BaseCheckpoint, target: Path) -> None:
    """Every file of the base's folder that is no weight file (tokenizer, generation config, ...) into ``target``
    (none for a base that is one file: a GGUF)."""
    if not base.folder.is_dir():
        return
    weight_names = {p.name for p in base.weight_files} | {SAFE_INDEX, BIN_INDEX, "config.json"}
    for item in sorted(base.folder.iterdir()):
        if item.name.startswith(".") or not item.is_file() or item.name in weight_names:
            continue
        if item.name.endswith(WEIGHT_SUFFIXES) or item.name.endswith(".index.json"):
            log.debug("not copying %s (weights)", item)
            continue
        shutil.copyfile(item, target / item.name)


def write_beside(
    base: BaseCheckpoint,
    folder: Path,
    names: list[str],
    shards: list[list],
    index: str,
    *,
    dtype_name: str | None,
    dense: bool,
) -> None:
    """The rest of a merged checkpoint beside its shards: the index, config.json (naming ``dtype_name`` when the
    tensors were converted to it; ``dense``: a quantized base written dequantized, so without its
    ``quantization_config``) and the base's other files. A diffusers config, which names no dtype, keeps its own."""
    write_index(folder, names, shards, index)
    config = dict(base.config)
    if dense:
        config.pop("quantization_config", None)  # a ComfyUI scaled FP8 single file has none
    for key in config_dtype_keys(config) if DIFFUSERS_CONFIG not in config and dtype_name else ():
        config[key] = dtype_name
    if base.config:  # a single-file checkpoint (ComfyUI's, BFL's) has none
        (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    copy_other_files(base, folder)
