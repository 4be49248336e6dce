"""GGUF base files (llama.cpp's model format; ComfyUI's GGUF loaders read the same files): recognised or refused,
their tensors read and re-quantized by the ``gguf`` package itself (``GGUFReader``, ``gguf.quants.dequantize`` and
``quantize``), never by a table of loramix's own.

A GGUF base is one ``.gguf`` file holding a whole model: ``general.type`` "model" (or unset, as older converters
wrote it; an adapter file is refused), ``general.architecture`` one gguf knows, and tensors under llama.cpp's names
(``blk.N.attn_q.weight``), each in its own quantization type (F32, F16, BF16, Q8_0, Q4_0, the k-quants …). A folder
holding exactly one ``.gguf`` file and no other weights names that file; split files (``-00001-of-0000N.gguf``) and
folders with several are refused. What gguf cannot dequantize (or, for a same-format merge, quantize) is one line
naming the tensor and its type.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from loramix.errors import CheckpointError, MissingPackageError, inside_backend
from loramix.lazy import lazy

gguf = lazy("gguf")  # the optional extra loramix[gguf]

SPLIT = re.compile(r"-\d{5}-of-\d{5}\.gguf$")
OTHER_WEIGHTS = ("*.safetensors", "*.bin", "config.json")


def gguf_base_file(base: str | Path) -> Path | None:
    """The GGUF file ``base`` names (the file itself, or a folder's one ``.gguf`` file and no other weights), None
    for anything else; split or several GGUF files are refused."""
    path = Path(base).expanduser()
    if path.is_dir():
        files = sorted(path.glob("*.gguf"))
        if not files or any(next(path.glob(p), None) for p in OTHER_WEIGHTS):
            return None
        if len(files) > 1:
            raise CheckpointError(f"{path}: {len(files)} GGUF files ({files[0].name}, …); name the base file itself")
        path = files[0]
    if path.suffix != ".gguf" or not path.is_file():
        return None
    if SPLIT.search(path.name):
        raise CheckpointError(f"{path}: one part of a split GGUF; merge it into one file first (llama-gguf-split)")
    return path


@dataclass
class GgufBase:
    """An opened GGUF base: its reader, architecture, the config facts the name map and Llama's q/k permutation
    need (``model_type``, head counts), and its tensors by GGUF name."""

    path: Path
    reader: Any  # gguf.GGUFReader
    architecture: str
    config: dict
    tensors: dict[str, Any] = field(default_factory=dict)  # name → gguf ReaderTensor

    def type_name(self, name: str) -> str:
        return self.tensors[name].tensor_type.name

    def dequantized(self, name: str, rows: slice | Any = None) -> torch.Tensor:
        """Tensor ``name`` as float32 (numpy order: out × in for a weight), by gguf's own dequantize; ``rows``
        (a slice or index array along the first axis: whole blocks, as a GGUF row is) reads only those."""
        tensor = self.tensors[name]
        data = tensor.data if rows is None else tensor.data[rows]
        with inside_backend("gguf", f"dequantizing {name} ({tensor.tensor_type.name})"):
            try:
                values = gguf.quants.dequantize(data, tensor.tensor_type)
            except NotImplementedError:
                raise CheckpointError(
                    f"{self.path}: tensor {name} is {tensor.tensor_type.name}, which gguf cannot dequantize"
                ) from None
        return torch.from_numpy(values.astype("float32", copy=False).copy())


def llama_permute(rows: torch.Tensor, heads: int) -> torch.Tensor:
    """convert_hf_to_gguf.py, LlamaModel.permute: HF's rotary halves back to llama.cpp's interleaved rows."""
    return rows.reshape(heads, 2, rows.shape[0] // heads // 2, *rows.shape[1:]).swapaxes(1, 2).reshape(rows.shape)


def _field(reader, key: str):
    found = reader.fields.get(key)
    return None if found is None else found.contents()


def open_gguf(path: Path) -> GgufBase:
    """Open GGUF base file ``path`` (headers only; tensor data is memory-mapped), or refuse it in one line."""
    try:
        gguf.GGUFReader  # noqa: B018 (the optional dependency is there)
    except ModuleNotFoundError:
        raise MissingPackageError("a GGUF base needs the gguf package: pip install 'loramix[gguf]'") from None
    try:
        reader = gguf.GGUFReader(str(path))
    except (ValueError, IndexError, OSError) as exc:  # what GGUFReader raises on a damaged or truncated file
        raise CheckpointError(f"{path}: not a readable GGUF file ({type(exc).__name__}: {exc})") from None
    with inside_backend("gguf", f"reading {path.name}"):
        arch = _field(reader, gguf.Keys.General.ARCHITECTURE)
        kind = _field(reader, gguf.Keys.General.TYPE)
    if kind not in (None, "model"):
        raise CheckpointError(f"{path}: a GGUF {kind} file (general.type {kind}), not a model")
    if arch not in gguf.MODEL_ARCH_NAMES.values():
        raise CheckpointError(f"{path}: GGUF architecture {arch!r} (general.architecture) is not one gguf knows")
    heads = _field(reader, gguf.Keys.Attention.HEAD_COUNT.format(arch=arch))
    config = {
        "model_type": arch,
        "num_attention_heads": heads,
        "num_key_value_heads": _field(reader, gguf.Keys.Attention.HEAD_COUNT_KV.format(arch=arch)) or heads,
        "num_hidden_layers": _field(reader, gguf.Keys.LLM.BLOCK_COUNT.format(arch=arch)),
    }
    tensors = {}
    for tensor in reader.tensors:
        if tensor.name in tensors:
            raise CheckpointError(f"{path}: tensor {tensor.name} is stored twice")
        tensors[tensor.name] = tensor
    return GgufBase(path, reader, arch, config, tensors)


def quantized_like(base: GgufBase, name: str, values: torch.Tensor):
    """``values`` (float32, the shape of tensor ``name``) in ``name``'s own type, by gguf's quantize: (the stored
    array, its type); a type gguf cannot quantize is `CheckpointError` pointing to an unquantized output."""
    tensor = base.tensors[name]
    with inside_backend("gguf", f"quantizing {name} as {tensor.tensor_type.name}"):
        try:
            return gguf.quants.quantize(values.numpy(), tensor.tensor_type), tensor.tensor_type
        except NotImplementedError:
            raise CheckpointError(
                f"{base.path}: tensor {name} is {tensor.tensor_type.name}, which gguf cannot quantize again; pass "
                "`--dtype float16` (or bfloat16, float32) to write a dense GGUF"
            ) from None


def unquantized_type(dtype: torch.dtype):
    """The GGUF type (F32, F16, BF16) that stores ``dtype``."""
    kind = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16"}.get(dtype)
    if kind is None:
        raise CheckpointError(f"a GGUF base is written with float32, float16 or bfloat16 tensors, not {dtype}")
    return gguf.GGMLQuantizationType[kind]


def unquantized(values: torch.Tensor, dtype: torch.dtype):
    """``values`` (float32) as a GGUF tensor of ``dtype``: (the stored array, its GGUF type)."""
    qtype = unquantized_type(dtype)
    with inside_backend("gguf", f"storing a tensor as {qtype.name}"):
        return gguf.quants.quantize(values.numpy(), qtype), qtype


def stored_shape(base: GgufBase, name: str) -> tuple[int, ...]:
    """Tensor ``name``'s shape in numpy order (out × in for a weight), as dequantize gives it."""
    return tuple(reversed([int(n) for n in base.tensors[name].shape]))


def stored_layout(shape: tuple[int, ...], qtype) -> tuple[tuple[int, ...], Any]:
    """(shape, numpy dtype) of the array gguf's quantize gives for values of ``shape`` in ``qtype``: float32 and
    float16 arrays for F32 and F16, bytes (whole blocks a row) for every other type."""
    if qtype.name in ("F32", "F16"):
        return shape, np.dtype(np.float32 if qtype.name == "F32" else np.float16)
    return gguf.quants.quant_shape_to_byte_shape(shape, qtype), np.dtype(np.uint8)


def dequantize_stored(array, qtype) -> torch.Tensor:
    """A stored GGUF array read back by gguf's dequantize (float32)."""
    with inside_backend("gguf", f"dequantizing a {qtype.name} tensor"):
        return torch.from_numpy(gguf.quants.dequantize(array, qtype).astype("float32", copy=False).copy())


# ggml's legacy block types begin each block with its step d (ggml_half; block_q4_0 {d, qs}, block_q4_1 {d, m, qs},
# block_q5_0 {d, qh, qs}, block_q5_1 {d, m, qh, qs}, block_q8_0 {d, qs}): W = d · q (+ m), q integer.
STEP_FIRST = ("Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0")


def local_step(base: GgufBase, name: str) -> torch.Tensor | None:
    """The quantization step of each entry of tensor ``name`` (its block's d, float32, the tensor's shape), None
    for a type without one step per block (k-quants' sub-block scales, float types)."""
    tensor = base.tensors[name]
    if tensor.tensor_type.name not in STEP_FIRST:
        return None
    block, size = gguf.GGML_QUANT_SIZES[tensor.tensor_type]
    data = torch.from_numpy(tensor.data.reshape(-1, size)[:, :2].copy())
    steps = data.view(torch.float16).float().abs().repeat_interleave(block, dim=0)  # Q4_0 stores d = max / −8
    return steps.reshape(stored_shape(base, name))
