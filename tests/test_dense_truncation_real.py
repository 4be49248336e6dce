"""Dense TIES on the real Qwen trio (../shared/real-adapters): the rank rule keeps what it says, and the card's
numbers equal an independent float64 recomputation.

The oracle is numpy: the dense TIES matrix written from the paper (`ties_reference`, float64) and the written
adapter's B·A in float64. The card's share of energy kept must equal ‖B·A‖²/‖ΔW_TIES‖² and its relative error
‖ΔW_TIES − B·A‖/‖ΔW_TIES‖ to 2e-4 absolute (loramix merges in float32: thresholds and the SVD agree with float64 to
about 1e-6 relative, a few trim ties may differ). Four modules (layers 0 and 12, q and v) keep the test short.
"""

from __future__ import annotations

import re

import numpy as np
import pytest
from helpers import REAL, requires_real
from test_methods_interference import ties_reference

from loramix import RankRule, combine, load_adapter
from loramix.render.card import model_card

pytestmark = requires_real

TRIO = ("qwen05__posttrain_v1", "qwen05__posttrain_v2", "qwen05__inference_engine")
WEIGHTS = [0.4, 0.4, 0.2]
MODULES = [f"model.layers.{i}.self_attn.{p}_proj" for i in (0, 12) for p in ("q", "v")]


@pytest.fixture(scope="module")
def trio():
    loaded = [load_adapter(REAL / name) for name in TRIO]
    return [a.with_modules({n: a.modules[n] for n in MODULES}) for a in loaded]


def card_rows(card: str) -> dict[str, tuple[float, float]]:
    rows = re.findall(r"^\| `([^`]+)` \| ([0-9.]+) \| ([0-9.]+) \|$", card, flags=re.M)
    return {name: (float(kept), float(error)) for name, kept, error in rows}


def dense_ties(adapters, name: str) -> np.ndarray:
    tasks = [m.scale * (m.B.double() @ m.A.double()).numpy() for m in (a.modules[name] for a in adapters)]
    return ties_reference(tasks, WEIGHTS, 0.2)


@pytest.mark.parametrize("energy", [None, 0.95])
def test_card_numbers_equal_a_float64_recomputation(trio, energy):
    merged = combine(trio, weights=WEIGHTS, method="ties", rank_rule=RankRule(energy=energy))
    card = model_card(merged)
    rows = card_rows(card)
    assert set(rows) == set(MODULES)
    assert f"truncation: energy {energy or 0.99:g}" in card
    for name in MODULES:
        reference = dense_ties(trio, name)
        module = merged.modules[name]
        written = module.scale * (module.B.double() @ module.A.double()).numpy()
        kept = np.sum(written**2) / np.sum(reference**2)
        error = np.linalg.norm(reference - written) / np.linalg.norm(reference)
        assert rows[name][0] == pytest.approx(kept, abs=2e-4), name
        assert rows[name][1] == pytest.approx(error, abs=2e-4), name
        assert kept >= (energy or 0.99) - 2e-4, name  # the rule's share, to float32 precision
        assert module.rank > 24  # more than Σrᵢ: the old hidden cap is gone
    shares = [kept for kept, _ in rows.values()]
    assert f"energy kept min {min(shares):.4f}" in card
