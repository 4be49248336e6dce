"""loramix `svd` against PEFT's `add_weighted_adapter(..., "svd")` on Llama-7B shapes, in one run.

Three rank-16 adapters (alphas 32, 16, 8; weights 0.5, 0.3, 0.2) on all 7 linear modules of each layer of a
Llama-2-7B-shaped model. PEFT needs a model holding the adapters, so it runs on a model with ``--peft-layers``
layers of true 7B shapes (the vocabulary shrunk: it plays no part) and its full-model time is extrapolated from
its per-layer time. loramix runs the whole 32-layer combine from files to files. Both produce the best rank-16
approximation of the same weighted sum; their ΔW are compared on the layers both computed.

    python benchmarks/bench_combine.py [--device cpu|cuda] [--layers 32] [--peft-layers 1]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from machine import machine
from safetensors.torch import save_file

from loramix import RankRule, combine, load_adapter, save_adapter

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from helpers import random_model  # noqa: E402 — the one builder of test and benchmark models

HIDDEN, INTERMEDIATE = 4096, 11008
MODULES = {
    "self_attn.q_proj": (HIDDEN, HIDDEN),
    "self_attn.k_proj": (HIDDEN, HIDDEN),
    "self_attn.v_proj": (HIDDEN, HIDDEN),
    "self_attn.o_proj": (HIDDEN, HIDDEN),
    "mlp.gate_proj": (INTERMEDIATE, HIDDEN),
    "mlp.up_proj": (INTERMEDIATE, HIDDEN),
    "mlp.down_proj": (HIDDEN, INTERMEDIATE),
}
RANK, ALPHAS, WEIGHTS = 16, (32, 16, 8), (0.5, 0.3, 0.2)


def write_adapter(folder: Path, seed: int, alpha: int, layers: int) -> None:
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for layer in range(layers):
        for name, (out, inp) in MODULES.items():
            key = f"base_model.model.model.layers.{layer}.{name}"
            tensors[f"{key}.lora_A.weight"] = torch.randn(RANK, inp, generator=g) / inp**0.5
            tensors[f"{key}.lora_B.weight"] = torch.randn(out, RANK, generator=g) / RANK
    folder.mkdir(parents=True)
    save_file(tensors, str(folder / "adapter_model.safetensors"), metadata={"format": "pt"})
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": "meta-llama/Llama-2-7b-hf",
        "r": RANK,
        "lora_alpha": alpha,
        "target_modules": [n.split(".")[1] for n in MODULES],
        "lora_dropout": 0.0,
    }
    (folder / "adapter_config.json").write_text(json.dumps(config))


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def time_loramix(inputs: list[Path], out: Path, device: str, repeats: int) -> tuple[float, float, object]:
    """(files-to-files seconds, in-memory combine seconds, combined adapter) — medians over ``repeats``."""
    total, compute = [], []
    for i in range(repeats):
        sync(device)
        start = time.perf_counter()
        loaded = [load_adapter(p) for p in inputs]
        sync(device)
        loaded_at = time.perf_counter()
        merged = combine(loaded, weights=list(WEIGHTS), method="svd", rank_rule=RankRule(rank=RANK), device=device)
        sync(device)
        combined_at = time.perf_counter()
        save_adapter(merged, out / f"run{i}")
        total.append(time.perf_counter() - start)
        compute.append(combined_at - loaded_at)
    return statistics.median(total), statistics.median(compute), merged


def time_peft(inputs: list[Path], layers: int, device: str):
    """PEFT's svd merge on a model of ``layers`` true-shape layers: (seconds, {module: ΔW})."""
    from peft import PeftModel

    sizes = dict(hidden_size=HIDDEN, intermediate_size=INTERMEDIATE, num_attention_heads=32, num_key_value_heads=32)
    model = random_model("llama", device="meta", vocab_size=128, num_hidden_layers=layers, **sizes)
    model = model.to_empty(device=device)  # base weights play no part in the adapter merge
    peft_model = PeftModel.from_pretrained(model, str(inputs[0]), adapter_name="a0")
    for i, path in enumerate(inputs[1:], start=1):
        peft_model.load_adapter(str(path), adapter_name=f"a{i}")
    names = [f"a{i}" for i in range(len(inputs))]
    sync(device)
    start = time.perf_counter()
    peft_model.add_weighted_adapter(
        names, list(WEIGHTS), "merged", combination_type="svd", svd_rank=RANK, svd_full_matrices=False
    )
    sync(device)
    seconds = time.perf_counter() - start
    deltas = {}
    for name, module in peft_model.named_modules():
        if hasattr(module, "lora_A") and "merged" in module.lora_A:
            key = name.removeprefix("base_model.model.")
            deltas[key] = module.get_delta_weight("merged").float().cpu()
    return seconds, deltas


def dense_reference(inputs: list[Path], key: str, device: str) -> torch.Tensor:
    """Best rank-16 approximation of the weighted sum for one module, densely in float64 (independent oracle)."""
    total = 0
    for path, weight in zip(inputs, WEIGHTS):
        adapter = load_adapter(path)
        m = adapter.modules[key]
        total = total + weight * m.scale * (m.B.to(device, torch.float64) @ m.A.to(device, torch.float64))
    U, S, Vh = torch.linalg.svd(total, full_matrices=False)
    return ((U[:, :RANK] * S[:RANK]) @ Vh[:RANK]).cpu()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--peft-layers", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        full = [root / f"full{i}" for i in range(3)]
        small = [root / f"small{i}" for i in range(3)]
        for i, alpha in enumerate(ALPHAS):
            write_adapter(full[i], seed=i, alpha=alpha, layers=args.layers)
            write_adapter(small[i], seed=i, alpha=alpha, layers=args.peft_layers)  # the same first layers
        total, compute, merged = time_loramix(full, root / "out", args.device, args.repeats)
        peft_seconds, peft_deltas = time_peft(small, args.peft_layers, args.device)
        probe = "model.layers.0.self_attn.q_proj"
        reference = dense_reference(small, probe, args.device)

    def off(delta: torch.Tensor) -> float:
        return float((delta.double() - reference).norm() / reference.norm())

    errors = []
    for key, peft_delta in peft_deltas.items():
        ours = merged.modules[key].delta()
        errors.append(float((ours - peft_delta).norm() / peft_delta.norm()))
    per_layer_peft = peft_seconds / args.peft_layers
    per_layer_ours = compute / args.layers
    full_peft = per_layer_peft * args.layers
    print(f"machine: {machine(args.device)}; device {args.device}")
    print(f"3 adapters, rank {RANK}, {args.layers} layers × {len(MODULES)} modules (Llama-7B shapes)")
    print("| step | loramix | PEFT | PEFT / loramix |")
    print("|---|---|---|---|")
    print(
        f"| svd merge, per layer (in memory) | {per_layer_ours * 1e3:.1f} ms | {per_layer_peft:.2f} s "
        f"| {per_layer_peft / per_layer_ours:,.0f}× |"
    )
    print(
        f"| whole model, files to files | {total:.2f} s | {full_peft:.0f} s (extrapolated: {args.layers} × "
        f"per-layer, merge only) | {full_peft / total:,.0f}× |"
    )
    print(f"max relative ‖ΔW_loramix − ΔW_PEFT‖/‖ΔW_PEFT‖ over {len(errors)} modules: {max(errors):.2e}")
    print(
        f"against a dense float64 SVD of {probe}: loramix {off(merged.modules[probe].delta()):.1e}, "
        f"PEFT {off(peft_deltas[probe]):.1e} (relative Frobenius error)"
    )


if __name__ == "__main__":
    main()
