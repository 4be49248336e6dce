"""Analyse adapters before merging: per-module spectra and ranks, pairwise overlap, merge interference
(`analyze`), all in factor space (see `loramix.analysis.compute`); results are the dataclasses of
`loramix.analysis.results`, rendered by `loramix.render`."""

from __future__ import annotations

import logging
import math
from pathlib import Path

import torch

from loramix.adapter import LoraAdapter, LoraModule
from loramix.analysis.compute import factor_grams, merge_module, overlaps, pair, spectrum
from loramix.analysis.results import (
    DEFAULT_RULE,
    AdapterAnalysis,
    Analysis,
    MergeAnalysis,
    MergeModule,
    ModuleOverlap,
)
from loramix.errors import IncompatibleAdaptersError, counted
from loramix.formats import load_adapters
from loramix.io.base import BaseCheckpoint, open_base, resolve_base
from loramix.io.quantized import share_below
from loramix.linalg import RankRule, gram_svd
from loramix.quantize import (
    Quantization,
    below_step_share,
    is_quantized,
    mxfp4_experts,
    quantization_settings,
    quantization_step,
    require_dense_base,
)
from loramix.runtime import progress_bar
from loramix.schedule import Schedule, count_layers

log = logging.getLogger(__name__)

__all__ = ["Analysis", "analyze", "base_norms"]


def _unique_names(adapters: list[LoraAdapter]) -> list[str]:
    names, seen = [], {}
    for a in adapters:
        seen[a.name] = seen.get(a.name, 0) + 1
        names.append(a.name if seen[a.name] == 1 else f"{a.name}#{seen[a.name]}")
    return names


def base_norms(base: BaseCheckpoint, modules: dict[str, tuple[int, ...]]) -> dict[str, float]:
    """‖W‖_F (float64) of each module's base weight, read one tensor at a time; ``modules`` maps name → shape.

    The base tensor is the one `BaseCheckpoint.weight_key` names (the rule merging uses too). Modules whose weight
    is not in the checkpoint are left out (and logged); a weight of another shape is an error.
    """
    return {
        name: float(torch.linalg.vector_norm(tensor, dtype=torch.float64))
        for name, _, tensor in _base_weights(base, modules)
    }


def _base_weights(base: BaseCheckpoint, modules: dict[str, tuple[int, ...]]):
    """(module name, base key, base weight) of each module whose weight is in ``base``, one at a time."""
    missing = []
    for name, shape in modules.items():
        key, _ = base.weight_key(name)
        if key is None:
            missing.append(name)
            continue
        stored = base.dense(key)  # a quantized weight dequantized
        if tuple(stored.shape) != tuple(shape):
            raise IncompatibleAdaptersError(
                f"module {name}: base weight {key} in {stored.path or base.folder} has shape {tuple(stored.shape)}, "
                f"the adapter's ΔW has {tuple(shape)}"
            )
        yield name, key, stored.rows(0, stored.shape[0] if stored.shape else 0)
    if missing:
        log.warning("%s: no base weight for %d module(s), e.g. %s", base.folder, len(missing), ", ".join(missing[:3]))


def below_step_shares(base: BaseCheckpoint, modules: dict[str, LoraModule], settings: Quantization) -> dict:
    """Per module, the share of ‖ΔW‖² below half the 4-bit quantization step of its base weight (see
    `loramix.quantize.below_step_share`), for the weights a 4-bit model quantizes; ΔW and W taken in the
    orientation bitsandbytes quantizes (out×in; a Conv1D weight transposed). MXFP4: `_expert_shares`."""
    if settings.mxfp4:
        return _expert_shares(base, modules, settings)
    shares = {}
    shapes = {name: m.base_shape for name, m in modules.items()}
    for name, key, weight in _base_weights(base, shapes):
        module = modules[name]
        if module.layout not in ("out_in", "conv1d_fan_in_fan_out") or not is_quantized(key, weight.shape, settings):
            continue
        delta = module.delta(dtype=torch.float64)
        if module.layout == "conv1d_fan_in_fan_out":
            delta, weight = delta.T, weight.T
        shares[name] = below_step_share(delta, weight, settings)
    return shares


def _expert_shares(base: BaseCheckpoint, modules: dict[str, LoraModule], settings: Quantization) -> dict:
    """MXFP4 quantizes gpt-oss's expert parameters only (`loramix.quantize.mxfp4_experts`): per expert module, the
    share of its ΔW below half the MXFP4 step of that expert's weight, both in the stored orientation ([in, out])."""
    experts = set(mxfp4_experts({k: tuple(t.shape) for k, t in base.tensors.items()}, base.model_type))
    shares, steps = {}, {}
    for name, module in modules.items():
        key = None if module.expert is None else base.find(module.expert.param)
        if key not in experts:
            continue
        if key not in steps:
            stored = base.dense(key)
            steps = {key: quantization_step(stored.rows(0, stored.shape[0]), settings)}  # one parameter at a time
        step = steps[key][module.expert.index]
        delta = module.delta(dtype=torch.float64)
        shares[name] = share_below(delta if delta.shape == step.shape else delta.T, step)
    return shares


def _finite(module: LoraModule) -> bool:
    return bool(torch.isfinite(module.A).all() and torch.isfinite(module.B).all() and math.isfinite(module.scale))


def _rule(rank_rule: RankRule | None) -> RankRule:
    rule = RankRule.given(rank_rule, conv=False)
    return DEFAULT_RULE if rule == RankRule() else rule


def analyze(
    adapters: list,
    *,
    weights: list[float] | None = None,
    rank_rule: RankRule | None = None,
    base: str | Path | None = None,
    allow_different_bases: bool = False,
    allow_nonfinite: bool = False,
    progress: bool = False,
    load_options: dict | None = None,
    quantized_as: str | None = None,
    blocksize: int | None = None,
) -> Analysis:
    """Spectra, ranks and pairwise overlap of ``adapters`` (paths, Hub ids or `LoraAdapter`s), in factor space.

    ``rank_rule`` (a `RankRule`: ``RankRule(energy=0.9)``) is the rule behind the rank suggestions — the same rule
    `combine(method="svd")` takes; with none given, energy 0.99. ``weights`` (default 1/n each, as in `combine`;
    numbers or values that vary by layer or module) weight the merged sum in ``Analysis.merge``, whose modules show
    each adapter's effective weight. ``base`` is a base model folder or Hub id; with it each module also
    gets ‖W‖_F of the base weight it updates, read one tensor at a time. ``load_options`` go to `load_adapter` for
    every source, as in `combine`. With a base and ``quantized_as`` ("nf4"/"fp4", ``blocksize`` default 64; or a
    4-bit ``quantization_config`` in the base's config.json) each module also gets ``below_step``: the share of
    ‖ΔW‖² in entries smaller than half the base's local 4-bit quantization step (needs ``loramix[qlora]``; "fp8"
    and "mxfp4": the step of transformers' block FP8 or, for gpt-oss's experts only, MXFP4).
    With ``allow_nonfinite``, a module whose factors hold NaN/Inf has no spectrum: it is left out of its adapter's
    figures, the overlaps and the merged sum, and ``notes`` name it.
    """
    truncation = _rule(rank_rule)
    loaded, weights = load_adapters(
        adapters,
        weights=weights,
        allow_different_bases=allow_different_bases,
        allow_nonfinite=allow_nonfinite,
        load_options=load_options,
    )
    return analyze_loaded(
        loaded,
        weights,
        rule=truncation,
        base=base,
        allow_nonfinite=allow_nonfinite,
        progress=progress,
        quantized_as=quantized_as,
        blocksize=blocksize,
    )


def analyze_loaded(
    loaded: list[LoraAdapter],
    weights: list[Schedule],
    *,
    rule: RankRule = DEFAULT_RULE,
    base: str | Path | None = None,
    allow_nonfinite: bool = False,
    progress: bool = False,
    quantized_as: str | None = None,
    blocksize: int | None = None,
) -> Analysis:
    """The core of `analyze`: ``loaded`` adapters (checked together by `load_adapters`) with their parsed
    ``weights``, under ``rule``; nothing here loads or re-checks them."""
    truncation = rule
    checkpoint = None if base is None else open_base(resolve_base(base))  # fail before the long part
    settings = None
    if checkpoint is not None:
        configs = [(str(checkpoint.folder), checkpoint.config)]
        settings = quantization_settings(configs, quantized_as=quantized_as, blocksize=blocksize)
        require_dense_base(checkpoint, settings)
    elif quantized_as not in (None, "none"):
        raise IncompatibleAdaptersError("`quantized_as` measures ΔW against a base's 4-bit grid: give `base` too")
    labels = _unique_names(loaded)
    results = [AdapterAnalysis(label, a.source, a.base_model, {}) for label, a in zip(labels, loaded)]
    pairs = [(i, j) for i in range(len(loaded)) for j in range(i + 1, len(loaded))]
    found: dict[tuple[int, int], dict[str, ModuleOverlap]] = {p: {} for p in pairs}
    merged: dict[str, MergeModule] = {}
    names = list(dict.fromkeys(n for a in loaded for n in a.modules))
    layers = count_layers(names)
    buffers: dict = {}
    nonfinite: dict[int, list[str]] = {}
    for name in progress_bar(enabled=progress, iterable=names, desc="analyze", unit="module"):
        indices = [i for i, a in enumerate(loaded) if name in a.modules]
        if allow_nonfinite:  # NaN/Inf factors have no spectrum: such a module is left out, and said so
            for i in [i for i in indices if not _finite(loaded[i].modules[name])]:
                nonfinite.setdefault(i, []).append(name)
                indices.remove(i)
            if not indices:
                continue
        modules = [loaded[i].modules[name] for i in indices]
        gram_b, gram_a, slices = factor_grams(modules, buffers)
        svds = [
            gram_svd(gram_b[rows, rows], gram_a[rows, rows], (m.out_features, m.in_features), scale=m.scale)
            for m, rows in zip(modules, slices)
        ]
        for i, m, svd in zip(indices, modules, svds):
            results[i].modules[name] = spectrum(m, svd, truncation)
        if len(loaded) < 2:
            continue
        if len(indices) > 1:
            shape = (modules[0].out_features, modules[0].in_features)
            for (x, y), overlap in overlaps(svds, gram_b, gram_a, slices, shape).items():
                found[indices[x], indices[y]][name] = overlap
        effective = [w.at(name, layers) for w in weights]
        coefs = [effective[i] * m.scale for i, m in zip(indices, modules)]
        merged[name] = merge_module(modules, coefs, gram_b, gram_a, truncation)
        merged[name].weights = effective

    notes = [
        f"{labels[i]}: {counted(len(left), 'module')} with NaN/Inf factors, so their spectra, overlaps and merged sum "
        f"were not computed (e.g. {', '.join(left[:3])})"
        for i, left in sorted(nonfinite.items())
    ]
    if checkpoint is not None:
        shapes = {n: m.base_shape for a in loaded for n, m in a.modules.items()}
        norms = base_norms(checkpoint, shapes)
        for result, adapter in zip(results, loaded):
            shares = {} if settings is None else below_step_shares(checkpoint, adapter.modules, settings)
            for name, module in result.modules.items():
                module.base_norm = norms.get(name)
                module.below_step = shares.get(name)
        if len(norms) < len(shapes):
            notes.append(f"{len(shapes) - len(norms)} of {len(shapes)} modules have no base weight in {base}")
    return Analysis(
        adapters=results,
        pairs=[pair(results[i], results[j], found[i, j], names) for i, j in pairs],
        merge=MergeAnalysis(weights, merged) if len(loaded) > 1 else None,
        rule=truncation,
        base=None if base is None else str(base),
        notes=notes,
        quantization=None if settings is None else settings.describe(),
    )
