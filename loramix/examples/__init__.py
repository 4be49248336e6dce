"""Bundled examples, built by ``tests/make_examples.py``; each is a folder, `path` gives it.

- ``tiny-llama``: a tiny random-weight Llama (vocab 256, 2 layers, bf16) with a character-level tokenizer
  (``tokenizer.json``: one token per printable ASCII character after ``<pad>``, ``<s>``, ``</s>``, ``<unk>``).
- ``summarize`` (r=8, q/v), ``translate`` (r=4, rsLoRA, q/k/v/o) and ``formal`` (r=8 with
  rank_pattern/alpha_pattern r=4 on o_proj): PEFT adapters made on it; ``dora`` (r=4, DoRA on q/v/down_proj, its
  magnitudes moved off their start), for ``loramix convert``.
- ``few-shot``: ``formal.jsonl``, six ``{"input": ..., "output": ...}`` pairs for ``loramix search``.
- ``minimind``: ``minimind_lora.pth``, a hand-made LoRA state dict in MiniMind's naming
  (``layers.0.attention.wq.lora.A.weight``, rank 4 on wq/wv/w2), and ``module_map.yaml``, which renames its modules
  to the tiny Llama's (``--module-map``).
- ``tiny-llama-tuned``: the tiny Llama "fully fine-tuned" (a rank-4 update plus a little noise on every projection,
  a retrained final norm), for ``loramix extract``.

Random weights: they demonstrate the mechanics, not skills.
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
