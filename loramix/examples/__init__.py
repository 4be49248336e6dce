"""Bundled examples: a tiny random-weight Llama (``tiny-llama``) and three PEFT adapters made on it by
``tests/make_examples.py``: ``summarize`` (r=8, q/v), ``translate`` (r=4, rsLoRA, q/k/v/o) and ``formal``
(r=8 with rank_pattern/alpha_pattern r=4 on o_proj). Random weights: they demonstrate the mechanics, not skills.
"""

from __future__ import annotations

from pathlib import Path

from loramix.errors import SourceError

ROOT = Path(__file__).parent


def names() -> list[str]:
    return sorted(p.name for p in ROOT.iterdir() if p.is_dir() and not p.name.startswith(("_", ".")))


def path(name: str) -> Path:
    """The folder of bundled example ``name``."""
    folder = ROOT / name
    if name not in names():
        raise SourceError(f"{name}: no such bundled example (have: {', '.join(names())})")
    return folder
