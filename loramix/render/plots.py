"""`loramix analyze --plot` rendered: heatmaps as matplotlib ``Figure`` objects (the plot extra).

Figures are built with ``matplotlib.figure.Figure`` directly: never pyplot, never a backend switch, so rendering
in a notebook leaves its plotting state alone. The caller saves them (`loramix.analysis_files.write_plots`).

Colour scales are fitted to the values shown (cosines on a scale symmetric about 0 up to the largest |cosine|
off the diagonal; φ from its smallest to its largest value), so that 0.04 against 0.15, or 0.97 against 0.999, can
be told apart. φ is shown against chance (the φ of random subspaces of the same sizes, which the text output prints
in brackets): a line on the colour bar, and cells at or below chance hatched. Adapter names are written in full.
"""

from __future__ import annotations

import statistics
from textwrap import fill

from loramix.analysis.names import layer_of, natural_key, type_of
from loramix.analysis.report import finite
from loramix.errors import LoramixError

# Spectra: up to this many modules one row each, labelled; beyond it one row per module type (mean over layers).
MAX_MODULE_ROWS = 72
PANELS = (  # attribute, title, colour map, attribute of its chance level
    ("cosine", "cosine of ΔW", "RdBu_r", None),
    ("phi_a", "φ input side", "viridis", "phi_a_chance"),
    ("phi_b", "φ output side", "viridis", "phi_b_chance"),
)


def _limits(values: list, *, symmetric: bool, floor: float | None = None) -> tuple[float, float]:
    """A colour range fitted to the finite ``values``: ±max|v| when ``symmetric``, else [min, max] (widened to
    include ``floor``, the chance level, and to a span of at least 1e-3 so that equal values still draw)."""
    finite_values = [v for v in values if finite(v) is not None]
    if not finite_values:
        return (-1.0, 1.0) if symmetric else (0.0, 1.0)
    if symmetric:
        top = max(max(abs(v) for v in finite_values), 1e-3)
        return -top, top
    low, high = min(finite_values), max(finite_values)
    if floor is not None:
        low = min(low, floor)
    if high - low < 1e-3:
        low, high = low - 5e-4, high + 5e-4
    return low, high


def _heatmap(ax, values, rows, cols, title, *, vmin, vmax, cmap, annotate=False, chance=None, fontsize=7):
    import numpy as np

    data = np.array([[np.nan if v is None else v for v in row] for row in values], dtype=float)
    image = ax.imshow(data, vmin=vmin, vmax=vmax, cmap=cmap, aspect="auto", interpolation="nearest")
    ax.set_title(title, fontsize=9)
    ax.set_yticks(range(len(rows)), rows, fontsize=fontsize)
    step = max(1, len(cols) // 40)
    ax.set_xticks(range(0, len(cols), step), cols[::step], fontsize=fontsize, rotation=90)
    if chance is not None:
        for (i, j), v in np.ndenumerate(data):
            if np.isfinite(v) and v <= chance[i][j]:
                ax.add_patch(_hatch((j, i)))
    if annotate:
        for (i, j), v in np.ndenumerate(data):
            if np.isfinite(v):
                rgb = image.cmap(image.norm(v))[:3]  # light text on dark cells
                color = "w" if 0.299 * rgb[0] + 0.587 * rgb[1] + 0.114 * rgb[2] < 0.5 else "k"
                text = f"{v:.3f}" if chance is None or chance[i][j] is None else f"{v:.3f}\n({chance[i][j]:.3f})"
                ax.text(j, i, text, ha="center", va="center", fontsize=6, color=color)
    return image


def _hatch(cell: tuple[int, int]):
    from matplotlib.patches import Rectangle

    x, y = cell
    return Rectangle((x - 0.5, y - 0.5), 1, 1, fill=False, hatch="///", edgecolor="0.5", linewidth=0)


def _colorbar(fig, image, ax, *, fraction: float, chance: list | None = None):
    bar = fig.colorbar(image, ax=ax, fraction=fraction)
    levels = [c for row in chance or [] for c in row if c is not None]
    if levels:
        level = statistics.median(levels)
        bar.ax.axhline(level, color="k", linewidth=1.5)
        bar.ax.text(1.05, level, " chance", transform=bar.ax.get_yaxis_transform(), fontsize=6, va="center")
    return bar


def _figure(figsize: tuple[float, float], rows: int, cols: int):
    """A figure and its axes grid (always 2-D), without pyplot."""
    try:
        import matplotlib  # noqa: F401 — the package itself first: its submodules may be imported already
        from matplotlib.figure import Figure
    except ImportError:
        raise LoramixError("plots need matplotlib: pip install 'loramix[plot]'") from None
    fig = Figure(figsize=figsize)
    return fig, fig.subplots(rows, cols, squeeze=False)


def _pair_grids(analysis, names: list[str], key: str, chance_key: str | None):
    """The n×n grid of a pair figure (diagonal left blank: an adapter against itself says nothing) and its
    chance levels."""
    index = {n: i for i, n in enumerate(names)}
    grid = [[None] * len(names) for _ in names]
    chance = [[None] * len(names) for _ in names]
    for p in analysis.pairs:
        i, j = index[p.a], index[p.b]
        grid[i][j] = grid[j][i] = finite(getattr(p.overall, key))
        if chance_key:
            chance[i][j] = chance[j][i] = finite(getattr(p.overall, chance_key))
    return grid, (chance if chance_key else None)


def _pairs_figure(analysis, names: list[str]):
    n = len(names)
    width = max(len(name) for name in names)
    fig, axes = _figure((6 + 3.2 * min(n, 12) + 0.15 * width, 2.5 + 0.7 * min(n, 12) + 0.08 * width), 1, 3)
    for ax, (key, title, cmap, chance_key) in zip(axes[0], PANELS):
        grid, chance = _pair_grids(analysis, names, key, chance_key)
        floor = min((c for row in chance for c in row if c is not None), default=None) if chance else None
        vmin, vmax = _limits([v for row in grid for v in row], symmetric=key == "cosine", floor=floor)
        image = _heatmap(ax, grid, names, names, title, vmin=vmin, vmax=vmax, cmap=cmap, annotate=n <= 6,
                         chance=chance)  # fmt: skip
        _colorbar(fig, image, ax, fraction=0.046, chance=chance)
    fig.tight_layout()
    return fig


def _layers_figure(analysis, names: list[str]):
    layers = sorted({k for p in analysis.pairs for k in p.by_layer}, key=natural_key)
    labels = [f"{p.a} ~ {p.b}" for p in analysis.pairs]
    height = 1.2 + 0.22 * len(labels)
    fig, axes = _figure((4 + 0.07 * max(map(len, labels)) + 0.28 * len(layers), 3 * height), 3, 1)
    for ax, (key, title, cmap, chance_key) in zip(axes[:, 0], PANELS):
        grid = [[finite(getattr(p.by_layer[k], key)) if k in p.by_layer else None for k in layers]
                for p in analysis.pairs]  # fmt: skip
        chance = None
        if chance_key:
            chance = [[finite(getattr(p.by_layer[k], chance_key)) if k in p.by_layer else None for k in layers]
                      for p in analysis.pairs]  # fmt: skip
        floor = min((c for row in chance for c in row if c is not None), default=None) if chance else None
        vmin, vmax = _limits([v for row in grid for v in row], symmetric=key == "cosine", floor=floor)
        image = _heatmap(ax, grid, labels, [k.rsplit(".", 1)[-1] for k in layers], f"{title} per layer",
                         vmin=vmin, vmax=vmax, cmap=cmap, chance=chance)  # fmt: skip
        ax.set_xlabel("layer", fontsize=7)
        _colorbar(fig, image, ax, fraction=0.02, chance=chance)
    fig.tight_layout()
    return fig


def _spectrum_rows(adapter) -> tuple[list[str], list[list[float | None]]]:
    """Per module (or, beyond `MAX_MODULE_ROWS` modules, per module type: the mean over its layers) the spectrum
    σᵢ/σ₁ from i = 2 (σ₁/σ₁ is always 1)."""
    names = sorted(adapter.modules, key=natural_key)
    spectra = {}
    for n in names:
        s = adapter.modules[n].singular_values
        spectra[n] = [v / s[0] for v in s[1:]] if s and s[0] > 0 else []
    if len(names) <= MAX_MODULE_ROWS:
        return [_short_module(n) for n in names], [spectra[n] for n in names]
    groups: dict[str, list[list[float]]] = {}
    for n in names:
        groups.setdefault(type_of(n), []).append(spectra[n])
    labels, rows = [], []
    for kind, members in sorted(groups.items()):
        width = max(map(len, members), default=0)
        rows.append([statistics.fmean(m[i] for m in members if i < len(m)) for i in range(width)])
        labels.append(f"{kind} (mean of {len(members)})")
    return labels, rows


def _short_module(name: str) -> str:
    """``12 q_proj`` for ``model.layers.12.self_attn.q_proj``: the layer number and the module type."""
    layer = layer_of(name).rsplit(".", 1)[-1]
    return f"{layer} {type_of(name)}" if layer.isdigit() else name


def _spectra_figure(analysis):
    tables = [_spectrum_rows(a) for a in analysis.adapters]
    width = max((len(row) for _, rows in tables for row in rows), default=0)
    height = max(len(rows) for _, rows in tables)
    cols = min(len(tables), 5)
    grid_rows = -(-len(tables) // cols)
    fig, axes = _figure((1.5 + 3.2 * cols, grid_rows * (1.5 + 0.14 * max(height, 8))), grid_rows, cols)
    image = None
    for k, (ax, a, (labels, rows)) in enumerate(zip(axes.flat, analysis.adapters, tables)):
        if not rows:  # every module left out (NaN/Inf factors): nothing to draw
            ax.set_axis_off()
            ax.set_title(f"{fill(a.name, 30)}\nno module analysed", fontsize=9)
            continue
        grid = [row + [None] * (width - len(row)) for row in rows] if width else [[None] for _ in rows]
        title = f"{fill(a.name, 30)}\nσᵢ/σ₁ per module (i ≥ 2)"
        image = _heatmap(ax, grid, labels, list(range(2, width + 2)) or [2], title, vmin=0.0, vmax=1.0, cmap="magma",
                         fontsize=6)  # fmt: skip
        ax.set_xlabel("i", fontsize=7)
        if k % cols and labels == tables[k - k % cols][0]:  # the row's first panel names the same modules
            ax.set_yticklabels([])
    for ax in list(axes.flat)[len(tables) :]:
        ax.set_axis_off()
    if image is not None:
        fig.colorbar(image, ax=axes.ravel().tolist(), fraction=0.02)
    return fig


def analysis_plots(analysis) -> dict[str, object]:
    """Heatmaps by file name: pairwise overlap, per-layer overlap (with two or more adapters), and spectra.
    Each value is a ``matplotlib.figure.Figure``. Needs matplotlib (the plot extra)."""
    written = {}
    names = [a.name for a in analysis.adapters]
    if analysis.pairs:
        written["overlap_pairs.png"] = _pairs_figure(analysis, names)
        written["overlap_layers.png"] = _layers_figure(analysis, names)
    written["spectra.png"] = _spectra_figure(analysis)
    return written
