"""`analyze`'s method advice (`loramix.analysis.advice`): the measured properties it reads agree with a dense float64
computation done here with numpy, and its decisions on constructed inputs (orthogonal, overlapping, conflicting,
near-duplicate adapters; with and without data) are the ones the rule states."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from loramix import LoraAdapter, LoraModule, analyze
from loramix.analysis.advice import CONFLICT, DUPLICATE, MANY, OVERLAP, measured, recommend
from loramix.analysis.report import analysis_dict, analysis_text

OUT, IN = 24, 20


def lora(B: np.ndarray, A: np.ndarray) -> LoraModule:
    return LoraModule(A=torch.from_numpy(A).float(), B=torch.from_numpy(B).float(), scale=1.0)


def adapters_of(*modules: dict) -> list[LoraAdapter]:
    return [
        LoraAdapter(modules={n: lora(*f) for n, f in mods.items()}, base_model="test/base", name=f"a{i}")
        for i, mods in enumerate(modules)
    ]


def dense(factors: dict) -> dict[str, np.ndarray]:
    return {n: B.astype(np.float64) @ A.astype(np.float64) for n, (B, A) in factors.items()}


def share(x: np.ndarray, y: np.ndarray) -> float:
    """‖P_out(y)·x·P_in(y)‖²/‖x‖², projectors onto y's column and row spaces (numpy SVD, numerical rank)."""
    U, s, Vt = np.linalg.svd(y, full_matrices=False)
    k = int((s > s[0] * 1e-6).sum())
    inside = U[:, :k] @ U[:, :k].T @ x @ Vt[:k].T @ Vt[:k]
    return float((inside**2).sum() / (x**2).sum())


def independent(first: dict, second: dict) -> tuple[float, float]:
    """Whole-adapter cosine and mean shared energy of two adapters, from dense float64 ΔW (shares energy-weighted)."""
    a, b = dense(first), dense(second)
    inner = sum(float((a[n] * b[n]).sum()) for n in a)
    na, nb = (sum(float((d[n] ** 2).sum()) for n in d) for d in (a, b))
    a_in_b = sum(share(a[n], b[n]) * float((a[n] ** 2).sum()) for n in a) / na
    b_in_a = sum(share(b[n], a[n]) * float((b[n] ** 2).sum()) for n in b) / nb
    return inner / np.sqrt(na * nb), (a_in_b + b_in_a) / 2


def expected(count: int, cosines: list[float], shared: float, data: bool) -> str:
    """The rule as the module docstring and RESULTS.md state it, applied to the independent figures."""
    if min(cosines) <= -CONFLICT:
        return "ties"
    if max(cosines) >= DUPLICATE:
        return "svd"
    if shared >= OVERLAP or count >= MANY:
        return "tsv"
    return "regmean" if data else "cat"


def factors(rng: np.random.Generator, rank: int = 4) -> tuple[np.ndarray, np.ndarray]:
    return rng.standard_normal((OUT, rank)), rng.standard_normal((rank, IN))


def orthogonal(rng, count: int = 2):
    """Disjoint output rows and input columns: cosine 0, nothing shared."""
    out = []
    for i in range(count):
        B, A = factors(rng)
        rows, cols = np.zeros(OUT, bool), np.zeros(IN, bool)
        rows[i * OUT // count : (i + 1) * OUT // count], cols[i * IN // count : (i + 1) * IN // count] = True, True
        B[~rows], A[:, ~cols] = 0, 0
        out.append({"m": (B, A)})
    return out


def overlapping(rng):
    """One shared rank-4 subspace on both sides, independent cores: all energy shared, a small cosine."""
    U, V = np.linalg.qr(rng.standard_normal((OUT, 4)))[0], np.linalg.qr(rng.standard_normal((IN, 4)))[0]
    return {"m": (U @ rng.standard_normal((4, 4)), V.T)}, {"m": (U @ rng.standard_normal((4, 4)), V.T)}


def conflicting(rng):
    B, A = factors(rng)
    return {"m": (B, A)}, {"m": (-B, A + 0.2 * rng.standard_normal(A.shape))}


def duplicates(rng):
    B, A = factors(rng)
    return {"m": (B, A)}, {"m": (B, A + 0.02 * rng.standard_normal(A.shape))}


@pytest.mark.parametrize("data", [False, True])
@pytest.mark.parametrize(
    ("build", "made_for"),
    [(orthogonal, "cat"), (overlapping, "tsv"), (conflicting, "ties"), (duplicates, "svd")],
)
def test_two_adapters(build, made_for, data):
    first, second = build(np.random.default_rng(3))
    inputs = measured(analyze(adapters_of(first, second)))
    cosine, shared = independent(first, second)
    # the advice reads analyze's factor-space figures: equal to the dense float64 ones to float32 rounding
    assert inputs.adapters == 2 and inputs.rank == 4
    assert inputs.min_cosine == pytest.approx(cosine, abs=1e-5) and inputs.max_cosine == pytest.approx(cosine, abs=1e-5)
    assert inputs.shared == pytest.approx(shared, abs=1e-4)
    # each construction lands where it was built to land, by the independent figures
    assert expected(2, [cosine], shared, False) == made_for
    advice = recommend(inputs, data=data)
    assert advice.method == expected(2, [cosine], shared, data)
    assert advice.reason and "\n" not in advice.reason
    if advice.method == "regmean":
        assert advice.flags == "--base BASE --examples FILE"


@pytest.mark.parametrize("data", [False, True])
def test_many_orthogonal_adapters(data):
    built = orthogonal(np.random.default_rng(4), count=MANY)
    inputs = measured(analyze(adapters_of(*built)))
    pairs = [independent(built[i], built[j]) for i in range(MANY) for j in range(i + 1, MANY)]
    assert inputs.shared == pytest.approx(float(np.mean([s for _, s in pairs])), abs=1e-6)
    advice = recommend(inputs, data=data)
    assert advice.method == expected(MANY, [c for c, _ in pairs], inputs.shared, data) == "tsv"
    assert f"{MANY} adapters, nearly orthogonal" in advice.reason


def test_advice_in_the_report_and_the_json():
    first, second = orthogonal(np.random.default_rng(1))
    result = analyze(adapters_of(first, second))
    text = analysis_text(result)
    line = next(ln for ln in text.splitlines() if ln.strip().startswith("- method:"))
    assert "`loramix combine ... --method cat`" in line
    data = analysis_dict(result)["advice"]
    assert data["method"] == "cat" and data["adapters"] == 2 and data["shared"] == pytest.approx(0, abs=1e-6)
    one = analyze(adapters_of(first))
    assert analysis_dict(one)["advice"] is None and "- method:" not in analysis_text(one)
