"""Merging an adapter into a GGUF base file (`loramix.io.gguf_base`): the merged model written as a GGUF file again.

Each adapter module is mapped onto its GGUF tensor by gguf's own ``TensorNameMap`` for the file's architecture, and
ΔW = s·B·A is put in llama.cpp's row order the way ``convert_hf_to_gguf.py`` puts the weights (Llama's q/k rows
permuted by ``LlamaModel.permute``; `loramix.formats.gguf.gguf_targets`, shared with the GGUF LoRA writer). Each
changed tensor is read by gguf's dequantize, W + ΔW formed in float32 and, by default, quantized again in the
tensor's own type by gguf's quantize (a type gguf cannot quantize — the k-quants, the i-quants — is refused in one
line that points to ``--dtype``); with a dtype the merged tensors are stored unquantized (F32, F16 or BF16). Every
other tensor and every metadata key is copied byte for byte. What survives is measured as for the other quantized
bases: the stored update dequant(requant(W + ΔW)) − W against ΔW, and the share of ‖ΔW‖² below half the block's
step (ggml's legacy block types, whose blocks carry one step d).
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from loramix.adapter import LoraAdapter
from loramix.errors import CheckpointError, OutputError, inside_backend
from loramix.experts import refuse
from loramix.formats.gguf import ARCHITECTURES, gguf_targets
from loramix.io.gguf_base import (
    GgufBase,
    dequantize_stored,
    gguf,
    local_step,
    quantized_like,
    unquantized,
)
from loramix.io.quantized import share_below
from loramix.merge.checkpoint import MergeReport
from loramix.merge.kernels import Survival
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
    """Write ``base`` with ``adapter`` merged as ``folder/<the base's file name>`` (see the module docstring)."""
    new, survival, shares = {}, {}, {}
    for target, updates in deltas_by_tensor(adapter, base).items():
        W = base.dequantized(target)
        delta = sum(d for _, d in updates)
        if tuple(delta.shape) != tuple(W.shape):
            raise CheckpointError(
                f"{base.path}: tensor {target} is {list(W.shape)}, adapter module {updates[0][0]} gives ΔW "
                f"{list(delta.shape)}"
            )
        merged = W + delta
        array, qtype = quantized_like(base, target, merged) if dtype is None else unquantized(merged, dtype)
        stats = Survival()
        if not math.isfinite(stats.add(dequantize_stored(array, qtype).reshape(W.shape) - W, delta)):
            raise CheckpointError(f"merging into {target} gives NaN/Inf values (the adapter or the base is broken)")
        step = local_step(base, target)
        share = share_below(delta, step) if step is not None and dtype is None else float("nan")
        for name, _ in updates:
            survival[name], shares[name] = stats.measure(), share
        new[target] = array, qtype
    file = folder / base.path.name
    _write(base, file, new)
    types = sorted({base.type_name(t) for t in new})
    if dtype is None:
        written_as = f"GGUF ({', '.join(types)}), the merged tensors re-quantized in their own types by gguf"
    else:
        written_as = f"GGUF, the merged tensors stored as {OUTPUT_DTYPE_NAMES[dtype]} (were {', '.join(types)})"
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


def _write(base: GgufBase, file: Path, new: dict) -> None:
    """``base``'s metadata and tensors into ``file`` in their order, the tensors in ``new`` replaced."""
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
        arrays = [new.get(t.name, (t.data, t.tensor_type)) for t in reader.tensors]
        for tensor, (array, qtype) in zip(reader.tensors, arrays):
            writer.add_tensor_info(tensor.name, array.shape, array.dtype, array.nbytes, raw_dtype=qtype)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for array, _ in arrays:
            writer.write_tensor_data(array, tensor_endianess=reader.endianess)
        writer.close()
