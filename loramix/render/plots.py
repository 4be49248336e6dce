"""`loramix analyze --plot` rendered: heatmaps as matplotlib ``Figure`` objects (the plot extra).

Figures are built with ``matplotlib.figure.Figure`` directly: never pyplot, never a backend switch, so rendering
in a notebook leaves its plotting state alone. The caller saves them (`loramix.analysis_files.write_plots`).

Colour scales are fixed, so that a colour means the same in every figure: cosines on [−1, 1] (white is 0, an
unrelated pair; a cosine of 0.002 is not deep red), φ on [0, 1]. φ is shown against chance (the φ of random subspaces
of the same sizes, which the text output prints in brackets): a line on the colour bar, and cells at or below chance
hatched, as the legend under the figure says. Small pairwise figures write each value in its cell. Adapter names are
written in full; modules are labelled by layer and type, and grouped by block and type where their names have no
layer numbers of their own (a Stable Diffusion LoRA's kohya names).
"""

from __future__ import annotations

import statistics
from textwrap import fill

from loramix.analysis.names import layer_of, natural_key, type_of, typed
from loramix.analysis.report import finite
from loramix.errors import MissingPackageError

# Spectra: up to this many modules one row each, labelled; beyond it one row per module type (mean over layers).
MAX_MODULE_ROWS = 72
PANELS = (  # attribute, title, colour map, attribute of its chance level, colour scale
    ("cosine", "cosine of ΔW", "RdBu_r", None, (-1.0, 1.0)),
    ("phi_a", "φ input side", "viridis", "phi_a_chance", (0.0, 1.0)),
    ("phi_b", "φ output side", "viridis", "phi_b_chance", (0.0, 1.0)),
)
HATCH_NOTE = "φ at or below chance: the φ of random subspaces of the same ranks (the line on the colour bar)"


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


def _hatch_legend(fig) -> None:
    """What hatching means, under the figure (saved with ``bbox_inches="tight"``, so never cut off)."""
    from matplotlib.patches import Patch

    swatch = Patch(facecolor="none", hatch="///", edgecolor="0.5", label=HATCH_NOTE)
    fig.legend(handles=[swatch], loc="upper center", bbox_to_anchor=(0.5, 0.0), fontsize=7, frameon=False)


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
        raise MissingPackageError("plots need matplotlib: pip install 'loramix[plot]'") from None
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
    for ax, (key, title, cmap, chance_key, (vmin, vmax)) in zip(axes[0], PANELS):
        grid, chance = _pair_grids(analysis, names, key, chance_key)
        image = _heatmap(ax, grid, names, names, title, vmin=vmin, vmax=vmax, cmap=cmap, annotate=n <= 6,
                         chance=chance)  # fmt: skip
        _colorbar(fig, image, ax, fraction=0.046, chance=chance)
    fig.tight_layout()
    _hatch_legend(fig)
    return fig


def _layers_figure(analysis, names: list[str]):
    layers = sorted({k for p in analysis.pairs for k in p.by_layer}, key=natural_key)
    labels = [f"{p.a} ~ {p.b}" for p in analysis.pairs]
    height = 1.2 + 0.22 * len(labels)
    fig, axes = _figure((4 + 0.07 * max(map(len, labels)) + 0.28 * len(layers), 3 * height), 3, 1)
    for ax, (key, title, cmap, chance_key, (vmin, vmax)) in zip(axes[:, 0], PANELS):
        grid = [[finite(getattr(p.by_layer[k], key)) if k in p.by_layer else None for k in layers]
                for p in analysis.pairs]  # fmt: skip
        chance = None
        if chance_key:
            chance = [[finite(getattr(p.by_layer[k], chance_key)) if k in p.by_layer else None for k in layers]
                      for p in analysis.pairs]  # fmt: skip
        image = _heatmap(ax, grid, labels, [k.rsplit(".", 1)[-1] for k in layers], f"{title} per layer",
                         vmin=vmin, vmax=vmax, cmap=cmap, chance=chance)  # fmt: skip
        ax.set_xlabel("layer", fontsize=7)
        _colorbar(fig, image, ax, fraction=0.02, chance=chance)
    fig.tight_layout()
    _hatch_legend(fig)
    return fig


def _spectrum_rows(adapter) -> tuple[list[str], list[list[float | None]]]:
    """The spectrum σᵢ/σ₁ from i = 2 (σ₁/σ₁ is always 1) per module, labelled ``12 q_proj``; where modules have no
    layer number (kohya names) or beyond `MAX_MODULE_ROWS` of them, the mean per block and type, or per type."""
    names = sorted(adapter.modules, key=natural_key)
    spectra = {}
    for n in names:
        s = adapter.modules[n].singular_values
        spectra[n] = [v / s[0] for v in s[1:]] if s and s[0] > 0 else []
    numbered = all(layer_of(n).rsplit(".", 1)[-1].isdigit() for n in names)
    if numbered and len(names) <= MAX_MODULE_ROWS:
        return [f"{layer_of(n).rsplit('.', 1)[-1]} {type_of(n)}" for n in names], [spectra[n] for n in names]
    blocks = {f"{layer_of(n)} {type_of(n)}" for n in names}
    key = (lambda n: f"{layer_of(n)} {type_of(n)}") if not numbered and len(blocks) <= MAX_MODULE_ROWS else typed
    groups: dict[str, list[list[float]]] = {}
    for n in names:
        groups.setdefault(key(n), []).append(spectra[n])
    labels, rows = [], []
    for kind, members in sorted(groups.items(), key=lambda kv: natural_key(kv[0])):
        width = max(map(len, members), default=0)
        rows.append([statistics.fmean(m[i] for m in members if i < len(m)) for i in range(width)])
        labels.append(kind if len(members) == 1 else f"{kind} (mean of {len(members)})")
    return labels, rows


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
