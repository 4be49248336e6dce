"""PEFT ``target_parameters`` adapters (LoRA on fused 3-D expert parameters, PEFT ≥ 0.17): read into one
`LoraModule` per expert, and written back as the nested pairs PEFT loads into the fused model.

A targeted parameter's pair sits under its module's name with one ``base_layer.`` per level of nesting
(`loramix.experts.nesting`); its rank is r·E, with r from ``rank_pattern`` / ``r`` matched on the parameter's
name (``model.layers.0.mlp.experts.gate_up_proj``) as PEFT matches it, so E = rank / r. A pair that no
``target_parameters`` entry explains, a rank that r does not divide, or nesting deeper than the parameters named is
refused in one line: such a file is never read as a dense LoRA.
"""

from __future__ import annotations

import math
from collections import defaultdict
from pathlib import Path

import torch

from loramix import experts
from loramix.adapter import ExpertSlot, LoraAdapter, LoraModule
from loramix.errors import ExpertLayoutError
from loramix.formats._keys import PREFIX, module_from_parts, pattern_value, targets_module

NESTED = ".base_layer"


def _unwrap(name: str) -> tuple[str, int]:
    """``…experts.base_layer.base_layer`` → (``…experts``, 2)."""
    depth = 0
    while name.endswith(NESTED):
        name, depth = name[: -len(NESTED)], depth + 1
    return name, depth


def _params_of(owner: str, targets: list[str]) -> list[str]:
    """The short names of the ``target_parameters`` entries that name a parameter of module ``owner`` (PEFT: the
    parameter's full name equals the entry or ends with ``.entry``)."""
    found = []
    for target in targets:
        module, _, short = target.rpartition(".")
        if not module or owner == module or owner.endswith("." + module):
            found.append(short)
    return list(dict.fromkeys(found))


def pop_params(parts: dict, config: dict, *, where: str | Path, config_where: str | Path) -> dict[str, LoraModule]:
    """Take the pairs of targeted parameters out of ``parts`` (`loramix.formats._keys.split_keys`'s modules) and
    return them as one module per expert; the ordinary modules stay in ``parts``."""
    targets = config.get("target_parameters") or []
    by_owner: dict[str, dict[int, str]] = defaultdict(dict)
    for name in parts:
        owner, depth = _unwrap(name)
        plain_target = targets_module(config.get("target_modules") or [], owner)
        if depth or (_params_of(owner, [t for t in targets if "." in t]) and not plain_target):
            by_owner[owner][depth] = name
    if by_owner and not targets:
        owner = next(iter(by_owner))
        raise ExpertLayoutError(
            f"{where}: {by_owner[owner][max(by_owner[owner])]} is a nested (base_layer) LoRA pair, which PEFT writes "
            "only for target_parameters, but the config names none; refused rather than read as a dense LoRA"
        )
    modules: dict[str, LoraModule] = {}
    for owner, names in sorted(by_owner.items()):
        params = _params_of(owner, targets)
        if sorted(names) != list(range(len(params))):
            raise ExpertLayoutError(
                f"{where}: module {owner} has LoRA pairs at nesting depths {sorted(names)}, but target_parameters "
                f"names {len(params)} parameter(s) of it ({', '.join(params) or 'none'})"
            )
        for short, depth in experts.nesting(params).items():
            key = f"{owner}.{short}"
            pair = module_from_parts(where, key, parts.pop(names[depth]), False)
            modules.update(_experts(pair, key, config, where=where, config_where=config_where))
    return modules


def _experts(pair: LoraModule, param: str, config: dict, *, where, config_where) -> dict[str, LoraModule]:
    if pair.bias is not None or pair.magnitude is not None or pair.layout != "out_in":
        raise ExpertLayoutError(f"{where}: {param}: PEFT's target_parameters pairs have no bias, DoRA or conv shape")
    rank = pattern_value(config.get("rank_pattern") or {}, param, config.get("r", 8), where=config_where)
    alpha = pattern_value(config.get("alpha_pattern") or {}, param, config.get("lora_alpha", 8), where=config_where)
    if pair.rank % rank:
        raise ExpertLayoutError(
            f"{where}: {param}: lora_A has {pair.rank} rows, not a multiple of r={rank} (PEFT stores r per expert, "
            "E experts as r·E rows)"
        )
    count = pair.rank // rank
    scale = float(alpha) / (math.sqrt(rank) if config.get("use_rslora") else rank)
    return {
        experts.module_name(param, e): LoraModule(A=A, B=B, scale=scale, expert=ExpertSlot(param, e, count))
        for e, (A, B) in enumerate(experts.split(pair.A, pair.B, count))
    }


def state_items(adapter: LoraAdapter, cast) -> dict[str, torch.Tensor]:
    """PEFT's saved keys for ``adapter``'s expert modules: per fused parameter one pair of rank r·E, nested as PEFT
    nests the parameters of one module. The experts of each parameter must be `loramix.experts.uniform`."""
    fused = {param: [found[e] for e in sorted(found)] for param, found in experts.groups(adapter.modules).items()}
    owners: dict[str, list[str]] = defaultdict(list)
    for param in fused:
        owner, _, short = param.rpartition(".")
        owners[owner].append(short)
    out = {}
    for owner, params in owners.items():
        for short, depth in experts.nesting(params).items():
            A, B = experts.fuse([(m.A, m.B) for m in fused[f"{owner}.{short}"]])
            key = PREFIX + owner + NESTED * depth
            out[f"{key}.lora_A.weight"] = cast(A)
            out[f"{key}.lora_B.weight"] = cast(B)
    return out


def config_items(adapter: LoraAdapter) -> tuple[dict[str, int], dict[str, float]]:
    """(rank, alpha) of each fused parameter as PEFT's config gives them: r per expert, alpha = scale·r (or
    scale·√r with rsLoRA); the experts of each parameter must be `loramix.experts.uniform`."""
    ranks, alphas = {}, {}
    for param, found in experts.groups(adapter.modules).items():
        first = found[0]
        ranks[param] = first.rank
        alphas[param] = first.scale * (math.sqrt(first.rank) if adapter.use_rslora else first.rank)
    return ranks, alphas
