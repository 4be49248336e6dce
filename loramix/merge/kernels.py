"""The ΔW kernels shared by merges into checkpoints (`loramix.merge.checkpoint`) and into loaded models
(`loramix.merge.loaded_model`): how ΔW lies on a base weight (`decide_layout`), its rows (`delta_rows`), DoRA's exact
merge (`dora_merge`) and effective update (`dora_delta`), and how the update a weight stores after rounding compares
with the intended one (`Survival`, `StoredUpdate`, `warn_stored`).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field

import torch

from loramix.adapter import LoraModule
from loramix.architecture import is_conv1d
from loramix.errors import CheckpointError
from loramix.runtime import OUTPUT_DTYPE_NAMES

log = logging.getLogger(__name__)

LOW_SURVIVAL = 0.5  # ‖stored‖/‖ΔW‖ below this: most of the update is lost
DISTORTED_ERROR = 0.5  # ‖stored − ΔW‖/‖ΔW‖ above this, or
DISTORTED_COSINE = 0.9  # cos(stored, ΔW) below this: the update stored is not the one intended


def decide_layout(
    module: LoraModule,
    name: str,
    key: str,
    shape: tuple[int, ...],
    model_type: str | None,
    *,
    conv1d: bool | None = None,
) -> str:
    """How ΔW lies on base tensor ``key``: settled by the base (shape, then model type and name), as PEFT does.
    ``conv1d`` settles a square weight when the base knows its layer's class (a live model)."""
    out, inp = module.out_features, module.in_features
    if module.layout in ("embedding", "conv2d"):
        if tuple(shape) != module.base_shape:
            raise CheckpointError(
                f"adapter module {name} ({module.layout}, ΔW {module.base_shape}) does not fit base tensor {key} "
                f"of shape {tuple(shape)}"
            )
        return module.layout
    fits = [lay for lay, s in (("out_in", (out, inp)), ("conv1d_fan_in_fan_out", (inp, out))) if tuple(shape) == s]
    if not fits:
        raise CheckpointError(
            f"adapter module {name} (out {out} × in {inp}) does not fit base tensor {key} of shape {tuple(shape)}"
        )
    if len(fits) == 1:
        return fits[0]
    if conv1d is None:
        conv1d = is_conv1d(model_type, name)
    return "conv1d_fan_in_fan_out" if conv1d else "out_in"


@dataclass
class Update:
    """One adapter module applied to one base tensor, with the layout the base settled."""

    name: str
    module: LoraModule
    layout: str
    rows: tuple[int, int] | None = None  # an expert's slab of a fused 3-D tensor: its rows of the tensor as (E·a, b)


@dataclass(frozen=True)
class StoredUpdate:
    """How the update stored in the output dtype, stored = round(W+ΔW) − round(W), compares with the intended ΔW:
    ``kept`` = ‖stored‖/‖ΔW‖ (below 1: lost to rounding; above 1: rounding noise added), ``error`` =
    ‖stored − ΔW‖/‖ΔW‖ and ``cosine`` = ⟨stored, ΔW⟩/(‖stored‖·‖ΔW‖)."""

    kept: float
    error: float
    cosine: float

    @property
    def lost(self) -> bool:
        return self.kept < LOW_SURVIVAL

    @property
    def distorted(self) -> bool:
        return not (self.error <= DISTORTED_ERROR and self.cosine >= DISTORTED_COSINE)


def delta_rows(
    module: LoraModule,
    layout: str,
    start: int,
    stop: int,
    device: torch.device,
    dtype: torch.dtype = torch.float32,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Rows [start, stop) of ΔW in the base tensor's stored layout, in ``dtype`` (float32) on ``device``; written
    into ``out`` (contiguous, of the rows' shape) when given (a conv2d weight: all of its rows, one product)."""
    A, B = module.A, module.B
    if A.dtype != dtype or B.dtype != dtype or A.device != device or B.device != device:  # no call into torch when kept
        A, B = A.to(device=device, dtype=dtype), B.to(device=device, dtype=dtype)
    if layout == "out_in":
        rows = torch.mm(B[start:stop], A, out=out)
    elif layout in ("conv1d_fan_in_fan_out", "embedding"):
        rows = torch.mm(A[:, start:stop].T, B.T, out=out)
    else:
        flat = None if out is None else out.view(len(B), -1)  # conv2d: one chunk, (out, in·k·k) as stored
        rows = torch.mm(B, A, out=flat).view(module.base_shape)
    return rows if module.scale == 1 else rows.mul_(module.scale)


def dora_merge(W: torch.Tensor, update: Update, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """PEFT's DoRA merge: m · (W + ΔW) / ‖W + ΔW‖, the norm per output row (taken in out×in orientation).
    Returns the merged weight and that norm (what undoing the merge needs)."""
    merged = W + delta_rows(update.module, update.layout, 0, W.shape[0], device)
    factor, norm = _dora_factor(merged, update)
    return merged * factor, norm


def dora_delta(W: torch.Tensor, update: Update) -> torch.Tensor:
    """DoRA's effective update, what its merge adds to W: (m/‖W + ΔW‖ − 1)·W + (m/‖W + ΔW‖)·ΔW, the norm per output
    row as in `dora_merge`, computed in W's dtype (float64 for a conversion) on W's device."""
    lora = delta_rows(update.module, update.layout, 0, W.shape[0], W.device, W.dtype)
    factor, _ = _dora_factor(W + lora, update)
    return W * (factor - 1) + lora * factor


def _dora_factor(merged: torch.Tensor, update: Update) -> tuple[torch.Tensor, torch.Tensor]:
    """m/‖W + ΔW‖ shaped to broadcast over the weight, and the norm: PEFT's weight norm is taken over the weight in
    out×in orientation (it transposes a fan_in_fan_out weight; an embedding's DoRA layer is fan_in_fan_out)."""
    math_view = merged.T if update.layout in ("conv1d_fan_in_fan_out", "embedding") else merged.reshape(len(merged), -1)
    norm = torch.linalg.vector_norm(math_view, dim=1)
    factor = update.module.magnitude.to(device=merged.device, dtype=merged.dtype) / norm
    return factor.reshape(row_shape(update.layout, merged.dim())), norm


def not_finite(target: str) -> CheckpointError:
    """The one-line error for a merged weight that holds NaN/Inf, or would once rounded to the output dtype."""
    return CheckpointError(
        f"merging into {target} gives NaN/Inf values (the adapter or the base is broken, or W + ΔW is past the "
        "range of the output dtype)"
    )


def row_shape(layout: str, dim: int) -> tuple[int, ...]:
    """How a per-output-row vector broadcasts over a weight stored in ``layout`` (``dim`` dimensions)."""
    if layout in ("conv1d_fan_in_fan_out", "embedding"):
        return (1, -1)
    return (-1, *([1] * (dim - 1)))


@dataclass
class Survival:
    """Sums over a tensor's chunks: ‖stored‖², ‖ΔW‖² and ‖stored − ΔW‖² (the last taken from the difference itself,
    not from the other two, so that a small error is not lost to cancellation)."""

    kept: float = 0.0
    total: float = 0.0
    diff: float = 0.0
    pending: list[torch.Tensor] = field(default_factory=list)  # norms still on the device (`add_later`)

    def add(self, stored: torch.Tensor, intended: torch.Tensor) -> float:
        """One chunk: the update as stored, and as intended (float32, same shape; ``stored`` is used up: it is
        overwritten). Returns ‖stored‖² + ‖ΔW‖², which is not finite when either holds NaN/Inf (a NaN/Inf in W or
        in W + ΔW shows in the stored update)."""
        energy = float(torch.linalg.vector_norm(intended)) ** 2
        kept = float(torch.linalg.vector_norm(stored)) ** 2
        self.total += energy
        self.kept += kept
        self.diff += float(torch.linalg.vector_norm(stored.sub_(intended))) ** 2
        return kept + energy

    def add_later(self, stored: torch.Tensor, intended: torch.Tensor) -> None:
        """As `add`, without waiting for the device: the chunk's three float32 norms stay on it until `settle`
        (three reductions per chunk; on a GPU each further step would be one more kernel launch per chunk)."""
        self.pending += [
            torch.linalg.vector_norm(stored),
            torch.linalg.vector_norm(intended),
            torch.linalg.vector_norm(stored.sub_(intended)),
        ]

    def settle(self) -> float:
        """Bring the norms of `add_later` in (one wait for the device), squared and summed in float64; returns
        their ‖stored‖² + ‖ΔW‖², not finite when a chunk held NaN/Inf."""
        if not self.pending:
            return 0.0
        kept, total, diff = torch.stack(self.pending).double().square().reshape(-1, 3).sum(0).tolist()
        self.pending = []
        self.kept, self.total, self.diff = self.kept + kept, self.total + total, self.diff + diff
        return kept + total

    def measure(self) -> StoredUpdate:
        if not self.total > 0:
            return StoredUpdate(float("nan"), float("nan"), float("nan"))
        error = math.sqrt(self.diff / self.total)
        inner = (self.kept + self.total - self.diff) / 2
        cosine = inner / math.sqrt(self.kept * self.total) if self.kept > 0 else 0.0
        return StoredUpdate(math.sqrt(self.kept / self.total), error, cosine)


def warn_stored(survival: dict[str, StoredUpdate], dtype: torch.dtype, label: str) -> None:
    """One warning for updates mostly lost to rounding to ``dtype``, one for updates stored distorted."""
    name = OUTPUT_DTYPE_NAMES.get(dtype, str(dtype).removeprefix("torch."))
    low = sorted((v.kept, k) for k, v in survival.items() if v.lost)
    if low:
        worst = ", ".join(f"{k} ({v:.2f})" for v, k in low[:3])
        log.warning(
            "%s: %d of %d module(s) lose most of their ΔW to %s rounding (‖round(W+ΔW)−W‖/‖ΔW‖ < %.1f): %s%s",
            label,
            len(low),
            len(survival),
            name,
            LOW_SURVIVAL,
            worst,
            ", ..." if len(low) > 3 else "",
        )
    bent = sorted((-v.error, k) for k, v in survival.items() if v.distorted and not v.lost)
    if bent:
        worst = ", ".join(
            f"{k} (error {survival[k].error:.2f}, cosine {survival[k].cosine:.2f}, kept {survival[k].kept:.2f})"
            for _, k in bent[:3]
        )
        log.warning(
            "%s: %d of %d module(s) are stored distorted in %s: round(W+ΔW)−round(W) is not ΔW (relative error > %.1f "
            "or cosine < %.1f; ΔW is small against W's rounding step): %s%s; merge in float32 (`dtype=float32`) or "
            "scale the adapter up",
            label,
            len(bent),
            len(survival),
            name,
            DISTORTED_ERROR,
            DISTORTED_COSINE,
            worst,
            ", ..." if len(bent) > 3 else "",
        )
