"""PEFT's own LoHa and LoKr adapters (``peft_type: LOHA`` / ``LOKR``), read as the exact LoRAs they are.

PEFT saves them as LoRA folders are saved (adapter_config.json, adapter_model.safetensors, keys
``base_model.model.<module>.<part>``), with the parameter names and layouts of LyCORIS (PEFT's ``tuners/loha`` and
``tuners/lokr`` follow LyCORIS's modules): LoHa ``hada_w1_a``, ``hada_w1_b``, ``hada_w2_a``, ``hada_w2_b`` (and the
Tucker cores ``hada_t1``, ``hada_t2``), LoKr ``lokr_w1`` or ``lokr_w1_a``/``lokr_w1_b`` and ``lokr_w2`` or
``lokr_w2_a``/``lokr_w2_b`` (and ``lokr_t2``). So each module becomes its exact LoRA through
`loramix.formats.lycoris.exact_lora` (a LoHa of rank r is a LoRA of rank r², a LoKr of rank₁·rank₂), in factor
space, with no base. The scale is PEFT's, not LyCORIS's: ``alpha / r`` with r and alpha from the config (its
``rank_pattern`` / ``alpha_pattern`` for the module), for LoKr also when both halves are full (LyCORIS uses 1 there).
Rank and module dropout are training-only and off.
"""

from __future__ import annotations

from pathlib import Path

from loramix.adapter import LoraAdapter, LoraModule
from loramix.errors import AdapterFormatError
from loramix.formats import _keys, lycoris

NAME = "peft-lycoris"
KINDS = {"LOHA": "LoHa", "LOKR": "LoKr"}
PARTS = {"LOHA": lycoris.LOHA_PARTS, "LOKR": lycoris.LOKR_PARTS}


def detect(path: Path) -> bool:
    """A folder whose adapter_config.json says ``peft_type: LOHA`` or ``LOKR``."""
    return _keys.folder_peft_type(path) in KINDS


def read(path: str | Path, *, allow_nonfinite: bool = False) -> LoraAdapter:
    """Read a PEFT LoHa or LoKr adapter folder into a `LoraAdapter` of exact LoRA modules."""
    folder = Path(path)
    config, weights, tensors = _keys.load_folder(folder, allow_nonfinite=allow_nonfinite, peft_types=tuple(KINDS))
    peft_type = config["peft_type"]
    notes: list[str] = []
    parts, extra = _keys.split_keys(tensors, notes, kinds=PARTS[peft_type], config=config, where=weights)
    if not parts:
        raise AdapterFormatError(f"{weights}: holds no {KINDS[peft_type]} tensors ({', '.join(PARTS[peft_type][:4])})")
    modules = {name: _module(weights, name, found, config) for name, found in sorted(parts.items())}
    return _keys.finish_adapter(
        path, config, weights, modules, extra, notes, provenance={"format": NAME, "peft_type": KINDS[peft_type]}
    )


def _module(weights: Path, name: str, found: dict, config: dict) -> LoraModule:
    kind = KINDS[config["peft_type"]]
    for (part, param), tensor in found.items():
        if param != "weight" or not (tensor.is_floating_point() and tensor.numel()):
            raise AdapterFormatError(f"{weights}: {kind} module {name}: {part}.{param} is not a factor")
    module, _, _ = lycoris.exact_lora(f"{weights}: module {name}", kind, {part: t for (part, _), t in found.items()})
    where = Path(weights).parent / _keys.CONFIG_FILE
    rank = _keys.pattern_value(config.get("rank_pattern") or {}, name, config.get("r", 8), where=where)
    alpha = _keys.pattern_value(config.get("alpha_pattern") or {}, name, config.get("alpha", 8), where=where)
    module.scale = float(alpha) / rank
    return module
