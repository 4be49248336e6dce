"""safetensors headers, byte copies between files and the locked temporary names outputs are written under:
no torch here.

Unchanged tensors are copied byte for byte in the kernel where the OS allows (``copy_file_range``, else
``sendfile``, else a buffered copy). `fresh` makes the ``.NAME.xxxxxxxx.tmp`` folder or file beside a target that
a run writes into, locked for as long as the run holds it (`loramix.io.files.recover` removes the unlocked ones that
killed runs left). Nothing here imports torch, so the CLI can start copying a base before torch is imported
(`loramix.io.disk.early_copy`).
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import secrets
import shutil
import struct
from collections.abc import Iterator
from pathlib import Path

from loramix.errors import CheckpointError, OutputError

try:
    import fcntl
except ImportError:  # no advisory locks here (Windows): leftovers of interrupted runs are never touched
    fcntl = None

COPY_PIECE = 1 << 28  # unchanged tensors are copied (in the kernel) in pieces of at most this many bytes
COPY_THREADS = 4  # kernel copies at once, at most


def copy_threads(files: int) -> int:
    """Kernel copies to run at once into ``files`` files: one per file (ext4 takes a file's writes one at a time: on an
    H100 host 4 threads wrote new pages at 15.7 GB/s to a file each, 3.8 to one), at most `COPY_THREADS` and half
    the CPUs."""
    return max(1, min(COPY_THREADS, files, (os.cpu_count() or 1) // 2))


# The kernel's copies, tried in this order before a buffered copy (a test empties it to force the fallback).
ZERO_COPY = ("copy_file_range", "sendfile")
# Errors that say "this copy cannot be done in the kernel here" (old kernel, other file system, special file).
_UNSUPPORTED = {errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EBADF, errno.EPERM}


def read_safetensors_header(path: Path) -> tuple[dict, int]:
    """The JSON header of a safetensors file and the absolute offset where its data starts."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            (length,) = struct.unpack("<Q", f.read(8))
            if length > min(100_000_000, size - 8):
                raise ValueError(f"header length {length} is implausible")
            header = json.loads(f.read(length))
    except (OSError, struct.error, ValueError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{path}: not a readable safetensors file ({exc})") from None
    except RecursionError:
        raise CheckpointError(f"{path}: not a readable safetensors file (header nested too deeply)") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: safetensors header is not a JSON object")
    return header, 8 + length


def pwrite_all(fd: int, data: memoryview, at: int) -> None:
    while data:
        done = os.pwrite(fd, data, at)
        data, at = data[done:], at + done


def _kernel_copy(way: str, src_fd: int, out: Path, offset: int, count: int, at: int) -> int:
    """Copy up to ``count`` bytes in the kernel with ``way``; returns the bytes copied (0: the source ended).
    Raises OSError when the kernel cannot do it here."""
    with open(out, "r+b", buffering=0) as f:  # sendfile writes at the output's file position: a descriptor of its own
        if way == "copy_file_range":
            return os.copy_file_range(src_fd, f.fileno(), count, offset, at)
        f.seek(at)
        return os.sendfile(f.fileno(), src_fd, offset, count)


def copy_range(src: Path, offset: int, count: int, out: Path, at: int) -> None:
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
                pwrite_all(o.fileno(), memoryview(buffer)[:got], at)
                offset, at, count = offset + got, at + got, count - got


def lock(fd: int) -> bool:
    """Take the advisory lock on ``fd`` without waiting; False when a live run holds it."""
    if fcntl is None:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


@contextlib.contextmanager
def fresh(target: Path, *, folder: bool) -> Iterator[Path]:
    """A new, locked ``.NAME.xxxxxxxx.tmp`` folder or empty file beside ``target``, created with the permissions
    any new file gets (the umask decides); the lock lasts as long as the block. It is born as ``.new`` and renamed
    once locked, so `recover` never sees it unlocked."""
    for _ in range(100):
        stem = f".{target.name}.{secrets.token_hex(4)}"
        new, path = target.with_name(stem + ".new"), target.with_name(stem + ".tmp")
        try:
            if folder:
                os.mkdir(new, 0o777)
                fd = os.open(new, os.O_RDONLY)
            else:
                fd = os.open(new, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
            break
        except FileExistsError:
            continue
    else:
        raise OutputError(f"{target}: no free temporary name beside it")
    try:
        lock(fd)
        os.rename(new, path)
        yield path
    finally:
        os.close(fd)
        if folder:  # not renamed into place (a failure, an interrupt at any point): nothing is left behind
            for leftover in (new, path):
                shutil.rmtree(leftover, ignore_errors=True)
