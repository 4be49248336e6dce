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
  Adaptive Knowledge Integration" — LOT Merging, NeurIPS 2025, arXiv:2505.23859v2): the task vector of least feature
  drift, T⋆ = argmin Σₖ ‖Xₖ(W₀ + T) − Xₖ(W₀ + Tₖ)‖²_F with Xₖ the module's inputs in expert k's model (§4, eq. 8),
  solved with the Moore–Penrose inverse, T⋆ = (Σₖ XₖᵀXₖ)† Σₖ XₖᵀXₖTₖ (§4.1, eq. 9, the paper's inputs-by-outputs
  orientation; here ΔW = λ·Σ wₖΔWₖGₖ (Σ wⱼGⱼ)⁺, weights 1 in the paper), then added to the base with a scaling factor λ
  (eq. 15: "λ = 1 already yields competitive performance", 1.2 for ViT-B/32 and 1.5 for ViT-L/14 in §6.3), the
  ``lambda`` option (default 1). Checked against the paper's text (§4–6); the authors' code (github.com/SunWenJu123/
  model-merging, named in the abstract page) could not be read here. Unlike RegMean's paper it neither shrinks the
  Grams' off-diagonals nor solves for the full weights (§5.2 argues against it): where the examples leave an input
  direction unseen (Σ Gⱼ singular, e.g. fewer tokens than inputs) the merged ΔW is zero along it, so the base weight
  stays there (the minimum-norm solution). The paper draws Xₖ from 16–64 exemplars of task k (§6.3); loramix's Gᵢ come
  from one ``--examples`` file run through each adapter's model, per token and normalised by the token count (equal for
  every adapter, so the normalisation cancels). In loramix's task-vector form this is ``regmean`` with ``alpha 1``
  scaled by λ. The paper's closed forms for normalisation layers and biases (eqs. 12, 14) have no LoRA counterpart.
  Same Grams as regmean; the solve is in×in: exact, not core space (Σ Gⱼ is not confined to the adapters' row spaces).
- wudi (Cheng et al. 2025, "Whoever Started the Interference Should End It", ICML 2025, arXiv:2503.08099): τ = argmin Σᵢ
  ‖(τ − τᵢ)·τᵢᵀ‖²_F / ‖τᵢ‖²_F with τᵢ = cᵢBᵢAᵢ (each task vector's rows stand in for its inputs; the paper's weights are
  1 each: pass ``-w 1,1,…``). By default (``solver adam``) loramix runs the authors' procedure: the merged τ, a free
  out×in matrix started at Σ τᵢ, moved by ``steps`` Adam steps (torch.optim.Adam's update with its default betas and
  eps, learning rate ``lr``, no weight decay; the gradient in closed form) on that loss — 300 steps at 1e-5 in the
  authors' code (nathanielyvo/WUDI-Merging, vit/interference.py ``get_redundant_task_vector`` and nlp_roberta/lamassu.py
  at commit dc3cd1204a68d1930a32da11c5cddb0cbd7410bb, whose RoBERTa script uses 2e-5; FusionBench's port,
  tanganke/fusion_bench fusion_bench/method/wudi/wudi.py at e41de5a29bba021a08cdcdd71d7d6de9a2bc4842, the same with
  1e-5). The loss is evaluated as ‖τ·Z − Y‖² with Z = [c₁A₁ᵀR₁ᵀ/‖τ₁‖ …] (Bᵢ = QᵢRᵢ, so Zᵢ·Zᵢᵀ = τᵢᵀτᵢ/‖τᵢ‖²) and Y =
  [τ₁Z₁ …]: the same value and gradient in out·in·Σrᵢ operations instead of the authors' out²·in per task. Adam's steps
  are element-wise (each entry moves at most lr·(1 − β₁)/√(1 − β₂) ≈ 3.2·``lr`` a step), so the result leaves the
  adapters' factor spans and is a dense ΔW cut by the rank rule (by default the smallest rank holding 99% of Σσ², as the
  other dense merges, whichever the solver); it stays within 3.2·steps·lr of the sum in every entry, so it cannot blow
  up where the closed form does. ``space core`` runs the same Adam on the cores of the joint factor bases
  (`task_space`): the loss is the same function there and has the same minimiser, but Adam is not rotation-invariant, so
  its 300 steps end elsewhere than the authors' (not exact; no out×in matrix). ``solver exact`` is the loss's minimiser
  in closed form, Nᵢ = Dᵢ = τᵢᵀτᵢ/‖τᵢ‖²_F above, on the R×R cores of the stacked A's (R = Σrᵢ), never forming an in×in
  or out×in matrix, exact in core space; it is refused on a module whose adapters' rows span all its inputs, where Σᵢ Dᵢ
  is ill-conditioned (8 rank-8 adapters on 64 inputs gave 162× the sum's norm). Adam has no random step (nothing to
  seed): the same inputs give the same merge on a device, the one the factors are on (`--device`).
"""

from __future__ import annotations

import math

from loramix.errors import MethodError
from loramix.lazy import lazy
from loramix.linalg import Factors, RankRule, factor_inner, orthonormal_bases, truncated_factors
from loramix.methods._elementwise import check_choice, check_number, split_weights, task_space
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
def lot(terms, *, rule: RankRule, base: str = "", examples: str | list = "", lambda_: float = 1.0) -> Factors:
    """LOT Merging: the ΔW of least feature drift from each adapter's on the examples (needs base and examples)."""
    return _regression("lot", terms, rule, 1.0, check_number("lambda", lambda_))


def _regression(name: str, terms, rule: RankRule, alpha: float, scale: float = 1.0) -> Factors:
    """ΔW = scale·Σ wᵢΔWᵢG̃ᵢ (Σ wⱼG̃ⱼ)⁺ with G̃ = alpha·G + (1 − alpha)·diag(G), as factors cut by ``rule``."""
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
    B, A = _solved(terms, [t.A.double() @ G for t, G in zip(terms, grams)], total)
    return truncated_factors(scale * B, A, rule)


@method(name="wudi", paper="Cheng et al. 2025, WUDI, ICML 2025, arXiv:2503.08099", truncates=True, dense=True)
def wudi(
    terms, *, rule: RankRule, solver: str = "adam", steps: int = 300, lr: float = 1e-5, space: str = "dense"
) -> Factors:
    """WUDI: the update that least disturbs each task on its own task vector's rows (the authors' Adam, or exact)."""
    check_choice("solver", solver, ("adam", "exact"))
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
        raise MethodError(f"steps must be a non-negative integer, got {steps!r}")
    lr = check_number("lr", lr, 0)
    live = [t for t in terms if t.coef != 0 and factor_inner(t.B, t.A, t.B, t.A) > 0]
    if not live:
        return Factors(terms[0].B.new_zeros(terms[0].B.shape[0], 1), terms[0].A.new_zeros(1, terms[0].A.shape[1]))
    if solver == "adam":
        return _wudi_adam(live, rule, steps, lr, space)
    ((Q, R),) = orthonormal_bases(torch.cat([t.A.double() for t in live], dim=0).T)  # stacked Aᵀ = Q·R
    if Q.shape[1] >= Q.shape[0]:  # Σᵢ τᵢᵀτᵢ/‖τᵢ‖² full rank on every input: the solve amplifies its weakest directions
        ranks = "+".join(str(t.A.shape[0]) for t in live)
        raise MethodError(
            f"wudi: the adapters' rows (ranks {ranks}) span all {Q.shape[0]} inputs of a module, where its closed form "
            "is ill-conditioned (the merged update can be many times the sum's norm): use solver adam (the default)"
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


def _wudi_adam(live, rule: RankRule, steps: int, lr: float, space: str) -> Factors:
    """The authors' Adam on Σᵢ ‖(τ − τᵢ)τᵢᵀ‖²/‖τᵢ‖² from τ = Σ τᵢ, as ‖τ·Z − Y‖² (see the module docstring)."""
    tasks, finish = task_space(live, [t.coef for t in live], space)
    if space == "dense":  # Zᵢ = cᵢ·Aᵢᵀ·Rᵢᵀ/‖τᵢ‖ (Bᵢ = QᵢRᵢ): Zᵢ·Zᵢᵀ = τᵢᵀτᵢ/‖τᵢ‖², in×rᵢ
        dtype = tasks[0].dtype
        Z = [t.coef * t.A.to(dtype).T @ torch.linalg.qr(t.B.to(dtype))[1].T for t in live]
    else:  # the cores themselves (R_B×R_A)
        Z = [task.T for task in tasks]
    Z = [z / task.norm() for z, task in zip(Z, tasks)]
    Y = torch.cat([task @ z for task, z in zip(tasks, Z)], dim=1)
    Z = torch.cat(Z, dim=1)
    merged, m, v = sum(tasks), torch.zeros_like(Y @ Z.T), torch.zeros_like(Y @ Z.T)
    for k in range(1, steps + 1):  # torch.optim.Adam's update (betas 0.9, 0.999; eps 1e-8), gradient 2(τZ − Y)Zᵀ
        grad = 2 * (merged @ Z - Y) @ Z.T
        m.mul_(0.9).add_(grad, alpha=0.1)
        v.mul_(0.999).addcmul_(grad, grad, value=0.001)
        merged = merged - lr / (1 - 0.9**k) * m / (v.sqrt() / math.sqrt(1 - 0.999**k) + 1e-8)
    return finish(merged, rule)
