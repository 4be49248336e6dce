"""The naming rules that group modules: by layer (``model.layers.3``), by type (``q_proj``), in natural order."""

from __future__ import annotations

import re

NO_LAYER = "(no layer)"


_LAYER = re.compile(r"^(.*?\.\d+)(?:\.|$)")


def layer_of(name: str) -> str:
    """The module path up to its first numeric component (``model.layers.3``), or ``(no layer)``."""
    match = _LAYER.match(name)
    return match.group(1) if match else NO_LAYER


def type_of(name: str) -> str:
    """The module's last path component (``q_proj``)."""
    return name.rsplit(".", 1)[-1]


def natural_key(text: str) -> list:
    """Sort key that orders embedded numbers numerically (layer 2 before layer 10)."""
    return [(0, int(part), "") if part.isdigit() else (1, 0, part) for part in re.split(r"(\d+)", text) if part]
