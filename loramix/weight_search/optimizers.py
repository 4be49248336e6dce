"""Optimizers over the adapter weights: COBYLA (what LoRAHub's NGOpt runs), a small seeded CMA-ES, and Adam.

Each takes ``objective(W) -> losses`` scoring a P×n array of candidates at once (a `Tracker` wraps it to keep the
best point, the history and the progress bar) and a budget of ``steps``: COBYLA function evaluations, CMA-ES
generations (each one batched forward pass), Adam gradient steps.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
from tqdm.auto import tqdm


@dataclass
class Tracker:
    """Counts evaluations, keeps the best candidate and a best-so-far history (one entry per step)."""

    objective: Callable[[np.ndarray], np.ndarray]
    bar: tqdm | None = None
    evaluations: int = 0
    best_loss: float = math.inf
    best: np.ndarray | None = None
    history: list[float] = field(default_factory=list)

    def record(self, W: np.ndarray, losses: np.ndarray) -> None:
        self.evaluations += len(W)
        i = int(np.argmin(losses))
        if losses[i] < self.best_loss:
            self.best_loss, self.best = float(losses[i]), np.array(W[i], dtype=np.float64)

    def step(self) -> None:
        self.history.append(self.best_loss)
        if self.bar is not None:
            self.bar.update()
            self.bar.set_postfix(best=f"{self.best_loss:.4f}", evals=self.evaluations)

    def __call__(self, W: np.ndarray) -> np.ndarray:
        W = np.atleast_2d(np.asarray(W, dtype=np.float64))
        losses = np.asarray(self.objective(W), dtype=np.float64)
        self.record(W, losses)
        return losses


class _Budget(Exception):
    pass


def cobyla(track: Tracker, x0: np.ndarray, *, steps: int, bounds: tuple[float, float], rhobeg: float = 0.5, **_):
    """scipy's COBYLA from x0 within the box, one candidate per evaluation, at most ``steps`` evaluations."""
    from scipy.optimize import Bounds, minimize

    lo, hi = bounds

    def f(x: np.ndarray) -> float:
        if track.evaluations >= steps:
            raise _Budget
        loss = float(track(np.clip(x, lo, hi))[0])
        track.step()
        return loss

    try:
        minimize(
            f,
            np.asarray(x0, dtype=np.float64),
            method="COBYLA",
            bounds=Bounds(np.full(len(x0), lo), np.full(len(x0), hi)),
            options={"maxiter": max(steps, len(x0) + 2), "rhobeg": min(rhobeg, (hi - lo) / 2)},
        )
    except _Budget:
        pass


def cma(
    track: Tracker,
    x0: np.ndarray,
    *,
    steps: int,
    bounds: tuple[float, float],
    seed: int,
    popsize: int | None = None,
    sigma: float | None = None,
    **_,
):
    """(μ/μ_w, λ)-CMA-ES (Hansen's tutorial defaults): one generation = one batched evaluation; samples are clipped
    to the box (and the clipped steps used in the update)."""
    rng = np.random.default_rng(seed)
    lo, hi = bounds
    n = len(x0)
    lam = popsize or 4 + int(3 * math.log(n))
    mu = lam // 2
    w = math.log(mu + 0.5) - np.log(np.arange(1, mu + 1))
    w /= w.sum()
    mueff = 1 / np.sum(w**2)
    cc, cs = (4 + mueff / n) / (n + 4 + 2 * mueff / n), (mueff + 2) / (n + mueff + 5)
    c1 = 2 / ((n + 1.3) ** 2 + mueff)
    cmu = min(1 - c1, 2 * (mueff - 2 + 1 / mueff) / ((n + 2) ** 2 + mueff))
    damps = 1 + 2 * max(0, math.sqrt((mueff - 1) / (n + 1)) - 1) + cs
    chi = math.sqrt(n) * (1 - 1 / (4 * n) + 1 / (21 * n * n))
    mean, sig = np.asarray(x0, dtype=np.float64).copy(), sigma or (hi - lo) / 6
    C, pc, ps = np.eye(n), np.zeros(n), np.zeros(n)
    for gen in range(steps):
        vals, vecs = np.linalg.eigh((C + C.T) / 2)
        D = np.sqrt(np.maximum(vals, 1e-20))
        z = rng.standard_normal((lam, n))
        X = np.clip(mean + sig * (z * D) @ vecs.T, lo, hi)
        Y = (X - mean) / sig
        order = np.argsort(track(X), kind="stable")[:mu]
        track.step()
        yw = w @ Y[order]
        mean = mean + sig * yw
        inv_sqrt = vecs @ np.diag(1 / D) @ vecs.T
        ps = (1 - cs) * ps + math.sqrt(cs * (2 - cs) * mueff) * inv_sqrt @ yw
        hsig = np.linalg.norm(ps) / math.sqrt(1 - (1 - cs) ** (2 * (gen + 1))) / chi < 1.4 + 2 / (n + 1)
        pc = (1 - cc) * pc + hsig * math.sqrt(cc * (2 - cc) * mueff) * yw
        rank_mu = (Y[order].T * w) @ Y[order]
        C = (1 - c1 - cmu) * C + c1 * (np.outer(pc, pc) + (1 - hsig) * cc * (2 - cc) * C) + cmu * rank_mu
        sig *= math.exp((cs / damps) * (np.linalg.norm(ps) / chi - 1))


def adam(
    track: Tracker,
    x0: np.ndarray,
    *,
    steps: int,
    bounds: tuple[float, float],
    seed: int,
    loss_and_grad: Callable[[torch.Tensor], torch.Tensor],
    lr: float = 0.1,
    jitter: float = 0.0,
    **_,
):
    """Adam on the weights with gradients through the forward pass, projected onto the box after each step.

    ``jitter`` adds seeded N(0, jitter²) noise to x0: the lorahub composition is quadratic in w, so w = 0 is a
    stationary point from which no gradient moves."""
    lo, hi = bounds
    rng = np.random.default_rng(seed)
    start = np.clip(np.asarray(x0, dtype=np.float64) + jitter * rng.standard_normal(len(x0)), lo, hi)
    w = torch.tensor(start, dtype=torch.float32, requires_grad=True)
    opt = torch.optim.Adam([w], lr=lr)
    for _ in range(steps):
        opt.zero_grad()
        loss = loss_and_grad(w.unsqueeze(0))[0]
        loss.backward()
        track.record(w.detach().numpy()[None].astype(np.float64), np.array([loss.item()]))
        track.step()
        opt.step()
        with torch.no_grad():
            w.clamp_(lo, hi)
