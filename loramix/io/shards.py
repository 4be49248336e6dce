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
import errno
import json
import logging
import os
import shutil
import struct
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import torch

from loramix.errors import CheckpointError
from loramix.io.base import BIN_INDEX, SAFE_INDEX, SAFETENSORS_CODES, BaseCheckpoint, read_safetensors_header

log = logging.getLogger(__name__)
DIFFUSERS_CONFIG = "_diffusers_version"  # a key only diffusers' model configs have
# Files a model folder holds weights in (never copied beside a merged checkpoint's own shards).
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".gguf", ".onnx")

COPY_PIECE = 1 << 28  # unchanged tensors are copied (in the kernel) in pieces of at most this many bytes
# The kernel's copies, tried in this order before a buffered copy (a test empties it to force the fallback).
ZERO_COPY = ("copy_file_range", "sendfile")
# Errors that say "this copy cannot be done in the kernel here" (old kernel, other file system, special file).
_UNSUPPORTED = {errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EBADF, errno.EPERM}


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


def safetensors_header(jobs: list, metadata: dict[str, str]) -> bytes:
    """The 8-byte length and JSON header for ``jobs`` stored in order, padded so the data starts 8-aligned."""
    header: dict = {"__metadata__": metadata}
    offset = 0
    for job in jobs:
        header[job.name] = {
            "dtype": SAFETENSORS_CODES[job.dtype],
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


def _kernel_copy(way: str, src_fd: int, out: Path, offset: int, count: int, at: int) -> int:
    """Copy up to ``count`` bytes in the kernel with ``way``; returns the bytes copied (0: the source ended).
    Raises OSError when the kernel cannot do it here."""
    if way == "copy_file_range":
        with open(out, "r+b", buffering=0) as f:
            return os.copy_file_range(src_fd, f.fileno(), count, offset, at)
    with open(out, "r+b", buffering=0) as f:  # sendfile writes at the output's file position: a descriptor of its own
        f.seek(at)
        return os.sendfile(f.fileno(), src_fd, offset, count)


def _copy_range(src: Path, offset: int, count: int, out: Path, at: int) -> None:
    """Copy ``count`` bytes at ``offset`` of ``src`` to position ``at`` of ``out``: in the kernel where possible
    (`ZERO_COPY` in order), else through a buffer; a way that fails part way hands the rest to the next."""
    with open(src, "rb", buffering=0) as f:
        src_fd = f.fileno()
        for way in ZERO_COPY:
            if not hasattr(os, way):
                continue
            try:
                while count:
                    done = _kernel_copy(way, src_fd, out, offset, min(count, COPY_PIECE), at)
                    if done == 0:
                        raise CheckpointError(f"{src}: truncated file")
                    offset, at, count = offset + done, at + done, count - done
                return
            except OSError as exc:
                if exc.errno not in _UNSUPPORTED:
                    raise
        buffer = bytearray(min(count, 1 << 24))
        with open(out, "r+b", buffering=0) as o:
            while count:
                got = os.preadv(src_fd, [memoryview(buffer)[: min(count, len(buffer))]], offset)
                if got == 0:
                    raise CheckpointError(f"{src}: truncated file")
                _pwrite_all(o.fileno(), memoryview(buffer)[:got], at)
                offset, at, count = offset + got, at + got, count - got


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


def _tasks(out: Path, fd: int, at: int, jobs: list) -> list[_Task]:
    """Tasks for ``jobs`` stored from ``at`` on; neighbouring unchanged tensors become one copy (in pieces)."""
    tasks: list[_Task] = []
    for job in jobs:
        last = tasks[-1] if tasks else None
        if not job.raw_copy:
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


def _run(task: _Task, produce: Produce, bar) -> None:
    job = task.job
    if job is None:
        _copy_range(task.src, task.offset, task.count, task.out, task.at)
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


def write_shards(
    folder: Path,
    names: list[str],
    shards: list[list],
    *,
    produce: Produce,
    bar,
    workers: int,
    headers: list[bytes | None] | None = None,
) -> None:
    """Write every shard into ``folder``: headers first (``headers[i]`` as given, else planned from the tensors),
    then every tensor at its planned place; ``produce(job)`` yields a computed tensor's output rows in order,
    already in its output dtype. One thread copies unchanged bytes (a second kernel copy at once gains nothing),
    ``workers`` threads compute meanwhile."""
    headers = headers or [None] * len(shards)
    with contextlib.ExitStack() as files:
        tasks: list[_Task] = []
        for name, shard, header in zip(names, shards, headers):
            path = folder / name
            fd = files.enter_context(open(path, "wb", buffering=0)).fileno()
            header = header or safetensors_header(shard, {"format": "pt"})
            _pwrite_all(fd, memoryview(header), 0)
            tasks += _tasks(path, fd, len(header), shard)
            os.ftruncate(fd, len(header) + sum(job.nbytes for job in shard))
        copies = [t for t in tasks if t.job is None]
        computed = [t for t in tasks if t.job is not None]
        with ThreadPoolExecutor(1) as copier, ThreadPoolExecutor(max(1, workers)) as pool:
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
    """Every file of the base's folder that is no weight file (tokenizer, generation config, ...) into ``target``."""
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
