"""`loramix analyze` rendered: an `Analysis` as JSON-ready data and as the terminal summary with suggestions (also
its ``str()``). Pure: the analysis in, text out."""

from __future__ import annotations

import dataclasses
import json
import math

from loramix.analysis.advice import measured, recommend
from loramix.analysis.experts import expert_lines
from loramix.analysis.names import natural_key
from loramix.errors import counted
from loramix.schedule import varies


def finite(value):
    """None for None/NaN/Inf (JSON has no NaN), the value otherwise."""
    return None if value is None or (isinstance(value, float) and not math.isfinite(value)) else value


def _group_dict(group) -> dict:
    return {key: finite(value) for key, value in dataclasses.asdict(group).items()}


def analysis_dict(analysis) -> dict:
    """JSON-ready data of an `Analysis` (the contract: adapters → modules → spectra; pairs → modules → cosine, φ)."""
    adapters = []
    for a in analysis.adapters:
        modules = {}
        for name, m in a.modules.items():
            item = {key: finite(value) for key, value in dataclasses.asdict(m).items()}
            item["shape"] = list(m.shape)
            item["relative_norm"] = finite(m.relative_norm)
            modules[name] = item
        adapters.append(
            {
                "name": a.name,
                "source": a.source,
                "base_model": a.base_model,
                "norm": a.norm,
                "relative_norm": finite(a.relative_norm),
                "suggested_rank": a.suggested_rank,
                "kept_energy": finite(a.kept_energy),
                "below_step": finite(a.below_step),
                "modules": modules,
            }
        )
    pairs = []
    for p in analysis.pairs:
        pairs.append(
            {
                "a": p.a,
                "b": p.b,
                **_group_dict(p.overall),
                "modules": {name: _group_dict(o) for name, o in p.modules.items()},
                "by_layer": {name: _group_dict(g) for name, g in p.by_layer.items()},
                "by_type": {name: _group_dict(g) for name, g in p.by_type.items()},
            }
        )
    merge = None
    if analysis.merge is not None:
        mg = analysis.merge
        merge = {
            "weights": [w.data() for w in mg.weights],
            "norm": mg.norm,
            "reference_rank": mg.reference_rank,
            "truncation_loss": finite(mg.truncation_loss),
            "suggested_rank": mg.suggested_rank,
            "modules": {name: _group_dict(m) for name, m in mg.modules.items()},
        }
    inputs = measured(analysis)
    advice = None if inputs is None else {**dataclasses.asdict(recommend(inputs)), **dataclasses.asdict(inputs)}
    return {
        "rule": analysis.rule.describe(),
        "base": analysis.base,
        "quantization": analysis.quantization,
        "notes": analysis.notes,
        "adapters": adapters,
        "pairs": pairs,
        "merge": merge,
        "advice": advice,
    }


def analysis_json(analysis) -> str:
    return json.dumps(analysis_dict(analysis), indent=1)


def _num(value, spec: str = ".3f") -> str:
    return "-" if finite(value) is None else format(value, spec)


def _column(values: list) -> list[str]:
    """One fixed-point format for a whole column: four significant digits for its largest value."""
    largest = max((abs(v) for v in values if finite(v) is not None and v != 0), default=1.0)
    spec = f".{max(0, 3 - math.floor(math.log10(largest)))}f"
    return [_num(v, spec) for v in values]


def _pct(value) -> str:
    return "-" if finite(value) is None else f"{100 * value:.1f}%"


def _mean(values) -> float | None:
    values = [v for v in values if finite(v) is not None]
    return sum(values) / len(values) if values else None


def _median(values) -> int:
    ordered = sorted(values)
    return ordered[len(ordered) // 2] if ordered else 0


def _table(header: list[str], rows: list[list[str]], *, left: int = 1) -> list[str]:
    """Columns padded to their widest cell; the first ``left`` columns left-aligned, the rest right-aligned."""
    widths = [max(len(str(r[c])) for r in [header, *rows]) for c in range(len(header))]

    def line(cells):
        return "  " + "  ".join(
            str(c).ljust(w) if i < left else str(c).rjust(w) for i, (c, w) in enumerate(zip(cells, widths))
        )

    return [line(header), *(line(r) for r in rows)]


def _shared(group) -> float:
    """The ordering key for "overlap": the mean share of each adapter's energy inside the other's subspaces."""
    values = [v for v in (group.share_a_in_b, group.share_b_in_a) if finite(v) is not None]
    return sum(values) / len(values) if values else -1.0


def _overlap_rows(items) -> list[list[str]]:
    rows = []
    for label, g in items:
        phi_in = f"{_num(g.phi_a)} ({_num(g.phi_a_chance)})"
        phi_out = f"{_num(g.phi_b)} ({_num(g.phi_b_chance)})"
        rows.append([label, _num(g.cosine), phi_in, phi_out, _pct(g.share_a_in_b), _pct(g.share_b_in_a)])
    return rows


_RANK_HEADER = [
    *("adapter", "modules", "rank", "eff.rank", "stable", "k@90%", "k@99%"),
    *("suggest med/max", "keeps", "‖ΔW‖", "‖ΔW‖/‖W‖"),
]
_OVERLAP_HEADER = ["", "cosine", "φ in (chance)", "φ out (chance)", "a in b", "b in a"]


def analysis_text(analysis, *, top: int = 5) -> str:
    """The terminal summary: rank use, overlap (pairs, module types, layers), merge figures, suggestions."""
    modules = {n for a in analysis.adapters for n in a.modules}
    lines = [
        f"{counted(len(analysis.adapters), 'adapter')}, {counted(len(modules), 'module')}; rank rule: "
        f"{analysis.rule.describe()}",
        "",
        "Rank use (means over modules; suggest = the rank the rule keeps: median module / largest module,",
        "  the largest being one --rank that satisfies the rule everywhere; keeps = energy kept by the rule)",
    ]
    rows = []
    for a in analysis.adapters:
        ms = list(a.modules.values())
        ranks = sorted({m.rank for m in ms})
        rows.append(
            [
                a.name,
                str(len(ms)),
                "/".join(map(str, ranks)),
                _num(_mean(m.effective_rank for m in ms), ".1f"),
                _num(_mean(m.stable_rank for m in ms), ".1f"),
                _num(_mean(m.energy_rank["0.9"] for m in ms), ".1f"),
                _num(_mean(m.energy_rank["0.99"] for m in ms), ".1f"),
                f"{_median(m.suggested_rank for m in ms)}/{a.suggested_rank}",
                _pct(a.kept_energy),
                _num(a.relative_norm, ".2e"),
            ]
        )
    norms = _column([a.norm for a in analysis.adapters])
    rows = [[*row[:-1], norm, row[-1]] for row, norm in zip(rows, norms)]
    lines += _table(_RANK_HEADER, rows)
    if analysis.pairs:
        lines += [
            "",
            "Overlap, whole adapter (cosine of all ΔW together; φ of the input/output subspaces, random",
            ("  subspaces in brackets; a in b = share of a's energy inside b's input and output subspaces)"),
        ]
        ordered = sorted(analysis.pairs, key=lambda p: _shared(p.overall), reverse=True)
        lines += _table(_OVERLAP_HEADER, _overlap_rows((f"{p.a} ~ {p.b}", p.overall) for p in ordered))
        by_type = [(f"{p.a} ~ {p.b}: {t}", g) for p in analysis.pairs for t, g in p.by_type.items() if g.modules]
        by_type.sort(key=lambda item: _shared(item[1]), reverse=True)
        if len(by_type) > 1:
            lines += ["", "Module types, most overlapping first"]
            shown = by_type if len(by_type) <= 2 * top else by_type[:top] + by_type[-top:]
            lines += _table(_OVERLAP_HEADER, _overlap_rows(shown))
            if len(shown) < len(by_type):
                lines.insert(len(lines) - top, f"  … {len(by_type) - 2 * top} more …")
        by_layer = [(f"{p.a} ~ {p.b}: {k}", g) for p in analysis.pairs for k, g in p.by_layer.items() if g.modules]
        by_layer.sort(key=lambda item: _shared(item[1]), reverse=True)
        if len(by_layer) > 1:
            lines += ["", f"Layers, the {min(top, len(by_layer))} most and least overlapping"]
            shown = by_layer if len(by_layer) <= 2 * top else by_layer[:top] + by_layer[-top:]
            lines += _table(_OVERLAP_HEADER, _overlap_rows(shown))
    if analysis.merge is not None:
        mg = analysis.merge
        weights = ", ".join(w.describe() for w in mg.weights)
        lines += [
            "",
            f"Merged sum (weights {weights}), as `combine --method svd` sees it before truncating",
            f"  cut to rank {mg.reference_rank} (the largest input rank) it loses {_pct(mg.truncation_loss)} of its "
            f"energy; the rule ({analysis.rule.describe()}) needs rank {mg.suggested_rank}",
        ]
        lines += _effective_weights(analysis)
    lines += _below_step_lines(analysis, top)
    lines += expert_lines(analysis, top=top)
    lines += ["", "Suggestions", *(f"  - {s}" for s in _suggestions(analysis))]
    lines += [f"note: {n}" for n in analysis.notes]
    return "\n".join(lines)


def _below_step_lines(analysis, top: int) -> list[str]:
    """Per adapter, the share of ‖ΔW‖² below half the base's 4-bit step, and its most affected modules."""
    if analysis.quantization is None:
        return []
    lines = [
        "",
        f"Below the 4-bit grid ({analysis.quantization}): share of ‖ΔW‖² in entries |ΔW| < half the base weight's",
        "  local quantization step (the part that only moves W inside its 4-bit cell; lost to a 4-bit re-quantization)",
    ]
    for a in analysis.adapters:
        measured = sorted(((m.below_step, n) for n, m in a.modules.items() if finite(m.below_step) is not None))
        worst = ", ".join(f"{n} {_pct(v)}" for v, n in measured[::-1][:top])
        lines.append(
            f"  {a.name}: {_pct(a.below_step)} over {counted(len(measured), 'module')}"
            + (f"; most: {worst}" if worst else "")
        )
    return lines


def _suggestions(analysis) -> list[str]:
    rule = analysis.rule
    flag = f"--energy {rule.energy:g}" if rule.energy is not None else ""
    if rule.rule is not None:
        flag = f"--rule {rule.rule} --rule-value {rule.rule_value:g}"
    if rule.rank is not None:
        flag = f"{flag} --rank {rule.rank}".strip()
    out = []
    for a in analysis.adapters:
        largest = max((m.rank for m in a.modules.values()), default=0)
        if 0 < a.suggested_rank < largest:
            out.append(
                f"{a.name}: rank {a.suggested_rank} of {largest} holds what the rule asks in every module "
                f"({_pct(a.kept_energy)} of its energy): "
                f"`loramix combine {a.source} --method svd {flag} -o OUT` resizes it"
            )
        elif a.suggested_rank:
            out.append(f"{a.name}: uses its full rank {largest} under the rule; no room to resize")
    given = analysis.merge.weights if analysis.merge else []
    weights = {} if any(varies(w) for w in given) else {a.name: w.value for a, w in zip(analysis.adapters, given)}
    for p in analysis.pairs:
        advice = _pair_advice(p, weights.get(p.a), weights.get(p.b), sum(weights.values()) if weights else None)
        if advice:
            out.append(f"{p.a} ~ {p.b}: {advice}")
    if analysis.merge is not None:
        mg = analysis.merge
        kept = None if mg.truncation_loss is None else 1 - mg.truncation_loss
        out.append(
            f"merging all: `loramix combine ... --method svd {flag}` gives rank ≤ {mg.suggested_rank}; "
            f"`--rank {mg.reference_rank}` keeps {_pct(kept)} of the sum"
        )
    inputs = measured(analysis)
    if inputs is not None:
        out.append(recommend(inputs).line())
    return out


# Overall cosine of two adapters' ΔWs: at or above NEAR_DUPLICATE they are nearly the same update; at or above
# OVERLAPPING (or at or below −OVERLAPPING) they share a large part; below ORTHOGONAL in size they hardly interact.
NEAR_DUPLICATE, OVERLAPPING, ORTHOGONAL = 0.9, 0.3, 0.1


def _effective_weights(analysis) -> list[str]:
    """Every module's effective weights, when some weight varies by layer or module."""
    mg = analysis.merge
    if not any(varies(w) for w in mg.weights):
        return []
    header = ["effective weight", *(a.name for a in analysis.adapters)]
    rows = [[name, *(f"{w:.4g}" for w in mg.modules[name].weights)] for name in sorted(mg.modules, key=natural_key)]
    return ["", *_table(header, rows)]


def _pair_advice(p, wa: float | None, wb: float | None, total: float | None) -> str | None:
    """What the pair's overlap means for a merge at the analysed weights (``total``: the sum of all weights)."""
    g = p.overall
    if g.cosine is None:
        return None
    c = g.cosine
    pair_weights = "" if wa is None else f" at weights {wa:.3g} and {wb:.3g}"
    averaged = total is not None and abs(total - 1) <= 0.05
    if c >= OVERLAPPING:
        what = "near-duplicates" if c >= NEAR_DUPLICATE else "overlapping updates"
        if averaged:
            count = "nothing is over-counted: the sum is their weighted average"
        else:
            count = (
                f"the weights sum to {total:g}, so their shared direction is applied about {total:g}× "
                "(scale the weights to sum to 1 for an average)"
            )
        dup = "; ties/dare buy nothing here (their signs agree)" if c >= NEAR_DUPLICATE else ""
        return f"cosine {c:.2f}, {what}{pair_weights}: {count}{dup}"
    if c <= -OVERLAPPING:
        return (
            f"cosine {c:.2f}, conflicting updates{pair_weights}: a weighted sum cancels what they share (each loses "
            "part of its effect); ties/dare elect one sign per entry, or lower the weight of the one that matters "
            "less (`loramix search` finds weights from examples)"
        )
    if g.phi_a is not None and g.phi_a_chance is not None and g.phi_a > max(0.5, 5 * g.phi_a_chance):
        if g.phi_b is not None and g.phi_b < 0.5:
            return (
                f"same input subspace (φ in {g.phi_a:.2f}; likely the same A initialisation) but different outputs "
                f"(φ out {g.phi_b:.2f}, cosine {c:.2f}): an exact sum keeps both"
            )
    if abs(c) < ORTHOGONAL:
        scaled = (
            f";{pair_weights} (weights summing to 1) each keeps only that share of its effect, weight 1 each keeps "
            "both at full strength"
            if averaged
            else ""
        )
        return f"cosine {c:.2f}, nearly orthogonal: an exact sum (cat/svd) keeps both without interference{scaled}"
    return None
