"""AdaLoRA adapters (PEFT ``peft_type: ADALORA``), read into the plain LoRA data model.

An AdaLoRA module holds ``lora_A`` (r×in), ``lora_E`` (r×1, the learned singular values) and ``lora_B`` (out×r).
PEFT 0.21 (``tuners/adalora/layer.py``, ``SVDLinear.get_delta_weight``) computes

    ΔW = B · (A ⊙ E) · scaling / (ranknum + 1e-5)

where ``scaling`` is the config's ``lora_alpha`` (or, when that is ≤ 0, the layer's stored rank) and ``ranknum`` is
the module's ``ranknum`` tensor when the file holds one (PEFT loads it), else the config's ``init_r``: PEFT creates
every layer with rank ``init_r`` and, when it shrinks a layer to the ranks ``rank_pattern`` keeps, copies the old
``ranknum`` back, so pruning never changes the scale. (The config's ``r`` is unused by AdaLoRA.)

Reading folds E into A (A' = A ⊙ E) and keeps only the live ranks (non-zero E), so each module's rank is its live
rank and ``scale = scaling / (ranknum + 1e-5)`` gives the same ΔW through ``LoraModule``'s ΔW = scale·B·A.
PEFT saves only the ranks ``rank_pattern`` keeps; a file whose tensors still hold every rank has the pattern
applied here (as PEFT's own save would). A module with no live rank changes nothing and is left out.

Not handled: AdaLoRA on Conv2d layers keeps A as a 2-D (r × in·kh·kw) matrix, so the kernel size cannot be read
from the file; such modules are read as linear ones of that width.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

from loramix.adapter import LoraAdapter, LoraModule
from loramix.errors import AdapterFormatError
from loramix.formats import _keys

NAME = "adalora"
PEFT_TYPE = "ADALORA"
KINDS = (*_keys.LORA_KINDS, "lora_E", "ranknum")
EPSILON = 1e-5  # PEFT adds it to ranknum in get_delta_weight and forward
_PATTERN_SUFFIX = re.compile(r"\.lora_E(\.[^.]+)?$")


def detect(path: Path) -> bool:
    """A folder whose adapter_config.json says ``peft_type: ADALORA`` (unreadable configs are the PEFT reader's)."""
    return _keys.folder_peft_type(path) == PEFT_TYPE


def read(path: str | Path, *, allow_nonfinite: bool = False) -> LoraAdapter:
    """Read an AdaLoRA adapter folder into a `LoraAdapter` of plain LoRA modules (E folded into A)."""
    folder = Path(path)
    config, weights, tensors = _keys.load_folder(folder, allow_nonfinite=allow_nonfinite, peft_types=(PEFT_TYPE,))
    notes: list[str] = []
    parts, extra = _keys.split_keys(tensors, notes, kinds=KINDS)
    if not parts:
        raise AdapterFormatError(f"{weights}: holds no AdaLoRA tensors (no lora_A / lora_E / lora_B keys)")
    masks = _rank_masks(folder, config)
    modules, live = {}, {}
    for name in sorted(parts):
        module, live[name] = _fold(weights, name, parts[name], config, masks.get(name), notes)
        if module is not None:
            modules[name] = module
    dead = sorted(n for n in parts if n not in modules)
    if dead:
        notes.append(
            f"{len(dead)} module(s) have no live rank (all singular values pruned) and change nothing; "
            f"left out ({_keys.sample(dead)})"
        )
    if not modules:
        raise AdapterFormatError(f"{weights}: every AdaLoRA module is pruned to rank 0: the adapter changes nothing")
    return _keys.finish_adapter(
        path,
        config,
        weights,
        modules,
        extra,
        notes,
        provenance={"format": "adalora", "init_r": config.get("init_r", 12), "live_ranks": live},
    )


def _rank_masks(folder: Path, config: dict) -> dict[str, list[bool]]:
    """``rank_pattern`` as {module name: keep-mask}; PEFT keys it ``<module>.lora_E`` (adapter name removed)."""
    pattern = config.get("rank_pattern") or {}
    if not isinstance(pattern, dict):
        raise AdapterFormatError(f"{folder / _keys.CONFIG_FILE}: rank_pattern must be a mapping, got {pattern!r}")
    masks = {}
    for key, mask in pattern.items():
        if not isinstance(mask, list) or not all(isinstance(v, (bool, int)) for v in mask):
            raise AdapterFormatError(
                f"{folder / _keys.CONFIG_FILE}: rank_pattern[{key!r}] must be a list of booleans, got {mask!r}"
            )
        name, _ = _keys.strip_prefix(_PATTERN_SUFFIX.sub("", key))
        masks[name] = [bool(v) for v in mask]
    return masks


def _fold(
    weights: Path, name: str, found: dict, config: dict, mask: list[bool] | None, notes: list[str]
) -> tuple[LoraModule | None, int]:
    """One module as plain LoRA factors (None when no rank is live) and its live rank."""
    A, E, B = (found.get((kind, "weight")) for kind in ("lora_A", "lora_E", "lora_B"))
    for kind, tensor in (("lora_A", A), ("lora_E", E), ("lora_B", B)):
        if tensor is None:
            raise AdapterFormatError(f"{weights}: AdaLoRA module {name} has no {kind} tensor")
    if A.dim() != 2 or B.dim() != 2 or E.numel() != A.shape[0] or B.shape[1] != A.shape[0]:
        raise AdapterFormatError(
            f"{weights}: AdaLoRA module {name}: lora_A {tuple(A.shape)}, lora_E {tuple(E.shape)} and "
            f"lora_B {tuple(B.shape)} disagree on the rank"
        )
    stored = A.shape[0]
    keep = E.reshape(-1) != 0
    if mask is not None and len(mask) != sum(mask):
        if stored == len(mask):
            notes.append(f"module {name} holds all {stored} ranks; applied its rank_pattern (keeps {sum(mask)})")
            keep &= torch.tensor(mask)
        elif stored != sum(mask):
            raise AdapterFormatError(
                f"{weights}: AdaLoRA module {name} has rank {stored} but rank_pattern keeps {sum(mask)} of {len(mask)}"
            )
    ranknum = _ranknum(weights, name, found.get(("ranknum", "weight")), config)
    alpha = config.get("lora_alpha", 8)
    scaling = float(alpha) if alpha > 0 else float(stored)
    live = int(keep.sum())
    if live == 0:
        return None, 0
    folded = (A.float() * E.float().reshape(-1, 1))[keep].to(A.dtype)
    module = _keys.module_from_parts(
        weights,
        name,
        {("lora_A", "weight"): folded, ("lora_B", "weight"): B[:, keep]},
        bool(config.get("fan_in_fan_out", False)),
    )
    module.scale = scaling / (ranknum + EPSILON)
    return module, live


def _ranknum(weights: Path, name: str, saved: torch.Tensor | None, config: dict) -> float:
    if saved is None:
        return float(config.get("init_r", 12))
    if saved.numel() != 1:
        raise AdapterFormatError(f"{weights}: AdaLoRA module {name}: ranknum has {saved.numel()} values, expected 1")
    return float(saved.reshape(()).item())
