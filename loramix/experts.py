"""Mixture-of-experts structure: the facts about fused expert parameters that readers, writers and merges share.

transformers 5 keeps a layer's experts as fused 3-D parameters (``mlp.experts.gate_up_proj`` (E, 2I, H),
``mlp.experts.down_proj`` (E, H, I); gpt-oss and a few others transposed, (E, in, out)). PEFT's ``ParamWrapper``
(``target_parameters``) gives each such parameter one LoRA pair of rank r·E: ``lora_A`` (r·E, in) holds expert e's
A in rows e·r … e·r+r-1, ``lora_B`` (out, r·E) holds expert e's B in the columns e, e+E, e+2E, … (PEFT reshapes it
to (out, r, E)), and ΔW_e = s·B_e·A_e. loramix keeps each expert as its own `LoraModule`, named
``<experts module>.<e>.<parameter>`` (``model.layers.0.mlp.experts.3.gate_up_proj``) with an `ExpertSlot`, so every
method, rank rule and analysis applies to each expert's ΔW on its own; this module splits and fuses the blocks.

Two parameters of one module are targeted by nesting: PEFT wraps the module's parameters in the order the module
registers them, so the first registered is innermost (its keys carry the most ``base_layer.``).
`loramix.architecture.EXPERT_PARAM_ORDER` is that order for transformers' expert modules (all of them register the
input projections before ``down_proj``).
"""

from __future__ import annotations

from collections import Counter, defaultdict

import torch

from loramix.adapter import ExpertSlot, LoraAdapter, LoraModule, refit
from loramix.architecture import EXPERT_PARAM_ORDER
from loramix.errors import ExpertLayoutError


def module_name(param: str, index: int) -> str:
    """The name of expert ``index`` of the fused ``param``: ``…experts.gate_up_proj`` → ``…experts.3.gate_up_proj``."""
    owner, _, short = param.rpartition(".")
    return f"{owner}.{index}.{short}"


def split(A: torch.Tensor, B: torch.Tensor, count: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """PEFT's fused pair (A r·E×in, B out×r·E) → [(A_e r×in, B_e out×r)] for the ``count`` experts."""
    rank = A.shape[0] // count
    As = A.reshape(count, rank, A.shape[1])
    Bs = B.reshape(B.shape[0], rank, count)
    return [(As[e].contiguous(), Bs[:, :, e].contiguous()) for e in range(count)]


def fuse(pairs: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
    """The inverse of `split`: [(A_e, B_e)] of one rank → PEFT's fused (A, B)."""
    A = torch.cat([a for a, _ in pairs])
    B = torch.stack([b for _, b in pairs], dim=2)
    return A, B.reshape(B.shape[0], -1)


def nesting(params: list[str]) -> dict[str, int]:
    """How deep PEFT nests each targeted parameter of one module (0: outermost, keys without ``base_layer``).

    ``params`` are short names (``gate_up_proj``); more than one must all be in `EXPERT_PARAM_ORDER`."""
    unknown = [p for p in params if p not in EXPERT_PARAM_ORDER]
    if len(params) > 1 and unknown:
        raise ExpertLayoutError(
            f"target_parameters {sorted(params)} on one module: PEFT nests them in the order the module registers "
            f"them, known only for {', '.join(EXPERT_PARAM_ORDER)}; {', '.join(unknown)} is not"
        )
    ordered = sorted(params, key=lambda p: EXPERT_PARAM_ORDER.index(p) if p in EXPERT_PARAM_ORDER else 0)
    return {p: len(ordered) - 1 - i for i, p in enumerate(ordered)}


def groups(modules: dict[str, LoraModule]) -> dict[str, dict[int, LoraModule]]:
    """The expert modules by fused parameter, then expert index."""
    found: dict[str, dict[int, LoraModule]] = defaultdict(dict)
    for m in modules.values():
        if m.expert is not None:
            found[m.expert.param][m.expert.index] = m
    return dict(found)


def is_expert_adapter(adapter: LoraAdapter) -> bool:
    return any(m.expert is not None for m in adapter.modules.values())


def uniform_adapter(adapter: LoraAdapter) -> LoraAdapter:
    """``adapter`` with every fused parameter's experts complete and at one rank and scale (`uniform`)."""
    found = groups(adapter.modules)
    if not found:
        return adapter
    fixed = {module_name(param, m.expert.index): m for param, ms in found.items() for m in uniform(param, ms)}
    plain = {n: m for n, m in adapter.modules.items() if m.expert is None}
    return adapter.with_modules(plain | fixed)


def uniform(param: str, experts: dict[int, LoraModule]) -> list[LoraModule]:
    """Every expert of ``param`` (0 … E-1) at one rank and one scale, as PEFT's fused pair needs: lower ranks
    zero-padded, other scales folded into B (`refit`), an expert no adapter changed as a zero block."""
    sample = next(iter(experts.values()))
    count = sample.expert.count
    rank = max(m.rank for m in experts.values())
    scale = Counter(m.scale for m in experts.values()).most_common(1)[0][0]
    out = []
    for e in range(count):
        m = experts.get(e)
        if m is None:
            zeros_a = sample.A.new_zeros(rank, sample.in_features)
            zeros_b = sample.B.new_zeros(sample.out_features, rank)
            m = LoraModule(A=zeros_a, B=zeros_b, scale=scale, expert=ExpertSlot(param, e, count))
        out.append(refit(m, rank, scale))
    return out


def refuse(adapter: LoraAdapter, what: str) -> None:
    """A one-line error when ``adapter`` holds expert modules and ``what`` does not handle them yet."""
    if is_expert_adapter(adapter):
        params = sorted(groups(adapter.modules))
        raise ExpertLayoutError(
            f"{adapter.source}: a mixture-of-experts adapter (PEFT target_parameters on {len(params)} fused expert "
            f"parameter(s), e.g. {params[0]}): {what} does not support expert adapters yet; write it as PEFT"
        )
