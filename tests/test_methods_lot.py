"""LOT Merging (Sun et al. 2025, arXiv:2505.23859) against a float64 reference written from its linear-layer closed
form, T = (Σₖ XₖᵀXₖ)⁺ Σₖ XₖᵀXₖTₖ (eq. 9, §4.1 of v2, in its inputs-by-outputs orientation: Tₖ = ΔWₖᵀ; the
minimum-norm minimiser of its feature drift Σₖ ‖Xₖ(T − Tₖ)‖², which the test also checks directly), with numpy's
Moore–Penrose pseudo-inverse on rank-deficient Grams (fewer tokens than inputs), and end to end on the bundled tiny
Llama with Grams hooked through PEFT. Float64 comparisons allow 1e-9 relative; the end-to-end test compares a float32
adapter with 1e-4 of the largest entry. LOT is not exact in core space (its solve is in×in, like RegMean's): no
core-space test applies; the solve's left factor stays in the span of the adapters' B's, which is tested.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from test_methods_interference import make_terms, product
from test_methods_regression import NAMES, close, peft_grams_and_deltas

import loramix
from loramix.cli import main
from loramix.errors import MethodError
from loramix.examples import path as example
from loramix.linalg import RankRule
from loramix.methods import REGISTRY, Term


def lot_reference(deltas, grams) -> np.ndarray:
    """The paper's eq. 9 on task vectors Tₖ = ΔWₖᵀ (in×out); returns ΔW = Tᵀ."""
    total = sum(grams)
    T = np.linalg.pinv(total, hermitian=True) @ sum(G @ D.T for G, D in zip(grams, deltas))
    return T.T


def drift(delta, deltas, xs) -> float:
    """The paper's objective: Σₖ ‖Xₖ(W₀ + T) − Xₖ(W₀ + Tₖ)‖²_F (W₀ cancels)."""
    return sum(np.square(X @ (delta - D).T).sum() for X, D in zip(xs, deltas))


def drift_terms(n=3, tokens=4, seed=0):
    """Terms with weight 1 (the paper's setting) and Grams XᵀX from ``tokens`` < in rows: Σ Gₖ is singular."""
    gen = torch.Generator().manual_seed(seed)
    xs, terms = [], []
    for t in make_terms(n, seed=seed, weights=[1.0] * n):
        X = torch.randn(tokens, t.A.shape[1], generator=gen, dtype=torch.float64)
        xs.append(X.numpy())
        terms.append(Term(t.coef, t.B, t.A, weight=1.0, gram=X.T @ X))
    return terms, xs


@pytest.mark.parametrize("lam", [1.2, 1.5])  # the paper's λ for ViT-B/32 and ViT-L/14 (§6.3)
def test_lot_lambda_scales_the_task_vector(lam):
    """Eq. 15: W = W₀ + λ·T⋆; loramix's weights cancel in the solve (Σ λΔWₖGₖ(Σ λGⱼ)⁺ = T⋆), so λ is its own option."""
    terms, _ = drift_terms(tokens=4)
    deltas = [t.coef * (t.B.numpy() @ t.A.numpy()) for t in terms]
    merged = product(REGISTRY["lot"].fn(terms, rule=RankRule(), **{"lambda_": lam}))
    close(merged, lam * lot_reference(deltas, [t.gram.numpy() for t in terms]))


@pytest.mark.parametrize("tokens", [2, 4, 40])  # Σ Gₖ of rank 6 and 10 (singular) or full
def test_lot_is_the_papers_closed_form(tokens):
    terms, xs = drift_terms(tokens=tokens)
    deltas = [t.coef * (t.B.numpy() @ t.A.numpy()) for t in terms]
    merged = product(REGISTRY["lot"].fn(terms, rule=RankRule()))
    close(merged, lot_reference(deltas, [t.gram.numpy() for t in terms]))
    # it minimises the drift: any change along an input direction the examples saw raises it
    rng = np.random.default_rng(1)
    for _ in range(5):
        assert drift(merged, deltas, xs) <= drift(merged + 1e-3 * rng.normal(size=merged.shape), deltas, xs)
    # and it is the minimum-norm minimiser: zero along every input direction no example reached
    seen = np.concatenate(xs)
    unseen = np.eye(seen.shape[1]) - np.linalg.pinv(seen) @ seen
    assert np.abs(merged @ unseen).max() <= 1e-9 * np.abs(merged).max()


def test_lot_is_regmean_unshrunk_and_stays_in_the_span_of_the_bs():
    terms, _ = drift_terms(tokens=40)
    factors = REGISTRY["lot"].fn(terms, rule=RankRule())
    close(product(factors), product(REGISTRY["regmean"].fn(terms, rule=RankRule(), alpha=1.0)))
    shrunk = product(REGISTRY["regmean"].fn(terms, rule=RankRule()))  # regmean's default alpha 0.9 differs
    assert np.abs(product(factors) - shrunk).max() > 1e-3
    Bs = torch.cat([t.B for t in terms], dim=1).numpy()
    B = factors.B.double().numpy()
    close(Bs @ np.linalg.lstsq(Bs, B, rcond=None)[0], B)


def test_lot_weights_weigh_each_experts_drift():
    """Weights wₖ weigh each expert's drift term: Σ wₖ‖Xₖ(T − Tₖ)‖² gives (Σ wₖGₖ)⁺ Σ wₖGₖTₖ."""
    terms, _ = drift_terms(tokens=40)
    weights = [0.2, 1.0, 3.0]
    weighted = [Term(w * t.coef, t.B, t.A, weight=w, gram=t.gram) for w, t in zip(weights, terms)]
    deltas = [t.coef * (t.B.numpy() @ t.A.numpy()) for t in terms]
    grams = [w * t.gram.numpy() for w, t in zip(weights, terms)]
    close(product(REGISTRY["lot"].fn(weighted, rule=RankRule())), lot_reference(deltas, grams))


@pytest.mark.parametrize(("change", "message"), [("negative", "must not be negative"), ("no gram", "Gram matrix")])
def test_lot_refuses_in_one_line(change, message):
    terms, _ = drift_terms(2)
    if change == "negative":
        terms[0] = Term(-terms[0].coef, terms[0].B, terms[0].A, weight=-1.0, gram=terms[0].gram)
    else:
        terms[1] = Term(terms[1].coef, terms[1].B, terms[1].A, weight=1.0)
    with pytest.raises(MethodError, match=message) as info:
        REGISTRY["lot"].fn(terms, rule=RankRule())
    assert "\n" not in str(info.value) and str(info.value).startswith("lot ")


def test_lot_on_the_command_line_matches_the_paper_on_peft_grams(tmp_path):
    """`combine … -m lot --base --examples` on three bundled adapters (ranks 4/8, rsLoRA, different module sets):
    the written adapter equals eq. 9 on Grams hooked through PEFT (a module an adapter lacks: Tₖ = 0 there, its
    drift still counts)."""
    jsonl = example("few-shot") / "formal.jsonl"
    examples = [json.loads(line) for line in jsonl.read_text().splitlines() if line.strip()]
    out = tmp_path / "lot"
    args = ["combine", *(str(example(n)) for n in NAMES), "-m", "lot", "-w", "1,1,1"]
    args += ["--base", str(example("tiny-llama")), "--examples", str(jsonl), "--device", "cpu", "-o", str(out)]
    done = CliRunner().invoke(main, args)
    assert done.exit_code == 0, done.output
    assert "lot of 3 adapters" in done.output
    written = loramix.load_adapter(out)
    grams, deltas = peft_grams_and_deltas(examples)
    for name, module in written.modules.items():
        own = [d.get(name, np.zeros(module.base_shape)) for d in deltas]
        close(module.delta(dtype=torch.float64).numpy(), lot_reference(own, [g[name] for g in grams]), 1e-4)
    assert "examples:" in (out / "loramix_recipe.yaml").read_text()
