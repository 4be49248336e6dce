"""Analyse adapters before merging: per-module spectra and ranks, pairwise overlap, merge interference.

Everything is computed in factor space (DESIGN.md); no out×in matrix is ever formed. The work runs module by
module over all adapters: each (adapter, module) ΔW = s·B·A is factorised once (`factor_svd`, float64 core) and
only its numerically non-zero directions are kept (U out×k, S, V in×k). Stacking every adapter's U (and V) for
the module gives all pairs' cross-Gram blocks U₁ᵀU₂, V₁ᵀV₂ in one product; cosines, φ, principal angles, shares
and the merged sum's spectrum all come from those small blocks. Cost per module O((out+in)·(Σk)²), memory one
module's bases at a time. Results are plain dataclasses; `loramix.report` renders them.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from loramix.adapter import LoraAdapter, LoraModule
from loramix.combine import check_compatible
from loramix.errors import AdapterFormatError, IncompatibleAdaptersError, MethodError, SourceError
from loramix.formats import load_adapter
from loramix.linalg import (
    GramSVD,
    RankRule,
    effective_rank,
    gram_svd,
    principal_angles,
    projected_share,
    stable_rank,
    stacked_singular_values,
    subspace_similarity,
    svd_inner,
)

log = logging.getLogger(__name__)

ENERGIES = (0.9, 0.99)
DEFAULT_RULE = RankRule(energy=0.99)
NO_LAYER = "(no layer)"


# ----------------------------------------------------------------------------------------------- results


def _energy_key(share: float) -> str:
    return f"{share:g}"


def _joint_norm(items) -> float:
    """‖·‖_F of several modules' ΔW taken together."""
    return math.sqrt(sum(m.norm**2 for m in items))


def _largest(items, attribute: str) -> int:
    return max((getattr(m, attribute) for m in items), default=0)


@dataclass
class ModuleSpectrum:
    """One adapter's ΔW on one module: its spectrum and the ranks read from it.

    ``singular_values`` are all min(r, out, in) of them, descending; ``numerical_rank`` counts those with
    σᵢ² > max(out, in)·eps·σ₁² (numpy's rule on ΔWᵀΔW: the resolution of the Gram route, see `gram_svd`);
    ``energy_rank["0.9"]`` is the smallest k keeping 90% of Σσ²; ``suggested_rank`` is what the analysis'
    `RankRule` keeps (0 for an all-zero module). ``base_norm`` is ‖W‖_F of the base weight when a base was given.
    """

    shape: tuple[int, int]
    rank: int
    singular_values: list[float]
    numerical_rank: int
    effective_rank: float
    stable_rank: float
    energy_rank: dict[str, int]
    norm: float
    suggested_rank: int
    base_norm: float | None = None

    @property
    def relative_norm(self) -> float | None:
        """‖ΔW‖_F / ‖W‖_F, or None without a base (or for an all-zero base weight)."""
        return self.norm / self.base_norm if self.base_norm else None

    def energy_kept(self, k: int) -> float:
        """Σσ² of the top ``k`` directions (absolute, not a share)."""
        return sum(s * s for s in self.singular_values[:k])


@dataclass
class AdapterAnalysis:
    """One adapter: its modules' spectra by normalised module name, plus whole-adapter summaries."""

    name: str
    source: str
    base_model: str | None
    modules: dict[str, ModuleSpectrum]

    @property
    def norm(self) -> float:
        """‖ΔW‖_F of all modules taken together."""
        return _joint_norm(self.modules.values())

    @property
    def suggested_rank(self) -> int:
        """One rank for every module that satisfies the rule everywhere: the largest per-module suggestion."""
        return _largest(self.modules.values(), "suggested_rank")

    @property
    def kept_energy(self) -> float:
        """Share of the whole adapter's Σσ² that truncating each module to its suggested rank keeps."""
        total = sum(m.norm**2 for m in self.modules.values())
        kept = sum(m.energy_kept(m.suggested_rank) for m in self.modules.values())
        return kept / total if total > 0 else float("nan")

    @property
    def relative_norm(self) -> float | None:
        """‖ΔW‖_F / ‖W‖_F over the modules whose base weight was found, taken together."""
        found = [m for m in self.modules.values() if m.base_norm is not None]
        base = math.sqrt(sum(m.base_norm**2 for m in found))
        return math.sqrt(sum(m.norm**2 for m in found)) / base if base > 0 else None


@dataclass
class ModuleOverlap:
    """Two adapters on one module.

    ``phi_a`` is φ of the input side (right singular vectors: the row space, what the A factors read) and
    ``phi_b`` of the output side (left singular vectors: the column space, what the B factors write); both over
    each ΔW's numerical rank, with their principal angles in degrees (ascending); ``phi_*_chance`` is φ's expected
    value for random subspaces of those ranks (max(k₁, k₂)/n). ``share_a_in_b`` is the share of ‖ΔW_a‖² lying inside
    ΔW_b's output and input subspaces (‖P_out ΔW_a P_in‖² / ‖ΔW_a‖²).
    """

    cosine: float | None
    phi_a: float | None
    phi_b: float | None
    angles_a: list[float]
    angles_b: list[float]
    share_a_in_b: float | None
    share_b_in_a: float | None
    inner: float
    min_rank: int
    phi_a_chance: float | None = None
    phi_b_chance: float | None = None


@dataclass
class GroupOverlap:
    """Two adapters over a group of modules (a layer, a module type or the whole adapter).

    ``cosine`` is the cosine of all the group's ΔW taken together (a module only one adapter has counts in its
    norm); ``phi_a``/``phi_b`` are the rank-weighted means of the modules' φ (φ of the block-diagonal subspaces);
    shares are energy-weighted (a module the other adapter lacks contributes 0).
    """

    cosine: float | None
    phi_a: float | None
    phi_b: float | None
    share_a_in_b: float | None
    share_b_in_a: float | None
    modules: int
    phi_a_chance: float | None = None
    phi_b_chance: float | None = None


@dataclass
class PairAnalysis:
    """Two adapters: per shared module, per layer, per module type and overall."""

    a: str
    b: str
    overall: GroupOverlap
    modules: dict[str, ModuleOverlap]
    by_layer: dict[str, GroupOverlap]
    by_type: dict[str, GroupOverlap]

    @property
    def cosine(self) -> float | None:
        return self.overall.cosine


@dataclass
class MergeModule:
    """The weighted sum Σ wᵢ·ΔWᵢ on one module, as `combine --method svd` sees it before truncating.

    ``reference_rank`` is the largest input rank; ``truncation_loss`` the share of the sum's Σσ² lost when cut to
    it (what `--rank reference_rank` throws away); ``suggested_rank`` what the analysis' rule keeps.
    """

    singular_values: list[float]
    energy_rank: dict[str, int]
    suggested_rank: int
    reference_rank: int
    truncation_loss: float | None
    norm: float


@dataclass
class MergeAnalysis:
    """The weighted sum of all adapters, module by module (only with two or more adapters)."""

    weights: list[float]
    modules: dict[str, MergeModule]

    @property
    def norm(self) -> float:
        return _joint_norm(self.modules.values())

    @property
    def suggested_rank(self) -> int:
        """The rank `combine --method svd` with the same rule gives (its largest module)."""
        return _largest(self.modules.values(), "suggested_rank")

    @property
    def reference_rank(self) -> int:
        return _largest(self.modules.values(), "reference_rank")

    @property
    def truncation_loss(self) -> float | None:
        """Share of the whole sum's Σσ² lost when every module is cut to its reference rank."""
        total = sum(m.norm**2 for m in self.modules.values())
        lost = sum(m.norm**2 * m.truncation_loss for m in self.modules.values() if m.truncation_loss is not None)
        return lost / total if total > 0 else None


@dataclass
class Analysis:
    """What `analyze` returns: adapters, every pair (in input order), and the weighted merge."""

    adapters: list[AdapterAnalysis]
    pairs: list[PairAnalysis]
    merge: MergeAnalysis | None
    rule: RankRule
    base: str | None = None
    notes: list[str] = field(default_factory=list)


# ----------------------------------------------------------------------------------------------- naming


_LAYER = re.compile(r"^(.*?\.\d+)(?:\.|$)")


def layer_of(name: str) -> str:
    """The module path up to its first numeric component (``model.layers.3``), or ``(no layer)``."""
    match = _LAYER.match(name)
    return match.group(1) if match else NO_LAYER


def type_of(name: str) -> str:
    """The module's last path component (``q_proj``)."""
    return name.rsplit(".", 1)[-1]


def natural_key(text: str) -> list:
    """Sort key that orders embedded numbers numerically (layer 2 before layer 10)."""
    return [(0, int(part), "") if part.isdigit() else (1, 0, part) for part in re.split(r"(\d+)", text) if part]


def _unique_names(adapters: list[LoraAdapter]) -> list[str]:
    names, seen = [], {}
    for a in adapters:
        seen[a.name] = seen.get(a.name, 0) + 1
        names.append(a.name if seen[a.name] == 1 else f"{a.name}#{seen[a.name]}")
    return names


# ----------------------------------------------------------------------------------------------- per module


@contextlib.contextmanager
def _intra_op_threads(count: int | None):
    """Run the block on ``count`` intra-op threads (None: leave torch's setting), restoring the caller's after."""
    previous = torch.get_num_threads()
    if count is not None:
        torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _stacked(parts: list[torch.Tensor], dim: int, buffers: dict) -> torch.Tensor:
    """``torch.cat(parts, dim)`` in float64, written into a buffer reused across modules of the same shape (fresh
    multi-megabyte tensors per module cost more in page faults than the copy itself)."""
    shape = list(parts[0].shape)
    shape[dim] = sum(p.shape[dim] for p in parts)
    out = buffers.get(tuple(shape))
    if out is None:
        out = buffers[tuple(shape)] = torch.empty(shape, dtype=torch.float64)
    start = 0
    for p in parts:
        out.narrow(dim, start, p.shape[dim]).copy_(p)
        start += p.shape[dim]
    return out


def _factor_grams(modules: list[LoraModule], buffers: dict) -> tuple[torch.Tensor, torch.Tensor, list[slice]]:
    """BᵀB and A·Aᵀ of all adapters' stacked factors for one module (float64), and each adapter's slice."""
    B = _stacked([m.B for m in modules], 1, buffers)
    gram_b = B.T @ B
    A = _stacked([m.A for m in modules], 0, buffers)
    gram_a = A @ A.T
    slices, start = [], 0
    for m in modules:
        slices.append(slice(start, start + m.rank))
        start += m.rank
    return gram_b, gram_a, slices


def _spectrum(module: LoraModule, svd: GramSVD, rule: RankRule) -> ModuleSpectrum:
    shape = (module.out_features, module.in_features)
    count = min(module.rank, *shape)
    S = torch.cat([svd.S, svd.S.new_zeros(max(count - svd.S.numel(), 0))])
    nonzero = svd.rank > 0
    return ModuleSpectrum(
        shape=shape,
        rank=module.rank,
        singular_values=S.tolist(),
        numerical_rank=svd.rank,
        effective_rank=effective_rank(S),
        stable_rank=stable_rank(S),
        energy_rank={_energy_key(e): RankRule(energy=e).choose(S, shape) if nonzero else 0 for e in ENERGIES},
        norm=float(S.square().sum().sqrt()),
        suggested_rank=rule.choose(S, shape) if nonzero else 0,
    )


def _padded_cross(gram: torch.Tensor, bases: list[torch.Tensor], slices: list[slice], width: int) -> torch.Tensor:
    """All cross-Grams Q_iᵀQ_j of the orthonormal bases Q_i = F_i·bases[i] (F the stacked factor, ``gram = FᵀF``),
    zero-padded to width×width: shape (n, n, width, width). One product over the stacked factors' Gram."""
    n = len(bases)
    lift = gram.new_zeros(gram.shape[0], n * width)
    for i, (basis, rows) in enumerate(zip(bases, slices)):
        lift[rows, i * width : i * width + basis.shape[1]] = basis
    return (lift.T @ gram @ lift).reshape(n, width, n, width).permute(0, 2, 1, 3)


def _overlaps(svds: list[GramSVD], gram_b, gram_a, slices, shape) -> dict[tuple[int, int], ModuleOverlap]:
    """Every pair (i < j, positions in ``svds``) on one module, computed batched from the padded cross-Grams."""
    n, width = len(svds), max(s.rank for s in svds)
    ranks = torch.tensor([s.rank for s in svds])
    empty = ModuleOverlap(None, None, None, [], [], None, None, 0.0, 0, None, None)
    if width == 0:
        return {(i, j): empty for i in range(n) for j in range(i + 1, n)}
    cross_u = _padded_cross(gram_b, [s.M for s in svds], slices, width)
    cross_v = _padded_cross(gram_a, [s.N for s in svds], slices, width)
    S = torch.stack([torch.cat([s.S[: s.rank], s.S.new_zeros(width - s.rank)]) for s in svds])
    norms = S.square().sum(-1).sqrt()
    low, high = torch.minimum(ranks[:, None], ranks[None, :]), torch.maximum(ranks[:, None], ranks[None, :])
    inner = svd_inner(S[:, None], cross_u, cross_v, S[None, :])
    figures = {
        "inner": inner,
        "cosine": inner / (norms[:, None] * norms[None, :]),
        "phi_a": subspace_similarity(cross_v, low, low),
        "phi_b": subspace_similarity(cross_u, low, low),
        "share": projected_share(S[:, None], cross_u, cross_v),
        "chance_a": high.double() / shape[1],
        "chance_b": high.double() / shape[0],
    }
    values = {key: value.tolist() for key, value in figures.items()}
    angles_a = torch.rad2deg(principal_angles(cross_v)).tolist()
    angles_b = torch.rad2deg(principal_angles(cross_u)).tolist()
    out = {}
    for i in range(n):
        for j in range(i + 1, n):
            k = int(low[i, j])
            if k == 0:
                out[i, j] = empty
                continue
            out[i, j] = ModuleOverlap(
                cosine=values["cosine"][i][j],
                phi_a=values["phi_a"][i][j],
                phi_b=values["phi_b"][i][j],
                angles_a=angles_a[i][j][:k],
                angles_b=angles_b[i][j][:k],
                share_a_in_b=values["share"][i][j],
                share_b_in_a=values["share"][j][i],
                inner=values["inner"][i][j],
                min_rank=k,
                phi_a_chance=values["chance_a"][i][j],
                phi_b_chance=values["chance_b"][i][j],
            )
    return out


def _merge_module(modules: list[LoraModule], coefs: list[float], gram_b, gram_a, rule: RankRule) -> MergeModule:
    """The spectrum of Σ cᵢ·Bᵢ·Aᵢ (cᵢ = wᵢ·sᵢ) from the stacked factors' Grams: what `combine --method svd` cuts."""
    coef = torch.cat([torch.full((m.rank,), c, dtype=torch.float64) for m, c in zip(modules, coefs)])
    S = stacked_singular_values(gram_b, coef, gram_a)
    shape = (modules[0].out_features, modules[0].in_features)
    S = S[: min(S.numel(), *shape)]
    total = float(S.square().sum())
    reference = max(m.rank for m in modules)
    nonzero = total > 0
    return MergeModule(
        singular_values=S.tolist(),
        energy_rank={_energy_key(e): RankRule(energy=e).choose(S, shape) if nonzero else 0 for e in ENERGIES},
        suggested_rank=rule.choose(S, shape) if nonzero else 0,
        reference_rank=reference,
        truncation_loss=float(S[reference:].square().sum()) / total if nonzero else None,
        norm=math.sqrt(total),
    )


# ----------------------------------------------------------------------------------------------- aggregation


def _group(names: list[str], a: AdapterAnalysis, b: AdapterAnalysis, overlaps: dict[str, ModuleOverlap]):
    inner = sum(overlaps[n].inner for n in names if n in overlaps)
    energy_a = sum(a.modules[n].norm ** 2 for n in names if n in a.modules)
    energy_b = sum(b.modules[n].norm ** 2 for n in names if n in b.modules)
    both = [(n, overlaps[n]) for n in names if n in overlaps and overlaps[n].min_rank > 0]
    weight = sum(o.min_rank for _, o in both)

    def phi(side: str) -> float | None:
        return sum(getattr(o, side) * o.min_rank for _, o in both) / weight if weight else None

    def share(side: str, owner: AdapterAnalysis, energy: float) -> float | None:
        if energy <= 0:
            return None
        return sum(getattr(o, side) * owner.modules[n].norm ** 2 for n, o in both) / energy

    return GroupOverlap(
        cosine=inner / math.sqrt(energy_a * energy_b) if energy_a > 0 and energy_b > 0 else None,
        phi_a=phi("phi_a"),
        phi_b=phi("phi_b"),
        share_a_in_b=share("share_a_in_b", a, energy_a),
        share_b_in_a=share("share_b_in_a", b, energy_b),
        modules=len(both),
        phi_a_chance=phi("phi_a_chance"),
        phi_b_chance=phi("phi_b_chance"),
    )


def _grouped(names: list[str], key) -> dict[str, list[str]]:
    groups: dict[str, list[str]] = {}
    for n in names:
        groups.setdefault(key(n), []).append(n)
    return {k: groups[k] for k in sorted(groups, key=natural_key)}


def _pair(a: AdapterAnalysis, b: AdapterAnalysis, overlaps: dict[str, ModuleOverlap], names: list[str]):
    union = [n for n in names if n in a.modules or n in b.modules]
    return PairAnalysis(
        a=a.name,
        b=b.name,
        overall=_group(union, a, b, overlaps),
        modules=overlaps,
        by_layer={k: _group(v, a, b, overlaps) for k, v in _grouped(union, layer_of).items()},
        by_type={k: _group(v, a, b, overlaps) for k, v in _grouped(union, type_of).items()},
    )


# ----------------------------------------------------------------------------------------------- base weights


def _base_files(folder: Path) -> dict[str, Path]:
    """Every tensor name in the base checkpoint → the safetensors file that holds it."""
    from safetensors import SafetensorError, safe_open

    if not folder.is_dir():
        raise SourceError(f"{folder}: base model folder not found")
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise AdapterFormatError(f"{index}: not a safetensors index ({type(exc).__name__})") from None
        return {key: folder / file for key, file in weight_map.items()}
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise SourceError(f"{folder}: no *.safetensors weights (and no model.safetensors.index.json)")
    found = {}
    for path in files:
        try:
            with safe_open(str(path), framework="pt") as f:
                found.update({key: path for key in f.keys()})
        except (SafetensorError, OSError) as exc:
            raise AdapterFormatError(f"{path}: not a readable safetensors file ({exc})") from None
    return found


def _base_key(name: str, keys: dict[str, Path]) -> str | None:
    """The base tensor for a module: ``NAME.weight``, else with leading path parts dropped, else a unique suffix."""
    parts = name.split(".")
    for start in range(len(parts)):
        key = ".".join(parts[start:]) + ".weight"
        if key in keys:
            return key
    suffix = f".{name}.weight"
    matches = [k for k in keys if k.endswith(suffix)]
    return matches[0] if len(matches) == 1 else None


def base_norms(
    folder: str | Path, modules: dict[str, tuple[int, ...]], *, keys: dict[str, Path] | None = None
) -> dict[str, float]:
    """‖W‖_F (float64) of each module's base weight, streamed one tensor at a time; ``modules`` maps name → shape.

    Modules whose weight is not in the checkpoint are left out (and logged); a weight of another shape is an error.
    ``keys`` is `_base_files(folder)` when already read.
    """
    from safetensors import SafetensorError, safe_open

    folder = Path(folder)
    keys = _base_files(folder) if keys is None else keys
    wanted: dict[Path, list[tuple[str, str]]] = {}
    missing = []
    for name in modules:
        key = _base_key(name, keys)
        if key is None:
            missing.append(name)
        else:
            wanted.setdefault(keys[key], []).append((name, key))
    if missing:
        log.warning("%s: no base weight for %d module(s), e.g. %s", folder, len(missing), ", ".join(missing[:3]))
    norms = {}
    for path, items in wanted.items():
        try:
            with safe_open(str(path), framework="pt") as f:
                for name, key in items:
                    tensor = f.get_tensor(key)
                    if tuple(tensor.shape) != tuple(modules[name]):
                        raise IncompatibleAdaptersError(
                            f"module {name}: base weight {key} in {path} has shape {tuple(tensor.shape)}, "
                            f"the adapter's ΔW has {tuple(modules[name])}"
                        )
                    norms[name] = float(torch.linalg.vector_norm(tensor, dtype=torch.float64))
        except (SafetensorError, OSError) as exc:
            raise AdapterFormatError(f"{path}: not a readable safetensors file ({exc})") from None
    return norms


# ----------------------------------------------------------------------------------------------- entry point


def _rule(rank: int | None, energy: float | None, rule: str | None, rule_value: float | None) -> RankRule:
    if rank is None and energy is None and rule is None:
        return DEFAULT_RULE
    return RankRule(rank=rank, energy=energy, rule=rule, value=rule_value)


def analyze(
    adapters: list,
    *,
    weights: list[float] | None = None,
    rank: int | None = None,
    energy: float | None = None,
    rule: str | None = None,
    rule_value: float | None = None,
    base: str | Path | None = None,
    allow_different_bases: bool = False,
    allow_nonfinite: bool = False,
    progress: bool = False,
    threads: int | None = 1,
) -> Analysis:
    """Spectra, ranks and pairwise overlap of ``adapters`` (paths, Hub ids or `LoraAdapter`s), in factor space.

    ``rank``/``energy``/``rule``/``rule_value`` form the `RankRule` behind the rank suggestions — the same rule
    `combine(method="svd")` takes; with none given, energy 0.99. ``weights`` (default 1/n each, as in `combine`)
    weight the merged sum in ``Analysis.merge``. ``base`` is a local folder of safetensors weights; with it each
    module also gets ‖W‖_F, streamed one tensor at a time.

    ``threads`` is torch's intra-op thread count while analysing (restored after; None leaves it as it is). The
    default, 1, is deliberate: the work is many small products and r×r decompositions, where a second OpenMP thread
    rarely pays and on a busy machine costs several times the work (ten Llama-7B-shaped adapters on a 2-core CPU
    shared with other jobs: 7 s on one thread, 25 s on two).
    """
    loaded = [load_adapter(a, allow_nonfinite=allow_nonfinite) for a in adapters]
    if not loaded:
        raise MethodError("no adapters given")
    weights = [1.0 / len(loaded)] * len(loaded) if weights is None else [float(w) for w in weights]
    if len(weights) != len(loaded):
        raise MethodError(f"{len(weights)} weight(s) for {len(loaded)} adapter(s)")
    truncation = _rule(rank, energy, rule, rule_value)
    check_compatible(loaded, allow_different_bases=allow_different_bases)
    base_keys = None if base is None else _base_files(Path(base))  # fail before the long part
    labels = _unique_names(loaded)
    results = [AdapterAnalysis(label, a.source, a.base_model, {}) for label, a in zip(labels, loaded)]
    pairs = [(i, j) for i in range(len(loaded)) for j in range(i + 1, len(loaded))]
    overlaps: dict[tuple[int, int], dict[str, ModuleOverlap]] = {p: {} for p in pairs}
    merged: dict[str, MergeModule] = {}
    names = list(dict.fromkeys(n for a in loaded for n in a.modules))
    buffers: dict = {}
    with _intra_op_threads(threads):
        for name in tqdm(names, desc="analyze", unit="module", disable=not progress):
            indices = [i for i, a in enumerate(loaded) if name in a.modules]
            modules = [loaded[i].modules[name] for i in indices]
            gram_b, gram_a, slices = _factor_grams(modules, buffers)
            svds = [
                gram_svd(gram_b[rows, rows], gram_a[rows, rows], (m.out_features, m.in_features), scale=m.scale)
                for m, rows in zip(modules, slices)
            ]
            for i, m, svd in zip(indices, modules, svds):
                results[i].modules[name] = _spectrum(m, svd, truncation)
            if len(loaded) < 2:
                continue
            if len(indices) > 1:
                shape = (modules[0].out_features, modules[0].in_features)
                for (x, y), overlap in _overlaps(svds, gram_b, gram_a, slices, shape).items():
                    overlaps[indices[x], indices[y]][name] = overlap
            coefs = [weights[i] * m.scale for i, m in zip(indices, modules)]
            merged[name] = _merge_module(modules, coefs, gram_b, gram_a, truncation)

    notes = []
    if base is not None:
        shapes = {n: m.base_shape for a in loaded for n, m in a.modules.items()}
        norms = base_norms(base, shapes, keys=base_keys)
        for result in results:
            for name, spectrum in result.modules.items():
                spectrum.base_norm = norms.get(name)
        if len(norms) < len(shapes):
            notes.append(f"{len(shapes) - len(norms)} of {len(shapes)} modules have no base weight in {base}")
    return Analysis(
        adapters=results,
        pairs=[_pair(results[i], results[j], overlaps[i, j], names) for i, j in pairs],
        merge=MergeAnalysis(weights, merged) if len(loaded) > 1 else None,
        rule=truncation,
        base=None if base is None else str(base),
        notes=notes,
    )
