"""Interference-aware and subspace merges: per-task retention on a multi-task benchmark, and dense vs core time.

retention — a tiny random-init MLP base (64→128→128→16, GELU) and T synthetic regression tasks. Task t's inputs
lie mostly in a shared 8-dim subspace plus its own 8-dim subspace (x = S·z + Pₜ·zₜ + 0.1·ε) and its targets come
from a teacher: the base with a random rank-4 update on every layer, plus noise (5% of the target sd). One LoRA
per task (r=8, alpha=16 on fc1/fc2/fc3) is trained with PEFT (Adam, 300 steps), so each task's own adapter is the
reference. For every method a uniform weight λ (and density — select_topk for SCE — for the pruning methods) is
chosen on a validation split, as the papers tune their scaling coefficient (nuslerp, multislerp and karcher
normalise their weights, so λ does nothing there; della divides by the weights it elects, so λ is its ``lambda``
option; slerp and nuslerp take two tasks only); the table reports test-split retention
    retentionₜ = (L_base,t − L_merged,t) / (L_base,t − L_own,t)   (1 = as good as the task's own adapter,
                                                                 0 = no better than the base),
its mean and its minimum over tasks, at T = 2, 4, 8 and two rank budgets: "full" (the method's default) and r=8
(the merged adapter no larger than one input).

timing — three rank-16 adapters on Llama-7B-shaped modules (q_proj 4096×4096, up_proj 11008×4096,
down_proj 4096×11008); ties at rank 16 dense (ΔW formed and SVD'd per module, PEFT's ties_svd route) against ties
in core space, plus the factor-form methods, each on the same modules.

    python benchmarks/bench_methods.py retention [--tasks 2 4 8] [--methods cat svd ...]
    python benchmarks/bench_methods.py timing [--modules q_proj up_proj down_proj]
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import tempfile
import time
from pathlib import Path

import torch
from machine import machine
from torch import nn

from loramix import LoraAdapter, LoraModule, RankRule, combine, load_adapter

D_IN, HIDDEN, D_OUT = 64, 128, 16
SHARED_DIM, TASK_DIM, TRUE_RANK = 8, 8, 4
LORA_R, LORA_ALPHA, STEPS = 8, 16, 300
LAYERS = ("fc1", "fc2", "fc3")
LAMBDAS = (0.2, 0.35, 0.5, 0.7, 1.0, 1.4, 2.0)
DENSITIES = (0.2, 0.5, 0.8)
METHODS = {  # name: (loramix method, fixed options, option tuned over DENSITIES or None, most tasks it takes)
    "cat": ("cat", {}, None, None),
    "svd": ("svd", {}, None, None),
    "ties": ("ties", {}, "density", None),
    "ties·core": ("ties", {"space": "core"}, "density", None),
    "dare_ties": ("dare_ties", {"seed": 0}, "density", None),
    "tsv": ("tsv", {}, None, None),
    "iso_c": ("iso_c", {}, None, None),
    "iso_cts": ("iso_cts", {}, None, None),
    "knots": ("knots", {}, "density", None),
    "breadcrumbs": ("breadcrumbs", {}, "density", None),
    "breadcrumbs_ties": ("breadcrumbs_ties", {}, "density", None),
    "della": ("della", {"seed": 0}, "density", None),
    "della_linear": ("della_linear", {"seed": 0}, "density", None),
    "sce": ("sce", {}, "select_topk", None),
    "slerp": ("slerp", {}, None, 2),
    "nuslerp": ("nuslerp", {}, None, 2),
    "multislerp": ("multislerp", {}, None, None),
    "karcher": ("karcher", {}, None, None),
    "model_stock": ("model_stock", {}, None, None),
    "star": ("star", {}, None, None),
    "compressed_sum": ("compressed_sum", {}, None, None),
    "wudi": ("wudi", {}, None, None),
}
# methods that divide by the weights they elect (normalize): λ goes in as their `lambda` option, weights stay 1
SCALED_BY_LAMBDA = {"della"}


# ----------------------------------------------------------------------------------------------- retention


class MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2, self.fc3 = nn.Linear(D_IN, HIDDEN), nn.Linear(HIDDEN, HIDDEN), nn.Linear(HIDDEN, D_OUT)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc3(nn.functional.gelu(self.fc2(nn.functional.gelu(self.fc1(x)))))


def orthonormal(rows: int, cols: int, g: torch.Generator) -> torch.Tensor:
    return torch.linalg.qr(torch.randn(rows, cols, generator=g))[0]


class Task:
    """Inputs in a shared plus a task-specific subspace; targets from the base with a low-rank update, plus noise."""

    def __init__(self, base: MLP, shared: torch.Tensor, index: int) -> None:
        g = torch.Generator().manual_seed(1000 + index)
        self.basis = orthonormal(D_IN, TASK_DIM, g)
        self.shared = shared
        # the task's rule reads mostly its own input features and partly the shared ones, through fc1
        W = base.fc1.weight.detach()
        reads = (
            torch.randn(TRUE_RANK, TASK_DIM, generator=g) @ self.basis.T
            + 0.5 * torch.randn(TRUE_RANK, SHARED_DIM, generator=g) @ shared.T
        )
        update = torch.randn(W.shape[0], TRUE_RANK, generator=g) @ reads
        self.teacher = {"fc1.weight": W + 1.5 * update * W.norm() / update.norm()}
        self.g = g
        self.splits = {split: self.sample(base, n) for split, n in (("train", 4096), ("val", 1024), ("test", 2048))}

    def sample(self, base: MLP, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        x = (
            self.shared @ torch.randn(SHARED_DIM, n, generator=self.g)
            + self.basis @ torch.randn(TASK_DIM, n, generator=self.g)
            + 0.1 * torch.randn(D_IN, n, generator=self.g)
        ).T
        with torch.no_grad():
            y = torch.func.functional_call(base, self.teacher, (x,))
        return x, y + 0.05 * y.std() * torch.randn(y.shape, generator=self.g)


def train_lora(base: MLP, task: Task, folder: Path, seed: int) -> LoraAdapter:
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matmuls: threads only contend
    model = get_peft_model(
        _copy(base),
        LoraConfig(r=LORA_R, lora_alpha=LORA_ALPHA, target_modules=list(LAYERS)),
    )
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=5e-3)
    x, y = task.splits["train"]
    g = torch.Generator().manual_seed(seed)
    for _ in range(STEPS):
        idx = torch.randint(0, x.shape[0], (256,), generator=g)
        loss = nn.functional.mse_loss(model(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    torch.set_num_threads(threads)
    model.save_pretrained(str(folder))
    adapter = load_adapter(folder, log_warnings=False)
    adapter.base_model = "synthetic/mlp-64-128-16"  # a plain nn.Module has no Hub id; one shared name for all
    return adapter


def _copy(base: MLP) -> MLP:
    clone = MLP()
    clone.load_state_dict(base.state_dict())
    return clone


def task_loss(base: MLP, adapter: LoraAdapter | None, task: Task, split: str) -> float:
    params = {k: v.detach() for k, v in base.named_parameters()}
    if adapter is not None:
        for name, module in adapter.modules.items():
            params[f"{name}.weight"] = params[f"{name}.weight"] + module.delta()
    x, y = task.splits[split]
    with torch.no_grad():
        return float(nn.functional.mse_loss(torch.func.functional_call(base, params, (x,)), y))


def retention(base, merged, tasks, own_losses, base_losses, split) -> list[float]:
    return [
        (base_losses[i][split] - task_loss(base, merged, t, split)) / (base_losses[i][split] - own_losses[i][split])
        for i, t in enumerate(tasks)
    ]


def run_retention(task_counts: list[int], methods: list[str]) -> None:
    torch.manual_seed(0)
    base = MLP().eval()
    shared = orthonormal(D_IN, SHARED_DIM, torch.Generator().manual_seed(7))
    n_max = max(task_counts)
    t0 = time.perf_counter()
    tasks = [Task(base, shared, i) for i in range(n_max)]
    with tempfile.TemporaryDirectory() as tmp:
        adapters = [train_lora(base, t, Path(tmp) / f"task{i}", seed=i) for i, t in enumerate(tasks)]
    train_s = time.perf_counter() - t0
    base_losses = [{s: task_loss(base, None, t, s) for s in ("val", "test")} for t in tasks]
    own_losses = [{s: task_loss(base, a, t, s) for s in ("val", "test")} for a, t in zip(adapters, tasks)]
    own_gain = statistics.mean(1 - o["test"] / b["test"] for o, b in zip(own_losses, base_losses))
    print(f"machine: {machine()}")
    print(f"{n_max} LoRAs trained with PEFT in {train_s:.0f} s; own adapters cut test loss by {100 * own_gain:.0f}%\n")
    print("| tasks | method | budget | λ | density | mean retention | min retention | merge s |")
    print("|---:|---|---|---:|---:|---:|---:|---:|")
    for n, (label, (method, fixed, tuned, most)) in itertools.product(task_counts, METHODS.items()):
        if label not in methods or (most is not None and n > most):
            continue
        chosen = adapters[:n]
        budgets = {"full": None} if method == "cat" else {"full": None, f"r={LORA_R}": LORA_R}
        for budget, rank in budgets.items():
            best = None
            for lam, density in itertools.product(LAMBDAS, DENSITIES if tuned else (None,)):
                options = dict(fixed, **({tuned: density} if density else {}))
                weight = 1.0 if label in SCALED_BY_LAMBDA else lam
                options.update({"lambda": lam} if label in SCALED_BY_LAMBDA else {})
                t = time.perf_counter()
                merged = combine(chosen, weights=[weight] * n, method=method, rank_rule=RankRule(rank=rank), **options)
                seconds = time.perf_counter() - t
                score = statistics.mean(retention(base, merged, tasks[:n], own_losses, base_losses, "val"))
                if best is None or score > best[0]:
                    best = (score, lam, density, merged, seconds)
            _, lam, density, merged, seconds = best
            test = retention(base, merged, tasks[:n], own_losses, base_losses, "test")
            print(
                f"| {n} | {label} | {budget} | {lam:g} | {density if density else '–'} | "
                f"{statistics.mean(test):.3f} | {min(test):.3f} | {seconds:.3f} |",
                flush=True,
            )


# ----------------------------------------------------------------------------------------------- timing

SHAPES = {"q_proj": (4096, 4096), "up_proj": (11008, 4096), "down_proj": (4096, 11008)}


def llama_adapters(names: list[str], n: int = 3, rank: int = 16) -> list[LoraAdapter]:
    out = []
    for i in range(n):
        g = torch.Generator().manual_seed(i)
        modules = {}
        for name in names:
            rows, cols = SHAPES[name]
            A = torch.randn(rank, cols, generator=g) / cols**0.5
            B = torch.randn(rows, rank, generator=g) / rank
            modules[f"model.layers.0.{name}"] = LoraModule(A=A, B=B, scale=2.0 / (i + 1))
        out.append(LoraAdapter(modules=modules, base_model="meta-llama/Llama-2-7b-hf", name=f"a{i}"))
    return out


def run_timing(names: list[str], repeats: int) -> None:
    print(f"machine: {machine()}")
    print("three rank-16 adapters; result rank 16; seconds per module (median of the repeats), ΔW never kept\n")
    print("| module | shape | ties dense | ties core | dense / core | tsv | iso_c | iso_cts | knots | svd |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for name in names:
        adapters = llama_adapters([name])
        runs = {
            "ties dense": ("ties", {"density": 0.2, "space": "dense"}, 1),
            "ties core": ("ties", {"density": 0.2, "space": "core"}, repeats),
            "tsv": ("tsv", {}, repeats),
            "iso_c": ("iso_c", {}, repeats),
            "iso_cts": ("iso_cts", {}, repeats),
            "knots": ("knots", {}, repeats),
            "svd": ("svd", {}, repeats),
        }
        seconds = {}
        for label, (method, options, count) in runs.items():
            times = []
            for _ in range(count):
                t = time.perf_counter()
                combine(adapters, weights=[0.5, 0.3, 0.2], method=method, rank_rule=RankRule(rank=16), **options)
                times.append(time.perf_counter() - t)
            seconds[label] = statistics.median(times)
        shape = "×".join(map(str, SHAPES[name]))
        ratio = seconds["ties dense"] / seconds["ties core"]
        cells = " | ".join(f"{seconds[k]:.3f}" for k in ("tsv", "iso_c", "iso_cts", "knots", "svd"))
        print(
            f"| {name} | {shape} | {seconds['ties dense']:.1f} | {seconds['ties core']:.3f} | {ratio:.0f}× | {cells} |",
            flush=True,
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="part", required=True)
    r = sub.add_parser("retention")
    r.add_argument("--tasks", type=int, nargs="+", default=[2, 4, 8])
    r.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    t = sub.add_parser("timing")
    t.add_argument("--modules", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    t.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    if args.part == "retention":
        run_retention(args.tasks, args.methods)
    else:
        run_timing(args.modules, args.repeats)


if __name__ == "__main__":
    main()
