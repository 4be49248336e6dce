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

Across GPUs (--scale): CMA-ES, population 64, on a Llama-3-8B-shaped bf16 base with random weights built straight on
the GPUs, with one process (one GPU) and two (`--gpus 2`: the population split, losses all-gathered over NCCL), both
scoring chunks of 32 so that the same seed gives the same bits; then a Llama-3-70B-shaped base (~141 GB) split over
both GPUs with accelerate in one process. Candidates per second, final loss, peak memory per GPU; rows in --out.

    PYTHONPATH=. python3 benchmarks/bench_search.py --scale --shape 8b --split-shape 70b --out OUT   # 2 GPUs, 4 min
    PYTHONPATH=. python3 benchmarks/bench_search.py --scale --shape tiny --popsize 8 --steps 2      # the path, CPU
"""

from __future__ import annotations

import argparse
import copy
import json
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


SHAPES = {  # Llama-3 shapes (vocab 128256, GQA with 8 KV heads); "tiny" checks the path on a CPU
    "8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32),
    "70b": dict(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64),
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4),
}
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def scale_model(shape: str, devices: list[torch.device], seed: int):
    """A Llama-shaped bf16 model with random weights, built on the meta device and materialised straight on the
    GPU(s): over several, accelerate places whole decoder blocks (balanced) and dispatches the model."""
    from accelerate import dispatch_model, infer_auto_device_map
    from accelerate.utils import get_balanced_memory, set_module_tensor_to_device

    vocab = 128256 if shape != "tiny" else 512
    config = dict(vocab_size=vocab, num_key_value_heads=8 if shape != "tiny" else 2, max_position_embeddings=8192)
    model = random_model("llama", seed=None, device="meta", tie_word_embeddings=False, **config, **SHAPES[shape])
    dtype = torch.bfloat16 if devices[0].type == "cuda" else torch.float32
    model = model.to(dtype)
    if len(devices) > 1:
        memory = {d.index: torch.cuda.mem_get_info(d)[0] for d in devices}
        balanced = get_balanced_memory(model, max_memory=memory, no_split_module_classes=["LlamaDecoderLayer"])
        device_map = infer_auto_device_map(model, max_memory=balanced, no_split_module_classes=["LlamaDecoderLayer"])
    else:
        device_map = {"": devices[0].index if devices[0].type == "cuda" else "cpu"}
    places = {name: place for name, place in device_map.items()}

    def place(name: str):  # the device_map entry holding ``name`` (the first GPU for what it leaves out)
        found = [k for k in places if k == "" or name == k or name.startswith(k + ".")]
        return places[max(found, key=len)] if found else next(iter(places.values()))

    generators = {}
    for name, p in list(model.named_parameters()):
        where = torch.device("cuda", place(name)) if isinstance(place(name), int) else torch.device(place(name))
        if where not in generators:
            generators[where] = torch.Generator(device=where).manual_seed(seed)
        value = torch.empty(p.shape, dtype=dtype, device=where)
        value.fill_(1.0) if name.endswith("norm.weight") else value.normal_(0, 0.02, generator=generators[where])
        set_module_tensor_to_device(model, name, where, value=value)
    rotary = model.model.rotary_emb
    where = torch.device("cuda", place("model.rotary_emb")) if devices[0].type == "cuda" else devices[0]
    model.model.rotary_emb = type(rotary)(config=model.config).to(where)
    if len(devices) > 1:
        model = dispatch_model(model, device_map=device_map)
    return model.eval()


def scale_adapters(model, count: int, rank: int, seed: int) -> list:
    """``count`` random rank-``rank`` LoRAs on every projection of ``model`` (alpha = 2·rank), made on the CPU."""
    from loramix.adapter import LoraAdapter, LoraModule

    g = torch.Generator().manual_seed(seed)
    shapes = [(n, m.weight.shape) for n, m in model.named_modules() if n.endswith(PROJECTIONS)]
    return [
        LoraAdapter(
            modules={
                n: LoraModule(
                    A=torch.randn(rank, s[1], generator=g) / s[1] ** 0.5,
                    B=torch.randn(s[0], rank, generator=g) * 0.02,
                    scale=2.0,
                )
                for n, s in shapes
            },
            source=f"random-{i}",
        )
        for i in range(count)
    ]


def scale_run(device: str, shape: str, popsize: int, steps: int, max_candidates: int | None, seed: int) -> dict:
    """One process of the scale benchmark (run by `distributed.launch`): build the base and 8 rank-16 adapters on
    every projection, warm up with one generation, then time a CMA-ES search of ``steps`` generations of ``popsize``
    (4 examples padded to 94 tokens: 376 token positions per candidate). ``peak_gib``: the peak memory torch
    allocated on each of rank 0's GPUs."""
    import torch.distributed as dist

    devices = [torch.device(d) for d in device.split(",")]
    start = time.perf_counter()
    model = scale_model(shape, devices, seed)
    adapters = scale_adapters(model, 8, 16, seed)
    built = time.perf_counter() - start
    rng = random.Random(seed)
    shots = examples(lambda s: s[::-1].upper(), 4, rng, alphabet=LETTERS)
    shots = [{"input": e["input"] * 8, "output": e["output"] * 4} for e in shots]  # ~60 tokens each
    settings = dict(optimizer="cma", popsize=popsize, seed=seed, device=device, max_candidates=max_candidates)
    tok = tokenizer()
    for d in devices:
        if d.type == "cuda":
            torch.cuda.reset_peak_memory_stats(d)
    loramix.search(model, adapters, shots, tokenizer=tok, steps=1, **settings)  # warm-up: kernels, allocator
    r = loramix.search(model, adapters, shots, tokenizer=tok, steps=steps, **settings)
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    memory = [torch.cuda.max_memory_allocated(d) / 2**30 for d in devices if d.type == "cuda"]
    return dict(
        shape=shape,
        processes=world,
        devices=device,
        machine=machine(devices[0]),
        parameters=sum(p.numel() for p in model.parameters()),
        build_s=built,
        candidates=r.evaluations,
        search_s=r.seconds,
        rate=r.evaluations / r.seconds,
        loss=r.loss,
        weights=r.weights,
        peak_gib=memory,
        tokens=r.settings["output_tokens"],
    )


def scale(args) -> None:
    """Candidates per second with 1 and 2 processes (one GPU each) on the --shape base, then the base split over
    two GPUs in one process (--split-shape); every row written to --out as it comes."""
    from loramix.weight_search.distributed import launch

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    cuda = torch.cuda.is_available()
    runs = []
    if args.shape:
        per = -(-args.popsize // 2)  # both runs score chunks of ⌈P/2⌉: the same forward shapes, the same losses
        runs += [
            ([("cuda:0" if cuda else "cpu")], args.shape, per),
            ([f"cuda:{i}" if cuda else "cpu" for i in (0, 1)], args.shape, per),
        ]
    if args.split_shape:
        runs.append(([",".join(f"cuda:{i}" for i in range(torch.cuda.device_count()))], args.split_shape, None))
    rows = []
    for devices, shape, chunk in runs:
        start = time.perf_counter()
        try:
            row = launch(scale_run, devices, shape, args.popsize, args.steps, chunk, args.seed)
        except Exception as exc:  # noqa: BLE001 — a failed row is recorded and the next one still runs
            row = dict(shape=shape, devices=" ".join(devices), error=f"{type(exc).__name__}: {exc}")
        row["wall_s"] = time.perf_counter() - start
        row["devices"] = " + ".join(devices)  # every process's, not rank 0's alone
        rows.append(row)
        print(json.dumps(row), flush=True)
        (out / "scale.json").write_text(json.dumps(rows, indent=1))
    one = next((r for r in rows if r.get("processes") == 1 and "," not in r.get("devices", ",")), None)
    for r in rows:
        if "rate" in r:
            ratio = f"{r['rate'] / one['rate']:.2f}×" if one and "," not in r["devices"] else ""
            same = "" if not one or r is one or "," in r["devices"] else f"same loss: {r['loss'] == one['loss']}"
            memory = ", ".join(f"{m:.1f}" for m in r["peak_gib"])
            print(
                f"| {r['shape']} | {r['processes']} × {r['devices']} | {r['candidates']} | {r['search_s']:.2f} | "
                f"{r['rate']:.1f} | {ratio} | {r['loss']:.6f} {same} | {memory} |",
                flush=True,
            )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="auto", help="cpu, cuda or auto")
    parser.add_argument("--small", action="store_true", help="a tiny model and short training (CPU, a few minutes)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tasks", nargs="*", default=list(HELD_OUT), choices=list(HELD_OUT))
    parser.add_argument("--threads", type=int, help="torch CPU threads (1 is fastest on a busy 2-core box)")
    parser.add_argument("--scale", action="store_true", help="search across GPUs on Llama-shaped random bases")
    parser.add_argument("--shape", choices=list(SHAPES), default="8b", help="--scale: base for 1 vs 2 processes")
    parser.add_argument("--split-shape", choices=list(SHAPES), help="--scale: base split over all GPUs")
    parser.add_argument("--popsize", type=int, default=64, help="--scale: CMA-ES population")
    parser.add_argument("--steps", type=int, default=6, help="--scale: timed CMA-ES generations")
    parser.add_argument("--out", default="scale-out", help="--scale: folder for scale.json")
    args = parser.parse_args()
    if args.scale:
        scale(args)
        return
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
