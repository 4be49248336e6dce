"""Extraction benchmark: `loramix extract` against `mergekit-extract-lora` on the same base / fine-tuned pair.

Models: a Llama-3.2-1B-shaped base in bfloat16 with random weights (hidden 2048, intermediate 8192, 32 heads, 8 KV
heads, vocabulary 128256, tied embeddings; --layers of 16 by default: 1.24 B parameters, 2.5 GB; --shape 8b:
Llama-3-8B shapes, hidden 4096, intermediate 14336, untied head) and a fine-tuned copy with a planted update on
every linear module of the decoder layers: ΔW = L + N, L of rank --planted (singular
values spread over a decade, ‖L‖ = 5% of ‖W‖) and full-rank Gaussian noise N (‖N‖ = --noise × ‖L‖), stored in
bfloat16 (its rounding adds more full-rank noise), and a changed final norm. Both are generated on --device (a
GPU's random numbers differ from the CPU's) and written tensor by tensor in 1 GB shards into --workdir.

Contenders, each a fresh subprocess at the same --rank and --threads on the same --device, after a warm-up read of
both models into the page cache:
  loramix   python -m loramix extract BASE TUNED --rank R --device D --threads T -o OUT
  mergekit  python -m mergekit.scripts.extract_lora (= mergekit-extract-lora; found wherever mergekit is importable,
            as wheels installed with --target too) --base-model BASE --model TUNED --max-rank R --device D -j T
            -e embed_tokens -e lm_head --no-copy-tokenizer --out-path OUT (the embedding and its tied head are
            unchanged: excluded, so neither tool writes them)
loramix's phases: its extraction.json's ``seconds`` (read, compare, decompose) and ``read_wait_seconds``, and the
start-up of a process that imports torch and loramix and starts the device, timed apart. Each module's relative
reconstruction error ‖ΔW − ΔW_adapter‖_F/‖ΔW‖_F is then measured the same way for both
adapters (loramix.load_adapter reads both; ΔW from the stored bf16 tensors in float64), with the optimum (the
float64 truncated SVD) on the first layer. Peak RSS from wait4. Large files are deleted at the end unless --keep.

    python benchmarks/bench_extract.py [--shape 1b|8b] [--layers 16] [--rank 16] [--threads 2] [--device cpu]
        [--skip-mergekit]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch
from machine import machine
from safetensors import safe_open
from safetensors.torch import save_file

ROOT = Path(__file__).resolve().parents[1]
LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
SHARD_BYTES = 1 << 30


def _config(shape: str, layers: int) -> dict:
    sys.path.insert(0, str(ROOT / "tests"))
    from helpers import LLAMA32_1B

    sizes = {**LLAMA32_1B, "num_hidden_layers": layers}
    if shape == "8b":  # Llama-3-8B: hidden 4096, MLP 14336, untied head
        sizes |= {"hidden_size": 4096, "intermediate_size": 14336, "tie_word_embeddings": False}
    return sizes


def _shapes(shape: str, layers: int) -> dict[str, tuple[int, ...]]:
    sys.path.insert(0, str(ROOT / "tests"))
    from helpers import random_model

    model = random_model("llama", device="meta", **_config(shape, layers))
    tied = model.config.tie_word_embeddings
    return {n: tuple(p.shape) for n, p in model.named_parameters() if not (tied and n == "lm_head.weight")}


def _weight(name: str, shape, index: int, device: str) -> torch.Tensor:
    if name.endswith("norm.weight"):
        return torch.ones(shape, device=device)
    generator = torch.Generator(device).manual_seed(index)
    return torch.randn(shape, generator=generator, device=device).mul_(0.02)


def _update(weight: torch.Tensor, index: int, planted: int, noise: float) -> torch.Tensor:
    device = weight.device
    generator = torch.Generator(device).manual_seed(10_000 + index)
    out, inp = weight.shape
    spread = torch.logspace(0, -1, planted, device=device)
    low = torch.randn(out, planted, generator=generator, device=device) * spread
    low = low @ torch.randn(planted, inp, generator=generator, device=device)
    low.mul_(0.05 * weight.norm() / low.norm())
    full = torch.randn(out, inp, generator=generator, device=device)
    return low.add_(full.mul_(noise * low.norm() / full.norm()))


def _write(folder: Path, tensors, sizes: dict) -> None:
    """Tensors (name → bf16 tensor, produced one by one) into ~1 GB safetensors shards with an index and config."""
    from transformers import AutoConfig

    folder.mkdir(parents=True)
    config = AutoConfig.for_model("llama", **sizes)
    config.architectures = ["LlamaForCausalLM"]
    config.dtype = "bfloat16"
    config.save_pretrained(folder)
    shard, size, files, weight_map = {}, 0, [], {}

    def flush():
        nonlocal shard, size
        name = f"model-{len(files) + 1:05d}.safetensors"
        save_file(shard, str(folder / name), metadata={"format": "pt"})
        files.append(name)
        weight_map.update(dict.fromkeys(shard, name))
        shard, size = {}, 0

    for key, tensor in tensors:
        if size and size + tensor.numel() * 2 > SHARD_BYTES:
            flush()
        shard[key] = tensor
        size += tensor.numel() * 2
    flush()
    index = {"metadata": {"total_size": sum((folder / f).stat().st_size for f in files)}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))


def build(work: Path, shape: str, layers: int, planted: int, noise: float, device: str) -> tuple[Path, Path]:
    """The base and fine-tuned pair, generated on ``device`` (random numbers depend on it: a GPU's differ from the
    CPU's, so a pair is compared only with itself)."""
    base, tuned = work / "base", work / "tuned"
    shapes, sizes = _shapes(shape, layers), _config(shape, layers)
    if not (base / "model.safetensors.index.json").exists():
        print("building the base ...", file=sys.stderr)
        made = ((n, _weight(n, s, i, device).bfloat16().cpu()) for i, (n, s) in enumerate(shapes.items()))
        _write(base, made, sizes)

    def tuned_tensors():
        for i, (name, shape) in enumerate(shapes.items()):
            weight = _weight(name, shape, i, device)
            if name.rsplit(".", 2)[-2] in LINEAR:
                weight += _update(weight, i, planted, noise)
            elif name == "model.norm.weight":
                weight *= 1.1
            yield name, weight.bfloat16().cpu()

    if not (tuned / "model.safetensors.index.json").exists():
        print("building the fine-tuned copy ...", file=sys.stderr)
        _write(tuned, tuned_tensors(), sizes)
    return base, tuned


def _run(command: list[str]) -> tuple[float, float, float]:
    """(wall seconds, CPU seconds (user + system), peak RSS in GB) of a child process. On a shared machine the CPU
    time is the steadier measure: the wall time also counts the time other jobs held the cores."""
    start = time.perf_counter()
    process = subprocess.Popen(
        command,
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])},
    )
    _, status, usage = os.wait4(process.pid, 0)
    seconds = time.perf_counter() - start
    if status:
        raise SystemExit(f"{command[0]} … failed with status {status}")
    return seconds, usage.ru_utime + usage.ru_stime, usage.ru_maxrss / 1e6


def _errors(base: Path, tuned: Path, adapter: Path, device: str) -> dict[str, float]:
    """Relative error of each module's ΔW as the adapter stores it (float64, on ``device``)."""
    sys.path.insert(0, str(ROOT))  # this checkout's loramix, installed or not
    from loramix import load_adapter

    loaded = load_adapter(adapter, log_warnings=False)
    index = json.loads((base / "model.safetensors.index.json").read_text())["weight_map"]
    errors = {}
    for name, module in loaded.modules.items():
        key = f"{name}.weight"
        with safe_open(str(base / index[key]), "pt") as b, safe_open(str(tuned / index[key]), "pt") as t:
            delta = t.get_tensor(key).to(device, torch.float64) - b.get_tensor(key).to(device, torch.float64)
        errors[name] = float((delta - module.delta(dtype=torch.float64, device=device)).norm() / delta.norm())
    return errors


def _optimum(base: Path, tuned: Path, names: list[str], rank: int, device: str) -> dict[str, float]:
    index = json.loads((base / "model.safetensors.index.json").read_text())["weight_map"]
    best = {}
    for name in names:
        key = f"{name}.weight"
        with safe_open(str(base / index[key]), "pt") as b, safe_open(str(tuned / index[key]), "pt") as t:
            delta = t.get_tensor(key).to(device, torch.float64) - b.get_tensor(key).to(device, torch.float64)
        S = torch.linalg.svdvals(delta)
        best[name] = float(S[rank:].square().sum().sqrt() / S.square().sum().sqrt())
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=["1b", "8b"], default="1b", help="Llama-3.2-1B or Llama-3-8B shapes")
    parser.add_argument("--layers", type=int, default=16)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--planted", type=int, default=16)
    parser.add_argument("--noise", type=float, default=0.2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/loramix-bench-extract"))
    parser.add_argument("--skip-mergekit", action="store_true")
    parser.add_argument("--keep", action="store_true", help="Keep the generated models and outputs.")
    args = parser.parse_args()
    base, tuned = build(args.workdir, args.shape, args.layers, args.planted, args.noise, args.device)
    size = sum(f.stat().st_size for f in base.glob("*.safetensors")) / 1e9
    subprocess.run(["cat", *map(str, [*base.glob("*"), *tuned.glob("*")])], stdout=subprocess.DEVNULL, check=True)
    outputs = {name: args.workdir / f"out-{name}" for name in ("loramix", "mergekit")}
    for folder in outputs.values():
        shutil.rmtree(folder, ignore_errors=True)
    print(f"uptime before: {subprocess.run(['uptime'], capture_output=True, text=True).stdout.strip()}")
    loramix_cmd = [sys.executable, "-m", "loramix", "-q", "extract", str(base), str(tuned), "--rank", str(args.rank)]
    loramix_cmd += ["--device", args.device, "--threads", str(args.threads), "-o", str(outputs["loramix"])]
    runs = {"loramix": _run(loramix_cmd)}
    print(f"loramix: {runs['loramix'][0]:.1f} s", file=sys.stderr)
    report = json.loads((outputs["loramix"] / "extraction.json").read_text())
    warm = f"import torch, loramix.extraction, loramix.pipeline; torch.zeros(1, device={args.device!r})"
    startup = _run([sys.executable, "-c", warm])[0]
    if not args.skip_mergekit:
        mergekit = [sys.executable, "-m", "mergekit.scripts.extract_lora", "--base-model", str(base)]
        mergekit += ["--model", str(tuned), "--max-rank", str(args.rank), "--device", args.device, "--quiet"]
        mergekit += ["-j", str(args.threads), "-e", "embed_tokens", "-e", "lm_head", "--no-copy-tokenizer"]
        runs["mergekit"] = _run([*mergekit, "--out-path", str(outputs["mergekit"])])
    print(f"uptime after: {subprocess.run(['uptime'], capture_output=True, text=True).stdout.strip()}")
    print({name: [round(x, 1) for x in run] for name, run in runs.items()}, "(wall s, CPU s, peak RSS GB)", flush=True)
    torch.set_num_threads(1)  # float64 checks on a shared 2-core machine: two threads contend badly
    errors = {name: _errors(base, tuned, outputs[name], args.device) for name in runs}
    first = [n for n in errors["loramix"] if ".layers.0." in n]
    best = _optimum(base, tuned, first, args.rank, args.device)
    print(
        f"\nmachine: {machine(args.device)}; {args.shape} shapes, {args.layers} layers, {size:.2f} GB bf16, "
        f"rank {args.rank}"
    )
    print("\n| tool | wall time | CPU time | peak RSS |\n|---|---|---|---|")
    for name, (seconds, cpu, rss) in runs.items():
        print(f"| {name} | {seconds:.1f} s | {cpu:.1f} s | {rss:.2f} GB |")
    rest = runs["loramix"][0] - startup - report["seconds"]
    print(
        f"\nloramix phases: start-up {startup:.1f} s (a process that imports torch and loramix and starts the "
        f"device); extraction {report['seconds']:.1f} s (read, compare, decompose), of which "
        f"{report['read_wait_seconds']:.1f} s waiting for reads; the rest {rest:.1f} s (plan, writing the adapter "
        "and card, exit)"
    )
    if "mergekit" in runs:
        wall, cpu = (runs["mergekit"][i] / runs["loramix"][i] for i in (0, 1))
        print(f"\nmergekit / loramix: wall time {wall:.1f}×, CPU time {cpu:.1f}×")
    header = " | ".join(f"{n} max | {n} median" for n in runs)
    print(f"\n| module | {header} |\n|---|" + "---|" * (2 * len(runs)))
    for kind in LINEAR:
        cells = []
        for name in runs:
            values = sorted(v for k, v in errors[name].items() if k.endswith(kind))
            cells += [f"{values[-1]:.6f}", f"{values[len(values) // 2]:.6f}"]
        print(f"| {kind} | " + " | ".join(cells) + " |")
    print("\nlayer 0, relative error per module (optimum: float64 truncated SVD of the stored ΔW):\n")
    print("| module | optimum | " + " | ".join(runs) + " |\n|---|---|" + "---|" * len(runs))
    for name in first:
        print(f"| {name} | {best[name]:.6f} | " + " | ".join(f"{errors[n][name]:.6f}" for n in runs) + " |")
    worse = max(errors["loramix"][n] - errors["mergekit"][n] for n in errors["loramix"]) if "mergekit" in runs else 0
    print(f"\nlargest (loramix − mergekit) error over all modules: {worse:+.2e}")
    if not args.keep:
        shutil.rmtree(args.workdir)


if __name__ == "__main__":
    main()
