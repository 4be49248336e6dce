"""Merged-checkpoint benchmark: `loramix combine --merge-into` against `cp -r` of the base and against PEFT's
merge_and_unload + save_pretrained, in one run, on the same base and adapter.

Bases (bfloat16, random weights, written once by this script straight as safetensors, no model in memory):
  8b  Llama-3-8B shapes: hidden 4096, 32 layers, intermediate 14336, 32 heads, 8 KV heads, vocabulary 128256,
      untied head; 16.06 GB, sharded as the real checkpoint is (~5 GB shards: 4 files)
  1b  Llama-3.2-1B shapes: hidden 2048, 16 layers, intermediate 8192, 32 heads, 8 KV heads, vocabulary 128256, tied
      embeddings; 2.47 GB in one model.safetensors, as the real checkpoint
  small  hidden 1024, 4 layers, intermediate 2816, vocabulary 32000 (a quick check on a CPU)
  qwen3moe  Qwen3-30B-A3B shapes: hidden 2048, 48 layers (--layers: fewer), 128 experts per layer stored one by one
      (gate/up 768×2048, down 2048×768), router mlp.gate, 32 heads of 128, 4 KV heads, q/k norms, vocabulary 151936,
      untied head; 1.25 GB per layer (16 layers: 21.2 GB, ~6,300 tensors); the adapter is on q/k/v/o only, so nearly
      every byte is an expert's, copied unchanged
  tinymoe  the same layout, tiny (a CPU check)
Adapter: rank 16, alpha 32 on all seven linear modules of every layer (PEFT's config, random factors in float32).
With --fp8 the base is block FP8 instead, as DeepSeek-V3 and Qwen3-FP8 ship it: the seven linear weights of every
layer in float8_e4m3fn (random valid codes) with a float32 weight_scale_inv per 128×128 block, quantization_config
{"quant_method": "fp8", "weight_block_size": [128, 128]}, the rest bf16 (8b: 9.08 GB). loramix then writes the same
format, the merged weights re-quantized with fresh scales; PEFT is not run (transformers loads block FP8 dequantized
on a CPU and as FP8Linear on a GPU, neither of which merge_and_unload writes back as FP8).

Contenders, each a fresh process writing a fresh output folder (deleted once measured: disk is short):
  cp       cp -r BASE OUT
  loramix  python -m loramix -q combine ADAPTER --method cat --merge-into BASE -o OUT [--device D] (the CLI, end to end)
  peft     AutoModelForCausalLM.from_pretrained(BASE, dtype=bfloat16, use_kernels=False: no Hub kernels offline)
           → PeftModel.from_pretrained → merge_and_unload
           → save_pretrained(OUT); under a hard address-space cap (prlimit --as, --peft-cap) so that it cannot take a
           shared machine down: when it does not fit, the row says it failed and why
Wall time is the command's, process start included; `sync` runs after each (timed apart: the dirty pages it leaves).
loramix runs with -v, and its "merge phases" line gives the phases: start-up (process start to the first merged
tensor's work: Python, torch, the adapter, the plan), the copy of untouched tensors (when it started and ended; the
CLI starts it before importing torch), the merged modules, and the end (index, config, card, rename). Peak RSS is the
child's ru_maxrss (wait4 from a lean launcher). The load average is printed before and after (a shared machine).

  loramix ×N  with --processes N: the same command under `torchrun --standalone --nproc-per-node N` (the merge split
           over N processes by shard, `loramix.merge.processes`)

    python benchmarks/bench_merge.py --shape 8b|1b|small|qwen3moe|tinymoe [--layers N|auto] [--fp8] [--device cpu|cuda]
        [--workdir DIR] [--repeat N] [--processes N]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import struct
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHAPES = {
    "8b": {"hidden": 4096, "layers": 32, "inter": 14336, "heads": 32, "kv": 8, "vocab": 128256, "tied": False},
    "1b": {"hidden": 2048, "layers": 16, "inter": 8192, "heads": 32, "kv": 8, "vocab": 128256, "tied": True},
    "small": {"hidden": 1024, "layers": 4, "inter": 2816, "heads": 16, "kv": 4, "vocab": 32000, "tied": False},
    # Qwen3-30B-A3B: 48 layers of 128 experts (8 routed per token), head_dim 128, q/k norms, router `mlp.gate`
    "qwen3moe": {
        "hidden": 2048,
        "layers": 48,
        "inter": 768,
        "heads": 32,
        "kv": 4,
        "head_dim": 128,
        "experts": 128,
        "vocab": 151936,
        "tied": False,
    },
    "tinymoe": {  # the same layout at a size a CPU test takes
        "hidden": 64,
        "layers": 2,
        "inter": 32,
        "heads": 4,
        "kv": 2,
        "head_dim": 16,
        "experts": 8,
        "vocab": 256,
        "tied": False,
    },
}
ATTENTION = ["q_proj", "k_proj", "v_proj", "o_proj"]  # the MoE adapter's targets (experts are copied)
MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
SHARD = 5 * 10**9


def linear_shapes(s: dict) -> dict[str, tuple[int, int]]:
    """(out, in) of each linear module of one layer the adapter targets (a MoE: attention only)."""
    head = s.get("head_dim", s["hidden"] // s["heads"])
    kv = head * s["kv"]
    h, i = s["hidden"], s["inter"]
    if "experts" in s:
        return {
            "self_attn.q_proj": (head * s["heads"], h),
            "self_attn.k_proj": (kv, h),
            "self_attn.v_proj": (kv, h),
            "self_attn.o_proj": (h, head * s["heads"]),
        }
    return {
        "self_attn.q_proj": (h, h),
        "self_attn.k_proj": (kv, h),
        "self_attn.v_proj": (kv, h),
        "self_attn.o_proj": (h, h),
        "mlp.gate_proj": (i, h),
        "mlp.up_proj": (i, h),
        "mlp.down_proj": (h, i),
    }


def base_tensors(s: dict) -> list[tuple[str, tuple[int, ...]]]:
    """Names and shapes in the order transformers saves a Llama (per layer: sorted names)."""
    out = [("model.embed_tokens.weight", (s["vocab"], s["hidden"]))]
    for n in range(s["layers"]):
        layer = {f"model.layers.{n}.{k}.weight": v for k, v in linear_shapes(s).items()}
        for e in range(s.get("experts", 0)):  # stored per expert, as the Hub checkpoints are
            for part, shape in (("gate_proj", (s["inter"], s["hidden"])), ("up_proj", (s["inter"], s["hidden"]))):
                layer[f"model.layers.{n}.mlp.experts.{e}.{part}.weight"] = shape
            layer[f"model.layers.{n}.mlp.experts.{e}.down_proj.weight"] = (s["hidden"], s["inter"])
        if "experts" in s:
            layer[f"model.layers.{n}.mlp.gate.weight"] = (s["experts"], s["hidden"])
            layer[f"model.layers.{n}.self_attn.q_norm.weight"] = (s["head_dim"],)
            layer[f"model.layers.{n}.self_attn.k_norm.weight"] = (s["head_dim"],)
        layer[f"model.layers.{n}.input_layernorm.weight"] = (s["hidden"],)
        layer[f"model.layers.{n}.post_attention_layernorm.weight"] = (s["hidden"],)
        out += sorted(layer.items())
    out.append(("model.norm.weight", (s["hidden"],)))
    if not s["tied"]:
        out.append(("lm_head.weight", (s["vocab"], s["hidden"])))
    return out


ITEMSIZE = {"BF16": 2, "F8_E4M3": 1, "F32": 4}
FP8_BLOCK = 128


def fp8_layout(tensors: list[tuple[str, tuple[int, ...]]]) -> list[tuple[str, tuple[int, ...], str]]:
    """(name, shape, dtype) of the block-FP8 base: each linear weight in F8_E4M3 followed by its F32 scale grid."""
    out = []
    for name, shape in tensors:
        if name.rsplit(".", 2)[-2] in MODULES:
            grid = tuple(-(-d // FP8_BLOCK) for d in shape)
            out += [(name, shape, "F8_E4M3"), (name + "_scale_inv", grid, "F32")]
        else:
            out.append((name, shape, "BF16"))
    return out


def write_safetensors(path: Path, tensors: list[tuple[str, tuple[int, ...], str]], pools: dict[str, bytes]) -> None:
    """A safetensors file whose tensors take their bytes from ``pools[dtype]`` at varying offsets (random values)."""
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for name, shape, dtype in tensors:
        size = ITEMSIZE[dtype] * _count(shape)
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)) + text)
        for i, (name, shape, dtype) in enumerate(tensors):
            size, pool = ITEMSIZE[dtype] * _count(shape), pools[dtype]
            if name.endswith("norm.weight"):
                f.write(b"\x80\x3f" * (size // 2))  # bf16 1.0
                continue
            start = (i * 7919 * ITEMSIZE[dtype]) % (len(pool) // 2)
            while size:
                piece = pool[start : start + size]
                f.write(piece)
                size -= len(piece)
                start = 0


def _count(shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def _pools(torch) -> dict[str, bytes]:
    """Random bytes per dtype: bf16 weights ~N(0, 0.02²), valid FP8 codes (no NaN byte), FP8 scales ~0.02/448."""
    gen = torch.Generator().manual_seed(0)

    def raw(tensor) -> bytes:
        return tensor.view(torch.uint8).numpy().tobytes()

    return {
        "BF16": raw((torch.randn(1 << 27, generator=gen) * 0.02).to(torch.bfloat16)),
        "F8_E4M3": raw((torch.randn(1 << 27, generator=gen) * 100).clamp(-448, 448).to(torch.float8_e4m3fn)),
        "F32": raw(torch.rand(1 << 20, generator=gen) * 1e-4 + 2e-5),
    }


def build_inputs(work: Path, shape: str, fp8: bool = False, layers: int | None = None) -> tuple[Path, Path]:
    import torch
    from peft import LoraConfig
    from safetensors.torch import save_file

    s = {**SHAPES[shape], **({"layers": layers} if layers else {})}
    tag = f"{shape}-{s['layers']}L"
    base, adapter = work / f"base-{tag}{'-fp8' if fp8 else ''}", work / f"adapter-{tag}"
    if not (base / "config.json").exists():
        print(f"writing the {shape} base (random {'block FP8' if fp8 else 'bf16'}) ...", file=sys.stderr)
        shutil.rmtree(base, ignore_errors=True)
        base.mkdir(parents=True)
        pools = _pools(torch)
        layout = fp8_layout(base_tensors(s)) if fp8 else [(n, shp, "BF16") for n, shp in base_tensors(s)]
        shards, size = [[]], 0
        for name, shp, dtype in layout:
            if shards[-1] and size + ITEMSIZE[dtype] * _count(shp) > SHARD:
                shards.append([])
                size = 0
            shards[-1].append((name, shp, dtype))
            size += ITEMSIZE[dtype] * _count(shp)
        names = (
            ["model.safetensors"]
            if len(shards) == 1
            else [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
        )
        for name, shard in zip(names, shards):
            write_safetensors(base / name, shard, pools)
        if len(shards) > 1:
            weight_map = {t: n for n, shard in zip(names, shards) for t, _, _ in shard}
            total = sum(ITEMSIZE[dt] * _count(shp) for shard in shards for _, shp, dt in shard)
            index = {"metadata": {"total_size": total}, "weight_map": weight_map}
            (base / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
        config = {
            "architectures": ["Qwen3MoeForCausalLM" if "experts" in s else "LlamaForCausalLM"],
            "model_type": "qwen3_moe" if "experts" in s else "llama",
            "hidden_size": s["hidden"],
            "intermediate_size": s["inter"],
            "num_hidden_layers": s["layers"],
            "num_attention_heads": s["heads"],
            "num_key_value_heads": s["kv"],
            "vocab_size": s["vocab"],
            "tie_word_embeddings": s["tied"],
            "rms_norm_eps": 1e-5,
            "rope_theta": 500000.0,
            "max_position_embeddings": 8192,
            "hidden_act": "silu",
            "dtype": "bfloat16",
        }
        if "experts" in s:
            config |= {
                "intermediate_size": 6 * s["hidden"],
                "moe_intermediate_size": s["inter"],
                "num_experts": s["experts"],
                "num_experts_per_tok": 8,
                "head_dim": s["head_dim"],
                "norm_topk_prob": True,
                "decoder_sparse_step": 1,
                "mlp_only_layers": [],
                "rms_norm_eps": 1e-6,
                "rope_theta": 1000000.0,
            }
        if fp8:
            block = [FP8_BLOCK, FP8_BLOCK]
            config["quantization_config"] = {
                "quant_method": "fp8",
                "weight_block_size": block,
                "activation_scheme": "dynamic",
            }
        (base / "config.json").write_text(json.dumps(config, indent=2))
    if not (adapter / "adapter_config.json").exists():
        print(f"writing the {shape} adapter ...", file=sys.stderr)
        adapter.mkdir(parents=True, exist_ok=True)
        gen = torch.Generator().manual_seed(1)
        tensors = {}
        for n in range(s["layers"]):
            for module, (o, i) in linear_shapes(s).items():
                key = f"base_model.model.model.layers.{n}.{module}"
                tensors[f"{key}.lora_A.weight"] = torch.randn(16, i, generator=gen) / i**0.5
                tensors[f"{key}.lora_B.weight"] = torch.randn(o, 16, generator=gen) * 0.01
        save_file(tensors, str(adapter / "adapter_model.safetensors"), metadata={"format": "pt"})
        targets = ATTENTION if "experts" in s else MODULES
        config = LoraConfig(r=16, lora_alpha=32, target_modules=targets, task_type="CAUSAL_LM")
        config.base_model_name_or_path = str(base)
        config.save_pretrained(str(adapter))
    return base, adapter


PEFT = """
import sys, torch
from peft import PeftModel
from transformers import AutoModelForCausalLM
extra = {} if sys.argv[4] == "cpu" else {"device_map": sys.argv[4]}
model = AutoModelForCausalLM.from_pretrained(sys.argv[2], dtype=torch.bfloat16, use_kernels=False, **extra)
merged = PeftModel.from_pretrained(model, sys.argv[1]).merge_and_unload()
merged.save_pretrained(sys.argv[3])
"""

# A lean launcher (python -S, nothing imported) forks the command and reads its rusage: ru_maxrss of a forked child
# counts the parent's pages at fork time, so measuring from this (torch-importing) script would inflate every figure.
LAUNCH = """
import os, sys, time
start, since = time.perf_counter(), time.time()
pid = os.fork()
if pid == 0:
    os.execvp(sys.argv[1], sys.argv[1:])
_, status, usage = os.wait4(pid, 0)
print(since, time.perf_counter() - start, usage.ru_maxrss, os.waitstatus_to_exitcode(status))
"""


def measure(cmd: list[str], out: Path) -> dict:
    """Wall seconds, peak RSS (MB), exit code and error tail of one run of ``cmd``; then ``sync``, timed apart."""
    shutil.rmtree(out, ignore_errors=True)
    subprocess.run(["sync"])
    paths = [str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]  # carried wheels (--target) stay visible
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "PYTHONPATH": os.pathsep.join(paths)}
    # cwd=ROOT: `python -m loramix` puts the current directory first on sys.path, so from anywhere else it could run
    # another checkout's loramix than this script's
    line = subprocess.run([sys.executable, "-S", "-c", LAUNCH, *cmd], cwd=ROOT, env=env, capture_output=True, text=True)
    since, wall, rss_kb, code = line.stdout.split()[-4:]  # the command's own output comes first
    start = time.perf_counter()
    subprocess.run(["sync"])
    result = {"wall": float(wall), "rss": int(rss_kb) / 1024, "code": int(code), "sync": time.perf_counter() - start}
    result["phases"] = phases(line.stderr, float(since), float(wall))
    if int(code) != 0:
        result["error"] = " / ".join(x.strip() for x in line.stderr.strip().splitlines()[-3:])[-400:]
    return result


def phases(stderr: str, since: float, wall: float) -> str:
    """loramix's phases from its `-v` line "merge phases": start-up (process start to the first merged tensor's
    work), the copy of untouched tensors (when it started, how long it ran; early: before torch was imported), the
    merged modules (first start to last end), and the end (last write to process exit: index, config, rename)."""
    line = next((x for x in stderr.splitlines() if "merge phases" in x), None)
    if line is None:
        return ""
    t = {k: v - since if "start" in k or "end" in k else v for k, v in json.loads(line.split(": ", 2)[-1]).items()}
    last = max(t.get("copy end", 0), t.get("computed end", 0))
    parts = [f"start-up {t.get('computed start', last):.2f}"]
    if "copy start" in t:
        early = f", {t['copied early'] / 1e9:.1f} GB early" if t.get("copied early") else ""
        early += f", {t['prefilled early'] / 1e9:.1f} GB prefilled" if t.get("prefilled early") else ""
        parts.append(f"copy {t['copy start']:.2f}→{t['copy end']:.2f}{early}")
    if "computed start" in t:
        parts.append(f"merged modules {t['computed end'] - t['computed start']:.2f}")
    parts.append(f"end {wall - last:.2f}")
    return "; ".join(parts)


def check_output(out: Path, base: Path, adapter: Path) -> str:
    """One merged q_proj against float64 W + s·B·A rounded to bf16 (in bf16 ulps), and a copied tensor's bytes."""
    import torch
    from safetensors import safe_open

    def read(folder: Path, key: str) -> torch.Tensor:
        index = folder / "model.safetensors.index.json"
        name = json.loads(index.read_text())["weight_map"][key] if index.exists() else "model.safetensors"
        with safe_open(str(folder / name), "pt") as f:
            return f.get_tensor(key)

    layers = json.loads((base / "config.json").read_text())["num_hidden_layers"]
    key = f"model.layers.{min(3, layers - 1)}.self_attn.q_proj"
    with safe_open(str(adapter / "adapter_model.safetensors"), "pt") as f:
        A = f.get_tensor(f"base_model.model.{key}.lora_A.weight").double()
        B = f.get_tensor(f"base_model.model.{key}.lora_B.weight").double()
    W, ours = read(base, key + ".weight"), read(out, key + ".weight")
    same = torch.equal(read(base, "model.embed_tokens.weight"), read(out, "model.embed_tokens.weight"))
    if W.dtype == torch.float8_e4m3fn:  # against transformers' own FP8 dequantization and re-quantization
        from types import SimpleNamespace

        from transformers import FineGrainedFP8Config
        from transformers.integrations.finegrained_fp8 import Fp8Dequantize, Fp8Quantize

        dense = Fp8Dequantize(None)._dequantize_one(W, read(base, key + ".weight_scale_inv"), torch.float32)
        settings = FineGrainedFP8Config(weight_block_size=[FP8_BLOCK, FP8_BLOCK])
        name = key + ".weight"
        expected = Fp8Quantize(SimpleNamespace(quantization_config=settings)).convert(
            {name: dense + 2.0 * (B @ A).float()}
        )
        codes = float((ours.float() == expected[name].float()).float().mean())
        scales = torch.allclose(read(out, name + "_scale_inv"), expected[name + "_scale_inv"], rtol=1e-6, atol=0)
        return (
            f"{name}: {codes:.4%} of FP8 codes as transformers' Fp8Quantize(dequant(W) + ΔW) gives, scales equal: "
            f"{scales}; embed_tokens copied unchanged: {same}"
        )
    exact = (W.double() + 2.0 * (B @ A)).to(torch.bfloat16).float()
    # the ulp at |W| + |ΔW|: float32 sums of terms that size err by ~1e-9 absolute, which is many bf16 ulps of a
    # result that cancels to near zero
    scale = W.double().abs() + 2.0 * (B @ A).abs()
    ulp = torch.exp2(torch.floor(torch.log2(scale.float().clamp_min(1e-30))) - 7)
    worst = float(((ours.float() - exact).abs() / ulp).max())
    return f"{key}.weight: max |loramix − exact| = {worst:.0f} bf16 ulp; embed_tokens copied unchanged: {same}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=list(SHAPES), default="1b")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (loramix's ΔW; PEFT's device_map)")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/loramix-bench-merge"))
    parser.add_argument("--repeat", type=int, default=1, help="measured runs per contender (best kept)")
    parser.add_argument("--peft-cap", default="12G", help="PEFT's address-space cap (prlimit --as); 'none' for none")
    parser.add_argument("--skip", default="", help="comma-separated contenders not to run: cp -r, loramix, peft")
    parser.add_argument("--keep", action="store_true", help="keep the base and adapter afterwards")
    parser.add_argument("--fp8", action="store_true", help="a block-FP8 base (128×128 scales); PEFT is not run")
    parser.add_argument(
        "--layers",
        default=None,
        help="layers of the shape (default: all); 'auto': as many as the "
        "workdir's free disk holds twice (base and output), with 10%% to spare",
    )
    parser.add_argument("--workers", type=int, help="loramix's --workers (default: its own)")
    parser.add_argument("--peft-timeout", type=int, default=600, help="seconds before PEFT's run is stopped")
    parser.add_argument("--processes", type=int, default=1, help="also run loramix under torchrun with N processes")
    args = parser.parse_args()
    work = args.workdir.resolve()  # the contenders run in ROOT
    work.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    layers = fitting_layers(args.shape, work) if args.layers == "auto" else int(args.layers or 0) or None
    base, adapter = build_inputs(work, args.shape, args.fp8, layers)
    built = time.perf_counter() - start
    size = sum(p.stat().st_size for p in base.glob("*.safetensors"))
    out = work / "out"
    py = sys.executable
    loramix = [py, "-m", "loramix", "-v", "combine", str(adapter), "--method", "cat", "--merge-into", str(base)]
    loramix += ["-o", str(out), "--device", args.device, *(["--workers", str(args.workers)] if args.workers else [])]
    peft = ["timeout", str(args.peft_timeout), py, "-c", PEFT, str(adapter), str(base), str(out), args.device]
    if args.peft_cap != "none":
        peft = ["prlimit", f"--as={_bytes(args.peft_cap)}", *peft]
    contenders = {
        "cp -r": ["cp", "-r", str(base), str(out)],
        "loramix": loramix,
        **({} if args.processes < 2 else {f"loramix ×{args.processes}": _under_torchrun(loramix, args.processes)}),
        **({} if args.fp8 else {"PEFT": peft}),
    }
    results, checked = {}, ""
    load_before = os.getloadavg()
    for name, cmd in contenders.items():
        if name.lower() in args.skip.lower().split(","):
            continue
        runs = [measure(cmd, out) for _ in range(1 if name == "PEFT" else args.repeat)]
        ok = [r for r in runs if r["code"] == 0]
        results[name] = {**min(ok or runs, key=lambda r: r["wall"]), "rss": max(r["rss"] for r in runs)}
        print(f"{name}: {results[name]} (load {os.getloadavg()[0]:.2f})", file=sys.stderr)
        if name.startswith("loramix") and ok:
            checked = check_output(out, base, adapter)
        shutil.rmtree(out, ignore_errors=True)
    load_after = os.getloadavg()
    s = {**SHAPES[args.shape], **({"layers": layers} if layers else {})}
    family = "Qwen3-MoE" if "experts" in s else "Llama"
    targets = ATTENTION if "experts" in s else MODULES
    count = sum(1 for _ in base_tensors(s))
    print(
        f"\nbase: {family} {args.shape} shapes, {s['layers']} layers, {count} tensors, {size / 1e9:.2f} GB "
        f"{'block FP8' if args.fp8 else 'bf16'} in {len(list(base.glob('*.safetensors')))} file(s) (written in "
        f"{built:.0f} s); adapter r=16 alpha 32 on {len(targets)} modules × {s['layers']} layers"
    )
    print(f"machine: {cpu_name()}, {os.cpu_count()} CPUs, {_ram()} RAM, {platform.system()} {platform.release()}")
    print(f"software: {software(args.device)}")
    print(f"device: {args.device}; best of {args.repeat} run(s); PEFT cap: address space {args.peft_cap}")
    print(f"load average (1/5/15 min): before {_load(load_before)}, after {_load(load_after)}")
    print("\n| contender | wall s | sync after s | peak RSS MB | phases s | result |\n|---|---|---|---|---|---|")
    for name, r in results.items():
        what = "ok" if r["code"] == 0 else f"failed (exit {r['code']}): {r.get('error', '')}"
        print(f"| {name} | {r['wall']:.2f} | {r['sync']:.2f} | {r['rss']:.0f} | {r['phases'] or '–'} | {what} |")
    lm, cp, pf = results.get("loramix"), results.get("cp -r"), results.get("PEFT")
    if lm and cp:
        synced = (lm["wall"] + lm["sync"]) / (cp["wall"] + cp["sync"])
        print(
            f"\nloramix / cp -r: {lm['wall'] / cp['wall']:.2f}× (goal ≤ 1.2 on a GPU host, 1.5 on 2 cores); "
            f"with the sync after each: {synced:.2f}×; "
            f"loramix {size / lm['wall'] / 1e6:.0f} MB/s"
        )
    many = results.get(f"loramix ×{args.processes}")
    if lm and many and many["code"] == 0:
        print(f"loramix ×{args.processes} / loramix: {many['wall'] / lm['wall']:.2f}×")
    if lm and pf and pf["code"] == 0:
        print(f"PEFT / loramix: {pf['wall'] / lm['wall']:.2f}× (goal ≥ 5); RSS {lm['rss'] / pf['rss']:.0%} of PEFT's")
    print(checked)
    if not args.keep:
        shutil.rmtree(base, ignore_errors=True)
        shutil.rmtree(adapter, ignore_errors=True)


def fitting_layers(shape: str, work: Path) -> int:
    """The most layers of ``shape`` whose base fits twice (base and output) in ``work``'s free disk, 10% spared."""
    s = SHAPES[shape]
    free = shutil.disk_usage(work).free * 0.9 / 2
    rest = sum(2 * _count(shp) for _, shp in base_tensors({**s, "layers": 0}))
    one = sum(2 * _count(shp) for _, shp in base_tensors({**s, "layers": 1})) - rest
    return max(1, min(s["layers"], int((free - rest) // one)))


def software(device: str) -> str:
    import peft
    import torch
    import transformers

    gpu = f"{torch.cuda.get_device_name()}, " if device.startswith("cuda") else ""
    return f"{gpu}torch {torch.__version__}, transformers {transformers.__version__}, peft {peft.__version__}"


def _under_torchrun(command: list[str], processes: int) -> list[str]:
    """``python -m loramix …`` as torchrun's N processes on this machine."""
    torchrun = Path(sys.executable).with_name("torchrun")
    return [str(torchrun), "--standalone", "--nproc-per-node", str(processes), *command[1:]]


def _bytes(text: str) -> int:
    units = {"K": 2**10, "M": 2**20, "G": 2**30}
    return int(float(text[:-1]) * units[text[-1].upper()]) if text[-1].upper() in units else int(text)


def _load(load: tuple[float, float, float]) -> str:
    return "/".join(f"{x:.2f}" for x in load)


def _ram() -> str:
    try:
        return f"{os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30:.0f} GiB"
    except (ValueError, OSError):
        return "?"


def cpu_name() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        return next(line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name"))
    except (OSError, subprocess.CalledProcessError, StopIteration):
        return platform.processor() or "unknown CPU"


if __name__ == "__main__":
    main()
