"""Merge-into start-up off the critical path: the base copied while torch is still importing.

The CLI knows the base folder, the adapters and the output before it imports anything heavy. From the files' headers
alone (no torch) it predicts which base tensors the adapters leave alone and starts copying their bytes, in the
kernel (a thread per file), into a locked staging folder beside the output, in the base's own shard files at the
base's own offsets (every header copied as it is); the places of the tensors predicted changed are meanwhile filled
with the base's bytes for the merge to write over, as far as the page cache keeps them until then (`EarlyCopy`).
The merge claims the copy (`claim`) and takes the staging folder as its output's temporary folder, renamed into place
at the end (no folder is left to remove: on a file system mounted with ``discard`` removing one waits for the disk).
`loramix.io.shards.write_shards` then, when the merge keeps the base's files unchanged in layout, writes the merged
tensors into the same files, skips the tensors already copied and waits for the copy; otherwise it stops the copy
and removes its files (`EarlyCopy.discard`). A wrong prediction costs time, never bytes: a tensor predicted
untouched that the merge changes is written after the copy ends, and one predicted changed is copied by the merge
as usual.

The prediction: a base tensor is changed when its name holds the last three parts of some adapter module's path
(``3.self_attn.q_proj`` in ``model.layers.3.self_attn.q_proj.weight``; PEFT's ``base_model.model.``, ``base_layer``
and ``modules_to_save`` left out). Only PEFT adapter folders with a safetensors file and bases of local safetensors
files without a quantization config are copied early; anything else starts no copy.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import threading
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from loramix.errors import LoramixError
from loramix.io.disk.rawcopy import COPY_PIECE, copy_range, copy_threads, fresh, pwrite_all, read_safetensors_header

log = logging.getLogger(__name__)

PREFIX = "base_model.model."
DROPPED_PARTS = ("base_layer", "modules_to_save", "original_module")
TAIL = 3  # parts of a module path that identify it within a base tensor's name
# The running copies, by resolved base folder: the CLI starts one (`early_copy`), the writer claims it (`claim`).
_RUNNING: dict[Path, EarlyCopy] = {}


@dataclass  # bytes of a base file for the same place of its staging file: unchanged tensors, or ``name``'s prefill
class Item:
    src: Path
    offset: int
    count: int
    out: Path
    name: str | None = None


@dataclass
class EarlyCopy:
    """A copy of the tensors ``names`` of the base's safetensors ``files`` into ``staging`` (same file names, sizes
    and headers), run by threads; ``started``/``finished`` are wall-clock times (time.time()).

    ``queues`` holds each file's items in data order; a thread takes the next item of a file no other thread is
    writing (the one with most left: a file system may take one file's writes one at a time). Beside the unchanged
    tensors the threads prefill the places of those predicted to be merged with the base's bytes, so that the page
    cache holds their pages before torch can compute their values (a new page costs more than an overwrite), as many
    as fit with the unchanged tensors under `writeback_threshold`: past it the kernel writes the prefill to the disk,
    and the merge's bytes after it (an 8B merge on a machine of 24 GB wrote 18.3 GB to it for its 16.1 GB). The
    writer `take`s each merged tensor before writing it: a prefill under way is waited for, and from the first
    `take` on no prefill begins (prefilling beside the merge would only add overwrites)."""

    base: Path
    staging: Path
    files: list[str]
    names: frozenset[str]
    queues: list[deque[Item]]
    started: float = 0.0
    finished: float = 0.0
    copied: int = 0
    prefilled: int = 0
    error: BaseException | None = None
    stop: threading.Event = field(default_factory=threading.Event)
    threads: list[threading.Thread] = field(default_factory=list)
    lock: threading.Condition = field(default_factory=threading.Condition)
    _state: dict[str, str] = field(default_factory=dict)  # prefilled tensor → "copying", "done" or "taken"
    _busy: set[int] = field(default_factory=set)  # the files a thread is writing now
    _merging: bool = False  # the writer has begun: no prefill begins

    def start(self, count: int) -> None:
        self.started = time.time()
        for _ in range(count):
            self.threads.append(threading.Thread(target=self._run, daemon=True))
            self.threads[-1].start()

    def _run(self) -> None:
        try:
            while (taken := self._next()) is not None:
                file, item = taken
                moved = 0
                try:
                    while moved < item.count and not self.stop.is_set():  # stopped: `_next` ends the thread
                        piece = min(COPY_PIECE, item.count - moved)
                        copy_range(item.src, item.offset + moved, piece, item.out, item.offset + moved)
                        moved += piece
                finally:
                    with self.lock:
                        self._busy.discard(file)
                        if item.name is None:
                            self.copied += moved
                        else:
                            self.prefilled += moved
                            self._state[item.name] = "done"
                        self.lock.notify_all()
        except BaseException as exc:  # handed to whoever joins
            self.error = exc
        finally:
            with self.lock:
                self.finished = max(self.finished, time.time())

    def _next(self) -> tuple[int, Item] | None:
        """The next item to copy and its file (marked busy; a prefill marked as being copied); None at the end."""
        with self.lock:
            for queue in self.queues:  # prefills no longer wanted
                while queue and queue[0].name is not None and (self._merging or queue[0].name in self._state):
                    queue.popleft()
            left = [(f not in self._busy, sum(i.count for i in q), f) for f, q in enumerate(self.queues) if q]
            if self.stop.is_set() or not left:
                return None
            file = max(left)[2]
            item = self.queues[file].popleft()
            self._busy.add(file)
            if item.name is not None:
                self._state[item.name] = "copying"
            return file, item

    def take(self, name: str) -> None:
        """Before the writer writes ``name``: no prefill begins any more; one of ``name`` under way is waited for."""
        with self.lock:
            self._merging = True
            self._state.setdefault(name, "taken")
            while self._state[name] == "copying":
                self.lock.wait()

    def join(self) -> None:
        """Wait for the copy (no prefill begins); raise what it raised."""
        with self.lock:
            self._merging = True
        for thread in self.threads:
            thread.join()
        if self.error is not None:
            raise self.error

    def cancel(self) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join()

    def discard(self) -> None:
        """Stop the copy and remove its files from the staging folder (a merge that lays its files out anew there)."""
        self.cancel()
        for name in self.files:
            (self.staging / name).unlink(missing_ok=True)


def module_tails(adapter: Path) -> set[tuple[str, ...]] | None:
    """The last `TAIL` parts of the path of every module a PEFT adapter folder's safetensors file names; None for
    any other source."""
    file = adapter / "adapter_model.safetensors"
    if not (adapter.is_dir() and file.is_file() and (adapter / "adapter_config.json").is_file()):
        return None
    header, _ = read_safetensors_header(file)
    tails = set()
    for key in header:
        if key == "__metadata__":
            continue
        path = key.split(".lora_", 1)[0] if ".lora_" in key else key.rpartition(".")[0]
        while path.startswith(PREFIX):
            path = path.removeprefix(PREFIX)
        parts = tuple(p for p in path.split(".") if p not in DROPPED_PARTS)
        tails.add(parts[-TAIL:])
    return tails


def _changed(name: str, tails: set[tuple[str, ...]]) -> bool:
    parts = tuple(name.split("."))
    return any(parts[i : i + n] in tails for n in range(1, TAIL + 1) for i in range(len(parts) - n + 1))


def _weight_files(base: Path) -> list[Path] | None:
    """The base's safetensors files in index order, or None when it is not a plain local safetensors model."""
    config = base / "config.json"
    if not config.is_file() or (base / "model_index.json").exists():
        return None
    try:
        if "quantization_config" in json.loads(config.read_text()):
            return None
        index = base / "model.safetensors.index.json"
        if index.is_file():
            names = dict.fromkeys(json.loads(index.read_text())["weight_map"].values())
            plain = all(isinstance(n, str) and n and Path(n).name == n and (base / n).is_file() for n in names)
            return [base / n for n in names] if names and plain else None  # else the base reader says what is wrong
    except (OSError, ValueError, KeyError, AttributeError, TypeError, RecursionError):
        return None
    single = base / "model.safetensors"
    return [single] if single.is_file() else None


Entries = dict[Path, list[tuple[str, int, int, bool]]]  # per file: (tensor, absolute start, end, changed?) in order


def plan(base: Path, adapters: list[Path]) -> tuple[dict[Path, int], Entries] | None:
    """The base's files in order, each with the offset where its data starts (its header's end), and per file its
    tensors, each predicted changed or not; None when no early copy applies."""
    paths = _weight_files(base)
    if paths is None or any(p.suffix != ".safetensors" for p in base.iterdir() if p.name.endswith(".bin")):
        return None
    tails: set[tuple[str, ...]] = set()
    for adapter in adapters:
        found = module_tails(adapter)
        if found is None:
            return None
        tails |= found
    files, entries = {}, {}
    for path in paths:
        header, files[path] = read_safetensors_header(path)
        header.pop("__metadata__", None)
        spans = sorted((e["data_offsets"][0], e["data_offsets"][1], n) for n, e in header.items())
        entries[path] = [(n, files[path] + a, files[path] + b, _changed(n, tails)) for a, b, n in spans]
    return files, entries


def writeback_threshold() -> int:
    """The bytes of dirty page cache Linux leaves in memory before it starts writing them to the disk
    (vm.dirty_background_bytes, else vm.dirty_background_ratio percent of the memory available); 0 elsewhere."""
    try:
        vm = Path("/proc/sys/vm")
        if fixed := int((vm / "dirty_background_bytes").read_text()):
            return fixed
        meminfo = dict(line.split(":", 1) for line in Path("/proc/meminfo").read_text().splitlines() if ":" in line)
        return int(meminfo["MemAvailable"].split()[0]) * 1024 * int((vm / "dirty_background_ratio").read_text()) // 100
    except (OSError, ValueError, KeyError, IndexError):
        return 0


def _start(base: Path, adapters: list[Path], staging: Path) -> EarlyCopy | None:
    planned = plan(base, adapters)
    if planned is None:
        return None
    files, entries = planned
    queues, names = [], frozenset(n for path in files for n, _, _, changed in entries[path] if not changed)
    untouched = sum(end - start for path in files for _, start, end, changed in entries[path] if not changed)
    budget = writeback_threshold() - untouched  # prefilled past it, bytes reach the disk twice (then merged over)
    for path, data in files.items():
        out = staging / path.name
        with open(path, "rb") as f:
            head = f.read(data)
        with open(out, "wb", buffering=0) as f:  # the base's header as it is, the file at its full size
            pwrite_all(f.fileno(), memoryview(head), 0)
            os.ftruncate(f.fileno(), path.stat().st_size)
        queue: list[Item] = []
        for name, start, end, changed in entries[path]:
            last = queue[-1] if queue and queue[-1].name is None else None
            if changed:
                if end - start <= budget:
                    budget -= end - start
                    queue.append(Item(path, start, end - start, out, name))
            elif last and last.offset + last.count == start and last.count < COPY_PIECE:  # neighbours: one item
                last.count += end - start
            else:
                queue.append(Item(path, start, end - start, out))
        queues.append(deque(queue))
    copy = EarlyCopy(base, staging, [p.name for p in files], names, queues)
    copy.start(copy_threads(len(files)))
    return copy


@contextlib.contextmanager
def early_copy(base: str | None, adapters: list[str], output: str | None) -> Iterator[EarlyCopy | None]:
    """Start the early copy of ``base`` for a merge of ``adapters`` into ``output`` when it applies (all local
    folders, see `plan`), for the length of the block; at its end a copy nobody claimed is stopped, and its staging
    folder removed unless the merge put it in place as the output. For the CLI only (it registers the copy
    process-wide for the merge to claim)."""
    if not (base and output and adapters) or not Path(base).is_dir() or not Path(output).parent.is_dir():
        yield None
        return
    folder = Path(base).resolve()
    with contextlib.ExitStack() as stack:
        try:
            staging = stack.enter_context(fresh(Path(output).resolve(), folder=True))
            copy = _start(folder, [Path(a) for a in adapters], staging)
        except (OSError, ValueError, RecursionError, LoramixError) as exc:  # the merge says what is wrong
            log.debug("no early copy: %s", exc)
            copy = None
        if copy is None:
            yield None
            return
        _RUNNING[folder] = copy
        try:
            yield copy
        finally:
            _RUNNING.pop(folder, None)
            copy.cancel()


def claim(base: Path) -> EarlyCopy | None:
    """The early copy running for ``base``, taken by the writer (at most once)."""
    return _RUNNING.pop(Path(base).resolve(), None)
