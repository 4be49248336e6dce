"""Merged-checkpoint benchmark: loramix.merge_into_base against PEFT and against a plain `cp -r` of the base.

Base: a Llama-3.2-1B-shaped model in bfloat16 with random weights (hidden 2048, 16 layers, intermediate 8192,
32 heads, 8 KV heads, vocabulary 128256, tied embeddings; ~2.5 GB in 500 MB shards). Adapter: rank 8 on q_proj and
v_proj, made by PEFT (init_lora_weights=False). Both are built once into --workdir and reused.

Contenders, each a fresh subprocess writing a fresh output folder:
  loramix  merge_into_base(adapter, base, out, shard_size="500MB", device=...)
  peft     AutoModelForCausalLM.from_pretrained(base, dtype=bfloat16) → PeftModel.from_pretrained → merge_and_unload
           → save_pretrained(out, max_shard_size="500MB")
  cp       cp -r base out
The page cache cannot be dropped here, so every contender runs once to warm up and is then measured (--repeat
times, best wall time kept): all read the base from the page cache. Peak RSS is the child's ru_maxrss (wait4 in a
lean launcher). The Python contenders also report how long their imports took and how long the work after them.

    python benchmarks/bench_merge.py [--device cpu|cuda] [--workdir DIR] [--repeat N]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def build_inputs(work: Path) -> tuple[Path, Path]:
    """The bf16 base (random weights, 500 MB shards) and the PEFT q/v adapter, built once."""
    import torch
    from transformers import LlamaForCausalLM

    sys.path.insert(0, str(ROOT / "tests"))
    from helpers import LLAMA32_1B, random_model

    base, adapter = work / "base", work / "adapter"
    if not (base / "model.safetensors.index.json").exists():
        print("building the base (random weights) ...", file=sys.stderr)
        model = random_model("llama", device="meta", dtype="bfloat16", **LLAMA32_1B)
        model = model.to_empty(device="cpu").to(torch.bfloat16)
        gen = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for name, param in model.named_parameters():
                if name.endswith("norm.weight"):
                    param.fill_(1.0)
                else:
                    param.copy_(torch.randn(param.shape, generator=gen, dtype=torch.float32).mul_(0.02))
        model.tie_weights()
        model.save_pretrained(str(base), max_shard_size="500MB")
        del model
    if not (adapter / "adapter_config.json").exists():
        print("building the adapter with PEFT ...", file=sys.stderr)
        from peft import LoraConfig, get_peft_model

        model = LlamaForCausalLM.from_pretrained(str(base), dtype=torch.bfloat16)
        torch.manual_seed(1)
        lora = LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
        peft_model = get_peft_model(model, lora)
        peft_model.save_pretrained(str(adapter))
        del model, peft_model
    return base, adapter


LORAMIX = """
import sys, time
start = time.perf_counter()
from loramix import merge_into_base
ready = time.perf_counter()
merge_into_base(sys.argv[1], sys.argv[2], sys.argv[3], shard_size="500MB", device=sys.argv[4], progress=False)
open(sys.argv[5], "w").write(f"{ready - start} {time.perf_counter() - ready}")
"""

PEFT = """
import sys, time
start = time.perf_counter()
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM
ready = time.perf_counter()
extra = {} if sys.argv[4] == "cpu" else {"device_map": sys.argv[4]}
model = AutoModelForCausalLM.from_pretrained(sys.argv[2], dtype=torch.bfloat16, **extra)
merged = PeftModel.from_pretrained(model, sys.argv[1]).merge_and_unload()
merged.save_pretrained(sys.argv[3], max_shard_size="500MB")
open(sys.argv[5], "w").write(f"{ready - start} {time.perf_counter() - ready}")
"""

# A lean launcher (python -S, nothing imported) forks the command and reads its rusage: ru_maxrss of a forked child
# counts the parent's pages at fork time, so measuring from this (torch-importing) script would inflate every figure.
LAUNCH = """
import os, sys, time
start = time.perf_counter()
pid = os.fork()
if pid == 0:
    os.execvp(sys.argv[1], sys.argv[1:])
_, status, usage = os.wait4(pid, 0)
print(time.perf_counter() - start, usage.ru_maxrss, os.waitstatus_to_exitcode(status))
"""


def measure(cmd: list[str], out: Path, timing: Path) -> dict:
    """Wall seconds, peak RSS (MB) and, for Python contenders, import and work seconds of one run of ``cmd``."""
    shutil.rmtree(out, ignore_errors=True)
    timing.unlink(missing_ok=True)
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    line = subprocess.run([sys.executable, "-S", "-c", LAUNCH, *cmd], env=env, capture_output=True, text=True)
    wall, rss_kb, code = line.stdout.split()
    if int(code) != 0:
        raise SystemExit(f"{cmd[:3]} failed with exit code {code}: {line.stderr[-2000:]}")
    result = {"wall": float(wall), "rss": int(rss_kb) / 1024}  # ru_maxrss is in KiB on Linux
    if timing.exists():
        result["import"], result["work"] = (float(x) for x in timing.read_text().split())
    return result


def check_outputs(work: Path, base: Path) -> str:
    """Max |loramix − PEFT| on one merged q_proj, in bf16 ulps of the value (both round W+ΔW to bf16)."""
    import torch
    from safetensors import safe_open

    def read(folder: Path, key: str) -> torch.Tensor:
        index = json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"]
        with safe_open(str(folder / index[key]), "pt") as f:
            return f.get_tensor(key).float()

    key = "model.layers.3.self_attn.q_proj.weight"
    ours, peft, w = read(work / "out-loramix", key), read(work / "out-peft", key), read(base, key)
    ulp = torch.exp2(torch.floor(torch.log2(peft.abs().clamp_min(1e-30))) - 7)
    changed = {name: float((t != w).float().mean()) for name, t in (("loramix", ours), ("PEFT", peft))}
    return (
        f"{key}: max |loramix − PEFT| = {float(((ours - peft).abs() / ulp).max()):.0f} bf16 ulp; "
        f"share of entries changed vs base: loramix {changed['loramix']:.3f}, PEFT {changed['PEFT']:.3f}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", help="cpu or cuda (for loramix's ΔW and PEFT's model)")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/loramix-bench-merge"))
    parser.add_argument("--repeat", type=int, default=1, help="measured runs per contender (after one warm-up)")
    args = parser.parse_args()
    work = args.workdir
    work.mkdir(parents=True, exist_ok=True)
    base, adapter = build_inputs(work)
    size = sum(p.stat().st_size for p in base.glob("*.safetensors"))
    py = sys.executable
    timing = work / "timing.txt"
    contenders = {
        "loramix": [py, "-c", LORAMIX, str(adapter), str(base), str(work / "out-loramix"), args.device, str(timing)],
        "peft": [py, "-c", PEFT, str(adapter), str(base), str(work / "out-peft"), args.device, str(timing)],
        "cp -r": ["cp", "-r", str(base), str(work / "out-cp")],
    }
    outs = {"loramix": "out-loramix", "peft": "out-peft", "cp -r": "out-cp"}
    results = {}
    load_before = os.getloadavg()[0]
    for name, cmd in contenders.items():
        measure(cmd, work / outs[name], timing)  # warm-up: the base is in the page cache for every measured run
        runs = [measure(cmd, work / outs[name], timing) for _ in range(args.repeat)]
        best = min(runs, key=lambda r: r["wall"])
        results[name] = {**best, "rss": max(r["rss"] for r in runs)}
        print(f"{name}: {results[name]}", file=sys.stderr)
    print(f"\nbase: {size / 1e9:.2f} GB in {len(list(base.glob('*.safetensors')))} shards; adapter r=8 q_proj,v_proj")
    print(f"machine: {cpu_name()}, {os.cpu_count()} CPUs, {platform.system()} {platform.release()}")
    print(f"device: {args.device}; best of {args.repeat} run(s) after one warm-up run each")
    print(f"load average (1 min): {load_before:.2f} before, {os.getloadavg()[0]:.2f} after (a shared machine)")
    print("\n| contender | wall s | imports s | work s | peak RSS MB |\n|---|---|---|---|---|")
    for name, r in results.items():
        imports, work_s = (f"{r[k]:.2f}" if k in r else "–" for k in ("import", "work"))
        print(f"| {name} | {r['wall']:.2f} | {imports} | {work_s} | {r['rss']:.0f} |")
    lm, pf, cp = results["loramix"], results["peft"], results["cp -r"]
    print(
        f"\nloramix vs PEFT: {pf['wall'] / lm['wall']:.2f}× faster end to end (goal ≥ 1.5), "
        f"{pf['work'] / lm['work']:.2f}× after imports; peak RSS {lm['rss'] / pf['rss']:.0%} of PEFT's (goal ≤ 25%)"
    )
    print(
        f"loramix vs cp -r: {lm['wall'] / cp['wall']:.2f}× cp's time end to end (goal ≤ 1.3), "
        f"{lm['work'] / cp['wall']:.2f}× after imports (Python start and `import torch` take {lm['import']:.2f} s)"
    )
    print(check_outputs(work, base))


def cpu_name() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        return next(line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name"))
    except (OSError, subprocess.CalledProcessError, StopIteration):
        return platform.processor() or "unknown CPU"


if __name__ == "__main__":
    main()
