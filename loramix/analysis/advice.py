"""Which merge method to use, read from what `analyze` measured: one recommendation and the one-line reason.

The rule follows the measured evidence in ``benchmarks/RESULTS.md`` (real pretrained weights: `bench_real.py`;
synthetic tasks: `bench_methods.py`). It reads measured properties of the inputs — how many adapters, their most
negative pair cosine (sign conflicts), their largest pair cosine (near-duplicates), the mean share of one adapter's
energy inside another's input and output subspaces (overlap), their largest rank — plus whether a base and a few
unlabelled examples are at hand (data-aware merges need both). Pure: an `Analysis` in, an `Advice` out.
"""

from __future__ import annotations

from dataclasses import dataclass

from loramix.errors import counted

# Pair cosines at or below −CONFLICT: the adapters push shared entries in opposite directions (a sum cancels them);
# at or above DUPLICATE: nearly the same update. Mean shared energy at or above OVERLAP: the adapters write into each
# other's subspaces (unlike independently trained LoRAs, whose shares stay near chance, a few percent).
CONFLICT, DUPLICATE, OVERLAP = 0.3, 0.9, 0.25
# From MANY adapters on, the benchmarks' best worst-task retention came from TSV rather than the plain sum.
MANY = 4


@dataclass(frozen=True)
class Measured:
    """The properties of the inputs the advice reads (whole-adapter figures from `analyze`'s pairs)."""

    adapters: int
    min_cosine: float
    max_cosine: float
    shared: float  # mean over pairs of (share of a in b + share of b in a) / 2
    rank: int  # the largest input rank (what one adapter's rank holds)


@dataclass(frozen=True)
class Advice:
    """A method (with its flags) for `combine`, and why, in one line."""

    method: str
    flags: str
    reason: str

    def line(self) -> str:
        flags = f" {self.flags}" if self.flags else ""
        return f"method: `loramix combine ... --method {self.method}{flags}`: {self.reason}"


def measured(analysis) -> Measured | None:
    """The advice's inputs from an `Analysis`; None with fewer than two adapters or no pair figures."""
    pairs = [p.overall for p in analysis.pairs if p.overall.cosine is not None]
    if len(analysis.adapters) < 2 or not pairs:
        return None
    shares = [
        sum(s for s in (g.share_a_in_b, g.share_b_in_a) if s is not None) / 2
        for g in pairs
        if g.share_a_in_b is not None or g.share_b_in_a is not None
    ]
    return Measured(
        adapters=len(analysis.adapters),
        min_cosine=min(g.cosine for g in pairs),
        max_cosine=max(g.cosine for g in pairs),
        shared=sum(shares) / len(shares) if shares else 0.0,
        rank=max((m.rank for a in analysis.adapters for m in a.modules.values()), default=0),
    )


def recommend(m: Measured, *, data: bool = False) -> Advice:
    """The method the measured evidence favours for inputs with these properties (``data``: a base and a few
    unlabelled examples of the tasks are at hand). Each reason names its evidence (``benchmarks/RESULTS.md``)."""
    n = counted(m.adapters, "adapter")
    if m.min_cosine <= -CONFLICT:
        return Advice(
            "ties",
            "--density 0.5",
            f"a pair conflicts (cosine {m.min_cosine:.2f}), so a sum cancels what they share; TIES elects one sign "
            "per entry (its premise: no benchmarked pair conflicted)",
        )
    if m.max_cosine >= DUPLICATE:
        return Advice(
            "svd",
            f"--rank {m.rank}",
            f"near-duplicates (cosine {m.max_cosine:.2f}): weights summing to 1 give their average, which one "
            "adapter's rank holds",
        )
    if m.shared >= OVERLAP:
        return Advice(
            "tsv",
            "",
            f"{n} sharing {100 * m.shared:.0f}% of their energy: TSV decorrelates the shared subspace (best worst task "
            "on the shared-subspace synthetic tasks)",
        )
    orthogonal = f"nearly orthogonal ({100 * m.shared:.1f}% shared energy, |cosine| ≤ {_largest(m):.2f})"
    if m.adapters < MANY:
        if data:
            return Advice(
                "regmean",
                "--base BASE --examples FILE",
                f"{n}, {orthogonal}, with a base and examples: RegMean was best on real weights at 2 tasks "
                "(it averages, so from 4 tasks on it kept less than the sum)",
            )
        return Advice(
            "cat",
            "",
            f"{n}, {orthogonal}: nothing to untangle; the exact sum at one tuned weight was within 0.04 of every "
            "data-free method on real weights and best on synthetic tasks",
        )
    return Advice(
        "tsv",
        "",
        f"{n}, {orthogonal}: TSV kept the exact sum's mean and raised the worst task on real and synthetic tasks "
        "(a data-aware average, regmean, kept less)",
    )


def _largest(m: Measured) -> float:
    return max(abs(m.min_cosine), abs(m.max_cosine))
