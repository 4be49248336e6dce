"""Module-subset search (`search_subset`): which modules, or layers, of each adapter to keep before a merge by any
method, chosen on a few examples.

Dropping adapter i's task vector in a module or layer — the base stays there for that task — and then merging with
any method is LwPTV's plug-in (Zhang et al. 2025, "Merging Smarter, Generalizing Better: Enhancing Model Merging on
OOD Data", arXiv:2506.09093: a binary mask per task and layer on the task vectors, applied before TIES, Task
Arithmetic and the rest). LwPTV sets the mask from a data-free saliency score; here the mask is searched on the
examples, as the layer choices of evolutionary merging are (Akiba et al. 2025, "Evolutionary Optimization of Model
Merging Recipes", Nature Machine Intelligence, arXiv:2403.13187), with `search`'s optimizers and objectives.

A candidate is θ ∈ [0, 1]ᵏ, one number per (adapter, group) — a group is one module the adapter targets
(``granularity="module"``) or the modules of one layer (``"layer"``; a module outside numbered layers is its own
group) — and drops the group where θ > 1/2. The search starts at θ = 1/4 (every module kept), so COBYLA's first
steps (+rhobeg = 1/2 on each number) are exactly "drop this one group alone". A mask is applied as weights: the
adapter's weight where kept, 0 where dropped (name filters, `loramix.schedule`), which every method reads as "this
adapter takes no part in this module" (a zero weight gives a zero term that no sign election, normalisation or
regression counts). Each mask is merged with ``method`` (`loramix.combine`) and the merged adapter scored on the
examples by `Evaluator` (a population's merges score in one batched forward pass); masks seen before are not merged
again. COBYLA and CMA-ES search θ directly; Adam moves drop probabilities θ by the score-function gradient of the
mean loss of ``popsize`` masks sampled from them (the merge is not differentiable in a mask). The result is the best
mask scored, never worse on the examples than keeping everything (scored first). For data methods (regmean, lot)
the input Gram matrices are collected once, with every module of every adapter kept.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import get_args

import numpy as np
import torch

from loramix.adapter import LoraAdapter
from loramix.combination import check_settings
from loramix.errors import SearchError
from loramix.formats import load_adapters
from loramix.linalg import RankRule
from loramix.runtime import progress_bar, resolve_device
from loramix.schedule import count_layers, layer_index, parse, varies
from loramix.settings import Granularity
from loramix.weight_search import optimizers
from loramix.weight_search.evaluator import Evaluator
from loramix.weight_search.grams import combine, input_grams
from loramix.weight_search.objective import as_examples, check_search, model_batch
from loramix.weight_search.run import SearchResult, load_base

log = logging.getLogger(__name__)

GRANULARITIES = get_args(Granularity)
START = 0.25  # every group kept; COBYLA's first step (+1/2) drops one group


@dataclass(frozen=True)
class Groups:
    """The searched choices: per adapter, its groups as (label, module names), adapter by adapter in θ."""

    adapters: list[list[tuple[str, list[str]]]]
    names: list[str]  # every module any adapter targets

    @classmethod
    def of(cls, adapters: list[LoraAdapter], granularity: str) -> Groups:
        grouped = []
        for a in adapters:
            groups: dict[str, list[str]] = {}
            for name in a.modules:
                layer = layer_index(name) if granularity == "layer" else None
                groups.setdefault(name if layer is None else f"layer {layer}", []).append(name)
            grouped.append(list(groups.items()))
        return cls(grouped, list(dict.fromkeys(n for a in adapters for n in a.modules)))

    @property
    def size(self) -> int:
        return sum(len(g) for g in self.adapters)

    def dropped(self, mask: np.ndarray) -> list[list[str]]:
        """Per adapter, the labels of the groups ``mask`` (k booleans, True = dropped) drops."""
        at, out = 0, []
        for groups in self.adapters:
            out.append([label for (label, _), drop in zip(groups, mask[at : at + len(groups)]) if drop])
            at += len(groups)
        return out

    def weights(self, mask: np.ndarray, weights: list[float]) -> list:
        """Each adapter's weight as a `loramix.schedule` form: its number where kept, 0 in every dropped module.

        Name filters match substrings, the first match winning: a module whose name contains a dropped one gets its
        own entry, longest names first, so that each module resolves to exactly its value."""
        layers = count_layers(self.names)
        forms = []
        for w, labels, groups in zip(weights, self.dropped(mask), self.adapters):
            off = {name for label, names in groups if label in labels for name in names}
            if not off:
                forms.append(w)
                continue
            filters = {name: 0.0 for name in off}
            plain = {**filters, "default": w}
            kept = {n: w for n in self.names if n not in off and parse(plain).at(n, layers) != w}
            # longest first, then by name: the same form (and recipe bytes) in every process, whatever set order
            ordered = sorted({**filters, **kept}.items(), key=lambda item: (-len(item[0]), item[0]))
            forms.append({**dict(ordered), "default": w})
        return forms


def search_subset(
    base,
    adapters: list,
    examples,
    *,
    method: str = "cat",
    granularity: str = "module",
    weights: list[float] | None = None,
    options: dict | None = None,
    rank_rule: RankRule | None = None,
    optimizer: str = "cobyla",
    objective: str = "cross-entropy",
    steps: int = 40,
    seed: int = 0,
    popsize: int | None = None,
    lr: float = 0.1,
    device: str = "auto",
    tokenizer=None,
    chat_template: bool = False,
    add_eos: bool = True,
    max_candidates: int | None = None,
    allow_different_bases: bool = False,
    allow_nonfinite: bool = False,
    load_options: dict | None = None,
    progress: bool = False,
) -> SearchResult:
    """Search which modules (``granularity="module"``) or layers (``"layer"``) of each of ``adapters`` to keep
    before merging them with ``method`` (any registered method, its ``options`` and ``rank_rule``, a `RankRule`
    whose settings `loramix.combine` takes), so that the merge fits
    ``examples`` best (see the module docstring). ``weights``: one number per adapter (default 1/n each, as
    `combine`); ``objective``, ``optimizer``, ``steps``, ``popsize``, ``lr``, ``seed``, ``max_candidates`` and the
    loading options as `search` takes them (COBYLA: merges scored; CMA-ES and Adam: generations of ``popsize``).

    Returns a `SearchResult` whose ``weights`` are the adapters' weights with the dropped modules at 0 (so that
    ``combine(adapters, weights=result.weights, method=method, ...)`` repeats the merge), ``adapter`` that merge, and
    ``settings["dropped"]`` the labels dropped per adapter (``settings["loss_keeping_all"]``: the objective with
    nothing dropped). ``loss`` and ``cross_entropy`` are both the objective of the mask found (no penalty)."""
    if granularity not in GRANULARITIES:
        raise SearchError(f"unknown granularity {granularity!r} (use {' or '.join(GRANULARITIES)})")
    check_search(objective, optimizer, steps)
    rule = RankRule.given(rank_rule)
    chosen = check_settings(method=method, options=dict(options or {}), rule=rule).method  # before loading
    loaded, numbers = load_adapters(
        adapters,
        weights=weights,
        allow_different_bases=allow_different_bases,
        allow_nonfinite=allow_nonfinite,
        load_options=load_options,
    )
    if any(varies(w) for w in numbers):
        raise SearchError("a module-subset search takes one number per adapter as its weight, not a varying form")
    numbers = [w.value for w in numbers]
    groups = Groups.of(loaded, granularity)
    source, examples = examples, as_examples(examples)
    target = resolve_device(device)
    model, tokenizer, encoder_decoder = load_base(base, device=[target], tokenizer=tokenizer)
    batch = model_batch(
        model, tokenizer, examples, encoder_decoder=encoder_decoder, chat_template=chat_template, add_eos=add_eos
    )
    named = str(getattr(model, "name_or_path", "")) if isinstance(base, torch.nn.Module) else str(base)
    options = dict(options or {})
    grams = None
    if chosen.data:  # the Grams once, every module kept; the recipe names the base and examples that gave them
        options.setdefault("base", named)
        if isinstance(source, (str, Path)):
            options.setdefault("examples", str(source))
        grams = input_grams(model, loaded, examples, device=str(target), tokenizer=tokenizer)
    merge = {"rank_rule": rule, **options, "device": str(target), "grams": grams}
    popsize = popsize or 4 + int(3 * math.log(groups.size))
    scores = _Scores(model, loaded, batch, groups, numbers, method, merge, encoder_decoder, objective, max_candidates)
    start = time.perf_counter()
    everything = np.zeros(groups.size, dtype=bool)
    keeping_all = float(scores(everything[None])[0])
    with progress_bar(enabled=progress, total=steps, desc=f"search subset ({optimizer})", unit="step") as bar:
        track = optimizers.Tracker(lambda W: scores(np.asarray(W) > 0.5), bar=bar)
        getattr(optimizers, optimizer)(
            track,
            np.full(groups.size, START),
            steps=steps,
            bounds=(0.0, 1.0),
            seed=seed,
            popsize=popsize,
            loss_and_grad=_score_function(scores, popsize, seed),
            lr=lr,
        )
    mask, loss = scores.best
    found = groups.weights(mask, numbers)
    adapter = combine(loaded, weights=found, method=method, **merge)
    seconds = time.perf_counter() - start
    log.info("search subset: loss %.4f (%.4f keeping all) after %d merges", loss, keeping_all, len(scores.seen))
    settings = {
        "base": named,
        "adapters": [a.source for a in loaded],
        "examples": len(examples),
        "subset": granularity,
        "method": method,
        "options": options,
        "rank_rule": {key: value for key, value in rule.keywords(conv=True).items() if value is not None},
        "objective": objective,
        "optimizer": optimizer,
        "steps": steps,
        "seed": seed,
        "device": str(target),
        "dropped": groups.dropped(mask),
        "loss_keeping_all": keeping_all,
        "merges": len(scores.seen),
    }
    if optimizer != "cobyla":
        settings["popsize"] = popsize
    if optimizer == "adam":
        settings["lr"] = lr
    return SearchResult(
        weights=found,
        loss=loss,
        cross_entropy=loss,
        history=track.history,
        evaluations=track.evaluations + 1,
        seconds=seconds,
        settings=settings,
        adapter=adapter,
    )


class _Scores:
    """The objective of drop masks (P×k booleans): each new mask merged and scored, each seen one remembered."""

    def __init__(self, model, adapters, batch, groups, weights, method, merge, encoder_decoder, objective, chunk):
        self.model, self.adapters, self.batch, self.groups, self.numbers = model, adapters, batch, groups, weights
        self.method, self.merge, self.objective, self.chunk = method, merge, objective, chunk
        self.encoder_decoder = encoder_decoder
        self.seen: dict[bytes, float] = {}
        self.best: tuple[np.ndarray, float] = (np.zeros(groups.size, dtype=bool), math.inf)

    def __call__(self, masks: np.ndarray) -> np.ndarray:
        masks = np.atleast_2d(masks).astype(bool)
        new = list({m.tobytes(): m for m in masks if m.tobytes() not in self.seen}.values())
        step = self.chunk or max(len(new), 1)
        for at in range(0, len(new), step):
            chunk = new[at : at + step]
            with _quiet(logging.getLogger("loramix.combination")):  # the merge written at the end says them once
                merged = [
                    combine(
                        self.adapters, weights=self.groups.weights(m, self.numbers), method=self.method, **self.merge
                    )
                    for m in chunk
                ]
            with Evaluator(
                self.model,
                merged,
                self.batch,
                composition="delta",
                encoder_decoder=self.encoder_decoder,
                objective=self.objective,
            ) as evaluator:
                losses = evaluator.cross_entropy(torch.eye(len(merged))).cpu().numpy()
            for m, loss in zip(chunk, losses):
                self.seen[m.tobytes()] = float(loss)
                if loss < self.best[1]:
                    self.best = (m.copy(), float(loss))
        return np.array([self.seen[m.tobytes()] for m in masks])


@contextlib.contextmanager
def _quiet(logger: logging.Logger) -> Iterator[None]:
    """Within the block, ``logger``'s warnings about each candidate merge (ranks, dense work) are not shown."""

    def keep(record: logging.LogRecord) -> bool:
        return record.levelno >= logging.ERROR

    logger.addFilter(keep)
    try:
        yield
    finally:
        logger.removeFilter(keep)


def _score_function(scores: _Scores, samples: int, seed: int):
    """Adam's loss and gradient at drop probabilities θ (1×k): the mean objective of ``samples`` masks drawn from
    them, with the score-function (REINFORCE) gradient Σₛ (Lₛ − L̄)·∇log p(maskₛ | θ) / (S − 1)."""
    rng = np.random.default_rng(seed)

    def loss_and_grad(W: torch.Tensor) -> torch.Tensor:
        p = W[0].clamp(0.02, 0.98)
        masks = rng.random((samples, p.numel())) < p.detach().double().numpy()
        losses = torch.as_tensor(scores(masks), dtype=torch.float32)
        drop = torch.as_tensor(masks, dtype=torch.float32)
        log_p = (drop * p.log() + (1 - drop) * (1 - p).log()).sum(dim=1)
        surrogate = ((losses - losses.mean()) * log_p).sum() / max(samples - 1, 1)
        return (losses.mean() + surrogate - surrogate.detach()).reshape(1)

    return loss_and_grad
