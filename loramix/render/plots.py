"""`loramix analyze --plot` rendered: heatmaps as matplotlib ``Figure`` objects (the plot extra).

Figures are built with ``matplotlib.figure.Figure`` directly: never pyplot, never a backend switch, so rendering
in a notebook leaves its plotting state alone. The caller saves them (`loramix.pipeline.write_plots`).
"""

from __future__ import annotations

from loramix.analysis.results import natural_key
from loramix.errors import LoramixError
from loramix.render.analysis import finite


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


def _figure(figsize: tuple[float, float], rows: int, cols: int):
    """A figure and its axes grid (always 2-D), without pyplot."""
    try:
        import matplotlib  # noqa: F401 — the package itself first: its submodules may be imported already
        from matplotlib.figure import Figure
    except ImportError:
        raise LoramixError("plots need matplotlib: pip install 'loramix[plot]'") from None
    fig = Figure(figsize=figsize)
    return fig, fig.subplots(rows, cols, squeeze=False)


def analysis_plots(analysis) -> dict[str, object]:
    """Heatmaps by file name: pairwise overlap, per-layer overlap (with two or more adapters), and spectra.
    Each value is a ``matplotlib.figure.Figure``. Needs matplotlib (the plot extra)."""
    written = {}
    names = [a.name for a in analysis.adapters]
    short = [n if len(n) <= 24 else n[:11] + "…" + n[-12:] for n in names]
    if analysis.pairs:
        index = {n: i for i, n in enumerate(names)}
        panels = (("cosine", "cosine of ΔW", -1.0, "RdBu_r"), ("phi_a", "φ input side", 0.0, "viridis"),
                  ("phi_b", "φ output side", 0.0, "viridis"))  # fmt: skip
        fig, axes = _figure((4 + 2.2 * len(names), 1.5 + 0.9 * len(names)), 1, 3)
        for ax, (key, title, vmin, cmap) in zip(axes[0], panels):
            grid = [[1.0 if i == j else None for j in range(len(names))] for i in range(len(names))]
            for p in analysis.pairs:
                value = getattr(p.overall, key)
                grid[index[p.a]][index[p.b]] = grid[index[p.b]][index[p.a]] = value
            image = _heatmap(ax, grid, short, short, title, vmin=vmin, cmap=cmap, annotate=len(names) <= 12)
            fig.colorbar(image, ax=ax, fraction=0.046)
        fig.tight_layout()
        written["overlap_pairs.png"] = fig
        layers = sorted({k for p in analysis.pairs for k in p.by_layer}, key=natural_key)
        labels = [f"{a} ~ {b}" for a, b in ((short[index[p.a]], short[index[p.b]]) for p in analysis.pairs)]
        fig, axes = _figure((3 + 0.25 * len(layers), 2 + 1.1 * len(labels)), 3, 1)
        for ax, (key, title, vmin, cmap) in zip(axes[:, 0], panels):
            grid = [[finite(getattr(p.by_layer[k], key)) if k in p.by_layer else None for k in layers]
                    for p in analysis.pairs]  # fmt: skip
            image = _heatmap(ax, grid, labels, [k.rsplit(".", 1)[-1] for k in layers], f"{title} per layer",
                             vmin=vmin, cmap=cmap)  # fmt: skip
            fig.colorbar(image, ax=ax, fraction=0.02)
        fig.tight_layout()
        written["overlap_layers.png"] = fig
    width = max((len(m.singular_values) for a in analysis.adapters for m in a.modules.values()), default=1)
    fig, axes = _figure((2 + 2.5 * len(names), 8), 1, len(names))
    for column, (ax, a, label) in enumerate(zip(axes[0], analysis.adapters, short)):
        rows = sorted(a.modules, key=natural_key)
        grid = []
        for n in rows:
            s = a.modules[n].singular_values
            top = s[0] if s and s[0] > 0 else None
            grid.append([(v / top if top else None) for v in s] + [None] * (width - len(s)))
        image = _heatmap(ax, grid, [], list(range(1, width + 1)), f"{label}\nσᵢ/σ₁ per module", cmap="magma")
        step = max(1, len(rows) // 40)
        ax.set_yticks(range(0, len(rows), step), rows[::step] if column == 0 else [], fontsize=5)
    fig.colorbar(image, ax=axes[0].tolist(), fraction=0.02)
    written["spectra.png"] = fig
    return written
