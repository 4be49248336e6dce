"""Batched evaluation of candidate weightings on a frozen base model.

The base is loaded once and never rewritten. Each targeted ``nn.Linear`` / transformers ``Conv1D`` gets a forward
hook that adds the composed LoRA as a low-rank term, ``y = base(x) + x·Aₚᵀ·Bₚᵀ``. For a population of P candidates
the example batch is repeated P times (candidate-major) and each hooked layer applies candidate p's factors to its
slice with batched matmuls, so one forward pass scores a whole generation. Gradients with respect to the weights
flow through the hooks (the base's parameters are frozen).

Compositions, per module (sᵢ = adapter i's scale, wᵢ = candidate weights):

- ``lorahub``: B = Σ wᵢ·√sᵢ·Bᵢ, A = Σ wᵢ·√sᵢ·Aᵢ, ΔW = B·A. This is LoRAHub's own form (sail-sg/lorahub
  ``get_score``: every lora_A and lora_B tensor of the PEFT state dict is multiplied by wᵢ and summed, then loaded
  into a PEFT model whose scale s is the first adapter's), identical to it when all adapters share one scale;
  √sᵢ is folded into each factor so that adapters of different alphas keep their own scale. Equal ranks needed.
  Not PEFT's ``linear`` (that mixes √wᵢ). ΔW contains the cross terms wᵢwⱼ·Bᵢ·Aⱼ and is quadratic in w.
- ``delta``: ΔW = Σ wᵢ·sᵢ·Bᵢ·Aᵢ exactly (any ranks), linear in w.

Weights that vary by layer or module (``forms``: a gradient, name filters or SD block weights per adapter, see
`loramix.schedule`): a candidate is then the vector θ of the numbers the forms hold (k of them, adapter by adapter),
and module m's weights are w = L_m·θ + c_m, with L_m (n×k) and c_m from `loramix.schedule.Schedule.affine`
(precomputed on the module's device; gradients flow through this linear map). When every form is a number, θ is w
and no map is applied.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn

from loramix.adapter import LoraAdapter
from loramix.errors import IncompatibleAdaptersError
from loramix.schedule import Schedule, count_layers, parse
from loramix.settings import COMPOSITIONS
from loramix.weight_search.objective import token_losses

_LAYOUTS = ("out_in", "conv1d_fan_in_fan_out")  # factors are kept in math orientation: both are x·Aᵀ·Bᵀ


@dataclass
class _Factors:
    """One targeted module's factors on the device (float32): stacked per adapter (lorahub) or concatenated."""

    A: torch.Tensor  # lorahub: n×r×in (√s folded, zero where an adapter lacks the module); delta: R×in
    B: torch.Tensor  # lorahub: n×out×r; delta: out×R
    owner: torch.Tensor | None = None  # delta: adapter index of each of the R columns
    scale: torch.Tensor | None = None  # delta: sᵢ of each column
    mix: torch.Tensor | None = None  # varying forms: L_m (n×k), the module's weights L_m·θ + offset
    offset: torch.Tensor | None = None  # varying forms: c_m (n)


def _check_module(name: str, module: nn.Module | None, lora) -> None:
    if module is None:
        raise IncompatibleAdaptersError(f"module {name}: not in the base model")
    if lora.layout not in _LAYOUTS:
        raise IncompatibleAdaptersError(f"module {name}: search supports Linear and Conv1D LoRA, not {lora.layout}")
    weight = getattr(module, "weight", None)
    if weight is None or weight.numel() != lora.out_features * lora.in_features:
        raise IncompatibleAdaptersError(
            f"module {name}: the base layer's weight does not match the adapter's ΔW {tuple(lora.base_shape)}"
        )


def build_factors(model: nn.Module, adapters: list[LoraAdapter], composition: str) -> dict[str, _Factors]:
    """Per targeted module, the factors the hooks apply, on that module's device (a base split over GPUs keeps
    each layer's factors beside it); checks names, layouts and, for lorahub, ranks."""
    if composition not in COMPOSITIONS:
        raise IncompatibleAdaptersError(f"unknown composition {composition!r} (use {' or '.join(COMPOSITIONS)})")
    for a in adapters:
        if a.has_dora or a.has_lora_bias or a.extra:
            what = "DoRA magnitudes" if a.has_dora else "lora_B biases" if a.has_lora_bias else "extra tensors (heads)"
            raise IncompatibleAdaptersError(
                f"{a.source}: search and the data-aware merges (regmean, lot) cannot run adapters carrying {what}"
            )
    named = dict(model.named_modules())
    names = list(dict.fromkeys(n for a in adapters for n in a.modules))
    factors = {}
    for name in names:
        present = [(i, a.modules[name]) for i, a in enumerate(adapters) if name in a.modules]
        for _, m in present:
            _check_module(name, named.get(name), m)
        device = named[name].weight.device
        if composition == "lorahub":
            ranks = {m.rank for _, m in present}
            if len(ranks) > 1:
                raise IncompatibleAdaptersError(
                    f"module {name}: the lorahub composition mixes A and B separately and needs equal ranks, got "
                    f"{sorted(ranks)}; use composition='delta'"
                )
            first = present[0][1]
            A = torch.zeros(len(adapters), first.rank, first.in_features)
            B = torch.zeros(len(adapters), first.out_features, first.rank)
            for i, m in present:
                root = math.sqrt(abs(m.scale))
                A[i] = root * m.A.float()
                B[i] = math.copysign(root, m.scale) * m.B.float()
            factors[name] = _Factors(A.to(device), B.to(device))
        else:
            A = torch.cat([m.A.float() for _, m in present])
            B = torch.cat([m.B.float() for _, m in present], dim=1)
            owner = torch.tensor([i for i, m in present for _ in range(m.rank)])
            scale = torch.tensor([m.scale for _, m in present for _ in range(m.rank)], dtype=torch.float32)
            factors[name] = _Factors(A.to(device), B.to(device), owner.to(device), scale.to(device))
    return factors


def _add_mixing(factors: dict[str, _Factors], forms: list[Schedule]) -> int:
    """Give each module its map from the forms' numbers θ to its n weights (see the module docstring), on the
    module's device; returns k, the length of θ. Nothing is added when every form holds one number (θ is then the
    weights themselves)."""
    starts = [sum(len(f.numbers) for f in forms[:i]) for i in range(len(forms))]
    k = sum(len(f.numbers) for f in forms)
    if k == len(forms):  # one number each: a form holding one number is that number in every module
        return k
    layers = count_layers(factors)
    for name, f in factors.items():
        L = torch.zeros(len(forms), k, dtype=torch.float64)
        offset = torch.zeros(len(forms), dtype=torch.float64)
        for i, (form, start) in enumerate(zip(forms, starts)):
            row, offset[i] = form.affine(name, layers)
            L[i, start : start + len(row)] = torch.tensor(row, dtype=torch.float64)
        f.mix, f.offset = L.to(f.A.device, torch.float32), offset.to(f.A.device, torch.float32)
    return k


class Evaluator:
    """Scores candidate weightings (P×k) on a frozen model through hooks: one forward pass per population chunk.

    ``batch`` is the examples' token batch (`build_batch`); ``max_candidates`` caps how many candidates share one
    forward pass (memory); ``None`` means the whole population; ``objective``: see `token_losses`. ``forms``: each
    adapter's weight form, a `loramix.schedule.Schedule` or a value it parses (default: a number each); a candidate
    holds their numbers (k = n when all are numbers, see the module docstring).
    """

    def __init__(
        self,
        model: nn.Module,
        adapters: list[LoraAdapter],
        batch: dict[str, torch.Tensor],
        *,
        composition: str = "lorahub",
        encoder_decoder: bool = False,
        max_candidates: int | None = None,
        forms: list | None = None,
        objective: str = "cross-entropy",
    ) -> None:
        self.model = model.eval().requires_grad_(False)
        self.device = model.get_input_embeddings().weight.device  # where the batch goes in (first of several)
        self.dtype = next(model.parameters()).dtype
        self.composition = composition
        self.factors = build_factors(model, adapters, composition)
        self.k = _add_mixing(self.factors, [parse(f, what="form") for f in forms or [0.0] * len(adapters)])
        self._devices = {f.A.device for f in self.factors.values()}
        self.batch = {k: v.to(self.device) for k, v in batch.items()}
        self.labels = self.batch.pop("labels")
        self.tokens = int((self.labels != -100).sum())
        self.shift = not encoder_decoder
        self.max_candidates = max_candidates
        self.objective = objective
        self._weights: dict[torch.device, torch.Tensor] | None = None  # the pass's candidates (P×k) per device
        named = dict(model.named_modules())
        self._handles = [named[name].register_forward_hook(self._hook(f)) for name, f in self.factors.items()]

    def close(self) -> None:
        """Remove the hooks (the model is then the plain base again)."""
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def __enter__(self) -> Evaluator:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _hook(self, f: _Factors):
        def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
            if self._weights is None:
                return output
            W = self._weights[f.A.device]
            P = W.shape[0]
            if f.mix is not None:
                W = W @ f.mix.T + f.offset  # P×k → this module's P×n weights
            x = args[0].reshape(P, -1, args[0].shape[-1])  # the batch is candidate-major: candidate p's rows
            if self.composition == "lorahub":
                A = torch.einsum("pn,nri->pri", W, f.A).to(x.dtype)
                B = torch.einsum("pn,nor->por", W, f.B).to(x.dtype)
                term = torch.bmm(torch.bmm(x, A.transpose(1, 2)), B.transpose(1, 2))
            else:
                coef = (W[:, f.owner] * f.scale).to(x.dtype)  # P×R: wᵢ·sᵢ on adapter i's columns
                term = torch.matmul((x @ f.A.to(x.dtype).T) * coef[:, None, :], f.B.to(x.dtype).T)
            return output + term.reshape(output.shape)

        return hook

    @contextlib.contextmanager
    def applied(self, weights) -> Iterator[None]:
        """Within the block, every forward pass of the model uses these candidates (P×k, or one k-vector)."""
        W = torch.as_tensor(weights, dtype=torch.float32, device=self.device)
        previous, self._weights = self._weights, self._placed(W.reshape(-1, self.k))
        try:
            yield
        finally:
            self._weights = previous

    def _placed(self, W: torch.Tensor) -> dict[torch.device, torch.Tensor]:
        """The candidates on every device that holds hooked layers (copied once per pass, not once per layer)."""
        return {device: W.to(device) for device in self._devices}

    def _forward(self, W: torch.Tensor) -> torch.Tensor:
        P = W.shape[0]
        inputs = {k: v.repeat(P, *([1] * (v.dim() - 1))) for k, v in self.batch.items()}
        previous, self._weights = self._weights, self._placed(W)
        try:
            logits = self.model(**inputs, use_cache=False).logits
        finally:
            self._weights = previous
        labels = self.labels.to(logits.device).repeat(P, 1)
        sums = token_losses(logits, labels, shift=self.shift, objective=self.objective)
        return sums.to(self.device).reshape(P, -1).sum(dim=1) / self.tokens

    def cross_entropy(self, weights) -> torch.Tensor:
        """Mean output-token cross-entropy of each candidate (P,), float32, or with ``objective="entropy"`` the mean
        entropy of the predictions at those positions (`token_losses`); differentiable when ``weights`` is."""
        W = weights if isinstance(weights, torch.Tensor) else torch.as_tensor(weights, dtype=torch.float32)
        W = W.to(device=self.device, dtype=torch.float32).reshape(-1, self.k)
        chunk = self.max_candidates or W.shape[0]
        grad = torch.enable_grad() if W.requires_grad else torch.no_grad()
        with grad:
            return torch.cat([self._forward(W[i : i + chunk]) for i in range(0, W.shape[0], chunk)])
