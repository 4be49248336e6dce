"""PEFT folders of diffusion transformers: an adapter that PEFT's ``save_pretrained`` wrote for a diffusers
transformer (``adapter_model.safetensors`` with ``base_model.model.transformer_blocks.0.attn.to_q.lora_A.weight``
and an ``adapter_config.json``), read as its family.

PEFT names its modules by their path inside the model it wrapped, here the pipeline's ``transformer`` component; the
PEFT reader (`loramix.formats.peft`) gives ``transformer_blocks.0.attn.to_q``. Where every module name, under
diffusers' ``transformer.`` prefix, is a module of a known diffusion-transformer family
(`loramix.formats.diffusion.recognise`: one family, or diffusers' names several share), the adapter takes that
prefix and the family's identity (`loramix.formats.diffusion.identify`), so it lines up with the same model's LoRAs
in every other naming, and `check` and the default output treat it as that family's LoRA. Any other PEFT adapter
(a language model's) is left as it is.
"""

from __future__ import annotations

from loramix.adapter import LoraAdapter
from loramix.formats.diffusion import COMPONENT, FAMILIES, identify, reading


def as_family(adapter: LoraAdapter, where: str) -> LoraAdapter:
    """``adapter`` (read from a PEFT folder) under diffusers' transformer names when all its modules are a diffusion
    transformer family's (see the module docstring); else as it is."""
    names = list(adapter.modules)
    if not names or any(n.startswith(COMPONENT) for n in names):
        return adapter
    prefixed = [COMPONENT + n for n in names]
    if not any(all(_target(family, n) for n in prefixed) for family in FAMILIES):
        return adapter
    renamed = adapter.with_modules({COMPONENT + n: m for n, m in adapter.modules.items()})
    out = identify(renamed, where)
    return out if out.provenance.get("family") or out.provenance.get("fits") else adapter


def _target(family, name: str) -> bool:
    found = reading(family, name)
    return found is not None and found[2] >= 0
