"""The one safetensors writer (`loramix.io.tensorfile`): what it writes safetensors reads back exactly, its bytes are
those of safetensors' own ``save`` (whose metadata order is its hash map's), and two processes with different hash
seeds write the same bytes.

Oracles: safetensors itself (``load_file``, ``safe_open``, ``save``, ``load``); exact equality throughout (no
tolerance: bytes and tensors are compared bit for bit).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load, load_file, save

from loramix.errors import OutputError
from loramix.io.tensorfile import SAFE_DTYPES, write_safetensors

METADATA = {"ss_network_dim": "4", "format": "pt", "loramix_base_model": "é/base\n\x01", "a": ""}


def _every_dtype() -> dict[str, torch.Tensor]:
    """A tensor of each dtype loramix writes (random bits), a 0-d and an empty one."""
    gen = torch.Generator().manual_seed(0)
    tensors = {}
    for code, dtype in SAFE_DTYPES.items():
        bits = torch.randint(0, 256, (3, 5 * dtype.itemsize), generator=gen, dtype=torch.uint8)
        tensors[f"t.{code}"] = (bits % 2).bool() if dtype == torch.bool else bits.view(dtype)
    tensors["scalar"] = torch.tensor(0.25)
    tensors["empty"] = torch.zeros(0, 4, dtype=torch.bfloat16)
    tensors["z.also.f32"] = torch.randn(2, 3, generator=gen)
    return tensors


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    """Equal names, dtypes, shapes and bits."""
    assert sorted(a) == sorted(b)
    for name in a:
        assert a[name].dtype == b[name].dtype and a[name].shape == b[name].shape, name
        assert torch.equal(a[name].reshape(-1).view(torch.uint8), b[name].reshape(-1).view(torch.uint8)), name


def _split(data: bytes) -> tuple[int, dict, bytes]:
    size = int.from_bytes(data[:8], "little")
    return size, json.loads(data[8 : 8 + size]), data[8 + size :]


def test_safetensors_reads_back_every_dtype_and_the_metadata(tmp_path):
    tensors = _every_dtype()
    path = write_safetensors(tmp_path / "x.safetensors", tensors, METADATA)
    _same(load_file(path), tensors)
    with safe_open(str(path), "pt") as f:
        assert f.metadata() == METADATA
        _same({k: f.get_tensor(k) for k in f.keys()}, tensors)


@pytest.mark.parametrize("metadata", [None, {"format": "pt"}, METADATA])
def test_the_bytes_are_those_of_safetensors_save(tmp_path, metadata):
    """With at most one metadata key the very bytes of ``save``; with more, the same length, header (parsed) and
    data, which ``load`` reads to the same tensors."""
    tensors = _every_dtype()
    ours = write_safetensors(tmp_path / "x.safetensors", tensors, metadata).read_bytes()
    theirs = save(tensors, metadata=metadata)
    if metadata is None or len(metadata) < 2:
        assert ours == theirs
    assert _split(ours) == _split(theirs)
    _same(load(ours), load(theirs))
    assert list(_split(ours)[1].get("__metadata__", {})) == sorted(metadata or {})


def test_strided_and_grad_tensors_are_written_as_their_values(tmp_path):
    base = torch.randn(4, 6, requires_grad=True)
    tensors = {"t": base.t(), "s": base[:, ::2]}
    path = write_safetensors(tmp_path / "x.safetensors", tensors)
    _same(load_file(path), {k: v.detach().contiguous() for k, v in tensors.items()})


def test_what_safetensors_files_cannot_hold_is_refused_before_writing(tmp_path):
    path = tmp_path / "x.safetensors"
    with pytest.raises(OutputError, match=r"tensor c: safetensors files are written in .*not torch.complex64"):
        write_safetensors(path, {"a": torch.zeros(2), "c": torch.zeros(2, dtype=torch.complex64)})
    assert not path.exists()
    with pytest.raises(TypeError, match="strings to strings"):
        write_safetensors(path, {"a": torch.zeros(2)}, {"rank": 4})
    assert not path.exists()


_WRITE = """
import sys, torch
from loramix.io.tensorfile import write_safetensors
gen = torch.Generator().manual_seed(0)
tensors = {f"m{i}.lora_{s}.weight": torch.randn(3, 4, generator=gen) for i in range(20) for s in "AB"}
metadata = {f"key{i}": str(i) for i in range(30)}
write_safetensors(sys.argv[1], tensors, metadata)
"""


def test_two_processes_with_other_hash_seeds_write_the_same_bytes(tmp_path):
    for seed in ("1", "2"):
        env = {**os.environ, "PYTHONHASHSEED": seed}
        subprocess.run([sys.executable, "-c", _WRITE, str(tmp_path / seed)], env=env, check=True)
    assert (tmp_path / "1").read_bytes() == (tmp_path / "2").read_bytes()
