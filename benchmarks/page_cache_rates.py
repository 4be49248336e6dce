"""How fast this host's page cache takes writes: into new pages (what `cp -r` and a merged checkpoint's first write
pay) and over pages already cached (what a merge that pre-copies the base and then overwrites its merged tensors
would pay), with 1, 4 and 8 threads writing one file, and with 4 threads writing a file each (a file system may
take one file's writes one at a time: ext4 holds the file's lock for each); and `import torch` with CUDA
initialisation, the start-up `cp -r` does not have. The floor arguments for merge-into at 8B (issue 32) in
RESULTS.md rest on these figures.

    python benchmarks/page_cache_rates.py [--gib 8] [--dir /tmp/page-cache-rates]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import threading
import time
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

    start = time.perf_counter()
    workers = [threading.Thread(target=work, args=(k,)) for k in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    for fd in fds:
        os.close(fd)
    return size / (time.perf_counter() - start) / 1e9


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
    finally:
        for each in args.dir.glob(f"{file.name}*"):
            each.unlink()
    print(f"import torch: {_seconds('import torch'):.2f} s")
    cuda = "import torch; torch.zeros(1, device='cuda') if torch.cuda.is_available() else None"
    print(f"import torch + CUDA initialisation: {_seconds(cuda):.2f} s")


if __name__ == "__main__":
    main()
