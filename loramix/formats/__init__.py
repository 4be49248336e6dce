"""On-disk adapter formats. `load_adapter` finds the source, detects its format and reads it."""

from __future__ import annotations

import logging
from pathlib import Path

from loramix.adapter import LoraAdapter
from loramix.errors import AdapterFormatError
from loramix.formats import adalora, kohya, peft, statedict
from loramix.sources import parse_hub_id, resolve

log = logging.getLogger(__name__)


def load_adapter(
    src: str | Path | LoraAdapter,
    *,
    allow_nonfinite: bool = False,
    log_warnings: bool = True,
    scale: float | None = None,
    alpha: float | None = None,
    base_model: str | None = None,
    module_map: dict | str | Path | None = None,
) -> LoraAdapter:
    """Load an adapter from a folder, a file, a Hub id (``org/name[@rev][:subfolder]``) or pass a `LoraAdapter` through.

    Formats: PEFT LoRA and AdaLoRA folders, kohya/A1111 and diffusers LoRA files (`kohya`, a file or a folder
    holding one), and single-file hand-made LoRA state dicts (`statedict`), which hold
    no scale, base model or base names: ``scale``/``alpha``, ``base_model`` and ``module_map`` supply them. Other
    formats carry their own scale and names (those options are ignored with a warning); ``base_model`` fills in
    a base they do not name. What the reader noticed is in ``adapter.warnings`` and, unless ``log_warnings`` is
    false, logged once.
    """
    if isinstance(src, LoraAdapter):
        return src
    path = resolve(src)
    if path.is_file() and path.name in peft.WEIGHT_FILES and peft.is_peft_folder(path.parent):
        path = path.parent
    options = {"scale": scale, "alpha": alpha, "base_model": base_model, "module_map": module_map}
    if kohya.find_file(path) is not None:
        adapter = _apply_options(kohya.read(path, allow_nonfinite=allow_nonfinite), **options)
    elif statedict.is_state_dict_file(path):
        adapter = statedict.read(path, allow_nonfinite=allow_nonfinite, **options)
    elif adalora.is_adalora_folder(path):
        adapter = _apply_options(adalora.read(path, allow_nonfinite=allow_nonfinite), **options)
    elif peft.is_peft_folder(path):
        adapter = _apply_options(peft.read(path, allow_nonfinite=allow_nonfinite), **options)
    else:
        raise AdapterFormatError(
            f"{path}: not a recognised adapter (no adapter_config.json, and not a "
            f"{'/'.join(statedict.SUFFIXES)} LoRA state dict file)"
        )
    adapter.source = str(src)
    if not Path(src).expanduser().exists():  # a Hub id: named after the repository, not the snapshot's hash
        ref = parse_hub_id(str(src))
        adapter.name = ref.repo_id.split("/")[-1] + (f":{ref.subfolder}" if ref.subfolder else "")
    if log_warnings:
        for note in adapter.warnings:
            log.warning("%s: %s", adapter.name, note)
    return adapter


def _apply_options(adapter: LoraAdapter, *, scale, alpha, base_model, module_map) -> LoraAdapter:
    """Options for state dicts, on a format that carries its own: ignored (said once), or fill in a missing base."""
    given = [
        label for label, value in (("scale", scale), ("alpha", alpha), ("module_map", module_map)) if value is not None
    ]
    if given:
        adapter.warnings.append(f"{', '.join(given)} apply to plain state dicts only; ignored for this adapter")
    if base_model is not None and adapter.base_model is None:
        adapter.base_model = base_model
    elif base_model is not None and adapter.base_model != base_model:
        adapter.warnings.append(f"base model {base_model!r} given, but the adapter names {adapter.base_model!r}: kept")
    return adapter
