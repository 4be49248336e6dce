"""On-disk adapter formats. `load_adapter` finds the source, detects its format and reads it."""

from __future__ import annotations

import logging
from pathlib import Path

from loramix.adapter import LoraAdapter
from loramix.errors import AdapterFormatError
from loramix.formats import peft
from loramix.sources import resolve

log = logging.getLogger(__name__)


def load_adapter(
    src: str | Path | LoraAdapter, *, allow_nonfinite: bool = False, log_warnings: bool = True
) -> LoraAdapter:
    """Load an adapter from a folder, a Hub id (``org/name[@rev][:subfolder]``) or pass a `LoraAdapter` through.

    What the reader noticed (normalised keys, config/tensor disagreements) is in ``adapter.warnings`` and,
    unless ``log_warnings`` is false, logged once.
    """
    if isinstance(src, LoraAdapter):
        return src
    path = resolve(src)
    if peft.is_peft_folder(path):
        adapter = peft.read(path, allow_nonfinite=allow_nonfinite)
    else:
        raise AdapterFormatError(f"{path}: not a recognised adapter (no adapter_config.json)")
    adapter.source = str(src)
    if log_warnings:
        for note in adapter.warnings:
            log.warning("%s: %s", adapter.name, note)
    return adapter
