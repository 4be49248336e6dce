"""`save_adapter`: an adapter (or any source `load_adapter` reads) written to one atomic output folder in a registered
format (`loramix.writers`), with its model card."""

from __future__ import annotations

from pathlib import Path

import torch

from loramix.adapter import LoraAdapter
from loramix.formats import default_format, load_adapter, write_adapter
from loramix.hub import revisions
from loramix.outputs import Output
from loramix.render.card import CARD_FILE, model_card
from loramix.runtime import parse_dtype
from loramix.settings import AdapterOutput


def save_adapter(
    adapter: LoraAdapter,
    folder: str | Path,
    *,
    format: str | None = None,
    dtype: torch.dtype | str | None = None,
    rank_layout: str = "portable",
    overwrite: bool = False,
    card: bool = True,
    **options,
) -> Path:
    """Write ``adapter`` to ``folder`` (atomically) as a PEFT folder, a kohya file or a llama.cpp GGUF (``format``;
    default: a kohya file for what was read from kohya, diffusers or LyCORIS files, else PEFT), with a
    README.md model card unless ``card`` is false; refuses to replace any of the adapter's own inputs. Returns the
    folder. ``adapter`` may also be any source `load_adapter` takes (a live PeftModel, for one). ``rank_layout``
    (PEFT and GGUF): "portable", one rank every engine reads, or "exact" (see `loramix.formats.peft.write`); other
    ``options`` go to the format's writer (GGUF: ``base``)."""
    adapter = load_adapter(adapter)
    written = AdapterOutput(format=format or default_format([adapter]), rank_layout=rank_layout)
    protect = [adapter.source, *adapter.provenance.get("sources", [])]
    out = Output(folder, overwrite=overwrite, protect=protect, name="folder")
    files = {CARD_FILE: model_card(adapter, revisions=revisions(protect), output_format=written.format)} if card else {}
    out.write(
        files,
        lambda tmp: write_adapter(
            adapter, tmp, dtype=parse_dtype(dtype), **written.write_options(str(folder)), **options
        ),
    )
    return Path(folder)
