"""Merging an adapter into a GGUF base file (`loramix.io.gguf_base`): the merged model written as a GGUF file again.

Each adapter module is mapped onto its GGUF tensor by gguf's own ``TensorNameMap`` for the file's architecture, and
ΔW = s·B·A is put in llama.cpp's row order the way ``convert_hf_to_gguf.py`` puts the weights (Llama's q/k rows
permuted by ``LlamaModel.permute``; `loramix.formats.gguf.gguf_targets`, shared with the GGUF LoRA writer). Each
changed tensor is read by gguf's dequantize, W + ΔW formed in float32 and, by default, quantized again in the
tensor's own type by gguf's quantize (a type gguf cannot quantize — the k-quants, the i-quants — is refused in one
line that points to ``--dtype``); every other tensor and every metadata key is copied byte for byte. With a dtype
the file is a dense GGUF, as ``convert_hf_to_gguf.py --outtype f16`` (bf16, f32) writes one and ``llama-quantize``
takes it: every tensor of 2 or more dimensions dequantized (and merged) and stored as F16, BF16 or F32, 1-D ones
(norms) kept as they are. Tensors are made one at a time as the file is written. What survives is measured as for
the other quantized bases: the stored update dequant(requant(W + ΔW)) − W against ΔW, and the share of ‖ΔW‖²
below half the block's step (ggml's legacy block types, whose blocks carry one step d).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from loramix.adapter import LoraAdapter
from loramix.errors import CheckpointError, OutputError, inside_backend
from loramix.experts import refuse
from loramix.formats.gguf import ARCHITECTURES, gguf_targets
from loramix.io.base import BaseCheckpoint
from loramix.io.gguf_base import (
    GgufBase,
    dequantize_stored,
    gguf,
    local_step,
    quantized_like,
    stored_layout,
    stored_shape,
    unquantized,
    unquantized_type,
)
from loramix.io.gguf_model import GgufTensor
from loramix.io.quantized import share_below
from loramix.merge.checkpoint import MergeReport
from loramix.merge.kernels import Survival, not_finite
from loramix.runtime import OUTPUT_DTYPE_NAMES


def deltas_by_tensor(adapter: LoraAdapter, base: GgufBase) -> dict[str, list[tuple[str, torch.Tensor]]]:
    """``{GGUF tensor: [(module, ΔW in llama.cpp's row order, float32)]}``; refuses what a GGUF weight cannot take."""
    refuse(adapter, f"merging into the GGUF base {base.path.name}")
    if adapter.extra:
        raise CheckpointError(
            f"adapter tensors {', '.join(sorted(adapter.extra)[:3])}: heads and saved layers cannot be merged into "
            f"the GGUF base {base.path.name}"
        )
    if base.architecture not in ARCHITECTURES:
        raise CheckpointError(
            f"{base.path}: GGUF architecture {base.architecture}; loramix merges into {', '.join(ARCHITECTURES)} "
            "GGUF bases (whose tensor transforms it knows)"
        )
    for name, m in adapter.modules.items():
        if m.bias is not None or m.magnitude is not None or m.layout not in ("out_in", "conv1d_fan_in_fan_out"):
            raise CheckpointError(
                f"module {name}: only plain linear LoRA merges into a GGUF base (no DoRA, bias, conv)"
            )
    try:
        targets = gguf_targets(adapter, base.config)
    except OutputError as exc:
        raise CheckpointError(f"{base.path}: {exc}") from None
    found: dict[str, list[tuple[str, torch.Tensor]]] = {}
    for name, (target, A, B) in targets.items():
        if target not in base.tensors:
            raise CheckpointError(f"{base.path} has no tensor {target} (adapter module {name}, gguf's TensorNameMap)")
        delta = adapter.modules[name].scale * (B.float() @ A.float())
        found.setdefault(target, []).append((name, delta))
    return found


def write_merged_gguf(adapter: LoraAdapter, base: GgufBase, folder: Path, dtype: torch.dtype | None) -> MergeReport:
    """Write ``base`` with ``adapter`` merged as ``folder/<the base's file name>`` (see the module docstring): one
    tensor made at a time, as the file is written."""
    deltas = deltas_by_tensor(adapter, base)
    for target, updates in deltas.items():
        shape = stored_shape(base, target)
        if tuple(updates[0][1].shape) != shape:
            raise CheckpointError(
                f"{base.path}: tensor {target} is {list(shape)}, adapter module {updates[0][0]} gives ΔW "
                f"{list(updates[0][1].shape)}"
            )
    kinds = {t: base.tensors[t].tensor_type for t in deltas} if dtype is None else {}
    if dtype is not None:  # dense: every tensor of 2 or more dimensions in dtype (1-D ones stay, as the converter has)
        kinds = {n: unquantized_type(dtype) for n, t in base.tensors.items() if n in deltas or len(t.shape) > 1}
    for target in deltas if dtype is None else ():
        quantized_like(base, target, torch.zeros(1, stored_shape(base, target)[-1]))  # one line now if it cannot
    survival, shares = {}, {}

    def merged(target: str):
        W = base.dequantized(target)
        updates = deltas[target]
        delta = sum(d for _, d in updates)
        array, qtype = quantized_like(base, target, W + delta) if dtype is None else unquantized(W + delta, dtype)
        stats = Survival()
        if not math.isfinite(stats.add(dequantize_stored(array, qtype).reshape(W.shape) - W, delta)):
            raise not_finite(target)
        step = local_step(base, target)
        share = share_below(delta, step) if step is not None and dtype is None else float("nan")
        for name, _ in updates:
            survival[name], shares[name] = stats.measure(), share
        return array

    def made(name: str):
        if name in deltas:
            return merged(name)
        if kinds[name] == base.tensors[name].tensor_type:
            return base.tensors[name].data  # already in dtype: byte for byte
        return unquantized(base.dequantized(name), dtype)[0]

    file = folder / base.path.name
    _write(base, file, kinds, made)
    types = sorted({base.type_name(t) for t in kinds})
    if dtype is None:
        written_as = f"GGUF ({', '.join(types)}), the merged tensors re-quantized in their own types by gguf"
    else:
        written_as = (
            f"a dense GGUF: every tensor of 2 or more dimensions stored as {OUTPUT_DTYPE_NAMES[dtype]} (were "
            f"{', '.join(types)}), 1-D ones as they were"
        )
    return MergeReport(
        path=folder,
        shards=[file.name],
        total_size=file.stat().st_size,
        tensors=len(base.tensors),
        dtype=dtype or torch.float32,
        in_own_format=dtype is None,
        survival=dict(sorted(survival.items())),
        written_as=written_as,
        below_step=shares,
        base_dtype=dtype or torch.float32,
    )


def safetensors_written_as(checkpoint: BaseCheckpoint, dtype: torch.dtype | None, tokenizer: str) -> str:
    """How a GGUF base merged as a transformers safetensors folder (`loramix.io.gguf_model`) was written
    (``tokenizer``: what `save_tokenizer` said)."""
    types = sorted({t.base.type_name(t.stored) for t in checkpoint.tensors.values() if isinstance(t, GgufTensor)})
    stored = OUTPUT_DTYPE_NAMES[dtype] if dtype else "F32/F16/BF16 as they were, quantized types as float32"
    model = (checkpoint.config.get("architectures") or ["?"])[0]
    return (
        f"a transformers safetensors folder ({model}, {stored}): the GGUF base ({', '.join(types)}) dequantized by "
        f"gguf under transformers' names, config.json from its metadata, {tokenizer}"
    )


def save_tokenizer(gguf_file: Path, folder: Path) -> str:
    """The tokenizer transformers builds from ``gguf_file``'s metadata (its GGUF tokenizer converters:
    ``AutoTokenizer.from_pretrained(..., gguf_file=...)``) saved into ``folder``; says which files, or why none."""
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name)
    except (ValueError, KeyError, TypeError, IndexError) as exc:  # what its converters raise on missing metadata
        reason = str(exc).splitlines()[0][:160] if str(exc) else type(exc).__name__
        return f"no tokenizer files (transformers builds none from its metadata: {reason})"
    with inside_backend("transformers", f"saving the tokenizer of {gguf_file.name}"):
        files = tokenizer.save_pretrained(folder)
    return "the tokenizer transformers builds from it (" + ", ".join(sorted(Path(f).name for f in files)) + ")"


def _write(base: GgufBase, file: Path, kinds: dict, made: Callable[[str], Any]) -> None:
    """``base``'s metadata and tensors into ``file`` in their order; each tensor in ``kinds`` stored in that GGUF
    type, its array made by ``made(name)`` when it is written (one at a time), every other one copied as it is."""
    reader = base.reader
    with inside_backend("gguf", f"writing {file.name}"):
        writer = gguf.GGUFWriter(str(file), base.architecture, endianess=reader.endianess)
        writer.data_alignment = reader.alignment
        for field in reader.fields.values():
            if field.name == gguf.Keys.General.ARCHITECTURE or field.name.startswith("GGUF."):
                continue  # the writer's own
            kind = field.types[0]
            sub = field.types[-1] if kind == gguf.GGUFValueType.ARRAY else None
            writer.add_key_value(field.name, field.contents(), kind, sub_type=sub)
        for tensor in reader.tensors:
            qtype = kinds.get(tensor.name, tensor.tensor_type)
            shape, dtype = stored_layout(stored_shape(base, tensor.name), qtype)
            nbytes = math.prod(shape) * dtype.itemsize
            writer.add_tensor_info(tensor.name, shape, dtype, nbytes, raw_dtype=qtype)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for tensor in reader.tensors:
            array = made(tensor.name) if tensor.name in kinds else tensor.data
            writer.write_tensor_data(array, tensor_endianess=reader.endianess)
        writer.close()
