"""What `loramix.analysis.analyze` returns: plain dataclasses (spectra, overlaps, the merged sum); `str()` of an
`Analysis` is its terminal summary (`loramix.analysis.report`). Nothing here computes."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from loramix.analysis.report import analysis_text
from loramix.linalg import RankRule
from loramix.schedule import Schedule

ENERGIES = (0.9, 0.99)
DEFAULT_RULE = RankRule(energy=0.99)


def energy_key(share: float) -> str:
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
    ``below_step`` (a base and its 4-bit quantization given): the share of ‖ΔW‖² in entries smaller than half the
    base weight's local 4-bit quantization step (`loramix.quantize.below_step_share`); None for weights a 4-bit
    model does not quantize.
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
    below_step: float | None = None

    @property
    def relative_norm(self) -> float | None:
        """‖ΔW‖_F / ‖W‖_F, or None without a base (or for an all-zero base weight)."""
        return self.norm / self.base_norm if self.base_norm else None

    def energy_kept(self, k: int) -> float:
        """Σσ² of the top ``k`` directions (absolute, not a share)."""
        return sum(s * s for s in self.singular_values[:k])


class _ModuleSet:
    """Figures of a set of modules taken together (an adapter's, or the merged sum's)."""

    modules: dict

    @property
    def norm(self) -> float:
        """‖ΔW‖_F of all modules taken together."""
        return _joint_norm(self.modules.values())

    @property
    def suggested_rank(self) -> int:
        """One rank for every module that satisfies the rule everywhere: the largest per-module suggestion (for the
        merged sum, the rank `combine --method svd` with the same rule gives)."""
        return _largest(self.modules.values(), "suggested_rank")


@dataclass
class AdapterAnalysis(_ModuleSet):
    """One adapter: its modules' spectra by normalised module name, plus whole-adapter summaries."""

    name: str
    source: str
    base_model: str | None
    modules: dict[str, ModuleSpectrum]

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

    @property
    def below_step(self) -> float | None:
        """The share of ‖ΔW‖² below half the 4-bit step, over the modules where it was measured, taken together."""
        found = [m for m in self.modules.values() if m.below_step is not None and math.isfinite(m.below_step)]
        total = sum(m.norm**2 for m in found)
        return sum(m.below_step * m.norm**2 for m in found) / total if total > 0 else None


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
    it (what `--rank reference_rank` throws away); ``suggested_rank`` what the analysis' rule keeps. ``weights``: the
    effective weight of each adapter (in input order) on this module, once weights that vary by layer or module are
    resolved (`loramix.schedule`).
    """

    singular_values: list[float]
    energy_rank: dict[str, int]
    suggested_rank: int
    reference_rank: int
    truncation_loss: float | None
    norm: float
    weights: list[float] = field(default_factory=list)


@dataclass
class MergeAnalysis(_ModuleSet):
    """The weighted sum of all adapters, module by module (only with two or more adapters). ``weights`` as given:
    numbers, or values that vary by layer or module (`loramix.schedule.Schedule`s; each module's own are in its
    ``weights``)."""

    weights: list[Schedule]
    modules: dict[str, MergeModule]

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
    quantization: str | None = None  # the base's 4-bit quantization the below-step shares measure against

    def __str__(self) -> str:
        return analysis_text(self)
