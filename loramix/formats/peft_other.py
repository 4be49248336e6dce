"""PEFT adapter types other than LoRA whose update needs the base weight (its values, or only its shape), read for
`loramix convert`: VeRA, (IA)³, OFT and FourierFT (`read_updates`), each module as an object with ``math_delta(W)`` and
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

OFT (``tuners/oft``, ``peft_type: OFT``, PEFT ≥ 0.15's ``oft_R.weight``): the input is rotated block by block,
x ↦ x·blockdiag(R), so W' = W·blockdiag(R)ᵀ and ΔW = W·(blockdiag(R)ᵀ − I) (`Rotation`, R as PEFT's
``_cayley_batch`` computes it); constrained OFT (coft) and conv layers are refused.

FourierFT (``tuners/fourierft``, ``peft_type: FOURIERFT``): ``fourierft_spectrum`` holds n coefficients placed at
n entries of an out×in spectrum drawn by ``torch.randperm`` from ``random_loc_seed``; ΔW = Re(ifft2)·scaling
(`Spectrum`), of full rank in general.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch

from loramix.adapter import ExtraTensor
from loramix.errors import AdapterFormatError
from loramix.formats import _keys

KINDS = {"VERA": "VeRA", "IA3": "(IA)³", "OFT": "OFT", "FOURIERFT": "FourierFT"}
PARTS = {
    "VERA": ("vera_lambda_b", "vera_lambda_d"),
    "IA3": ("ia3_l",),
    "OFT": ("oft_R",),
    "FOURIERFT": ("fourierft_spectrum",),
}
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


@dataclass(frozen=True)
class Rotation:
    """OFT on one module: ``params`` (blocks × k(k−1)/2: one row per k×k block, or one row shared by every block)
    fill the upper triangle of Q, skew-symmetric; R_i = Cayley(Q_i) (PEFT's truncated Neumann series
    I + 2Q + 2Q² + … with ``terms`` terms, or (I + Q)⁻¹(I − Q) exactly), and W' = W·blockdiag(R)ᵀ."""

    kind: str
    params: torch.Tensor
    terms: int | None  # None: the exact Cayley transform

    def rotation(self, blocks: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """blockdiag(R_1, …, R_blocks) (in×in), in ``dtype``."""
        q = self.params.to(device=device, dtype=dtype)
        size = _block_size(q)
        rows, cols = torch.triu_indices(size, size, 1, device=device)
        Q = q.new_zeros(q.shape[0], size, size)
        Q[:, rows, cols] = q
        Q = Q - Q.mT
        eye = torch.eye(size, dtype=dtype, device=device).expand_as(Q)
        if self.terms is None:
            R = torch.linalg.solve(eye + Q, eye - Q, left=False)
        else:
            R = eye.clone()
            if self.terms > 1:
                R = R + 2 * Q
            if self.terms > 2:  # as PEFT sums it: 2Q² … 2Q^(terms−2), then Q^(terms−1) (Q³ for three terms)
                power = Q @ Q
                R = R + 2 * power
                for _ in range(3, self.terms - 1):
                    power = power @ Q
                    R = R + 2 * power
                R = R + power @ Q
        if R.shape[0] == 1:
            R = R.expand(blocks, size, size)
        return torch.block_diag(*R)

    def math_delta(self, W: torch.Tensor) -> torch.Tensor:
        """ΔW = W·(Rᵀ − I) for ``W`` out×in, in W's dtype."""
        size = _block_size(self.params)
        blocks = self.params.shape[0] if self.params.shape[0] > 1 else W.shape[1] // size
        if blocks * size != W.shape[1]:
            raise AdapterFormatError(
                f"OFT blocks ({self.params.shape[0]} of {size}×{size}) do not cover the base's {W.shape[1]} inputs"
            )
        R = self.rotation(blocks, W.dtype, W.device)
        return W @ (R.T - torch.eye(W.shape[1], dtype=W.dtype, device=W.device))

    def bias_delta(self, bias: torch.Tensor) -> None:
        return None


@dataclass(frozen=True)
class Spectrum:
    """FourierFT on one module: ``coefficients`` at the entries ``torch.randperm(out·in, seed)[:n]`` (row-major) of an
    out×in spectrum, zero elsewhere; ΔW = Re(ifft2(spectrum))·``scaling``. The entries depend on the base weight's
    shape, so the base settles them, with PEFT's generator call repeated (a seeded CPU ``torch.Generator``)."""

    kind: str
    coefficients: torch.Tensor
    seed: int
    scaling: float

    def math_delta(self, W: torch.Tensor) -> torch.Tensor:
        """ΔW (out×in, W's dtype) for a base weight ``W`` in out×in orientation (only its shape is used)."""
        out, inp = W.shape
        count = self.coefficients.numel()
        if count > out * inp:
            raise AdapterFormatError(f"FourierFT: {count} coefficients do not fit a base weight of {out}×{inp}")
        chosen = torch.randperm(out * inp, generator=torch.Generator().manual_seed(self.seed))[:count]
        spectrum = torch.zeros(out * inp, dtype=torch.float64)
        spectrum[chosen] = self.coefficients.to(torch.float64)
        delta = torch.fft.ifft2(spectrum.reshape(out, inp)).real * self.scaling
        return delta.to(device=W.device, dtype=W.dtype)

    def bias_delta(self, bias: torch.Tensor) -> None:
        return None


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
        if peft_type == "VERA":
            modules[name] = _vera(where, found, shared)
        elif peft_type == "IA3":
            modules[name] = _ia3(where, found)
        elif peft_type == "OFT":
            modules[name] = _oft(where, found, config)
        else:
            modules[name] = _fourier(where, found, config)
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


def _oft(where: str, found: dict, config: dict) -> Rotation:
    if config.get("coft"):
        raise AdapterFormatError(f"{where}: constrained OFT (coft) is not converted")
    params = found["oft_R"]
    if (
        params.dim() != 2
        or _block_size(params) < 2
        or _block_size(params) * (_block_size(params) - 1) != 2 * params.shape[1]
    ):
        raise AdapterFormatError(f"{where}: oft_R.weight {tuple(params.shape)} is not blocks × k(k−1)/2 parameters")
    return Rotation(
        "OFT", params, config.get("num_cayley_neumann_terms", 5) if config.get("use_cayley_neumann") else None
    )


def _fourier(where: str, found: dict, config: dict) -> Spectrum:
    coefficients = found["fourierft_spectrum"]
    if coefficients.dim() != 1 or not coefficients.is_floating_point():
        raise AdapterFormatError(f"{where}: fourierft_spectrum {tuple(coefficients.shape)} is not a vector")
    return Spectrum(
        "FourierFT", coefficients, int(config.get("random_loc_seed", 777)), float(config.get("scaling", 150.0))
    )


def _block_size(params: torch.Tensor) -> int:
    """k of k(k−1)/2 parameters per block (the nearest, for a count that is not such a number)."""
    return int(round((1 + math.sqrt(1 + 8 * params.shape[-1])) / 2))


def _ia3(where: str, found: dict) -> Rescale:
    vector = found["ia3_l"]
    if vector.dim() != 2 or 1 not in vector.shape or not vector.is_floating_point():
        raise AdapterFormatError(f"{where}: expected ia3_l of shape (out, 1) or (1, in), got {tuple(vector.shape)}")
    return Rescale("(IA)³", vector.reshape(-1), "out" if vector.shape[1] == 1 else "in")
