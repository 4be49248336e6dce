"""The files `loramix analyze` writes: its JSON (`write_analysis_json`, atomic, over an existing file only when
told) and its heatmaps (`write_plots`); neither ever over or inside an analysed adapter."""

from __future__ import annotations

from pathlib import Path

from loramix.analysis import Analysis
from loramix.analysis.report import analysis_json
from loramix.io.files import refuse_inputs, write_text_atomic
from loramix.render.plots import analysis_plots


def write_analysis_json(analysis: Analysis, path: str | Path, *, overwrite: bool = False) -> Path:
    """The analysis as JSON in the file ``path``: atomically, never over an analysed adapter, and over an existing
    file only with ``overwrite``."""
    protect = [a.source for a in analysis.adapters]
    return write_text_atomic(path, analysis_json(analysis) + "\n", protect=protect, overwrite=overwrite)


def write_plots(analysis: Analysis, folder: str | Path) -> list[Path]:
    """The analysis' heatmaps as PNG files in ``folder`` (created if needed; never inside an input); returns their
    paths."""
    folder = refuse_inputs(folder, [a.source for a in analysis.adapters])
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for name, figure in analysis_plots(analysis).items():
        figure.savefig(folder / name, dpi=110, bbox_inches="tight")
        written.append(folder / name)
    return written
