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


def test_names_in_full_spectra_without_the_first_column_and_scales_fixed():
    """Issue 26: cosine on [−1, 1] and φ on [0, 1] whatever the data (issue 13 had fitted them: a cosine of 0.002
    came out deep red); hatching is explained in a legend under the figure."""
    analysis = analyze(adapters(3))
    figures = analysis_plots(analysis)
    pairs = figures["overlap_pairs.png"]
    cosine_axes = pairs.axes[0]
    labels = [t.get_text() for t in cosine_axes.get_yticklabels()]
    assert labels == [a.name for a in analysis.adapters]  # not middle-truncated
    assert max(abs(p.overall.cosine) for p in analysis.pairs) < 0.5
    for name in ("overlap_pairs.png", "overlap_layers.png"):
        images = [ax.images[0] for ax in figures[name].axes if ax.images]
        assert [image.get_clim() for image in images] == [(-1.0, 1.0), (0.0, 1.0), (0.0, 1.0)], name
        legend = [t.get_text() for lg in figures[name].legends for t in lg.get_texts()]
        assert legend == ["φ at or below chance: the φ of random subspaces of the same ranks (the line on the colour "
                          "bar)"], name  # fmt: skip
    spectra = figures["spectra.png"].axes[0]
    assert [t.get_text() for t in spectra.get_xticklabels()][0] == "2"  # σ₁/σ₁ = 1 is not drawn
    assert len(spectra.images[0].get_array()[0]) == 3  # rank 4: σ₂..σ₄
    assert [t.get_text() for t in spectra.get_yticklabels()][:2] == ["0 gate_proj", "0 k_proj"]


SD_TYPES = [f"attn{i}_to_{p}" for i in (1, 2) for p in ("q", "k", "v", "out_0")]
SD_BLOCKS = ("down_blocks_0", "down_blocks_1", "up_blocks_1", "up_blocks_2")


def sd_adapter(seed: int) -> LoraAdapter:
    """64 UNet modules and 12 text-encoder ones under their kohya names (76, as an SD 1.5 LoRA has)."""
    gen = torch.Generator().manual_seed(seed)
    names = [f"lora_unet_{b}_attentions_{a}_transformer_blocks_0_{t}" for b in SD_BLOCKS for a in (0, 1)
             for t in SD_TYPES]  # fmt: skip
    names += [f"lora_te_text_model_encoder_layers_{i}_self_attn_{p}_proj" for i in range(3) for p in "qkvo"]
    modules = {n: LoraModule(torch.randn(4, 24, generator=gen), torch.randn(16, 4, generator=gen), 1.0) for n in names}
    return LoraAdapter(modules=modules, name=f"sd{seed}")


def test_kohya_names_are_grouped_by_block_and_type(tmp_path):
    """Issue 26: an SD LoRA's kohya names no longer overprint the heatmaps; spectra rows are block and type (the
    mean over the two attentions of a block), layer columns are blocks, module types are grouped in the text."""
    from click.testing import CliRunner
    from safetensors.torch import save_file

    from loramix.analysis.report import analysis_text
    from loramix.cli import main

    analysis = analyze([sd_adapter(1), sd_adapter(2)])
    figures = analysis_plots(analysis)
    rows = [t.get_text() for t in figures["spectra.png"].axes[0].get_yticklabels()]
    assert len(rows) == 4 * 8 + 3 * 4 and not any("lora_" in r for r in rows), rows
    assert "UNet down_blocks_0 attn1_to_q (mean of 2)" in rows and "text encoder layers_2 self_attn_q_proj" in rows
    columns = [t.get_text() for t in figures["overlap_layers.png"].axes[0].get_xticklabels()]
    assert columns == ["UNet down_blocks_0", "UNet down_blocks_1", "UNet up_blocks_1", "UNet up_blocks_2",
                       "text encoder layers_0", "text encoder layers_1", "text encoder layers_2"]  # fmt: skip
    text = analysis_text(analysis)
    assert "sd1 ~ sd2: attn2_to_out_0" in text and "sd1 ~ sd2: UNet up_blocks_2" in text
    assert "lora_unet" not in text
    # inspect: the 76 names as types, by component
    tensors = {}
    for name, m in sd_adapter(1).modules.items():
        tensors |= {f"{name}.lora_down.weight": m.A, f"{name}.lora_up.weight": m.B, f"{name}.alpha": torch.tensor(4.0)}
    save_file(tensors, str(tmp_path / "sd.safetensors"))
    result = CliRunner().invoke(main, ["inspect", str(tmp_path / "sd.safetensors")])
    line = next(line for line in result.output.splitlines() if line.strip().startswith("modules"))
    types = ", ".join(f"{t} ×8" for t in sorted(SD_TYPES))
    assert (
        line.split(None, 1)[1]
        == f"76 (UNet: {types}; text encoder: " + ", ".join(f"self_attn_{p}_proj ×3" for p in "koqv") + ")"
    ), line
