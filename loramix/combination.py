"""Combine adapters: walk the union of module names, apply a merge method per module on a device.

A module missing from an adapter contributes zero. lora_B biases are summed exactly (they are linear);
full extra tensors (heads) are carried when one adapter has them; several adapters' are refused, averaged or left
out, as asked (``heads``).
"""

from __future__ import annotations

import contextlib
import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, fields, replace

import torch

from loramix.adapter import ExtraTensor, LoraAdapter, LoraModule, check_rank_layout, portable_rank
from loramix.errors import ArgumentError, IncompatibleAdaptersError, MethodError, SettingError
from loramix.formats import load_adapters
from loramix.formats._keys import sample
from loramix.linalg import FactorSVD, RankRule, factor_svd, numerical_rank
from loramix.methods import Method, Term, absent_as_zero, get_method
from loramix.runtime import parse_dtype, progress_bar, resolve_device
from loramix.schedule import Schedule, count_layers, parse_options, plain, resolve_options
from loramix.settings import HEADS, Heads, RankLayout

log = logging.getLogger(__name__)

LONG_DENSE_SECONDS = 60  # warn before a dense merge estimated to take longer
LARGE_RANK_FACTOR = 4  # warn when a chosen rank exceeds this many times the sum of the sources' ranks
_GPU_WORKERS = 4  # measured on an H100 host: 1 → 37.5, 2 → 22.7, 4 → 17.2, 6 → 21.6, 8 → 25.0 ms per 7B layer


def _worker_stream(device: torch.device):
    """Each worker's GPU work on its own stream, so that workers overlap; nothing on the CPU."""
    if device.type != "cuda":
        return contextlib.nullcontext()
    return torch.cuda.stream(torch.cuda.Stream(device=device))


def _combine_extras(
    adapters: list[LoraAdapter], weights: list[Schedule], heads: str, layers: int
) -> dict[str, ExtraTensor]:
    owners: dict[str, list[tuple[float, ExtraTensor, LoraAdapter]]] = {}
    for a, w in zip(adapters, weights):
        for name, item in a.extra.items():
            owners.setdefault(name, []).append((w.at(name, layers), item, a))
    out, dropped = {}, []
    for name, found in owners.items():
        if len(found) == 1:
            out[name] = found[0][1]
            continue
        names = ", ".join(a.name for _, _, a in found)
        if heads == "drop":
            dropped.append(name)
            continue
        if heads != "average":
            raise IncompatibleAdaptersError(
                f"extra tensor {name} (a head or saved layer) is in several adapters ({names}); leave them out (the "
                "base's own is kept) or average them (`heads='average'`)",
                option="heads",
                value="drop",
            )
        shapes = {tuple(item.tensor.shape) for _, item, _ in found}
        if len(shapes) > 1:
            raise IncompatibleAdaptersError(f"extra tensor {name} has different shapes in {names}: {sorted(shapes)}")
        total = sum(w for w, _, _ in found)
        if total == 0:
            raise IncompatibleAdaptersError(f"extra tensor {name}: the weights of {names} sum to 0, no average exists")
        mean = sum(w * item.tensor.float() for w, item, _ in found) / total
        out[name] = ExtraTensor(mean.to(found[0][1].tensor.dtype), found[0][1].kind)
    if dropped:
        log.warning(
            "%d extra tensor(s) in several adapters left out (`heads='drop'`): %s", len(dropped), sample(dropped)
        )
    return out


def _combined_bias(present: list[tuple[float, LoraModule]]) -> torch.Tensor | None:
    biases = [(w, m.bias_delta()) for w, m in present if m.bias is not None]
    return sum(w * b for w, b in biases) if biases else None


def _widen(modules: dict[str, LoraModule], spectra: dict, rule: RankRule, dtype: torch.dtype) -> dict[str, float]:
    """Each module's best rank-R approximation (R = `portable_rank` of the rule's ranks), within its numerical rank
    and the rank its rule caps it at (``rule.rank``, or ``rule.conv_rank`` for a k×k conv): at the layout's size
    anyway, the extra directions make each module closer to the exact sum.
    Returns the share of each module's energy (Σσ²) the written rank keeps."""
    rank = portable_rank(m.rank for m in modules.values())
    kept = {}
    for name, spectrum in spectra.items():
        shape = (spectrum.U.shape[0], spectrum.Vh.shape[1])
        cap = rule.for_kernel(modules[name].kernel_size).rank or rank
        keep = min(rank, max(numerical_rank(spectrum.S, shape), modules[name].rank), cap)
        B, A = spectrum.factors(keep)
        modules[name].B, modules[name].A = B.to(device="cpu", dtype=dtype), A.to(device="cpu", dtype=dtype)
        energy = spectrum.S.double().square()
        kept[name] = float(energy[:keep].sum() / energy.sum()) if energy.sum() > 0 else 1.0
    return kept


@dataclass(frozen=True)
class CombineSettings:
    """A combine's settings, checked: the method, the rank rule as the method applies it, its options (parsed), what
    to do with heads several adapters carry, the rank layout prepared, the device, the output dtype (None: the first
    input's)."""

    method: Method
    rule: RankRule
    options: dict
    heads: Heads = "refuse"
    rank_layout: RankLayout = "portable"
    device: str = "auto"
    dtype: torch.dtype | None = None


def check_settings(
    *,
    method: str,
    options: dict,
    heads: str = "refuse",
    rule: RankRule | None = None,
    rank_layout: str = "portable",
    device: str = "auto",
    dtype: torch.dtype | str | None = None,
) -> CombineSettings:
    """The settings of a combine, checked before anything is loaded (unknown method or option, a malformed varying
    option, a rank rule for a method that does not truncate, an unknown heads policy or rank layout, a bad dtype)."""
    chosen = get_method(method)
    rule = rule or RankRule()
    if rule != RankRule() and not chosen.truncates:
        raise MethodError(
            f"method {method} does not truncate; `rank`/`energy`/`rule`/`conv_rank` apply to re-factorising methods"
        )
    chosen.check_options(options)
    parsed = parse_options(options)
    if heads not in HEADS:
        raise SettingError(f"heads must be {', '.join(map(repr, HEADS))}, got {heads!r}")
    check_rank_layout(rank_layout)
    truncation = chosen.rule_for(rule, options)
    return CombineSettings(chosen, truncation, parsed, heads, rank_layout, device, parse_dtype(dtype))


def _dense_seconds(shapes: list[tuple[int, int]], device: torch.device) -> float:
    """A rough time for the full SVDs of a dense merge: out·in·min(out, in) at the rate measured on one CPU core
    (1.5e9/s: benchmarks/RESULTS.md measured 47 s for a 4096×4096 SVD and 89 s for 11008×4096 on 2 shared cores)
    or a GPU (about 2e10/s)."""
    rate = 2e10 if device.type == "cuda" else 1.5e9
    return sum(o * i * min(o, i) for o, i in shapes) / rate


def _warn_dense(method: str, loaded: list[LoraAdapter], names: list[str], device: torch.device) -> None:
    shapes = [next((m.out_features, m.in_features) for a in loaded if (m := a.modules.get(n))) for n in names]
    seconds = _dense_seconds(shapes, device)
    if seconds > LONG_DENSE_SECONDS:
        log.warning(
            "%s in dense space forms and decomposes %d full out×in matrices: about %.0f min on %s; space='core' "
            "works on the small cores instead (CLI: --space core), in seconds",
            method,
            len(shapes),
            seconds / 60,
            device.type,
        )


def _warn_large_ranks(method: str, modules: dict[str, LoraModule], loaded: list[LoraAdapter], rule: RankRule) -> None:
    """One line when the rule chose ranks above 4·Σrᵢ (the rank an exact sum would have)."""
    large = []
    for name, module in modules.items():
        total = sum(a.modules[name].rank for a in loaded if name in a.modules)
        if module.rank > LARGE_RANK_FACTOR * total:
            large.append((module.rank, total, name))
    if large:
        rank, total, name = max(large)
        params = sum(m.num_params() for m in modules.values())
        log.warning(
            "%s with %s chose ranks above %d·Σrᵢ in %d of %d modules (up to rank %d where Σrᵢ = %d, %s): the adapter "
            "has %s parameters; give `rank` or `energy` to make it smaller",
            method,
            rule.describe(),
            LARGE_RANK_FACTOR,
            len(large),
            len(modules),
            rank,
            total,
            name,
            f"{params:,}",
        )


def accept(
    adapters: list,
    *,
    weights: list | None = None,
    method: str = "svd",
    rank_rule: RankRule | None = None,
    device: str = "auto",
    dtype: torch.dtype | str | None = None,
    heads: str = "refuse",
    rank_layout: str = "portable",
    allow_different_bases: bool = False,
    allow_nonfinite: bool = False,
    load_options: dict | None = None,
    **options,
) -> tuple[list[LoraAdapter], list, CombineSettings]:
    """What `loramix.combine` takes, accepted once: the settings checked (`check_settings`), then the sources loaded
    and checked together (`load_adapters`). Returns the adapters, their parsed weights and the settings, which
    `combine_loaded` takes as they are. A rank setting passed loose (``rank=16``) is refused in one line naming
    ``rank_rule=RankRule(rank=16)``."""
    loose = [key for key in options if key in {field.name for field in fields(RankRule)}]
    if loose:
        given = ", ".join(f"{key}={options[key]!r}" for key in loose)
        raise ArgumentError(f"combine takes its rank rule whole: rank_rule=loramix.RankRule({given}), not {given}")
    settings = check_settings(
        method=method,
        options=options,
        heads=heads,
        rule=RankRule.given(rank_rule),
        rank_layout=rank_layout,
        device=device,
        dtype=dtype,
    )
    loaded, weights = load_adapters(
        adapters,
        weights=weights,
        allow_different_bases=allow_different_bases,
        allow_nonfinite=allow_nonfinite,
        load_options=load_options,
    )
    return loaded, weights, settings


def combine_loaded(
    loaded: list[LoraAdapter],
    weights: list[Schedule],
    settings: CombineSettings,
    *,
    grams: list[dict] | None = None,
    progress: bool = False,
) -> LoraAdapter:
    """The core of `combine`: ``loaded`` adapters (checked together by `load_adapters`) with their parsed
    ``weights``, by checked ``settings``; nothing here loads or re-checks them."""
    chosen, truncation, options, method = settings.method, settings.rule, settings.options, settings.method.name
    heads, rank_layout = settings.heads, settings.rank_layout
    for a in loaded:
        if a.has_dora:
            raise IncompatibleAdaptersError(
                f"{a.source}: DoRA adapters combine only as their effective updates on a base (the magnitude "
                "rescales W+ΔW, which is not linear): give the base (loramix.run with Plan.base / --base BASE, or "
                "merge_into), or convert each first (loramix convert)"
            )
    if chosen.data and (grams is None or len(grams) != len(loaded)):
        raise MethodError(
            f"method {method} needs each adapter's input Gram matrices (grams); loramix.combine with "
            "the options base and examples collects them"
        )
    target = resolve_device(settings.device)
    out_dtype = settings.dtype or loaded[0].dtype
    names = list(dict.fromkeys(n for a in loaded for n in a.modules))
    layers = count_layers(names)
    # a rule-chosen rank below the layout's R: keep the untruncated spectrum, truncate once R is known
    spectral = truncation.energy is not None or truncation.rule is not None
    widen = rank_layout == "portable" and chosen.exact and chosen.truncates and spectral
    spectra: dict[str, FactorSVD] = {}
    if chosen.dense and chosen.settings(options).get("space") == "dense":
        _warn_dense(method, loaded, names, target)
    kept: dict[str, float] = {}

    def merge_module(name: str) -> LoraModule:
        resolved = [w.at(name, layers) for w in weights]  # each adapter's weight for this module
        present = [(w, a.modules[name]) for a, w in zip(loaded, resolved) if name in a.modules]
        rule = truncation.for_kernel(present[0][1].kernel_size)
        with _worker_stream(target):
            terms = [Term(w * m.scale, m.B.to(target), m.A.to(target), weight=w) for w, m in present]
            if chosen.every_adapter:
                terms = absent_as_zero(terms, resolved, [name in a.modules for a in loaded])
            if chosen.data:  # every adapter's term, and its model's Gram (a data method takes every adapter)
                terms = [replace(t, gram=g[name]) for t, g in zip(terms, grams)]
            try:
                factors = chosen.apply(
                    terms, rule=RankRule(rank=rule.rank) if widen else rule, **resolve_options(options, name, layers)
                )
            except torch.linalg.LinAlgError as exc:  # NaN/Inf (allowed inputs, or an overflowing scale or weight)
                raise MethodError(
                    f"module {name}: method {method} cannot factorise it ({str(exc).splitlines()[0]}); "
                    "its inputs, scales or weights hold or overflow to NaN/Inf"
                ) from None
            if factors.kept is not None:
                kept[name] = factors.kept
            B, A = factors.B, factors.A
            if widen:
                full = factor_svd(B, A)
                B, A = full.factors(rule.choose(full.S, (B.shape[0], A.shape[1])))
                spectra[name] = FactorSVD(full.U.cpu(), full.S.cpu(), full.Vh.cpu())
            B, A = B.to(device="cpu", dtype=out_dtype), A.to(device="cpu", dtype=out_dtype)
        first = present[0][1]
        bias = _combined_bias(present)
        return LoraModule(
            A=A,
            B=B,
            scale=1.0,
            layout=first.layout,
            kernel_size=first.kernel_size,
            bias=None if bias is None else bias.to(out_dtype),
            expert=first.expert,
        )

    # On a GPU a module's merge is mostly launch and small-solver latency: overlap a few modules at a time.
    workers = _GPU_WORKERS if target.type == "cuda" else 1
    with (
        ThreadPoolExecutor(workers) as pool,
        progress_bar(enabled=progress, total=len(names), desc=f"combine ({method})", unit="module") as bar,
    ):
        modules = {}
        for name, module in zip(names, pool.map(merge_module, names)):
            modules[name] = module
            bar.update()
    if widen:  # the exact method kept everything the rank allows; what the written rank keeps is measured here
        kept.update(_widen(modules, spectra, truncation, out_dtype))
    if chosen.truncates:
        _warn_large_ranks(method, modules, loaded, truncation)
    base = next((a.base_model for a in loaded if a.base_model), None)
    renamed = next((a.provenance["renamed"] for a in loaded if a.provenance.get("renamed")), None)
    families = {a.provenance["family"] for a in loaded if a.provenance.get("family")}  # loramix.formats.diffusion
    return LoraAdapter(
        modules=modules,
        base_model=base,
        extra=_combine_extras(loaded, weights, heads, layers),
        task_type=next((a.task_type for a in loaded if a.task_type), None),
        source="<combined>",
        name="combined",
        provenance={
            "method": method,
            "weights": [w.data() for w in weights],
            "num_layers": layers,
            "sources": [a.source for a in loaded],
            "names": [a.name for a in loaded],
            "formats": [a.provenance.get("format") for a in loaded],
            "truncation": truncation.describe() if chosen.truncates else None,
            "options": {k: plain(v) for k, v in chosen.settings(options).items()},
            "kept_energy": {name: kept[name] for name in names if name in kept},
            **({"renamed": renamed} if renamed else {}),
            **({"family": next(iter(families))} if len(families) == 1 else {}),
        },
    )
