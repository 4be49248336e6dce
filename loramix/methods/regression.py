"""Merges that solve one least-squares problem per module: RegMean and LOT Merging (input Gram matrices from data)
and WUDI (Gram matrices from the task vectors themselves). All three have the closed form

    ΔW (Σⱼ Dⱼ) = Σᵢ cᵢ·Bᵢ·Aᵢ·Nᵢ,   so   ΔW = [c₁B₁ … cₙBₙ] · [A₁N₁; …; AₙNₙ] · (Σⱼ Dⱼ)⁺

(cᵢ = wᵢ·sᵢ; ⁺ the pseudo-inverse, the minimum-norm solution where Σ Dⱼ is singular). The left factor is the
adapters' own B's: the result is a LoRA of rank Σrᵢ, exact, then cut by the rank rule like `svd`.

- regmean (Jin et al. 2023, "Dataless Knowledge Fusion by Merging Weights of Language Models", ICLR 2023,
  arXiv:2212.09849): W = argmin Σᵢ wᵢ‖XᵢWᵀ − XᵢWᵢᵀ‖², with Xᵢ the module's inputs in adapter i's model (base +
  adapter i) and Wᵢ = W₀ + ΔWᵢ, gives Wᵀ = (Σ wᵢGᵢ)⁻¹ Σ wᵢGᵢWᵢᵀ with Gᵢ = XᵢᵀXᵢ; the base cancels, so
  ΔW = Σ wᵢΔWᵢGᵢ (Σ wⱼGⱼ)⁻¹ (Nᵢ = Gᵢ, Dᵢ = wᵢGᵢ). An adapter that leaves a module alone is a model whose Wⱼ is W₀
  there (ΔWⱼ = 0): it still counts with its Gram in Σ wⱼGⱼ, as in the paper's merge of whole models. The paper
  scales each Gram's off-diagonal entries by ``alpha`` (G̃ = alpha·G + (1 − alpha)·diag(G)). Each Gᵢ here is the
  mean over the examples' tokens, XᵢᵀXᵢ/Nᵢ (see `loramix.weight_search.grams`). Equal Grams give the weighted mean
  Σ wᵢΔWᵢ / Σ wᵢ (weights 1/n: the plain average). The solve is in×in: exact, not core space.
- lot (Sun et al. 2025, "Towards Minimizing Feature Drift in Model Merging: Layer-wise Task Vector Fusion for
  Adaptive Knowledge Integration" — LOT Merging, NeurIPS 2025, arXiv:2505.23859): the task vector of least feature
  drift, T = argmin Σₖ ‖Xₖ(W₀ + T) − Xₖ(W₀ + Tₖ)‖²_F with Xₖ the module's inputs in expert k's model, solved for the
  task vector with the Moore–Penrose pseudo-inverse: T = (Σₖ XₖᵀXₖ)⁺ Σₖ XₖᵀXₖTₖ in the paper's inputs-by-outputs
  orientation (here ΔW = Σ wₖΔWₖGₖ (Σ wⱼGⱼ)⁺, weights 1 in the paper). Written from the objective (its abstract and
  CAT Merging's, arXiv:2505.06977, whose feature drift it takes) and a third-party description of its eq. 9 as this
  pseudo-inverse solve: the paper's full text and the authors' code were not at hand to check. Unlike RegMean's paper it
  neither shrinks the Grams' off-diagonals nor solves for the full weights: where the examples leave an input
  direction unseen (Σ Gⱼ singular, e.g. fewer tokens than inputs) the merged ΔW is zero along it, so the base
  weight stays there (the minimum-norm solution). In loramix's task-vector form this is ``regmean`` with
  ``alpha 1``. The paper's closed forms for normalisation layers and biases have no LoRA counterpart. Same Grams as
  regmean; the solve is in×in: exact, not core space (Σ Gⱼ is not confined to the adapters' row spaces).
- wudi (Cheng et al. 2025, "Whoever Started the Interference Should End It", ICML 2025, arXiv:2503.08099):
  τ = argmin Σᵢ ‖(τ − τᵢ)·τᵢᵀ‖²_F / ‖τᵢ‖²_F with τᵢ = cᵢBᵢAᵢ (the paper's weights are 1 each: pass ``-w 1,1,…``),
  i.e. Nᵢ = Dᵢ = τᵢᵀτᵢ/‖τᵢ‖²_F. Every Dᵢ lies in the row space of the stacked A's, so the solve runs on R×R cores
  (R = Σrᵢ) and never forms an in×in or out×in matrix. The authors' code (nathanielyvo/WUDI-Merging) minimises the
  same loss with 300 Adam steps from Σ τᵢ; this is its exact minimiser (minimum norm).
"""

from __future__ import annotations

from loramix.errors import MethodError
from loramix.lazy import lazy
from loramix.linalg import Factors, RankRule, factor_inner, orthonormal_bases, truncated_factors
from loramix.methods._elementwise import check_number, split_weights
from loramix.methods.registry import method

torch = lazy("torch")


def _solved(terms, rows: list, total) -> tuple:
    """Factors [c₁B₁ … cₙBₙ] and [rows]·total⁺ of the solution (rows[i] = Aᵢ·Nᵢ, total = Σ Dⱼ, float64)."""
    B = torch.cat([t.B.double() * t.coef for t in terms], dim=1)
    return B, torch.cat(rows, dim=0) @ torch.linalg.pinv(total, hermitian=True)


@method(
    name="regmean",
    paper="Jin et al. 2023, RegMean, ICLR 2023, arXiv:2212.09849",
    truncates=True,
    every_adapter=True,
    data=True,
)
def regmean(terms, *, rule: RankRule, base: str = "", examples: str | list = "", alpha: float = 0.9) -> Factors:
    """RegMean: the ΔW whose outputs best match each adapter's on the examples' inputs (needs base and examples)."""
    return _regression("regmean", terms, rule, check_number("alpha", alpha, 0, 1))


@method(
    name="lot",
    paper="Sun et al. 2025, LOT Merging, NeurIPS 2025, arXiv:2505.23859",
    truncates=True,
    every_adapter=True,
    data=True,
)
def lot(terms, *, rule: RankRule, base: str = "", examples: str | list = "") -> Factors:
    """LOT Merging: the ΔW of least feature drift from each adapter's on the examples (needs base and examples)."""
    return _regression("lot", terms, rule, 1.0)


def _regression(name: str, terms, rule: RankRule, alpha: float) -> Factors:
    """ΔW = Σ wᵢΔWᵢG̃ᵢ (Σ wⱼG̃ⱼ)⁺ with G̃ = alpha·G + (1 − alpha)·diag(G), as factors cut by ``rule``."""
    _, weights = split_weights(terms)
    if any(w < 0 for w in weights):
        raise MethodError(f"{name} weighs each adapter's regression: the weights must not be negative")
    if any(t.gram is None for t in terms):
        raise MethodError(f"{name} needs each module's input Gram matrix: give base and examples")
    grams = []
    for t in terms:
        G = t.gram.to(device=t.A.device, dtype=torch.float64)
        grams.append(G if alpha == 1 else alpha * G + (1 - alpha) * torch.diag(torch.diagonal(G)))
    total = sum(w * G for w, G in zip(weights, grams))
    return truncated_factors(*_solved(terms, [t.A.double() @ G for t, G in zip(terms, grams)], total), rule)


@method(name="wudi", paper="Cheng et al. 2025, WUDI, ICML 2025, arXiv:2503.08099", truncates=True)
def wudi(terms, *, rule: RankRule) -> Factors:
    """WUDI: the update that least disturbs each task on its own task vector's rows (closed form, core space)."""
    live = [t for t in terms if t.coef != 0 and factor_inner(t.B, t.A, t.B, t.A) > 0]
    if not live:
        return Factors(terms[0].B.new_zeros(terms[0].B.shape[0], 1), terms[0].A.new_zeros(1, terms[0].A.shape[1]))
    ((Q, R),) = orthonormal_bases(torch.cat([t.A.double() for t in live], dim=0).T)  # stacked Aᵀ = Q·R
    if Q.shape[1] >= Q.shape[0]:  # Σᵢ τᵢᵀτᵢ/‖τᵢ‖² full rank on every input: the solve amplifies its weakest directions
        ranks = "+".join(str(t.A.shape[0]) for t in live)
        raise MethodError(
            f"wudi: the adapters' rows (ranks {ranks}) span all {Q.shape[0]} inputs of a module, where its closed form "
            "is ill-conditioned (the merged update can be many times the sum's norm; the paper's optimiser stops long "
            "before): use tsv or cat"
        )
    cores, at = [], 0
    for t in live:
        M = R[:, at : at + t.A.shape[0]].T  # Aᵢ = M·Qᵀ
        at += t.A.shape[0]
        B = t.B.double() * t.coef
        cores.append((M, (M.T @ (B.T @ B) @ M) / factor_inner(B, t.A, B, t.A)))
    total = sum(D for _, D in cores)
    B, A = _solved(live, [M @ D for M, D in cores], total)
    return truncated_factors(B, A @ Q.T, rule)
