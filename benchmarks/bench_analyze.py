"""`loramix analyze` in factor space against the dense route (explicit ΔW + torch.linalg.svd), in one run.

Ten rank-16 adapters on all 7 linear modules of each of 32 layers of Llama-7B shapes (q, k, v, o 4096×4096;
gate, up 11008×4096; down 4096×11008, out×in). loramix runs the full analysis — every adapter's spectra and
ranks, all 45 pairs per module, layer, module type and overall, and the merged sum's spectrum — from files and in
memory. The dense route forms each ΔW and takes its full SVD (float32, ``full_matrices=False``), then the pairwise
cosines from the dense matrices and φ from the dense singular vectors. A dense SVD of one 4096×4096 matrix takes
over a minute on a 2-core CPU, so the dense route is timed on one module of each shape (up to transposition) and
one pair, and its cost for a layer (10 adapters × 7 modules, 45 pairs × 7 modules) is added up from those.

    python benchmarks/bench_analyze.py [--adapters 10] [--layers 32] [--repeats 1] [--threads 1] [--skip-dense]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch
from bench_combine import MODULES, RANK, write_adapter
from machine import machine

from loramix import analyze, load_adapter

ALPHA = 32


def factors(seed: int, out: int, inp: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(out, RANK, generator=g) / RANK, torch.randn(RANK, inp, generator=g) / inp**0.5


def time_loramix(inputs: list[Path], repeats: int, threads: int) -> tuple[float, float, object]:
    """(files-to-analysis seconds, in-memory analysis seconds, analysis) — medians over ``repeats``."""
    total, compute = [], []
    for _ in range(repeats):
        start = time.perf_counter()
        loaded = [load_adapter(p) for p in inputs]
        loaded_at = time.perf_counter()
        result = analyze(loaded, threads=threads)
        total.append(time.perf_counter() - start)
        compute.append(time.perf_counter() - loaded_at)
    return statistics.median(total), statistics.median(compute), result


def dense_module(seed: int, out: int, inp: int):
    """Dense route for one adapter on one module: (seconds, ΔW, U, S, Vh)."""
    B, A = factors(seed, out, inp)
    start = time.perf_counter()
    delta = (ALPHA / RANK) * (B @ A)
    U, S, Vh = torch.linalg.svd(delta, full_matrices=False)
    return time.perf_counter() - start, delta, U[:, :RANK], S, Vh[:RANK]


def dense_pair(x, y) -> float:
    """Dense route for one pair on one module: cosine from ΔW, φ from the singular vectors."""
    start = time.perf_counter()
    cosine = (x[1] * y[1]).sum() / (x[1].norm() * y[1].norm())
    phi_out = (x[2].T @ y[2]).square().sum() / RANK
    phi_in = (x[4] @ y[4].T).square().sum() / RANK
    torch.stack([cosine, phi_out, phi_in]).tolist()
    return time.perf_counter() - start


def time_dense_layer() -> dict[tuple[int, int], tuple[float, float]]:
    """Per module shape: (one dense SVD's seconds, one pair's dense cosine + φ seconds).

    One SVD per shape up to transposition (down_proj's 4096×11008 costs what gate's 11008×4096 does); the pair is
    timed on that one result twice over, which costs what two different ones would.
    """
    timings = {}
    for shape in dict.fromkeys(MODULES.values()):
        if shape[::-1] in timings:
            timings[shape] = timings[shape[::-1]]
            continue
        result = dense_module(1, *shape)
        timings[shape] = (result[0], dense_pair(result, result))
    return timings


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--adapters", type=int, default=10)
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--threads", type=int, default=1, help="analyze(threads=...); the dense route uses torch's")
    parser.add_argument("--skip-dense", action="store_true")
    args = parser.parse_args()
    n = args.adapters
    with tempfile.TemporaryDirectory() as tmp:
        inputs = [Path(tmp) / f"a{i}" for i in range(n)]
        for i, folder in enumerate(inputs):
            write_adapter(folder, seed=i, alpha=ALPHA, layers=args.layers)
        load = "{:.1f} {:.1f} {:.1f}".format(*os.getloadavg())
        total, compute, result = time_loramix(inputs, args.repeats, args.threads)
    pairs, modules = n * (n - 1) // 2, len(MODULES) * args.layers
    print(f"machine: {machine('cpu')}")
    print(f"analyze on {args.threads} thread(s); load average before the run (1, 5, 15 min): {load}")
    print(f"{n} adapters, rank {RANK}, {args.layers} layers × {len(MODULES)} modules (Llama-7B shapes), {pairs} pairs")
    print(f"loramix analyze, files to result: {total:.2f} s; in memory: {compute:.2f} s")
    print(f"  ({len(result.pairs)} pairs × {len(result.pairs[0].modules)} modules; merge over {modules} modules)")
    if args.skip_dense:
        return
    timings = time_dense_layer()
    print(f"dense route on torch's {torch.get_num_threads()} thread(s); load average after: {os.getloadavg()[0]:.1f}")
    svd_layer = sum(n * timings[shape][0] for shape in MODULES.values())
    pair_layer = sum(pairs * timings[shape][1] for shape in MODULES.values())
    dense_layer = svd_layer + pair_layer
    ours_layer = compute / args.layers
    print("| step | loramix (factor space) | dense (ΔW + torch.linalg.svd) | dense / loramix |")
    print("|---|---|---|---|")
    for shape, (svd_s, pair_s) in timings.items():
        print(f"| dense SVD of one {shape[0]}×{shape[1]} ΔW (measured, or its transpose's) | | {svd_s:.1f} s | |")
        print(f"| dense cosine + φ of one pair, {shape[0]}×{shape[1]} (measured) | | {pair_s * 1e3:.0f} ms | |")
    print(
        f"| one layer: {n} adapters × {len(MODULES)} modules, {pairs} pairs | {ours_layer:.2f} s (whole run / "
        f"{args.layers}) | {dense_layer:.0f} s (sum of measured parts) | {dense_layer / ours_layer:,.0f}× |"
    )
    print(
        f"| whole model, {args.layers} layers | {compute:.1f} s (measured) | {dense_layer * args.layers / 3600:.1f} h "
        f"(extrapolated) | {dense_layer * args.layers / compute:,.0f}× |"
    )


if __name__ == "__main__":
    main()
