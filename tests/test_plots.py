"""`loramix analyze --plot`: every figure renders for 2, 3 (72 modules) and 10 adapters (24 modules), at a sane size and
not blank, with the names written in full and the spectra starting at σ₂/σ₁.

Oracle: the PNG files themselves, read back with matplotlib's reader: pixel size within bounds, and many distinct
colours (a blank or single-colour image has a handful).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from loramix import LoraAdapter, LoraModule, analyze
from loramix.analysis_files import write_plots
from loramix.render.plots import analysis_plots

pytest.importorskip("matplotlib")

LAYERS, TYPES = 12, ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj")  # 72 modules


def adapters(n: int, types: tuple[str, ...] = TYPES) -> list[LoraAdapter]:
    gen = torch.Generator().manual_seed(n)
    out = []
    for i in range(n):
        modules = {
            f"model.layers.{layer}.self_attn.{kind}": LoraModule(
                A=torch.randn(4, 24, generator=gen), B=torch.randn(16, 4, generator=gen), scale=1.0
            )
            for layer in range(LAYERS)
            for kind in types
        }
        out.append(LoraAdapter(modules=modules, name=f"an_adapter_with_a_long_descriptive_name_{i}", base_model="b"))
    return out


@pytest.mark.parametrize("n", [2, 3, 10])
def test_every_plot_renders_at_a_sane_size_and_is_not_blank(tmp_path, n):
    from matplotlib.image import imread

    analysis = analyze(adapters(n, TYPES if n <= 3 else TYPES[:2]))  # 72 modules; 24 for 45 pairs (time)
    paths = write_plots(analysis, tmp_path)
    assert sorted(p.name for p in paths) == ["overlap_layers.png", "overlap_pairs.png", "spectra.png"]
    for path in paths:
        pixels = imread(path)
        height, width = pixels.shape[:2]
        assert 300 <= width <= 8000 and 200 <= height <= 8000, (path.name, width, height)
        colours = np.unique((pixels[..., :3] * 255).astype(np.uint8).reshape(-1, 3), axis=0)
        assert len(colours) > 50, path.name


def test_names_in_full_spectra_without_the_first_column_and_scales_fitted():
    analysis = analyze(adapters(3))
    figures = analysis_plots(analysis)
    pairs = figures["overlap_pairs.png"]
    cosine_axes = pairs.axes[0]
    labels = [t.get_text() for t in cosine_axes.get_yticklabels()]
    assert labels == [a.name for a in analysis.adapters]  # not middle-truncated
    low, high = cosine_axes.images[0].get_clim()
    largest = max(abs(p.overall.cosine) for p in analysis.pairs)
    assert high == pytest.approx(largest) and low == pytest.approx(-largest)  # fitted, not ±1
    spectra = figures["spectra.png"].axes[0]
    assert [t.get_text() for t in spectra.get_xticklabels()][0] == "2"  # σ₁/σ₁ = 1 is not drawn
    assert len(spectra.images[0].get_array()[0]) == 3  # rank 4: σ₂..σ₄
    assert [t.get_text() for t in spectra.get_yticklabels()][:2] == ["0 gate_proj", "0 k_proj"]
