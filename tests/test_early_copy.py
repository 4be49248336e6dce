"""Merge-into at memory speed: the CLI's early copy of untouched tensors (started before torch is imported), and the
chunked arithmetic whose bytes must not depend on how it is scheduled. Oracle: the same merge without an early copy
(byte for byte), float64 W + s·B·A (to 1 bf16 ulp of |W| + |ΔW|) and today's algorithm in one piece (bit for
bit)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections import deque
from pathlib import Path

import pytest
import torch
from helpers import bf16_ulp, raw_lora_folder
from safetensors import safe_open
from test_merge_disk import make_adapter, make_base, weight_files

import loramix.merge.chunks
from loramix import load_adapter, merge_into_base
from loramix.io.disk.early_copy import early_copy, plan

SIZES = {"layers": 3, "hidden": 32, "inter": 96}


@pytest.fixture(scope="module")
def pair(tmp_path_factory) -> tuple[Path, Path]:
    work = tmp_path_factory.mktemp("early")
    return make_base(work / "base", **SIZES), make_adapter(work / "adapter", **SIZES)


def _leftovers(folder: Path) -> list[str]:
    return [p.name for p in folder.iterdir() if p.name.startswith(".")]


def test_the_cli_copies_untouched_tensors_while_torch_imports(pair, tmp_path):
    base, adapter = pair
    expected = merge_into_base(adapter, base, tmp_path / "api").path  # no early copy from the API
    out = tmp_path / "cli"
    cmd = [sys.executable, "-m", "loramix", "-v", "combine", str(adapter), "-m", "cat", "--merge-into", str(base)]
    done = subprocess.run([*cmd, "-o", str(out)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    line = next(x for x in done.stderr.splitlines() if "merge phases" in x)
    times = json.loads(line.split(": ", 2)[-1])
    assert times["copied early"] > 0  # the bytes of the embeddings, norms, gate_proj and head
    assert times["prefilled early"] > 0  # q/v/down_proj's places, with the base's bytes, while torch imported
    assert times["copy start"] < times["computed start"]
    assert weight_files(out) == weight_files(expected)
    assert _leftovers(tmp_path) == []  # the staging folder became the output: no temporary folder is left


@pytest.mark.parametrize("cpus", [2, 8])  # one copying thread; one per file
def test_a_wrong_prediction_costs_time_never_bytes(pair, tmp_path, monkeypatch, cpus):
    """The copy is predicted for an adapter on gate_proj only; the merge is of one on q/v/down: tensors copied
    early are merged over (after the copy), gate_proj is copied by the writer."""
    base, adapter = pair
    monkeypatch.setattr(os, "cpu_count", lambda: cpus)
    expected = weight_files(merge_into_base(adapter, base, tmp_path / "api").path)
    shapes = {f"model.layers.{i}.mlp.gate_proj": (96, 4, 32) for i in range(SIZES["layers"])}
    other = raw_lora_folder(tmp_path / "other", shapes=shapes, config={"target_modules": ["gate_proj"]})
    files, entries = plan(base, [other])
    predicted = {name for spans in entries.values() for name, _, _, changed in spans if not changed}
    assert "model.layers.0.self_attn.q_proj.weight" in predicted
    assert "model.layers.0.mlp.gate_proj.weight" not in predicted
    with early_copy(str(base), [str(other)], str(tmp_path / "out")) as copy:
        assert len(copy.threads) == (min(4, len(files)) if cpus >= 8 else 1)
        merge_into_base(adapter, base, tmp_path / "out")
    assert weight_files(tmp_path / "out") == expected
    assert sorted(_leftovers(tmp_path)) == []


def test_a_merge_that_lays_the_files_out_anew_drops_the_early_copy(pair, tmp_path):
    base, adapter = pair
    expected = weight_files(merge_into_base(adapter, base, tmp_path / "api", shard_size="20KB").path)
    with early_copy(str(base), [str(adapter)], str(tmp_path / "out")) as copy:
        assert copy is not None
        merge_into_base(adapter, base, tmp_path / "out", shard_size="20KB")
        assert copy.stop.is_set()
    assert weight_files(tmp_path / "out") == expected
    assert _leftovers(tmp_path) == []


def test_no_early_copy_for_sources_it_cannot_read_without_torch(pair, tmp_path):
    base, adapter = pair
    assert plan(base, [adapter]) is not None
    assert plan(base, [tmp_path / "missing"]) is None  # not a PEFT folder (a Hub id, a kohya file...)
    code = "import sys, loramix.io.disk.early_copy; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_sampled_stored_update_figures_leave_the_bytes_alone(tmp_path, monkeypatch):
    """On the CPU the figures come from every STATS_EVERY-th chunk: the bytes equal those of measuring every chunk
    and float64 W + s·B·A to 1 bf16 ulp of |W| + |ΔW|; the sampled figures stay close to the full ones."""
    sizes = {"layers": 1, "hidden": 256, "inter": 4096}  # gate/down: 4096×256 = 4 CPU chunks of 2^18 elements
    base = make_base(tmp_path / "base", **sizes)
    adapter = make_adapter(tmp_path / "adapter", **sizes)
    monkeypatch.setattr(loramix.merge.chunks, "STATS_EVERY", 1)
    full = merge_into_base(adapter, base, tmp_path / "every", device="cpu")
    monkeypatch.setattr(loramix.merge.chunks, "STATS_EVERY", 4)
    sampled = merge_into_base(adapter, base, tmp_path / "sampled", device="cpu")
    assert weight_files(tmp_path / "every") == weight_files(tmp_path / "sampled")
    for name, figures in full.survival.items():
        assert sampled.survival[name].kept == pytest.approx(figures.kept, rel=0.05), name
        assert sampled.survival[name].error == pytest.approx(figures.error, rel=0.2, abs=1e-3), name
    loaded = load_adapter(adapter)
    name = "model.layers.0.mlp.down_proj"
    module = loaded.modules[name]
    file = json.loads((base / "model.safetensors.index.json").read_text())["weight_map"][f"{name}.weight"]
    with safe_open(str(base / file), "pt") as f, safe_open(str(tmp_path / "sampled" / file), "pt") as g:
        W, merged = f.get_tensor(f"{name}.weight"), g.get_tensor(f"{name}.weight")
    delta = module.scale * (module.B.double() @ module.A.double())
    ulp = bf16_ulp((W.double().abs() + delta.abs()).float())  # float32 terms err by ~1e-9: cancellation to ~0
    assert bool(((merged.double() - (W.double() + delta)).abs() <= ulp).all())
    assert torch.equal(merged, (W.float() + (module.B * module.scale) @ module.A).to(torch.bfloat16))


def test_merged_tensors_prefilled_with_base_bytes_are_written_over(pair, tmp_path):
    """Left alone until the copy threads end, the early copy also fills every place a merged tensor takes with the
    base's bytes; the merge then writes over them: the same bytes as a merge without any early copy."""
    base, adapter = pair
    expected = weight_files(merge_into_base(adapter, base, tmp_path / "api").path)
    files, entries = plan(base, [adapter])
    to_merge = sum(end - start for spans in entries.values() for _, start, end, changed in spans if changed)
    with early_copy(str(base), [str(adapter)], str(tmp_path / "out")) as copy:
        for thread in copy.threads:
            thread.join(timeout=60)  # nobody takes a tensor: the threads prefill them all, then end
        assert copy.prefilled == to_merge > 0
        merge_into_base(adapter, base, tmp_path / "out")
    assert weight_files(tmp_path / "out") == expected
    assert _leftovers(tmp_path) == []


def test_the_staging_folder_becomes_the_output_folder(pair, tmp_path, monkeypatch):
    """The merge takes the early copy's staging folder as its output's temporary folder and renames it into place:
    no folder is removed at the end (on a file system mounted with ``discard`` that waits for the disk's queue)."""
    base, adapter = pair
    expected = weight_files(merge_into_base(adapter, base, tmp_path / "api").path)
    removed, rmtree = [], shutil.rmtree
    monkeypatch.setattr(
        shutil, "rmtree", lambda path, **kw: (os.path.exists(path) and removed.append(path), rmtree(path, **kw))
    )
    out = tmp_path / "out"
    with early_copy(str(base), [str(adapter)], str(out)) as copy:
        staging = copy.staging.stat().st_ino
        merge_into_base(adapter, base, out)
    assert (out.stat().st_ino, removed, _leftovers(tmp_path)) == (staging, [], [])
    assert weight_files(out) == expected


def test_no_prefill_past_the_kernels_writeback_threshold(pair, tmp_path, monkeypatch):
    """Dirty page cache past the kernel's writeback threshold is written to the disk, so a prefill there would reach
    it before the merge writes over it (twice the bytes): only what fits with the unchanged tensors under
    `writeback_threshold` is prefilled, and the bytes are the same either way."""
    import loramix.io.disk.early_copy as early

    base, adapter = pair
    expected = weight_files(merge_into_base(adapter, base, tmp_path / "api").path)
    files, entries = plan(base, [adapter])
    spans = [(end - start, changed) for path in files for _, start, end, changed in entries[path]]
    untouched, first = sum(n for n, changed in spans if not changed), next(n for n, changed in spans if changed)
    for threshold, prefilled in ((0, 0), (untouched + first, first)):
        monkeypatch.setattr(early, "writeback_threshold", lambda threshold=threshold: threshold)
        out = tmp_path / f"out{threshold}"
        with early_copy(str(base), [str(adapter)], str(out)) as copy:
            for thread in copy.threads:
                thread.join(timeout=60)
            assert (copy.prefilled, copy.copied) == (prefilled, untouched)
            merge_into_base(adapter, base, out)
        assert weight_files(out) == expected
    meminfo = Path("/proc/meminfo").read_text().split()
    total = int(meminfo[meminfo.index("MemTotal:") + 1]) * 1024
    assert 0 < early.writeback_threshold() < total  # Linux: a share of the memory (or the bytes set)


def test_a_prefill_under_way_is_waited_for_and_none_begins_after_a_take(tmp_path, monkeypatch):
    """The protocol between the copy threads and the writer: the writer's `take` of a tensor being prefilled returns
    only once that copy is done (else the base's bytes could land over the merged ones), and from the first take on
    no prefill begins."""
    import threading

    import loramix.io.disk.early_copy as early

    started, release, copied = threading.Event(), threading.Event(), []

    def slow_copy(src, offset, count, out, at):
        started.set()
        assert release.wait(30)
        copied.append(offset)

    monkeypatch.setattr(early, "copy_range", slow_copy)
    prefill = [early.Item(tmp_path / "src", 100 * i, 10, tmp_path / "out", f"t{i}") for i in range(3)]
    copy = early.EarlyCopy(tmp_path, tmp_path, [], frozenset(), [deque(prefill)])
    copy.start(1)
    assert started.wait(30)  # t0 is being copied
    taken = threading.Thread(target=copy.take, args=("t0",))
    taken.start()
    taken.join(0.3)
    assert taken.is_alive()  # waiting for t0's copy
    release.set()
    taken.join(30)
    assert not taken.is_alive() and copied == [0]
    copy.join()
    assert copied == [0] and copy.prefilled == 10  # t1 and t2 never began


class _Driver:
    """libcuda's three calls, recorded; ``ordinals`` devices exist."""

    def __init__(self, calls: list, ordinals: int = 2) -> None:
        self.calls, self.ordinals = calls, ordinals

    def cuInit(self, flags):  # noqa: N802 (the driver's own names)
        self.calls.append(("cuInit", flags))
        return 0

    def cuDeviceGet(self, handle, ordinal):  # noqa: N802
        self.calls.append(("cuDeviceGet", ordinal))
        handle._obj.value = 100 + ordinal
        return 0 if ordinal < self.ordinals else 101  # CUDA_ERROR_INVALID_DEVICE

    def cuDevicePrimaryCtxRetain(self, context, handle):  # noqa: N802
        self.calls.append(("cuDevicePrimaryCtxRetain", handle.value))
        return 0


@pytest.mark.parametrize(
    "device, expected",
    [
        ("cpu", []),
        ("cuda:x", []),
        (None, [("cuInit", 0), ("cuDeviceGet", 0), ("cuDevicePrimaryCtxRetain", 100)]),
        ("auto", [("cuInit", 0), ("cuDeviceGet", 0), ("cuDevicePrimaryCtxRetain", 100)]),
        ("cuda:1", [("cuInit", 0), ("cuDeviceGet", 1), ("cuDevicePrimaryCtxRetain", 101)]),
        ("cuda:5", [("cuInit", 0), ("cuDeviceGet", 5)]),  # no such device: no context
    ],
)
def test_the_cli_starts_the_cuda_driver_for_the_chosen_gpu_before_torch(monkeypatch, device, expected):
    import ctypes
    import threading

    from loramix.cli import options

    calls, opened = [], []
    monkeypatch.setattr(ctypes, "CDLL", lambda name: opened.append(name) or _Driver(calls))
    options.start_gpu_driver(device)
    for thread in threading.enumerate():
        if thread.name == "loramix-cuda-driver":
            thread.join(30)
    assert calls == expected and opened == (["libcuda.so.1"] if expected else [])


def test_no_cuda_driver_is_nothing_to_start(monkeypatch):
    import ctypes
    import threading

    from loramix.cli import options

    def missing(name):
        raise OSError(f"{name}: cannot open shared object file")

    failures = []
    monkeypatch.setattr(ctypes, "CDLL", missing)
    monkeypatch.setattr(threading, "excepthook", failures.append)
    options.start_gpu_driver("auto")
    for thread in threading.enumerate():
        if thread.name == "loramix-cuda-driver":
            thread.join(30)
    assert failures == []


def test_the_writer_copies_unchanged_bytes_on_a_thread_per_file_with_the_same_bytes(pair, tmp_path, monkeypatch):
    from loramix.io.disk.rawcopy import copy_threads

    base, adapter = pair
    one = weight_files(merge_into_base(adapter, base, tmp_path / "one", workers=1).path)
    monkeypatch.setattr(os, "cpu_count", lambda: 8)
    assert copy_threads(len(list(base.glob("*.safetensors")))) == 3  # one per file of the 3
    assert weight_files(merge_into_base(adapter, base, tmp_path / "three").path) == one
