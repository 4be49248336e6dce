"""The safetensors format as loramix writes it: its dtype codes, its header, and the one writer of a tensor file.

A file is an 8-byte little-endian header length, then a JSON header — ``__metadata__`` (str → str) first, then per
tensor its ``dtype`` code, ``shape`` and ``data_offsets`` (start, end) within the data — padded with spaces to a
multiple of 8, then the tensors' bytes end to end. safetensors' own ``save_file`` writes the metadata in the order
its Rust hash map iterates, which changes from process to process; here the metadata keys are sorted and the
tensors stored in safetensors' own order (larger dtypes first, as its ``Dtype`` enum ranks them, then by name), so
the same tensors and metadata always give the same bytes: those ``save_file`` gives whenever its hash map happens
to iterate in sorted order (always, for at most one metadata key).
"""

from __future__ import annotations

import json
import struct
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import NamedTuple

import torch

from loramix.errors import OutputError

# Every dtype loramix reads and writes, by its safetensors code, in the order of safetensors' ``Dtype`` enum.
SAFE_DTYPES = {
    "BOOL": torch.bool,
    "U8": torch.uint8,
    "I8": torch.int8,
    "F8_E5M2": torch.float8_e5m2,
    "F8_E4M3": torch.float8_e4m3fn,
    "I16": torch.int16,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I32": torch.int32,
    "F32": torch.float32,
    "F64": torch.float64,
    "I64": torch.int64,
}
SAFETENSORS_CODES = {v: k for k, v in SAFE_DTYPES.items()}  # torch dtype → its safetensors header code
_RANK = {dtype: i for i, dtype in enumerate(SAFE_DTYPES.values())}


class _Entry(NamedTuple):
    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    nbytes: int


def _code(name: str, dtype: torch.dtype) -> str:
    try:
        return SAFETENSORS_CODES[dtype]
    except KeyError:
        codes = ", ".join(str(d).removeprefix("torch.") for d in SAFETENSORS_CODES)
        raise OutputError(f"tensor {name}: safetensors files are written in {codes}, not {dtype}") from None


def header(entries: Iterable, metadata: Mapping[str, str] | None) -> bytes:
    """The 8-byte length and JSON header of ``entries`` (each with ``name``, ``dtype``, ``shape`` and ``nbytes``)
    stored end to end in the order given, ``metadata`` by sorted key (none: no ``__metadata__``), padded with spaces
    so the data starts 8-aligned."""
    head: dict = {}
    if metadata is not None:
        if not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
            raise TypeError("safetensors metadata maps strings to strings")
        head["__metadata__"] = dict(sorted(metadata.items()))
    offset = 0
    for entry in entries:
        code = _code(entry.name, entry.dtype)
        head[entry.name] = {"dtype": code, "shape": list(entry.shape), "data_offsets": [offset, offset + entry.nbytes]}
        offset += entry.nbytes
    text = json.dumps(head, separators=(",", ":"), ensure_ascii=False).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text


def write_safetensors(
    path: Path, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None
) -> Path:
    """Write ``tensors`` (any device, any strides) with ``metadata`` as the safetensors file ``path``: the same bytes
    for the same input in any process. Each tensor's bytes go to the file as they lie (copied only when it is not
    contiguous or not on the CPU); returns ``path``."""
    names = sorted(tensors, key=lambda n: (-_RANK.get(tensors[n].dtype, -1), n))
    head = header([_Entry(n, tensors[n].dtype, tuple(tensors[n].shape), tensors[n].nbytes) for n in names], metadata)
    with open(path, "wb") as f:
        f.write(head)
        for name in names:
            tensor = tensors[name].detach().cpu().contiguous()
            f.write(memoryview(tensor.reshape(-1).view(torch.uint8).numpy()))
    return path
