"""Rendering: plain data in, text or JSON out. Nothing here computes merges."""

from __future__ import annotations

import dataclasses
import json
import math
from collections import Counter
from pathlib import Path

from loramix.adapter import LoraAdapter


def _dtype_name(dtype) -> str:
    return str(dtype).removeprefix("torch.")


def adapter_summary(adapter: LoraAdapter) -> dict:
    """What `loramix inspect` reports about one adapter, as JSON-ready data."""
    modules = adapter.modules.values()
    scales = sorted({round(m.scale, 6) for m in modules})
    features = [
        name
        for name, present in (
            ("rslora", adapter.use_rslora),
            ("dora", adapter.has_dora),
            ("lora_bias", adapter.has_lora_bias),
            ("embedding", any(m.layout == "embedding" for m in modules)),
            ("conv2d", any(m.layout == "conv2d" for m in modules)),
            ("conv1d_fan_in_fan_out", any(m.layout == "conv1d_fan_in_fan_out" for m in modules)),
        )
        if present
    ]
    return {
        "name": adapter.name,
        "source": adapter.source,
        "base_model": adapter.base_model,
        "task_type": adapter.task_type,
        "dtype": _dtype_name(adapter.dtype),
        "num_modules": len(adapter.modules),
        "module_types": dict(sorted(Counter(n.rsplit(".", 1)[-1] for n in adapter.modules).items())),
        "ranks": adapter.ranks,
        "scales": scales,
        "num_params": adapter.num_params(),
        "file_bytes": adapter.file_bytes,
        "features": features,
        "extra_tensors": sorted(adapter.extra),
        "extra_shapes": {n: list(e.tensor.shape) for n, e in sorted(adapter.extra.items())},
        "warnings": list(adapter.warnings),
    }


def _size(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return ""


def inspect_text(summaries: list[dict]) -> str:
    """A readable block per adapter."""
    blocks = []
    for s in summaries:
        types = ", ".join(f"{t} ×{n}" for t, n in s["module_types"].items())
        rows = [
            ("source", s["source"]),
            ("base model", s["base_model"] or "(unknown)"),
            ("task", s["task_type"] or "-"),
            ("dtype", s["dtype"]),
            ("modules", f"{s['num_modules']} ({types})"),
            ("ranks", ", ".join(map(str, s["ranks"]))),
            ("scale", ", ".join(f"{v:g}" for v in s["scales"])),
            ("parameters", f"{s['num_params']:,}"),
            ("file size", _size(s["file_bytes"]) if s["file_bytes"] else "-"),
            ("features", ", ".join(s["features"]) or "-"),
            ("extra tensors", ", ".join(f"{n} {s['extra_shapes'][n]}" for n in s["extra_tensors"]) or "-"),
        ]
        lines = [s["name"]] + [f"  {k:<14}{v}" for k, v in rows]
        lines += [f"  {'warning':<14}{w}" for w in s["warnings"]]
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks)


def inspect_json(summaries: list[dict]) -> str:
    return json.dumps(summaries, indent=2)


# ----------------------------------------------------------------------------------------------- analyze


def _finite(value):
    """None for None/NaN/Inf (JSON has no NaN), the value otherwise."""
    return None if value is None or (isinstance(value, float) and not math.isfinite(value)) else value


def _group_dict(group) -> dict:
    return {key: _finite(value) for key, value in dataclasses.asdict(group).items()}


def analysis_dict(analysis) -> dict:
    """JSON-ready data of an `Analysis` (the contract: adapters → modules → spectra; pairs → modules → cosine, φ)."""
    adapters = []
    for a in analysis.adapters:
        modules = {}
        for name, m in a.modules.items():
            item = {key: _finite(value) for key, value in dataclasses.asdict(m).items()}
            item["shape"] = list(m.shape)
            item["relative_norm"] = _finite(m.relative_norm)
            modules[name] = item
        adapters.append(
            {
                "name": a.name,
                "source": a.source,
                "base_model": a.base_model,
                "norm": a.norm,
                "relative_norm": _finite(a.relative_norm),
                "suggested_rank": a.suggested_rank,
                "kept_energy": _finite(a.kept_energy),
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
            "weights": mg.weights,
            "norm": mg.norm,
            "reference_rank": mg.reference_rank,
            "truncation_loss": _finite(mg.truncation_loss),
            "suggested_rank": mg.suggested_rank,
            "modules": {name: _group_dict(m) for name, m in mg.modules.items()},
        }
    return {
        "rule": analysis.rule.describe(),
        "base": analysis.base,
        "notes": analysis.notes,
        "adapters": adapters,
        "pairs": pairs,
        "merge": merge,
    }


def analysis_json(analysis) -> str:
    return json.dumps(analysis_dict(analysis), indent=1)


def _num(value, spec: str = ".3f") -> str:
    return "-" if _finite(value) is None else format(value, spec)


def _pct(value) -> str:
    return "-" if _finite(value) is None else f"{100 * value:.1f}%"


def _mean(values) -> float | None:
    values = [v for v in values if _finite(v) is not None]
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
    values = [v for v in (group.share_a_in_b, group.share_b_in_a) if _finite(v) is not None]
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
        f"{len(analysis.adapters)} adapter(s), {len(modules)} module(s); rank rule: {analysis.rule.describe()}",
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
                _num(a.norm, ".4g"),
                _num(a.relative_norm, ".2e"),
            ]
        )
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
        weights = ", ".join(f"{w:g}" for w in mg.weights)
        lines += [
            "",
            f"Merged sum (weights {weights}), as `combine --method svd` sees it before truncating",
            f"  cut to rank {mg.reference_rank} (the largest input rank) it loses {_pct(mg.truncation_loss)} of its "
            f"energy; the rule ({analysis.rule.describe()}) needs rank {mg.suggested_rank}",
        ]
    lines += ["", "Suggestions", *(f"  - {s}" for s in _suggestions(analysis))]
    lines += [f"note: {n}" for n in analysis.notes]
    return "\n".join(lines)


def _suggestions(analysis) -> list[str]:
    rule = analysis.rule
    flag = f"--energy {rule.energy:g}" if rule.energy is not None else ""
    if rule.rule is not None:
        flag = f"--rule {rule.rule} --rule-value {rule.value:g}"
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
    for p in analysis.pairs:
        g = p.overall
        if g.cosine is not None and abs(g.cosine) >= 0.3:
            kind = "reinforce (a plain sum over-counts them)" if g.cosine > 0 else "cancel (a plain sum loses both)"
            out.append(f"{p.a} ~ {p.b}: cosine {g.cosine:.2f}, they {kind}; lower their weights or use ties/dare")
        elif g.phi_a is not None and g.phi_a_chance is not None and g.phi_a > max(0.5, 5 * g.phi_a_chance):
            if g.phi_b is not None and g.phi_b < 0.5:
                out.append(
                    f"{p.a} ~ {p.b}: same input subspace (φ in {g.phi_a:.2f}; likely the same A initialisation) but "
                    f"different outputs (φ out {g.phi_b:.2f}, cosine {g.cosine:.2f}): an exact sum keeps both"
                )
    if analysis.merge is not None:
        mg = analysis.merge
        kept = None if mg.truncation_loss is None else 1 - mg.truncation_loss
        out.append(
            f"merging all: `loramix combine ... --method svd {flag}` gives rank ≤ {mg.suggested_rank}; "
            f"`--rank {mg.reference_rank}` keeps {_pct(kept)} of the sum"
        )
    return out


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        from loramix.errors import LoramixError

        raise LoramixError("--plot needs matplotlib: pip install 'loramix[plot]'") from None
    return plt


def _heatmap(ax, values, rows, cols, title, *, vmin=0.0, vmax=1.0, cmap="viridis", annotate=False):
    import numpy as np

    data = np.array([[np.nan if v is None else v for v in row] for row in values], dtype=float)
    image = ax.imshow(data, vmin=vmin, vmax=vmax, cmap=cmap, aspect="auto", interpolation="nearest")
    ax.set_title(title, fontsize=9)
    ax.set_yticks(range(len(rows)), rows, fontsize=7)
    step = max(1, len(cols) // 32)
    ax.set_xticks(range(0, len(cols), step), cols[::step], fontsize=7, rotation=90)
    if annotate:
        for (i, j), v in np.ndenumerate(data):
            if np.isfinite(v):
                rgb = image.cmap(image.norm(v))[:3]  # light text on dark cells
                color = "w" if 0.299 * rgb[0] + 0.587 * rgb[1] + 0.114 * rgb[2] < 0.5 else "k"
                ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=7, color=color)
    return image


def analysis_plots(analysis, folder: str | Path) -> list[Path]:
    """PNG heatmaps into ``folder``: pairwise overlap, per-layer overlap, spectra. Needs matplotlib (the plot extra)."""
    plt = _pyplot()
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    names = [a.name for a in analysis.adapters]
    short = [n if len(n) <= 24 else n[:11] + "…" + n[-12:] for n in names]
    if analysis.pairs:
        index = {n: i for i, n in enumerate(names)}
        panels = (("cosine", "cosine of ΔW", -1.0, "RdBu_r"), ("phi_a", "φ input side", 0.0, "viridis"),
                  ("phi_b", "φ output side", 0.0, "viridis"))  # fmt: skip
        fig, axes = plt.subplots(1, 3, figsize=(4 + 2.2 * len(names), 1.5 + 0.9 * len(names)), squeeze=False)
        for ax, (key, title, vmin, cmap) in zip(axes[0], panels):
            grid = [[1.0 if i == j else None for j in range(len(names))] for i in range(len(names))]
            for p in analysis.pairs:
                value = getattr(p.overall, key)
                grid[index[p.a]][index[p.b]] = grid[index[p.b]][index[p.a]] = value
            image = _heatmap(ax, grid, short, short, title, vmin=vmin, cmap=cmap, annotate=len(names) <= 12)
            fig.colorbar(image, ax=ax, fraction=0.046)
        fig.tight_layout()
        written.append(_save(fig, folder / "overlap_pairs.png", plt))
        layers = sorted({k for p in analysis.pairs for k in p.by_layer}, key=_natural)
        labels = [f"{a} ~ {b}" for a, b in ((short[index[p.a]], short[index[p.b]]) for p in analysis.pairs)]
        fig, axes = plt.subplots(3, 1, figsize=(3 + 0.25 * len(layers), 2 + 1.1 * len(labels)), squeeze=False)
        for ax, (key, title, vmin, cmap) in zip(axes[:, 0], panels):
            grid = [[_finite(getattr(p.by_layer[k], key)) if k in p.by_layer else None for k in layers]
                    for p in analysis.pairs]  # fmt: skip
            image = _heatmap(ax, grid, labels, [k.rsplit(".", 1)[-1] for k in layers], f"{title} per layer",
                             vmin=vmin, cmap=cmap)  # fmt: skip
            fig.colorbar(image, ax=ax, fraction=0.02)
        fig.tight_layout()
        written.append(_save(fig, folder / "overlap_layers.png", plt))
    width = max((len(m.singular_values) for a in analysis.adapters for m in a.modules.values()), default=1)
    fig, axes = plt.subplots(1, len(names), figsize=(2 + 2.5 * len(names), 8), squeeze=False)
    for column, (ax, a, label) in enumerate(zip(axes[0], analysis.adapters, short)):
        rows = sorted(a.modules, key=_natural)
        grid = []
        for n in rows:
            s = a.modules[n].singular_values
            top = s[0] if s and s[0] > 0 else None
            grid.append([(v / top if top else None) for v in s] + [None] * (width - len(s)))
        image = _heatmap(ax, grid, [], list(range(1, width + 1)), f"{label}\nσᵢ/σ₁ per module", cmap="magma")
        step = max(1, len(rows) // 40)
        ax.set_yticks(range(0, len(rows), step), rows[::step] if column == 0 else [], fontsize=5)
    fig.colorbar(image, ax=axes[0].tolist(), fraction=0.02)
    written.append(_save(fig, folder / "spectra.png", plt))
    return written


def _natural(text: str) -> list:
    from loramix.analysis import natural_key

    return natural_key(text)


def _save(fig, path: Path, plt) -> Path:
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


def write_analysis_json(analysis, path: str | Path | None) -> str:
    """The analysis as JSON: returned when ``path`` is None, else written atomically to ``path`` (returned)."""
    text = analysis_json(analysis)
    if path is None:
        return text
    import os
    import tempfile

    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    handle, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    try:
        with os.fdopen(handle, "w") as f:
            f.write(text + "\n")
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return str(target)
