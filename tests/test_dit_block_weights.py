"""Block weights (the ``lbw`` form) on diffusion transformers: Flux.1's 57 blocks (19 double, 38 single) and SD3's
joint blocks, on LoRAs in any naming (read onto diffusers' module names first).

Oracle: diffusers' own reading of each file (``FluxPipeline.lora_state_dict``; for SD3's original names, diffusers'
checkpoint converter, as in tests/test_sd3.py) and the block of each diffusers module numbered here by hand
(``transformer_blocks.N`` → N, ``single_transformer_blocks.N`` → 19 + N); the combination must equal the float64
per-block-weighted sum per module (rtol 1e-5, atol 1e-6).
"""

from __future__ import annotations

import json
import re

import pytest
import torch
from dit_helpers import assert_deltas

import loramix
from loramix.cli import main
from loramix.errors import MethodError
from loramix.schedule import parse

pytest.importorskip("diffusers")
test_flux = pytest.importorskip("test_flux")
test_sd3 = pytest.importorskip("test_sd3")


def _block(name: str) -> int | None:
    found = re.match(r"^transformer\.(single_)?transformer_blocks\.(\d+)\.", name)
    if found is None:
        return None
    return int(found.group(2)) + (19 if found.group(1) else 0)


def test_flux_block_weights_across_namings(tmp_path):
    """A kohya Flux LoRA under a 57-value list (ratio 0.8) plus a diffusers one at 0.5: each module's ΔW is its
    block's value × 0.8 (0.8 alone outside the blocks: img_in, final_layer) plus 0.5 × the other's."""
    kohya = test_flux.kohya_file(tmp_path / "k.safetensors", modules={**test_flux.KOHYA, **test_flux.TOP}, alpha=2.0)
    other = test_flux.diffusers_file(tmp_path / "d.safetensors")
    lbw = [0.05 * (i + 1) for i in range(57)]
    merged = loramix.combine([kohya, other], weights=[{"lbw": lbw, "ratio": 0.8}, 0.5], method="cat")
    expected: dict[str, torch.Tensor] = {}
    for name, delta in test_flux.oracle_deltas(kohya).items():
        block = _block(name)
        expected[name] = (0.8 * (lbw[block] if block is not None else 1.0)) * delta
    assert any(_block(n) is None for n in expected) and any((_block(n) or 0) >= 19 for n in expected)
    for name, delta in test_flux.oracle_deltas(other).items():
        expected[name] = expected.get(name, 0) + 0.5 * delta
    assert_deltas(merged, expected)


def test_sd3_joint_block_weights_and_the_cli(tmp_path):
    """An sd-scripts SD3 LoRA under a 24-value list (SD3.5 Medium's joint blocks), through the API and --lbws."""
    path = test_sd3.original_file(tmp_path / "k.safetensors", "kohya")
    lbw = [0.1 * (i + 1) for i in range(24)]
    merged = loramix.combine([path], weights=[{"lbw": lbw, "ratio": 0.5}], method="cat")
    expected = {
        name: 0.5 * (lbw[b] if (b := _block(name)) is not None else 1.0) * delta
        for name, delta in test_sd3.oracle(
            [test_sd3.factors(0)] if hasattr(test_sd3, "factors") else [test_sd3._factors(0)], [1.0]
        ).items()
    }
    assert_deltas(merged, expected)
    out = tmp_path / "out"
    args = ["-q", "combine", str(path), "-w", "0.5", "--lbws", json.dumps(lbw), "-m", "cat", "--format", "kohya"]
    with pytest.raises(SystemExit) as done:
        main([*args, "-o", str(out)])
    assert done.value.code == 0
    assert_deltas(loramix.load_adapter(out), expected)


def test_block_list_lengths_are_checked():
    with pytest.raises(MethodError, match=r"57 \(Flux.1: 19 double, 38 single blocks\), 24 or 38"):
        parse({"lbw": [1.0] * 56})
