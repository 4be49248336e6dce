"""LoRAHub-style search (`search`): the adapter weights whose combination fits a few examples of a new task best.

`search` loads the base once (frozen; bf16 on a GPU, float32 on the CPU), scores candidates through a batched
low-rank evaluator (`loramix.weight_search.evaluator`), minimises the few-shot loss plus ``l1·mean|wᵢ|`` with
COBYLA, CMA-ES or Adam, and returns a `SearchResult` whose ``adapter`` is the searched combination as a `LoraAdapter`:
``lorahub`` → LoRAHub's own A/B mixing written with exactly the searched factors (scale 1), ``delta`` →
`loramix.combine` with method ``cat`` (the exact Σ wᵢ·sᵢ·Bᵢ·Aᵢ).
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from loramix.adapter import LoraAdapter
from loramix.combination import check_settings, combine_loaded
from loramix.errors import MissingPackageError, SearchError
from loramix.formats import load_adapters
from loramix.io.base import resolve_base
from loramix.runtime import progress_bar, resolve_device
from loramix.schedule import Constant, Schedule, parse
from loramix.settings import COMPOSITIONS
from loramix.weight_search import distributed, optimizers
from loramix.weight_search.evaluator import Evaluator
from loramix.weight_search.objective import as_examples, check_search, l1_penalty, model_batch

log = logging.getLogger(__name__)


@dataclass
class SearchResult:
    """The searched weights (in the adapters' order, each in the form of its init: a number, a gradient, filters, …),
    the final objective and its parts, and the combined adapter."""

    weights: list
    loss: float
    cross_entropy: float
    history: list[float]
    evaluations: int
    seconds: float
    settings: dict
    adapter: LoraAdapter = field(repr=False)

    def to_json(self) -> dict:
        out = asdict(self)
        del out["adapter"]
        return out


def _split_memory(devices: list[torch.device]) -> dict[int, int]:
    """The free memory of each GPU a base is split over (accelerate's ``max_memory``); needs accelerate."""
    try:
        import accelerate  # noqa: F401 — transformers' device_map and dispatch_model run on it
    except ImportError:
        raise MissingPackageError("splitting the base over GPUs needs accelerate (pip install accelerate)") from None
    return {d.index: torch.cuda.mem_get_info(d)[0] for d in devices}


def _split_over(model: torch.nn.Module, devices: list[torch.device]) -> torch.nn.Module:
    """``model`` dispatched by accelerate over ``devices``: whole blocks per GPU, balanced, the activations handed
    from GPU to GPU by accelerate's hooks (a pipeline over the layers: one GPU busy at a time)."""
    from accelerate import dispatch_model, infer_auto_device_map
    from accelerate.utils import get_balanced_memory

    memory = _split_memory(devices)
    blocks = getattr(model, "_no_split_modules", None) or []
    balanced = get_balanced_memory(model, max_memory=memory, no_split_module_classes=blocks)
    return dispatch_model(
        model, device_map=infer_auto_device_map(model, max_memory=balanced, no_split_module_classes=blocks)
    )


def load_base(base, *, device: torch.device | list[torch.device], tokenizer=None):
    """(model, tokenizer, encoder_decoder) for a folder or Hub id (causal LM or seq2seq), or a model object.

    ``device`` may be several GPUs: the base is then split over them with accelerate (``device_map``, whole
    decoder blocks per GPU). A model object that accelerate already dispatched (``hf_device_map``) stays where it is.
    """
    import transformers

    devices = device if isinstance(device, list) else [device]
    device = devices[0]
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    if isinstance(base, torch.nn.Module):
        model = base
        if tokenizer is None:
            raise SearchError("a base model object needs its tokenizer (tokenizer=...)")
    else:
        folder = resolve_base(base)
        try:
            config = transformers.AutoConfig.from_pretrained(str(folder))
        except (OSError, ValueError) as exc:
            raise SearchError(f"{base}: not a transformers model ({str(exc).splitlines()[0]})") from None
        auto = (
            transformers.AutoModelForSeq2SeqLM
            if getattr(config, "is_encoder_decoder", False)
            else transformers.AutoModelForCausalLM
        )
        if tokenizer is None:
            try:
                tokenizer = transformers.AutoTokenizer.from_pretrained(str(folder))
            except (OSError, ValueError, TypeError) as exc:
                detail = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
                raise SearchError(f"{base}: no usable tokenizer beside the model ({detail[:200]})") from None
        split = {} if len(devices) == 1 else {"device_map": "balanced", "max_memory": _split_memory(devices)}
        try:
            # use_kernels=False: transformers' own layers, never kernels fetched from the Hub at run time (offline
            # machines, and one set of numerics for every candidate)
            model = auto.from_pretrained(str(folder), dtype=dtype, use_kernels=False, **split)
        except (OSError, ValueError) as exc:
            raise SearchError(f"{base}: cannot load as {auto.__name__} ({str(exc).splitlines()[0]})") from None
    if isinstance(tokenizer, (str, Path)):
        tokenizer = transformers.AutoTokenizer.from_pretrained(str(tokenizer))
    if getattr(model, "hf_device_map", None) is None:
        model = model.to(dtype=dtype)  # on the CPU first when split: accelerate moves each block once
        model = _split_over(model, devices) if len(devices) > 1 else model.to(device=device)
    placed = set(getattr(model, "hf_device_map", {}).values())
    if len(devices) > 1 and not placed <= {d.index for d in devices}:
        raise SearchError(f"{base}: the base does not fit in the free memory of {', '.join(map(str, devices))}")
    model = model.eval().requires_grad_(False)
    return model, tokenizer, bool(getattr(model.config, "is_encoder_decoder", False))


def _initial(init, count: int) -> list[Schedule]:
    """Each adapter's starting weight in its form (`loramix.schedule.parse`; default 0 each)."""
    if init is None:
        return [Constant(0.0)] * count
    if len(init) != count:
        raise SearchError(f"init has {len(init)} value(s) for {count} adapter(s)")
    return [parse(w, what=f"init {i + 1}") for i, w in enumerate(init)]


def search(
    base,
    adapters: list,
    examples,
    *,
    composition: str = "lorahub",
    optimizer: str = "cobyla",
    objective: str = "cross-entropy",
    steps: int = 40,
    l1: float = 0.05,
    bounds: tuple[float, float] = (-1.5, 1.5),
    seed: int = 0,
    device: str = "auto",
    init: list | None = None,
    tokenizer=None,
    chat_template: bool = False,
    add_eos: bool = True,
    popsize: int | None = None,
    lr: float = 0.1,
    max_candidates: int | None = None,
    allow_different_bases: bool = False,
    allow_nonfinite: bool = False,
    load_options: dict | None = None,
    progress: bool = False,
    gpus: int | None = None,
    gpus_per_base: int = 1,
) -> SearchResult:
    """Search the weights of ``adapters`` (paths, Hub ids or `LoraAdapter`s) for ``examples`` (a JSONL path or a list
    of ``{"input", "output"}``) on ``base`` (a folder or Hub id with its tokenizer, or a model with ``tokenizer=``).

    Starts at ``init``: one weight per adapter (default 0, LoRAHub's), each a number or a form that varies by layer
    or module (a gradient ``[0, 1]``, name filters ``{"q_proj": 0.5, "default": 0}``, ``{"lbw": [...]}``; see
    `loramix.schedule`). The search runs over θ, the numbers those forms hold (one per number: a gradient of k values
    gives k; ``lbw``'s ``ratio`` stays fixed), every module's weights being linear in θ; ``bounds`` apply to each
    number, and the result's ``weights`` are the init's forms holding the numbers found. The objective is the mean
    output-token cross-entropy (input tokens masked) plus ``l1·mean|θⱼ|``, over the numbers (the weights themselves
    when all are numbers); ``objective="entropy"`` (AdaMerging's, unlabeled) puts the mean entropy of the predicted
    next-token distribution at those positions in the cross-entropy's place (the result's ``cross_entropy`` then
    holds it). ``steps``: COBYLA evaluations, CMA-ES generations (``popsize`` candidates each, one
    forward pass), or Adam steps (``lr``). Adam with the lorahub composition adds seeded N(0, 0.1²) jitter to the
    start, since 0 is a stationary point there. ``max_candidates`` caps the candidates per forward pass.
    Adapters are loaded as by `combine` (``allow_different_bases``, ``allow_nonfinite``, ``load_options``).

    Across GPUs: ``device="cuda:0,cuda:1"`` splits the base over those GPUs (accelerate's device_map, one process).
    ``gpus=N`` starts N/``gpus_per_base`` processes on this machine (N CPU processes where there is no GPU), each
    with its own copy of the base on ``gpus_per_base`` GPUs, and splits every population among them (see
    `loramix.weight_search.distributed`); called inside a process group, the search splits it among the group's
    ranks; in a process torchrun started (give no ``gpus``), it joins torchrun's group as its rank for the search,
    on its local GPU(s) — the CLI and the API alike. Either way the result equals one process's with
    ``max_candidates = ⌈P/processes⌉``.
    """
    options = {
        "composition": composition,
        "optimizer": optimizer,
        "objective": objective,
        "steps": steps,
        "l1": l1,
        "bounds": bounds,
        "seed": seed,
        "device": device,
        "init": init,
        "tokenizer": tokenizer,
        "chat_template": chat_template,
        "add_eos": add_eos,
        "popsize": popsize,
        "lr": lr,
        "max_candidates": max_candidates,
        "allow_different_bases": allow_different_bases,
        "allow_nonfinite": allow_nonfinite,
        "load_options": load_options,
        "progress": progress,
    }
    place = distributed.torchrun_rank()  # (rank, local rank, world) when torchrun started this process
    if place is not None and distributed.rank_and_world()[1] == 1:  # no process group yet: one rank of torchrun's
        if gpus is not None:
            raise SearchError("under torchrun give no `gpus`: each process torchrun starts is one rank")
        rank, local_rank, world = place
        options["device"] = distributed.rank_devices(device, local_rank, gpus_per_base)
        with distributed.process_group(options["device"], rank=rank, world=world):
            return _search(base, adapters, examples, **{**options, "progress": progress and rank == 0})
    if gpus is not None or gpus_per_base != 1:  # gpus_per_base=K alone: one process, its base on K GPUs
        gpus = gpus if gpus is not None else gpus_per_base
        return _search_processes(base, adapters, examples, gpus=gpus, gpus_per_base=gpus_per_base, options=options)
    return _search(base, adapters, examples, **options)


def _search(
    base,
    adapters: list,
    examples,
    *,
    composition: str,
    optimizer: str,
    objective: str,
    steps: int,
    l1: float,
    bounds: tuple[float, float],
    seed: int,
    device: str,
    init: list | None,
    tokenizer,
    chat_template: bool,
    add_eos: bool,
    popsize: int | None,
    lr: float,
    max_candidates: int | None,
    allow_different_bases: bool,
    allow_nonfinite: bool,
    load_options: dict | None,
    progress: bool,
) -> SearchResult:
    """`search` in this process (or in this rank of a process group)."""
    if composition not in COMPOSITIONS:
        raise SearchError(f"unknown composition {composition!r} (use {' or '.join(COMPOSITIONS)})")
    check_search(objective, optimizer, steps)
    lo, hi = (float(b) for b in bounds)
    if not lo < hi:
        raise SearchError(f"bounds must be LOW,HIGH with LOW < HIGH, got {lo},{hi}")
    loaded, _ = load_adapters(
        adapters,
        allow_different_bases=allow_different_bases,
        allow_nonfinite=allow_nonfinite,
        load_options=load_options,
    )
    forms = _initial(init, len(loaded))
    x0 = np.asarray([v for f in forms for v in f.numbers], dtype=np.float64)  # θ: the numbers the forms hold
    examples = as_examples(examples)
    targets = [resolve_device(d) for d in str(device).split(",")]
    if len(targets) > 1 and any(t.type != "cuda" for t in targets):
        raise SearchError(f"device {device!r}: a base is split only over GPUs (cuda:0,cuda:1,…)")
    target = targets[0]
    model, tokenizer, encoder_decoder = load_base(base, device=targets, tokenizer=tokenizer)
    _, processes = distributed.rank_and_world()
    batch = model_batch(
        model, tokenizer, examples, encoder_decoder=encoder_decoder, chat_template=chat_template, add_eos=add_eos
    )
    settings = {
        "base": str(getattr(model, "name_or_path", "")) if isinstance(base, torch.nn.Module) else str(base),
        "adapters": [a.source for a in loaded],
        "examples": len(examples),
        "output_tokens": int((batch["labels"] != -100).sum()),
        "composition": composition,
        "objective": objective,
        "optimizer": optimizer,
        "steps": steps,
        "l1": l1,
        "bounds": [lo, hi],
        "seed": seed,
        "init": [f.data() for f in forms],
        "device": ",".join(map(str, targets)),
        "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
        "chat_template": chat_template,
    }
    if optimizer == "cma":
        settings["popsize"] = popsize or 4 + int(3 * math.log(x0.size))
    if optimizer == "adam":
        settings["lr"] = lr
    if processes > 1:
        settings["processes"] = processes
    start = time.perf_counter()
    with Evaluator(
        model,
        loaded,
        batch,
        composition=composition,
        encoder_decoder=encoder_decoder,
        max_candidates=max_candidates,
        forms=forms,
        objective=objective,
    ) as evaluator:

        def objective(W: np.ndarray) -> np.ndarray:
            Wt = torch.as_tensor(W, dtype=torch.float32)
            losses = distributed.scatter_gather(Wt, evaluator.cross_entropy, evaluator.device)
            return (losses + l1_penalty(Wt, l1)).numpy()

        def loss_and_grad(W: torch.Tensor) -> torch.Tensor:  # one candidate: every rank computes it alike
            return evaluator.cross_entropy(W).cpu() + l1_penalty(W, l1)

        with progress_bar(enabled=progress, total=steps, desc=f"search ({optimizer})", unit="step") as bar:
            track = optimizers.Tracker(objective, bar=bar)
            getattr(optimizers, optimizer)(
                track,
                x0,
                steps=steps,
                bounds=(lo, hi),
                seed=seed,
                popsize=popsize,
                loss_and_grad=loss_and_grad,
                lr=lr,
                jitter=0.1 if composition == "lorahub" else 0.0,
            )
        theta = [float(w) for w in track.best]
        cross_entropy = float(evaluator.cross_entropy([theta])[0])
    starts = np.cumsum([0] + [len(f.numbers) for f in forms])
    found = [f.with_numbers(theta[a:b]) for f, a, b in zip(forms, starts[:-1], starts[1:])]
    seconds = time.perf_counter() - start
    # the searched composition as an adapter: cat is the weighted sum of ΔWs, lorahub LoRAHub's factor mixing
    method = "lorahub" if composition == "lorahub" else "cat"
    checked = check_settings(method=method, options={}, device=str(target))
    adapter = combine_loaded(loaded, found, checked)
    log.info("search: loss %.4f after %d evaluations in %.1f s", track.best_loss, track.evaluations, seconds)
    return SearchResult(
        weights=[f.data() for f in found],
        loss=cross_entropy + l1 * float(np.mean(np.abs(theta))),
        cross_entropy=cross_entropy,
        history=track.history,
        evaluations=track.evaluations,
        seconds=seconds,
        settings=settings,
        adapter=adapter,
    )


def _search_processes(base, adapters, examples, *, gpus: int, gpus_per_base: int, options: dict) -> SearchResult:
    """`search` over ``gpus`` GPUs (or CPU processes): gpus/gpus_per_base processes, or this one alone."""
    if gpus < 1 or gpus_per_base < 1 or gpus % gpus_per_base:
        raise SearchError(f"gpus ({gpus}) must be a positive multiple of gpus_per_base ({gpus_per_base})")
    if distributed.rank_and_world()[1] > 1:
        raise SearchError("already in a process group (torchrun): give no gpus, each rank is one process")
    world = gpus // gpus_per_base
    devices = [distributed.rank_devices(options["device"], rank, gpus_per_base) for rank in range(world)]
    if world == 1:
        return _search(base, adapters, examples, **{**options, "device": devices[0]})
    if isinstance(base, torch.nn.Module):
        raise SearchError("across processes the base must be a folder or Hub id: each process loads its own copy")
    return distributed.launch(_search_rank, devices, base, adapters, examples, options)


def _search_rank(device: str, base, adapters, examples, options: dict) -> SearchResult:
    """One process of `_search_processes` (started by `distributed.launch`): only rank 0 shows progress, and no
    rank transformers' per-tensor loading bar (this process is ours to configure)."""
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()
    progress = options["progress"] and distributed.rank_and_world()[0] == 0
    return _search(base, adapters, examples, **{**options, "device": device, "progress": progress})
