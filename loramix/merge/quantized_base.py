"""Merging into a quantized base (`loramix.io.quantized` recognises it): which output tensors change and how a
merged weight is re-quantized.

By default the checkpoint keeps the base's format: each weight an adapter changes is read as W = dequant(codes,
scales), W + ΔW is formed in float32 and quantized again with fresh scales (the format's own rounding), its codes and
scale tensor both written from that; every other tensor is copied byte for byte. Asked for a dtype, the checkpoint
is written dense: every quantized weight dequantized and cast, the scale tensors dropped. What survives the
re-quantization is measured as the QLoRA path measures it: stored = dequant(requant(W + ΔW)) − W against ΔW, and
the share of ‖ΔW‖² in entries below half the base's local quantization step (`share_below`).
"""

from __future__ import annotations

import math

import torch

from loramix.errors import CheckpointError
from loramix.io.base import BaseCheckpoint
from loramix.io.quantized import QuantizedBase, share_below
from loramix.merge.kernels import Survival, delta_rows, dora_merge, not_finite
from loramix.runtime import OUTPUT_DTYPE_NAMES


def mark_quantized(jobs: list, base: BaseCheckpoint, quantized: QuantizedBase, dtype: torch.dtype | None) -> list:
    """A quantized base's output jobs (`loramix.merge.checkpoint.Job`): with a ``dtype``, every quantized weight read
    dequantized (under the dense model's name, cast to ``dtype``) and the scale tensors dropped; else each weight an
    adapter changes marked for re-quantization (its codes, scales and zeros, all from W + ΔW), the others left to be
    copied as they are."""
    by_name = {j.name: j for j in jobs}
    for key, scale in quantized.scales.items():
        job = by_name[key]
        if job.replaced:
            raise CheckpointError(
                f"adapter tensor {key} ({job.replaced}) would replace a {quantized.describe()} weight"
            )
        if dtype is None:  # copied as stored, or re-quantized into tensors of the stored ones' shapes and dtypes
            job.source = base.tensors[key]
            job.dtype = job.source.dtype
        else:
            job.source = base.dense(quantized.dense_names.get(key, key))
            job.name, job.dtype = job.source.name, dtype
        if dtype is None and job.updates:  # the codes, the scales and (GPTQ/AWQ) the zeros from W + ΔW; g_idx kept
            rewritten = (key, scale, *quantized.extras.get(key, ())[:1])
            for index, name in enumerate(rewritten):
                by_name[name].requantized = (key, index)
    dropped = {*quantized.parts_of_weights(), *quantized.activation_scales} if dtype is not None else set()
    return [j for j in jobs if j.name not in dropped]


def requantize(
    job, base: BaseCheckpoint, device: torch.device, stats: Survival, shares: dict[str, float]
) -> dict[int, torch.Tensor]:
    """The rewritten parts of merged quantized weight ``job.name`` (its factors on ``device`` with B scaled), by
    their place in its parts (0 codes, 1 scales, 2 GPTQ/AWQ zeros): W + ΔW (or DoRA's merge) quantized with fresh
    scales. ``stats`` gets the stored update dequant(requant(W + ΔW)) − W against ΔW; ``shares[job.name]`` the
    share of ‖ΔW‖² below half W's local step."""
    source = base.dense(job.name)
    scheme = source.scheme
    stored = tuple(part.to(device) for part in source.parts())
    W = scheme.dequantize_parts(*stored)
    if any(u.module.magnitude is not None for u in job.updates):
        merged, _ = dora_merge(W, job.updates[0], device)
    else:
        merged = whole_delta(job.updates, W.shape, device).add_(W)  # W + ΔW in ΔW's buffer
    parts = scheme.quantize_parts(merged, stored)
    intended = merged.sub_(W)
    if not math.isfinite(stats.add(scheme.dequantize_parts(*parts).sub_(W), intended)):
        raise not_finite(job.name)
    shares[job.name] = share_below(intended, scheme.step(*stored))
    written = (parts[0], parts[1].reshape(source.scale.shape), *parts[2:3])
    return {index: part.cpu() for index, part in enumerate(written)}


def whole_delta(updates: list, shape: tuple[int, ...], device: torch.device) -> torch.Tensor:
    """ΔW of a whole weight (float32): the sum of its updates, each on its rows (experts stored fused: a slab of
    the weight viewed as (E·a, b))."""
    delta = torch.zeros(shape, device=device).reshape(-1, shape[-1])
    for update in updates:
        first, last = update.rows or (0, shape[0])
        delta[first:last] += delta_rows(update.module, update.layout, 0, last - first, device)
    return delta.reshape(shape)


def written_as(quantized: QuantizedBase | None, dtype: torch.dtype | None) -> str | None:
    """How a merge wrote a quantized base (None for a dense base)."""
    if quantized is None:
        return None
    if dtype is None:
        return f"{quantized.describe()}, the merged weights re-quantized with fresh scales"
    return f"dense {OUTPUT_DTYPE_NAMES[dtype]}, dequantized from {quantized.describe()}"
