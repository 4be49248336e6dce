"""LoRAHub-style weight search: loramix's batched search against a faithful LoRAHub loop, with no download.

Setup — a small Llama-shaped causal LM (≈25M parameters; --small: ≈0.1M) is trained from scratch, character-level,
on the copy task ``aB3>aB3</s>`` (letters of both cases and digits). One LoRA per synthetic task (r=8 on every
attention and MLP projection, trained with PEFT on lowercase words): reverse, uppercase, shift letters by one, sort,
double each character. Held-out tasks combine two of them (reverse+uppercase, shift+uppercase, reverse+shift); each
gets 5 few-shot examples for the search and unseen examples for exact-match accuracy (greedy decoding).

Per held-out task the table compares
  zero-shot          the base (all weights 0)
  uniform            the exact mean ΔW (delta composition, wᵢ = 1/n)
  lorahub-faithful   LoRAHub's own loop (sail-sg/lorahub): a PeftModel, every candidate's Σ wᵢ·state_dictᵢ written
                     with set_peft_model_state_dict, then one forward pass; scipy COBYLA (what its NGOpt runs at
                     this budget) from 0 within ±1.5, 40 evaluations, loss + 0.05·mean|w|
  loramix            `loramix.search` with each composition × optimizer (40 COBYLA evaluations / 40 CMA-ES
                     generations of the default 8 candidates, or of 32 ("cma ×32") / 40 Adam steps), base loaded
                     once and frozen (bf16 on a GPU), hooks
and reports the final loss (the objective on the few-shot examples, re-scored by one float32 referee for every
method), exact-match accuracy on the unseen examples, and candidate evaluations per second of the search loop
(model loading excluded on both sides). The throughput row scores one population of 64 candidates per pass.

    PYTHONPATH=. python3 benchmarks/bench_search.py --device cuda      # one 10-minute GPU run
    PYTHONPATH=. python3 benchmarks/bench_search.py --small            # a few minutes on a 2-core CPU
"""

from __future__ import annotations

import argparse
import copy
import os
import random
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing is downloaded: every model and adapter is made here

import numpy as np  # noqa: E402
import torch  # noqa: E402
from machine import machine

import loramix
from loramix.runtime import resolve_device

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from helpers import random_model  # noqa: E402 — the one builder of test and benchmark models

from loramix.weight_search import load_base
from loramix.weight_search.evaluator import Evaluator
from loramix.weight_search.objective import as_examples, build_batch

LETTERS = "abcdefghijklmnopqrstuvwxyz"
CHARS = LETTERS + LETTERS.upper() + "0123456789>"
SPECIAL = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3}
TASKS = {
    "reverse": lambda s: s[::-1],
    "upper": str.upper,
    "shift": lambda s: "".join(LETTERS[(LETTERS.index(c) + 1) % 26] for c in s),
    "sort": lambda s: "".join(sorted(s)),
    "double": lambda s: "".join(c + c for c in s),
}
HELD_OUT = {
    "reverse+upper": lambda s: s[::-1].upper(),
    "shift+upper": lambda s: TASKS["shift"](s).upper(),
    "reverse+shift": lambda s: TASKS["shift"](s)[::-1],
}
SIZES = {  # hidden, layers, heads, intermediate, base steps, LoRA steps, batch, test examples
    "full": dict(hidden=512, layers=8, heads=8, inter=1408, base_steps=1500, lora_steps=300, batch=128, test=64),
    "small": dict(hidden=64, layers=2, heads=4, inter=128, base_steps=400, lora_steps=300, batch=32, test=24),
}
L1, BOUNDS, STEPS, SHOTS = 0.05, (-1.5, 1.5), 40, 5


def tokenizer():
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {**SPECIAL, **{c: i + len(SPECIAL) for i, c in enumerate(CHARS)}}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tk.decoder = decoders.Fuse()
    tk.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tk, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )


def examples(task, n: int, rng: random.Random, alphabet: str = LETTERS) -> list[dict]:
    words = ["".join(rng.choice(alphabet) for _ in range(rng.randint(3, 7))) for _ in range(n)]
    return [{"input": w + ">", "output": task(w)} for w in words]


def train(model, tok, task, *, steps: int, batch: int, lr: float, seed: int, device, alphabet: str = LETTERS) -> float:
    rng = random.Random(seed)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.1)
    model.train()
    for _ in range(steps):
        data = build_batch(as_examples(examples(task, batch, rng, alphabet)), tok, encoder_decoder=False)
        data = {k: v.to(device) for k, v in data.items()}
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            loss = model(**data).loss
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
    model.eval()
    return float(loss.detach())


def build(folder: Path, size: dict, device: torch.device, seed: int):
    """Train the base and one LoRA per task; save them (PEFT folders) under ``folder``."""
    from peft import LoraConfig, get_peft_model

    tok = tokenizer()
    torch.manual_seed(seed)  # the global RNG: training draws follow the base's, as when RESULTS.md was measured
    base = random_model(
        "llama",
        seed=None,
        vocab_size=len(SPECIAL) + len(CHARS),
        hidden_size=size["hidden"],
        intermediate_size=size["inter"],
        num_hidden_layers=size["layers"],
        num_attention_heads=size["heads"],
        num_key_value_heads=size["heads"],
        max_position_embeddings=64,
        tie_word_embeddings=False,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    ).to(device)
    params = sum(p.numel() for p in base.parameters())
    start = time.perf_counter()
    loss = train(
        base,
        tok,
        lambda s: s,
        steps=size["base_steps"],
        batch=size["batch"],
        lr=2e-3,
        seed=seed,
        device=device,
        alphabet=CHARS[:-1],  # the base copies mixed-case letters and digits, so every output token is familiar
    )
    took = time.perf_counter() - start
    print(f"base: {params / 1e6:.1f}M parameters, copy task trained to loss {loss:.3f} in {took:.0f} s", flush=True)
    base.save_pretrained(folder / "base")
    tok.save_pretrained(folder / "base")
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    paths = []
    start = time.perf_counter()
    for i, (name, task) in enumerate(TASKS.items()):
        torch.manual_seed(seed + 1 + i)
        lora = get_peft_model(copy.deepcopy(base), LoraConfig(r=8, lora_alpha=16, target_modules=targets))
        loss = train(
            lora, tok, task, steps=size["lora_steps"], batch=size["batch"], lr=3e-3, seed=seed + 1 + i, device=device
        )
        lora.peft_config["default"].base_model_name_or_path = str(folder / "base")
        lora.save_pretrained(folder / name)
        paths.append(folder / name)
        print(f"  LoRA {name:<8} loss {loss:.3f}", flush=True)
    print(f"{len(paths)} LoRAs trained in {time.perf_counter() - start:.0f} s")
    return tok, paths


def lorahub_faithful(
    base: Path, adapters: list[Path], shots: list[dict], tok, device, dtype
) -> tuple[list[float], int, float]:
    """LoRAHub's loop: PEFT state-dict swap per candidate, one forward each, COBYLA from 0 (returns w, evals, s)."""
    from peft import PeftModel
    from peft.utils.save_and_load import get_peft_model_state_dict, set_peft_model_state_dict
    from scipy.optimize import Bounds, minimize
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(base), dtype=dtype).to(device)
    model = PeftModel.from_pretrained(model, str(adapters[0])).eval()
    cache = []
    for path in adapters:
        other = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(base), dtype=dtype), str(path))
        cache.append({k: v.to(device) for k, v in get_peft_model_state_dict(other).items()})
    keys = list(cache[0])
    data = {k: v.to(device) for k, v in build_batch(as_examples(shots), tok, encoder_decoder=False).items()}
    best = [np.inf, None]
    count = [0]

    def score(w: np.ndarray) -> float:
        mixed = {k: sum(float(wi) * sd[k] for wi, sd in zip(w, cache)) for k in keys}
        set_peft_model_state_dict(model, mixed)
        with torch.no_grad():
            loss = float(model(**data).loss) + L1 * float(np.mean(np.abs(w)))
        count[0] += 1
        if loss < best[0]:
            best[:] = [loss, np.array(w)]
        return loss

    _sync(device)
    start = time.perf_counter()
    n = len(adapters)
    minimize(
        score,
        np.zeros(n),
        method="COBYLA",
        bounds=Bounds(np.full(n, BOUNDS[0]), np.full(n, BOUNDS[1])),
        options={"maxiter": STEPS, "rhobeg": 0.5},
    )
    _sync(device)
    return [float(x) for x in best[1]], count[0], time.perf_counter() - start


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Referee:
    """float32 scoring of any weights: few-shot objective and exact match of greedy decoding on unseen examples."""

    def __init__(self, base: Path, adapters: list[Path], shots, test, tok, device) -> None:
        from transformers import AutoModelForCausalLM

        self.tok, self.test, self.device = tok, test, device
        self.loaded = [loramix.load_adapter(a) for a in adapters]
        self.model = AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32).to(device).eval()
        self.batch = build_batch(as_examples(shots), tok, encoder_decoder=False)

    def score(self, weights, composition: str) -> tuple[float, float]:
        with Evaluator(self.model, self.loaded, self.batch, composition=composition) as ev:
            loss = float(ev.cross_entropy([weights])[0]) + L1 * float(np.mean(np.abs(weights)))
            self.tok.padding_side = "left"
            prompts = self.tok([e["input"] for e in self.test], return_tensors="pt", padding=True).to(self.device)
            self.tok.padding_side = "right"
            longest = max(len(e["output"]) for e in self.test) + 1
            with torch.no_grad(), ev.applied(weights):
                out = self.model.generate(
                    **prompts, max_new_tokens=longest, do_sample=False, pad_token_id=0, eos_token_id=2
                )
        texts = self.tok.batch_decode(out[:, prompts["input_ids"].shape[1] :], skip_special_tokens=True)
        exact = np.mean([t == e["output"] for t, e in zip(texts, self.test)])
        return loss, float(exact)


def throughput(base: Path, adapters: list[Path], shots, tok, device, population: int = 64) -> float:
    """Candidates per second of one batched pass over ``population`` candidates (bf16 on a GPU), median of 5."""
    model, tok, _ = load_base(str(base), device=device, tokenizer=tok)
    batch = build_batch(as_examples(shots), tok, encoder_decoder=False)
    loaded = [loramix.load_adapter(a) for a in adapters]
    W = torch.rand(population, len(adapters), generator=torch.Generator().manual_seed(0)) * 3 - 1.5
    times = []
    with Evaluator(model, loaded, batch, composition="lorahub") as ev:
        for _ in range(6):
            _sync(device)
            start = time.perf_counter()
            ev.cross_entropy(W)
            _sync(device)
            times.append(time.perf_counter() - start)
    return population / float(np.median(times[1:]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="auto", help="cpu, cuda or auto")
    parser.add_argument("--small", action="store_true", help="a tiny model and short training (CPU, a few minutes)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tasks", nargs="*", default=list(HELD_OUT), choices=list(HELD_OUT))
    parser.add_argument("--threads", type=int, help="torch CPU threads (1 is fastest on a busy 2-core box)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    size = SIZES["small" if args.small else "full"]
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    print(f"machine: {machine(device)}")
    total = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        tok, adapters = build(folder, size, device, args.seed)
        n = len(adapters)
        print(
            f"\nsearch: {SHOTS} few-shot examples, {size['test']} unseen test examples per task, loss + {L1}·mean|w|, "
            f"bounds {BOUNDS}, {STEPS} steps; loss re-scored in float32, accuracy = exact match of greedy decoding; "
            f"search dtype {str(dtype).removeprefix('torch.')}\n"
        )
        print(
            "| task | method | loss | exact match | evaluations | search s | candidates/s "
            f"| weights ({', '.join(TASKS)}) |"
        )
        print("|---|---|---:|---:|---:|---:|---:|---|")
        rates = {}
        for t, name in enumerate(args.tasks):
            rng = random.Random(1000 + t)
            shots, test = examples(HELD_OUT[name], SHOTS, rng), examples(HELD_OUT[name], size["test"], rng)
            referee = Referee(folder / "base", adapters, shots, test, tok, device)
            rows = [("zero-shot", "delta", [0.0] * n, None), ("uniform", "delta", [1 / n] * n, None)]
            w, evals, secs = lorahub_faithful(folder / "base", adapters, shots, tok, device, dtype)
            rows.append(("lorahub-faithful (PEFT swaps, COBYLA)", "lorahub", w, (evals, secs)))
            for composition in ("lorahub", "delta"):
                for optimizer, popsize in (("cobyla", None), ("cma", None), ("cma", 32), ("adam", None)):
                    r = loramix.search(
                        str(folder / "base"),
                        adapters,
                        shots,
                        composition=composition,
                        optimizer=optimizer,
                        steps=STEPS,
                        l1=L1,
                        bounds=BOUNDS,
                        seed=args.seed,
                        device=str(device),
                        popsize=popsize,
                    )
                    label = f"loramix {composition} {optimizer}" + (f" ×{popsize}" if popsize else "")
                    rows.append((label, composition, r.weights, (r.evaluations, r.seconds)))
            for label, composition, weights, run in rows:
                loss, exact = referee.score(weights, composition)
                cells = ["", "", ""] if run is None else [str(run[0]), f"{run[1]:.2f}", f"{run[0] / run[1]:.0f}"]
                if run is not None:
                    rates.setdefault(label, []).append(run[0] / run[1])
                ws = ", ".join(f"{x:+.2f}" for x in weights)
                print(f"| {name} | {label} | {loss:.4f} | {exact:.0%} | {' | '.join(cells)} | {ws} |", flush=True)
        batched = throughput(folder / "base", adapters, shots, tok, device)
    faithful = float(np.mean(rates["lorahub-faithful (PEFT swaps, COBYLA)"]))
    print("\ncandidate evaluations per second (mean over tasks), and the ratio to lorahub-faithful:")
    for label, values in rates.items():
        print(f"  {label:<40} {np.mean(values):>9.0f}/s  {np.mean(values) / faithful:6.1f}×")
    print(f"  {'loramix evaluator, population of 64/pass':<40} {batched:>9.0f}/s  {batched / faithful:6.1f}×")
    print(f"\ntotal {time.perf_counter() - total:.0f} s")


if __name__ == "__main__":
    main()
