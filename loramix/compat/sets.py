"""Whether several adapters form a serving set: one base, the same target modules, one rank and one scale, nothing
but LoRA factors — what PEFT's ``hotswap_adapter`` (peft/utils/hotswap.py) needs to swap one into a
``torch.compile``d model without recompiling (same tensor names and shapes; its ``check_hotswap_configs_compatible``
compares use_rslora, lora_dropout, alpha_pattern and use_dora; another scale is a new Python float, so a recompile
unless the model was prepared with ``prepare_model_for_compiled_hotswap``), and what vLLM's and SGLang's fixed
adapter slots are sized by (``--max-lora-rank``: the largest rank of the set). `set_verdicts` says it per consumer."""

from __future__ import annotations

from loramix.adapter import LoraAdapter, canonical_base
from loramix.compat.engines import VLLM_MAX_RANKS
from loramix.compat.facts import Verdict


def set_problems(adapters: dict[str, LoraAdapter]) -> list[str]:
    """Why ``adapters`` (by folder name) are not one serving set; empty when they are."""
    problems = []
    bases = {canonical_base(a.base_model) for a in adapters.values() if a.base_model}
    if len(bases) > 1:
        problems.append(f"bases differ ({', '.join(sorted(bases))})")
    targets = {name: frozenset(a.modules) for name, a in adapters.items()}
    if len(set(targets.values())) > 1:
        union = frozenset().union(*targets.values())
        short = [f"{name} lacks {len(union - held)}" for name, held in targets.items() if held != union]
        problems.append(f"target modules differ ({', '.join(short)} of {len(union)})")
    ranks = {name: sorted({m.rank for m in a.modules.values()}) for name, a in adapters.items()}
    if len({r for rs in ranks.values() for r in rs}) > 1:
        problems.append("ranks differ (" + ", ".join(f"{n} {'/'.join(map(str, r))}" for n, r in ranks.items()) + ")")
    scales = {m.scale for a in adapters.values() for m in a.modules.values()}
    if len(scales) > 1:
        problems.append(f"scales differ ({', '.join(f'{s:g}' for s in sorted(scales))})")
    rslora = {a.use_rslora for a in adapters.values()}
    if len(rslora) > 1:
        problems.append("use_rslora differs")
    for name, a in adapters.items():
        held = [
            w for w, has in (("DoRA", a.has_dora), ("lora_B biases", a.has_lora_bias), ("full tensors", a.extra)) if has
        ]
        if held:
            problems.append(f"{name} holds {', '.join(held)}")
    return problems


def set_verdicts(adapters: dict[str, LoraAdapter], folder: str) -> list[Verdict]:
    """Whether ``adapters`` (the adapter folders in ``folder``, by name) are a serving set, and what serves it: PEFT
    hot-swapping under torch.compile, and vLLM's and SGLang's --max-lora-rank (the set's largest rank)."""
    problems = set_problems(adapters)
    top = max(m.rank for a in adapters.values() for m in a.modules.values())
    fitting = [r for r in VLLM_MAX_RANKS if r >= top]
    fix = "loramix align " + " ".join(f"{folder}/{name}" for name in adapters) + " -o OUT"
    names = ", ".join(adapters)
    if problems:
        peft = Verdict("serving set", "no", "; ".join(problems), fix)
    else:
        peft = Verdict(
            "serving set",
            "yes",
            note=f"{len(adapters)} adapters ({names}): one rank {top}, one scale, "
            "the same modules: PEFT hotswap_adapter swaps them under torch.compile",
        )
    vllm = (
        Verdict("vLLM", "yes", note=f"--max-lora-rank {fitting[0]} --max-loras {len(adapters)}")
        if fitting
        else Verdict("vLLM", "no", f"rank {top} is above the largest --max-lora-rank (512)")
    )
    sglang = Verdict("SGLang", "yes", note=f"--max-lora-rank {top} --max-loras-per-batch {len(adapters)}")
    return [peft, vllm, sglang]
