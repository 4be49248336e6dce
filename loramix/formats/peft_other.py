"""PEFT adapter types other than LoRA whose update needs the base weight (its values, or only its shape), read for
`loramix convert`: VeRA and (IA)³ (`read_updates`), each module as an object with ``math_delta(W)`` and
``bias_delta(bias)``, which `loramix.extraction.conversion` applies to the base weights it streams.

VeRA (PEFT ``tuners/vera``, ``peft_type: VERA``): every module shares two frozen random matrices, saved once as
``base_model.vera_A`` (r×in_max) and ``base_model.vera_B`` (out_max×r) when ``save_projection`` is on, and learns two
vectors, ``vera_lambda_d`` (r) and ``vera_lambda_b`` (out). PEFT's ``get_delta_weight`` is
ΔW = (λ_b ⊙ B[:out, :])·(λ_d ⊙ A[:, :in]) (transposed for fan_in_fan_out), no further scale: a LoRA of rank r with
B' = λ_b·B[:out], A' = λ_d·A[:, :in] — but the input width is not in the file (vera_A is saved at the widest input
of all targets), so the base weight's shape settles it (`Projection`; converted at full rank it is exact, rank r).
An adapter saved without its projection would need PEFT's generator to rebuild it, and is refused.

(IA)³ (``tuners/ia3``, ``peft_type: IA3``): ``ia3_l`` is (out, 1), scaling the output rows, or, for
``feedforward_modules``, (1, in), scaling the input columns, in out×in orientation (PEFT transposes it onto a
Conv1D weight). PEFT's merge is W' = W ⊙ l, and for an output-side vector the base bias b' = b ⊙ l. So
ΔW = W ⊙ (l − 1) depends on the base weight (`Rescale`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from loramix.adapter import ExtraTensor
from loramix.errors import AdapterFormatError
from loramix.formats import _keys

KINDS = {"VERA": "VeRA", "IA3": "(IA)³"}
PARTS = {"VERA": ("vera_lambda_b", "vera_lambda_d"), "IA3": ("ia3_l",)}
PROJECTIONS = ("vera_A", "vera_B")


@dataclass(frozen=True)
class Projection:
    """VeRA on one module: ΔW = (λ_b ⊙ B[:out])·(λ_d ⊙ A[:, :in]), with in the base weight's input width (not in the
    file: vera_A is saved at the widest input of all targets)."""

    kind: str
    A: torch.Tensor
    B: torch.Tensor
    lambda_b: torch.Tensor
    lambda_d: torch.Tensor

    def math_delta(self, W: torch.Tensor) -> torch.Tensor:
        """ΔW (out×in, W's dtype) for a base weight ``W`` in out×in orientation (only its shape is used)."""
        out, inp = W.shape
        if out != self.lambda_b.numel() or inp > self.A.shape[1]:
            raise AdapterFormatError(
                f"VeRA vectors for {self.lambda_b.numel()} outputs and projections of width {self.A.shape[1]} do not "
                f"fit a base weight of {out}×{inp}"
            )
        cast = {"device": W.device, "dtype": W.dtype}
        B = self.lambda_b.to(**cast)[:, None] * self.B[:out].to(**cast)
        return B @ (self.lambda_d.to(**cast)[:, None] * self.A[:, :inp].to(**cast))

    def bias_delta(self, bias: torch.Tensor) -> None:
        return None


@dataclass(frozen=True)
class Rescale:
    """(IA)³ on one module: W' = W ⊙ l with ``vector`` l scaling the output rows (``side`` "out") or the input
    columns ("in") of the weight in out×in orientation; an output-side vector scales the base bias too."""

    kind: str
    vector: torch.Tensor
    side: str

    def math_delta(self, W: torch.Tensor) -> torch.Tensor:
        """ΔW = W ⊙ (l − 1) for ``W`` out×in, in W's dtype."""
        size = W.shape[0 if self.side == "out" else 1]
        if self.vector.numel() != size:
            raise AdapterFormatError(
                f"(IA)³ vector of {self.vector.numel()} values does not fit the {self.side}put side ({size}) of a "
                f"base weight of {W.shape[0]}×{W.shape[1]}"
            )
        scale = self.vector.to(device=W.device, dtype=W.dtype) - 1
        return W * (scale[:, None] if self.side == "out" else scale[None, :])

    def bias_delta(self, bias: torch.Tensor) -> torch.Tensor | None:
        """What PEFT's merge adds to the base bias: b ⊙ (l − 1) for an output-side vector."""
        if self.side != "out":
            return None
        return bias * (self.vector.to(device=bias.device, dtype=bias.dtype) - 1)


def read_updates(
    path: str | Path, *, allow_nonfinite: bool = False
) -> tuple[dict, dict[str, Projection | Rescale], dict[str, ExtraTensor]]:
    """(config, modules, extra tensors) of a PEFT VeRA or (IA)³ adapter folder."""
    config, weights, tensors = _keys.load_folder(path, allow_nonfinite=allow_nonfinite, peft_types=tuple(KINDS))
    peft_type = config["peft_type"]
    shared = {name: tensors.pop(f"base_model.{name}", None) for name in PROJECTIONS}
    notes: list[str] = []
    parts, extra = _keys.split_keys(tensors, notes, kinds=PARTS[peft_type], config=config, where=weights)
    if not parts:
        raise AdapterFormatError(f"{weights}: holds no {KINDS[peft_type]} tensors ({', '.join(PARTS[peft_type])})")
    if peft_type == "VERA" and any(t is None for t in shared.values()):
        raise AdapterFormatError(
            f"{weights}: VeRA adapter saved without its projection (base_model.vera_A/vera_B; save_projection=false): "
            "rebuilding it needs PEFT's generator, so it is not read"
        )
    modules = {}
    for name, found in sorted(parts.items()):
        found = {part: tensor for (part, _), tensor in found.items()}
        where = f"{weights}: {KINDS[peft_type]} module {name}"
        modules[name] = _vera(where, found, shared) if peft_type == "VERA" else _ia3(where, found)
    return config, modules, extra


def _vera(where: str, found: dict, shared: dict) -> Projection:
    b, d = found.get("vera_lambda_b"), found.get("vera_lambda_d")
    A, B = shared["vera_A"], shared["vera_B"]
    if b is None or d is None or b.dim() != 1 or d.numel() != A.shape[0]:
        raise AdapterFormatError(
            f"{where}: expected vectors vera_lambda_b and vera_lambda_d ({A.shape[0]}), found "
            + ", ".join(f"{k} {tuple(v.shape)}" for k, v in found.items())
        )
    return Projection("VeRA", A, B, b, d)


def _ia3(where: str, found: dict) -> Rescale:
    vector = found["ia3_l"]
    if vector.dim() != 2 or 1 not in vector.shape or not vector.is_floating_point():
        raise AdapterFormatError(f"{where}: expected ia3_l of shape (out, 1) or (1, in), got {tuple(vector.shape)}")
    return Rescale("(IA)³", vector.reshape(-1), "out" if vector.shape[1] == 1 else "in")
