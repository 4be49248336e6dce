"""QLoRA-faithful merge benchmark: how close the merged bf16 checkpoint is to the model the adapter was trained on.

A random-weight Llama (built by tests/helpers.random_model, seeded) is saved in bfloat16, loaded in 4-bit NF4 with
double quantization by transformers + bitsandbytes (``BitsAndBytesConfig``, compute dtype bfloat16), and a LoRA
(r 8, alpha 16, every Linear) is trained on it with PEFT for a few AdamW steps on seeded random tokens. The adapter is
saved, then merged into the bf16 base by loramix twice:

  faithful  merge_into_base(adapter, base, out, quantized_as="nf4", double_quant=True)
  plain     merge_into_base(adapter, base, out)                      (W + ΔW: what every other tool writes)

Each merged checkpoint is loaded in bfloat16 and its logits on held-out random tokens are compared with those of
the trained model itself (the 4-bit base + adapter, the reference). The reference row ("bf16 level") is the faithful
checkpoint run in bfloat16 against itself run in float32: how far bf16 arithmetic alone moves the logits, the floor
no bf16 checkpoint can beat.

    python benchmarks/bench_qlora.py [--device cuda|cpu] [--workdir DIR]

On CUDA the model has hidden 512, 4 layers (under 2 minutes with start-up); ``--device cpu`` uses hidden 64,
2 layers (bitsandbytes ≥ 0.47 runs 4-bit layers on CPU).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "benchmarks"))

from helpers import random_model  # noqa: E402
from machine import machine  # noqa: E402

SIZES = {
    "cuda": dict(hidden_size=512, intermediate_size=1376, num_hidden_layers=4, num_attention_heads=8, vocab_size=2048),
    "cpu": dict(hidden_size=64, intermediate_size=172, num_hidden_layers=2, num_attention_heads=4, vocab_size=256),
}
STEPS, LR, BATCH, SEQ = 40, 2e-3, 8, 64


def build_base(folder: Path, device_kind: str) -> None:
    config = dict(SIZES[device_kind], num_key_value_heads=2, max_position_embeddings=SEQ, tie_word_embeddings=False)
    random_model("llama", seed=0, **config).to(torch.bfloat16).save_pretrained(folder)


def train_qlora(base: Path, adapter: Path, device: str, vocab: int):
    """The 4-bit NF4 base with a LoRA trained on it for STEPS steps (seeded): the model the adapter learned with."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    quantization = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.bfloat16,
    )
    model = AutoModelForCausalLM.from_pretrained(
        base, quantization_config=quantization, dtype=torch.bfloat16, device_map={"": device}
    )
    torch.manual_seed(0)
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=targets))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LR)
    gen = torch.Generator().manual_seed(1)
    model.train()
    for _ in range(STEPS):
        tokens = torch.randint(0, vocab, (BATCH, SEQ), generator=gen).to(device)
        loss = model(input_ids=tokens, labels=tokens).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()
    model.save_pretrained(adapter)
    return model


def logits(model, tokens: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=tokens).logits.float()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--workdir", type=Path, default=None)
    args = parser.parse_args()
    from transformers import AutoModelForCausalLM

    from loramix import merge_into_base

    kind = "cuda" if args.device.startswith("cuda") else "cpu"
    work = args.workdir or Path(tempfile.mkdtemp(prefix="bench-qlora-"))
    started = time.perf_counter()
    build_base(work / "base", kind)
    trained = train_qlora(work / "base", work / "adapter", args.device, SIZES[kind]["vocab_size"])
    trained_s = time.perf_counter() - started
    tokens = torch.randint(0, SIZES[kind]["vocab_size"], (4, SEQ), generator=torch.Generator().manual_seed(2))
    tokens = tokens.to(args.device)
    reference = logits(trained, tokens)
    del trained
    merged = {}
    for label, options in (("faithful", {"quantized_as": "nf4", "double_quant": True}), ("plain", {})):
        t = time.perf_counter()
        merge_into_base(work / "adapter", work / "base", work / label, device=args.device, overwrite=True, **options)
        merged[label] = time.perf_counter() - t
    rows = []
    outputs = {}
    for label in ("faithful", "plain"):
        model = AutoModelForCausalLM.from_pretrained(work / label, dtype=torch.bfloat16).to(args.device).eval()
        outputs[label] = logits(model, tokens)
        diff = (outputs[label] - reference).abs()
        rows.append((f"{label} merge (bf16) vs 4-bit + adapter", diff.max().item(), diff.mean().item()))
    float32 = AutoModelForCausalLM.from_pretrained(work / "faithful", dtype=torch.float32).to(args.device).eval()
    floor = (outputs["faithful"] - logits(float32, tokens)).abs()
    rows.append(("bf16 level: faithful in bf16 vs in float32", floor.max().item(), floor.mean().item()))
    print(f"machine: {machine(args.device)}")
    size = SIZES[kind]
    print(
        f"model: Llama hidden {size['hidden_size']}, {size['num_hidden_layers']} layers, vocab {size['vocab_size']}; "
        f"LoRA r 8 on all 7 Linear, {STEPS} AdamW steps (lr {LR}) on NF4 + double quant, compute bf16"
    )
    print(f"|logits| max {reference.abs().max().item():.3f}, mean {reference.abs().mean().item():.3f}\n")
    print("| comparison | max abs diff | mean abs diff |")
    print("|---|---|---|")
    for label, high, mean in rows:
        print(f"| {label} | {high:.3e} | {mean:.3e} |")
    ratio = rows[1][2] / rows[0][2] if rows[0][2] > 0 else float("inf")
    print(f"\nplain / faithful mean diff: {ratio:.1f}×")
    print(
        f"time: build + train {trained_s:.1f} s, faithful merge {merged['faithful']:.2f} s, "
        f"plain merge {merged['plain']:.2f} s, total {time.perf_counter() - started:.1f} s"
    )


if __name__ == "__main__":
    main()
