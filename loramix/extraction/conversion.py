"""Convert an adapter that is not a plain LoRA into the LoRA closest to what it does: `convert_lora`.

Every module's effective update ΔW — what the source adapter adds to the base weight — is re-factorised under a
`RankRule` (none: its full numerical rank, an exact conversion to float rounding), with each module's kept share of
‖ΔW‖² and relative error ‖ΔW − B·A‖/‖ΔW‖ measured with the stored factors:

- a module whose update depends on the base weight (DoRA's m·(W + ΔW)/‖W + ΔW‖ − W, from
  `loramix.merge.kernels.dora_delta`; a `WeightUpdate`: VeRA, whose input width only the base says, (IA)³, OFT and
  FourierFT) is formed in float64 from the base weight, read one tensor at a time in the base's storage order (one
  streaming pass), and decomposed by the extraction's machinery (`loramix.extraction.Extractor`: the top of its
  spectrum as far as the rule needs it);
- a module that already is a product of factors (a plain LoRA module, or one that a reader turned into its exact
  LoRA, as LoHa/LoKr) is re-factorised in factor space (`loramix.linalg.truncated_factors`), no base needed.

The converted modules have scale 1 and their own ranks; an (IA)³ change of a base bias becomes a lora_B bias.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, replace
from typing import Protocol

import torch

from loramix.adapter import LoraAdapter, LoraModule
from loramix.architecture import is_conv1d
from loramix.errors import CheckpointError, IncompatibleAdaptersError, SettingError
from loramix.extraction import GPU_BATCH, Extraction, Extractor, ModuleExtraction, Pending, math_view
from loramix.io.base import open_base, resolve_base
from loramix.linalg import RankRule, factor_inner, truncated_factors
from loramix.merge.kernels import Update, decide_layout, dora_delta
from loramix.runtime import parse_dtype, progress_bar, resolve_device


class WeightUpdate(Protocol):
    """A module whose effective ΔW is a function of the base weight (`loramix.formats.peft_other`: VeRA, (IA)³,
    OFT, FourierFT)."""

    kind: str

    def math_delta(self, W: torch.Tensor) -> torch.Tensor: ...

    def bias_delta(self, bias: torch.Tensor) -> torch.Tensor | None: ...


@dataclass(frozen=True)
class DoraUpdate:
    """A DoRA `LoraModule` (magnitude included): ΔW = m·(W + sBA)/‖W + sBA‖ − W (`loramix.merge.kernels.dora_delta`)."""

    module: LoraModule
    kind: str = "DoRA"


def base_updates(adapter: LoraAdapter) -> dict[str, DoraUpdate]:
    """The modules of ``adapter`` whose update depends on the base weight: DoRA's."""
    found = {}
    for name, module in adapter.modules.items():
        if module.magnitude is None:
            continue
        if module.bias is not None:
            raise IncompatibleAdaptersError(
                f"{adapter.source}: DoRA module {name} has a lora_B bias, which conversion does not take"
            )
        found[name] = DoraUpdate(module)
    return found


def _delta(update: DoraUpdate | WeightUpdate, W: torch.Tensor, name: str, key: str, model_type: str | None):
    """(ΔW in W's stored layout and dtype, that layout) of ``update`` on the base weight ``W`` stored under ``key``."""
    if isinstance(update, DoraUpdate):
        module = update.module.on_weight(tuple(W.shape))
        layout = decide_layout(module, name, key, tuple(W.shape), model_type)
        return dora_delta(W, Update(name, module, layout)), layout
    if W.dim() != 2:
        raise CheckpointError(
            f"{update.kind} module {name}: base tensor {key} is {W.dim()}-D; converted are 2-D weights"
        )
    conv1d = is_conv1d(model_type, name)
    delta = update.math_delta(W.T if conv1d else W)
    return (delta.T, "conv1d_fan_in_fan_out") if conv1d else (delta, "out_in")


def convert_lora(
    adapter: LoraAdapter,
    base: str | None = None,
    *,
    updates: dict[str, WeightUpdate] | None = None,
    rank_rule: RankRule | None = None,
    device: str | torch.device = "auto",
    dtype: torch.dtype | str | None = None,
    progress: bool = False,
) -> Extraction:
    """The plain LoRA closest to ``adapter`` on ``base`` (a model folder or Hub id; needed only when a module's update
    depends on the base weight, as DoRA's does) under ``rank_rule`` (a `RankRule`; none: the full numerical rank, exact
    to float rounding), stored in ``dtype`` (default: the adapter's). Returns the adapter (scale 1 per module, each at
    its own rank; heads carried as they are) with each module's account, as `loramix.extraction.extract_lora` does
    (``finetuned`` is the source adapter; ``solver`` says how the module was converted). ``updates`` are modules of
    another kind (VeRA, (IA)³, OFT, FourierFT) whose ΔW is a function of the base weight."""
    started = time.perf_counter()
    truncation = RankRule.given(rank_rule)
    target = resolve_device(device)
    dependent = {**base_updates(adapter), **(updates or {})}
    if dependent and base is None:
        kinds = sorted({u.kind for u in dependent.values()})
        raise SettingError(
            f"{adapter.source}: {len(dependent)} {'/'.join(kinds)} module(s) ({next(iter(dependent))}, ...) change "
            "with the base weight, so converting them needs the base model",
            option="base",
            value="BASE",
        )
    out_dtype = parse_dtype(dtype) or adapter.dtype
    converted = LoraAdapter(
        modules={},
        base_model=adapter.base_model or (str(base) if base else None),
        extra=dict(adapter.extra),
        task_type=adapter.task_type,
        source="<converted>",
        name=f"LoRA converted from {adapter.name}",
    )
    result = Extraction(converted, str(base or ""), adapter.source, truncation, str(target))
    with progress_bar(enabled=progress, total=len(adapter.modules), desc="convert", unit="module") as bar:
        if dependent:
            extractor = Extractor(result, target, out_dtype, GPU_BATCH if target.type == "cuda" else 1)
            _stream_base(extractor, dependent, str(base), bar)
        for name, module in adapter.modules.items():
            if name not in dependent:
                _refactor(result, name, module, truncation, out_dtype)
                bar.update()
    converted.modules = {name: converted.modules[name] for name in sorted(converted.modules)}
    result.modules = {name: result.modules[name] for name in sorted(result.modules)}
    result.seconds = time.perf_counter() - started
    return result


def _stream_base(extractor: Extractor, dependent: dict, base: str, bar) -> None:
    """Each base weight an update applies to, read once in the base's storage order; its ΔW (float64) queued; the
    base bias changes of (IA)³ become the converted modules' lora_B biases."""
    checkpoint = open_base(resolve_base(base))
    keys: dict[str, str] = {}
    for name in dependent:
        key, _ = checkpoint.weight_key(name)
        if key is None:
            raise CheckpointError(f"adapter module {name} has no matching tensor {name}.weight in base {base}")
        if key in keys:
            raise CheckpointError(f"adapter modules {keys[key]} and {name} both apply to base tensor {key}")
        keys[key] = name
    device = extractor.device
    biases = {}
    for key, entry in checkpoint.tensors.items():
        if key not in keys:
            continue
        name = keys[key]
        W = entry.rows(0, entry.shape[0]).to(device=device, dtype=torch.float64)
        delta, layout = _delta(dependent[name], W, name, key, checkpoint.model_type)
        total = float(torch.linalg.vector_norm(delta)) ** 2
        weight = float(torch.linalg.vector_norm(W))
        change = math.sqrt(total) / weight if weight > 0 else math.inf
        kernel = tuple(W.shape[2:]) if layout == "conv2d" else ()
        extractor.add(Pending(name, layout, kernel, math_view(delta, layout).float(), total, change))
        bias = checkpoint.tensors.get(key.removesuffix("weight") + "bias")
        if bias is not None and not isinstance(dependent[name], DoraUpdate):
            biases[name] = dependent[name].bias_delta(bias.rows(0, bias.shape[0]).to(torch.float64))
        bar.update()
    extractor.finish()
    for name, bias in biases.items():  # the converted module's scale is 1
        if bias is not None:
            extractor.result.adapter.modules[name].bias = bias.to(extractor.dtype).cpu()


def _refactor(result: Extraction, name: str, module: LoraModule, rule: RankRule, dtype: torch.dtype) -> None:
    """A module that is a product of factors, re-factorised in factor space under ``rule`` (float64)."""
    B = module.B.to(torch.float64) * module.scale
    A = module.A.to(torch.float64)
    factors = truncated_factors(B, A, rule.for_kernel(module.kernel_size))
    new_B, new_A = factors.B.to(dtype), factors.A.to(dtype)
    total = factor_inner(B, A, B, A)
    both_B = torch.cat([B, -new_B.to(torch.float64)], dim=1)
    both_A = torch.cat([A, new_A.to(torch.float64)])
    error = math.sqrt(max(factor_inner(both_B, both_A, both_B, both_A), 0.0) / total) if total > 0 else 0.0
    result.adapter.modules[name] = LoraModule(
        A=new_A, B=new_B, scale=1.0, layout=module.layout, kernel_size=module.kernel_size, bias=_bias(module, dtype)
    )
    result.modules[name] = ModuleExtraction(
        rank=new_A.shape[0],
        kept=factors.kept if factors.kept is not None else 1.0,
        error=error,
        change=None,
        shape=module.base_shape,
        solver="factor space",
    )


def _bias(module: LoraModule, dtype: torch.dtype) -> torch.Tensor | None:
    """The lora_B bias at scale 1 (the converted module's scale)."""
    delta = module.bias_delta()
    return None if delta is None else delta.to(dtype)


def effective_adapters(
    adapters: list[LoraAdapter], base: str | None, *, device: str | torch.device = "auto", progress: bool = False
) -> list[LoraAdapter]:
    """``adapters`` with each one that holds DoRA modules replaced by its effective update on ``base`` as a plain
    LoRA at full numerical rank (exact to float rounding; `convert_lora`), in float32, so that methods combine
    those; the others as they are. `IncompatibleAdaptersError` when a DoRA adapter comes without a base."""
    converted = []
    for adapter in adapters:
        if not adapter.has_dora:
            converted.append(adapter)
            continue
        if base is None:
            raise IncompatibleAdaptersError(
                f"{adapter.source}: a DoRA adapter's update depends on the base weight (its magnitude rescales W+ΔW), "
                "so it combines only as its effective update on a base: give base, or merge_into",
                option="base",
                value="BASE",
            )
        lora = convert_lora(adapter, str(base), device=device, dtype=torch.float32, progress=progress).adapter
        converted.append(replace(adapter, modules=lora.modules, warnings=[]))
    return converted
