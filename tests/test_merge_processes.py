"""One merge into a base split over processes by torchrun (gloo on the CPU): the same bytes as one process, and a
failure on any rank fails the run everywhere with nothing written.

Oracles: the single-process merge (every weight file, the index and config.json must be byte-identical: shard i
depends only on base shard i) and float64 W + s·B·A for the merged tensors (checked by test_merge_disk for that
single-process output); the failing run leaves no output folder and no temporary folder beside it.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from test_merge_disk import make_adapter, make_base

from loramix import merge_into_base

SIZES = {"layers": 3, "hidden": 32, "inter": 96}


def _torchrun(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent)) or shutil.which("torchrun")
    assert torchrun, "torchrun comes with torch"
    command = [torchrun, "--standalone", "--nproc-per-node", "2", "-m", "loramix", *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> tuple[Path, Path]:
    work = tmp_path_factory.mktemp("processes")
    return make_base(work / "base", **SIZES), make_adapter(work / "adapter", **SIZES)


def test_two_processes_write_the_bytes_of_one(inputs, tmp_path):
    base, adapter = inputs
    single = merge_into_base(adapter, base, tmp_path / "one", progress=False)
    done = _torchrun("combine", str(adapter), "--merge-into", str(base), "-o", str(tmp_path / "two"), cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.count("wrote ") == 1  # rank 0 reports, once
    counts = f"with {len(single.survival)} modules merged, {single.tensors} tensors in 3 shards"
    assert len(single.survival) == 9 and counts in done.stdout  # every rank's modules counted
    one, two = tmp_path / "one", tmp_path / "two"
    compared = [p.name for p in sorted(one.iterdir()) if p.suffix in (".safetensors", ".json")]
    assert {"config.json", "model.safetensors.index.json"} <= set(compared) and len(compared) == 5
    for name in compared:
        assert (two / name).read_bytes() == (one / name).read_bytes(), name
    assert (two / "README.md").exists() and (two / "loramix_recipe.yaml").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary folder left


def test_a_failure_on_one_rank_fails_every_rank_and_writes_nothing(inputs, tmp_path):
    base, adapter = inputs
    broken = tmp_path / "broken"
    shutil.copytree(base, broken)
    shard = broken / "model-00002-of-00003.safetensors"  # rank 1's shard: rank 0 reads nothing of it
    tensors = load_file(shard)
    tensors["model.layers.1.self_attn.q_proj.weight"][0, 0] = torch.nan
    save_file(tensors, str(shard), metadata={"format": "pt"})
    done = _torchrun("combine", str(adapter), "--merge-into", str(broken), "-o", str(tmp_path / "out"), cwd=tmp_path)
    assert done.returncode != 0
    ours = done.stderr.split("torch/distributed/elastic")[0]  # torchrun's own report of failed children follows
    assert "Traceback" not in ours
    assert "model.layers.1.self_attn.q_proj" in ours  # rank 1's own line names the cause
    assert not (tmp_path / "out").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_under_torchrun_combine_needs_a_base(inputs, tmp_path):
    _, adapter = inputs
    done = _torchrun("combine", str(adapter), "-o", str(tmp_path / "out"), cwd=tmp_path)
    assert done.returncode != 0 and "under torchrun, combine splits a --merge-into" in done.stderr
    assert not (tmp_path / "out").exists()
