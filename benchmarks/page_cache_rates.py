"""How fast this host's page cache takes writes: into new pages (what `cp -r` and a merged checkpoint's first write
pay) and over pages already cached (what a merge that pre-copies the base and then overwrites its merged tensors
would pay), with 1, 4 and 8 threads writing one file, and with 4 threads writing a file each (a file system may
take one file's writes one at a time: ext4 holds the file's lock for each); memory copies on 1–16 threads; with a
GPU, a merge's path for each 8 MB piece (read into pinned memory, to the GPU as bf16, widened, rounded back, written
over a cached file) on 4–16 threads; and `import torch` with CUDA initialisation, the start-up `cp -r` does not
have. The floor arguments for merge-into at 8B (issue 32) in RESULTS.md rest on these figures.

    python benchmarks/page_cache_rates.py [--gib 8] [--dir /tmp/page-cache-rates]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

CHUNK = 64 << 20


def _fill(path: Path, size: int, threads: int, *, new: bool, apart: bool = False) -> float:
    """GB/s of writing ``size`` bytes into ``path`` by ``threads`` threads (a new file, or over the cached one);
    ``apart``: each thread writes its share into a file of its own (``path`` with its number appended)."""
    paths = [path.with_name(f"{path.name}{k}") for k in range(threads)] if apart else [path]
    if new:
        for each in paths:
            each.unlink(missing_ok=True)
    data = os.urandom(CHUNK)
    fds = [os.open(each, os.O_WRONLY | os.O_CREAT) for each in paths]
    count = size // CHUNK

    def work(first: int) -> None:
        fd, apart = fds[first % len(fds)], len(fds) > 1
        for i in range(first, count, threads):
            os.pwrite(fd, data, (i // threads if apart else i) * CHUNK)  # a file each: from its start on

    seconds = _on_threads(threads, work)
    for fd in fds:
        os.close(fd)
    return size / seconds / 1e9


def _on_threads(threads: int, work: Callable[[int], None]) -> float:
    """Seconds for ``work(k)`` on threads k = 0 … threads − 1, all at once."""
    start = time.perf_counter()
    workers = [threading.Thread(target=work, args=(k,)) for k in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    return time.perf_counter() - start


def _copies(threads: int, size: int = 256 << 20, times: int = 8) -> float:
    """GB/s copied from memory to memory by ``threads`` threads (numpy lets go of the GIL while it copies)."""
    import numpy as np

    pairs = [(np.ones(size, np.uint8), np.ones(size, np.uint8)) for _ in range(threads)]
    return (
        threads
        * times
        * size
        / _on_threads(threads, lambda k: [np.copyto(*pairs[k][::-1]) for _ in range(times)])
        / 1e9
    )


def _merge_path(sources: list[Path], targets: list[Path], threads: int, piece: int = 8 << 20) -> float:
    """GB/s of a GPU merge's path over the bytes of ``sources``: each piece read into a pinned buffer, sent to the GPU
    as bf16, widened to float32, + 1, rounded back, returned into a second pinned buffer and written over the same
    place of ``targets`` (cached files of the same sizes); the files' pieces in turn, ``threads`` at once."""
    import torch

    reads, writes = [os.open(p, os.O_RDONLY) for p in sources], [os.open(p, os.O_WRONLY) for p in targets]
    count = min(p.stat().st_size for p in sources) // piece

    def work(first: int) -> None:
        stream = torch.cuda.Stream()
        read, write = (torch.empty(piece, dtype=torch.uint8, pin_memory=True) for _ in range(2))
        with torch.cuda.stream(stream):
            for i in range(first, count * len(reads), threads):
                file, at = i % len(reads), (i // len(reads)) * piece
                os.preadv(reads[file], [memoryview(read.numpy())], at)
                out = (read.to("cuda", non_blocking=True).view(torch.bfloat16).float() + 1).to(torch.bfloat16)
                write.view(torch.bfloat16).copy_(out, non_blocking=True)
                stream.synchronize()
                os.pwrite(writes[file], memoryview(write.numpy()), at)

    seconds = _on_threads(threads, work)
    for fd in reads + writes:
        os.close(fd)
    return count * len(reads) * piece / seconds / 1e9


def _seconds(code: str) -> float:
    start = time.perf_counter()
    subprocess.run([sys.executable, "-c", code], check=True)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gib", type=int, default=8)
    parser.add_argument("--dir", type=Path, default=Path("/tmp/page-cache-rates"))
    args = parser.parse_args()
    args.dir.mkdir(parents=True, exist_ok=True)
    size, file = args.gib << 30, args.dir / "f"
    try:
        for threads in (1, 4, 8):
            new, over = _fill(file, size, threads, new=True), _fill(file, size, threads, new=False)
            print(f"{threads} threads: new pages {new:.2f} GB/s, over cached pages {over:.2f} GB/s")
        file.unlink()
        new, over = _fill(file, size, 4, new=True, apart=True), _fill(file, size, 4, new=False, apart=True)
        print(f"4 threads, a file each: new pages {new:.2f} GB/s, over cached pages {over:.2f} GB/s")
        print("memory copies: " + ", ".join(f"{t} threads {_copies(t):.1f} GB/s" for t in (1, 2, 4, 8, 16)))
        import torch

        if torch.cuda.is_available():
            out = args.dir / "g"
            _fill(out, size, 4, new=True, apart=True)
            sources, targets = ([each.with_name(f"{each.name}{k}") for k in range(4)] for each in (file, out))
            rates = (f"{t} threads {_merge_path(sources, targets, t):.1f} GB/s" for t in (4, 8, 12, 16))
            print("merge path (read, GPU, write), 4 files: " + ", ".join(rates))
    finally:
        for each in [*args.dir.glob(f"{file.name}*"), *args.dir.glob("g*")]:
            each.unlink()
    print(f"import torch: {_seconds('import torch'):.2f} s")
    cuda = "import torch; torch.zeros(1, device='cuda') if torch.cuda.is_available() else None"
    print(f"import torch + CUDA initialisation: {_seconds(cuda):.2f} s")


if __name__ == "__main__":
    main()
