"""The naming rules that group modules: by layer or block (``model.layers.3``, ``UNet down_blocks_0``), by type
(``q_proj``, ``attn1_to_q``) and by pipeline component (UNet, text encoder), in natural order. kohya's flat names
(``lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q``) are read by the same rules as dotted ones,
so a Stable Diffusion LoRA's 64 modules group as ``attn1_to_q ×8, …`` rather than 64 groups of one."""

from __future__ import annotations

import re
from collections import Counter

from loramix.io.diffusers import KOHYA_COMPONENTS

NO_LAYER = "(no layer)"
COMPONENTS = {"unet": "UNet", "text_encoder": "text encoder", "text_encoder_2": "text encoder 2"}
COMPONENTS |= {"transformer": "transformer"}

_LAYER = re.compile(r"^(.*?\.\d+)(?:\.|$)")
_FLAT_BLOCK = re.compile(r"^(mid_block|.*?_\d+)(?:_|$)")  # a flat name up to its first index: down_blocks_0
# The last container index of a flat name; what follows is the module type (…_transformer_blocks_0_ → attn1_to_q).
_FLAT_CONTAINER = re.compile(r"(?:blocks|attentions|resnets|layers|samplers)_\d+(?:_\d+)?_")


def _flat(name: str) -> tuple[str, str] | None:
    """(component, name without its kohya prefix) of a kohya name, else None."""
    if "." in name:
        return None
    prefix = max((p for p in KOHYA_COMPONENTS if name.startswith(p)), key=len, default=None)
    return (KOHYA_COMPONENTS[prefix], name.removeprefix(prefix)) if prefix else None


def component_of(name: str) -> str | None:
    """The diffusion pipeline component a module belongs to, as shown (``UNet``, ``text encoder``), from a kohya
    prefix or a dotted ``unet.``/``text_encoder.`` one; None for a model's own module paths."""
    flat = _flat(name)
    component = flat[0] if flat else name.split(".", 1)[0] if "." in name else None
    return COMPONENTS.get(component) if component else None


def layer_of(name: str) -> str:
    """The module path up to its first numeric component (``model.layers.3``); for a kohya name the component and
    block (``UNet down_blocks_0``, ``text encoder layers_3``); else ``(no layer)``."""
    flat = _flat(name)
    if flat:
        rest = flat[1].removeprefix("text_model_").removeprefix("encoder_")
        match = _FLAT_BLOCK.match(rest)
        return f"{COMPONENTS.get(flat[0], flat[0])} {match.group(1)}" if match else NO_LAYER
    match = _LAYER.match(name)
    return match.group(1) if match else NO_LAYER


def type_of(name: str) -> str:
    """The module's last path component (``q_proj``); for a kohya name what follows its last block index
    (``attn1_to_q``, ``ff_net_0_proj``, ``self_attn_q_proj``)."""
    flat = _flat(name)
    if flat:
        return _FLAT_CONTAINER.split(flat[1])[-1]
    return name.rsplit(".", 1)[-1]


def typed(name: str) -> str:
    """The module's type, its component first where it has one: ``q_proj``, ``UNet: attn1_to_q``."""
    component = component_of(name)
    return f"{component}: {type_of(name)}" if component else type_of(name)


def type_counts(names) -> dict[str, int]:
    """How many modules of each `typed` type ``names`` hold, in natural order (components after plain types); the
    component is named only where the names span several (a GPT-2's ``transformer.h.0`` is no pipeline's part)."""
    names = list(names)
    several = len({component_of(n) for n in names}) > 1
    counts = Counter(map(typed if several else type_of, names))
    return {key: counts[key] for key in sorted(counts, key=lambda k: (":" in k, natural_key(k)))}


def type_summary(counts: dict[str, int]) -> str:
    """`type_counts` on one line, grouped by component: ``q_proj ×2, v_proj ×2`` or ``UNet: attn1_to_q ×16, …;
    text encoder: self_attn_q_proj ×12, …``."""
    groups: dict[str, list[str]] = {}
    for key, count in counts.items():
        component, _, kind = key.rpartition(": ")
        groups.setdefault(component, []).append(f"{kind} ×{count}")
    return "; ".join(", ".join(items) if not c else f"{c}: {', '.join(items)}" for c, items in groups.items())


def natural_key(text: str) -> list:
    """Sort key that orders embedded numbers numerically (layer 2 before layer 10)."""
    return [(0, int(part), "") if part.isdigit() else (1, 0, part) for part in re.split(r"(\d+)", text) if part]
