"""On-disk adapter formats and the front door every command uses to read and write them.

Each format module has the same verbs: ``NAME``, ``detect(path)`` (from file names and headers only),
``read(path, **options)`` and, where the format can be written, ``write(adapter, folder, **options)`` (into an
existing folder; atomicity is the caller's, see `loramix.pipeline`). `FORMATS` lists the readers in detection
order. `load_adapter` reads one source, `load_adapters` several with their weights and the compatibility check
every command needs, `write_adapter` writes one adapter in a named format.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable
from pathlib import Path

from loramix import experts, writers
from loramix.adapter import LoraAdapter, check_compatible
from loramix.errors import AdapterFormatError, ArgumentError, IncompatibleAdaptersError, SettingError
from loramix.formats import _keys, adalora, kohya, live, lycoris, peft, peft_lycoris, statedict
from loramix.formats.diffusion import file_naming, fits_a_family, peft_folder
from loramix.formats.diffusion import reference_names as diffusion_files
from loramix.io.conversion_mapping import in_memory, model_names
from loramix.schedule import Schedule, parse
from loramix.sources import local_config, parse_hub_id, resolve

log = logging.getLogger(__name__)

# detection order: the first whose detect() says yes reads the source (LyCORIS before kohya: same names, more keys)
FORMATS = (lycoris, kohya, diffusion_files, statedict, adalora, peft_lycoris, peft)
DIFFUSION_FORMATS = (kohya.NAME, lycoris.NAME)  # files diffusion pipelines' loaders read
UNKNOWN_BASE = "base model unknown; only module shapes can be checked against the others"
# path::key=value: the options a plain state dict needs, per source (numbers or text)
SOURCE_OPTIONS = {key: float if key in ("scale", "alpha") else str for key in statedict.LOAD_OPTIONS}


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
    """Load an adapter from a folder, a file, a Hub id (``org/name[@rev][:subfolder]``), a live object (a
    ``PeftModel`` or transformers model holding adapters, ``(model, "adapter name")``, ``(state_dict, LoraConfig)``:
    see `loramix.formats.live`) or pass a `LoraAdapter` through. A path or Hub id may carry its own load options:
    ``path::scale=0.5,alpha=16`` (see `split_source_options`).

    Formats: PEFT LoRA, AdaLoRA, LoHa and LoKr folders, kohya/A1111 and diffusers LoRA files and LyCORIS
    LoCon/LoHa/LoKr files (LoHa and LoKr read as exact LoRAs; a file or a folder holding one), and hand-made LoRA
    state dicts (a file, or a folder holding only it), which hold no scale, base model or base names:
    ``scale``/``alpha``, ``base_model`` and ``module_map`` supply them. Other formats carry their own scale and
    names (those options are ignored with a warning); ``base_model`` fills in a base they do not name. What the
    reader noticed is in ``adapter.warnings`` and, unless ``log_warnings`` is false, logged once.
    """
    if isinstance(src, LoraAdapter):
        return src
    options = {"scale": scale, "alpha": alpha, "base_model": base_model, "module_map": module_map}
    if live.is_live(src):
        return _finish(_apply_options(live.read(src, allow_nonfinite=allow_nonfinite), **options), log_warnings)
    if not isinstance(src, (str, Path)):
        raise AdapterFormatError(f"cannot load an adapter from {live.describe(src)}: give {live.ACCEPTED}")
    src, per_source = split_source_options(src)
    options.update(per_source)
    path = resolve(src)
    if path.is_file() and path.name in _keys.WEIGHT_FILES and peft.detect(path.parent):
        path = path.parent
    reader = next((fmt for fmt in FORMATS if fmt.detect(path)), None)
    if reader is None:
        raise AdapterFormatError(
            f"{path}: not a recognised adapter (no adapter_config.json, and not a "
            f"{'/'.join(statedict.SUFFIXES)} LoRA state dict file or a folder holding exactly one)"
        )
    if reader is statedict:
        adapter = statedict.read(path, allow_nonfinite=allow_nonfinite, **options)
    else:
        adapter = _apply_options(reader.read(path, allow_nonfinite=allow_nonfinite), **options)
    if reader is peft:  # a diffusion transformer's PEFT folder reads as its family
        adapter = peft_folder.as_family(adapter, str(path))
    if allow_nonfinite:
        _nonfinite_note(adapter)
    adapter.source = str(src)
    if not Path(src).expanduser().exists():  # a Hub id: named after the repository, not the snapshot's hash
        ref = parse_hub_id(str(src))
        adapter.name = ref.repo_id.split("/")[-1] + (f":{ref.subfolder}" if ref.subfolder else "")
    return _finish(adapter, log_warnings)


def _finish(adapter: LoraAdapter, log_warnings: bool) -> LoraAdapter:
    if log_warnings:
        for note in adapter.warnings:
            log.warning("%s: %s", adapter.name, note)
    return adapter


def _nonfinite_note(adapter: LoraAdapter) -> None:
    """Say how many NaN/Inf values an adapter read with ``allow_nonfinite`` holds, and where."""
    counts = adapter.nonfinite()
    if counts:
        total = sum(counts.values())
        adapter.warnings.append(
            f"{total:,} of {adapter.num_params():,} values are NaN/Inf, in {len(counts)} tensor(s) "
            f"({_keys.sample([f'{n} ×{c:,}' for n, c in counts.items()])})"
        )


def split_source_options(src: str | Path) -> tuple[str | Path, dict]:
    """``path::scale=0.5,module_map=map.yaml`` → (``path``, its own load options); a source without ``::`` as is.

    Options: scale, alpha (numbers), base_model, module_map (text). They override the options given for every
    source."""
    if not isinstance(src, str) or "::" not in src:
        return src, {}
    path, _, spec = src.partition("::")
    options: dict = {}
    for item in spec.split(","):
        key, sep, value = (part.strip() for part in item.partition("="))
        if not sep or key not in SOURCE_OPTIONS or not value:
            raise AdapterFormatError(
                f"{src}: expected SOURCE::KEY=VALUE[,KEY=VALUE] with KEY one of {', '.join(SOURCE_OPTIONS)}, "
                f"got {item.strip()!r}"
            )
        if SOURCE_OPTIONS[key] is float:
            try:
                options[key] = float(value)
            except ValueError:
                raise AdapterFormatError(f"{src}: {key} must be a number, got {value!r}") from None
        else:
            options[key] = value
    return path, options


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


def load_adapters(
    sources: list,
    *,
    weights: list[float] | None = None,
    allow_different_bases: bool = False,
    allow_nonfinite: bool = False,
    log_warnings: bool = True,
    load_options: dict | None = None,
) -> tuple[list[LoraAdapter], list[Schedule]]:
    """Load ``sources`` (as `load_adapter`, with ``load_options`` for each) and check them together: the weights
    (default 1/n each; one per adapter: a finite number or a value that varies by layer or module, see
    `loramix.schedule`) and that the adapters fit one base (`check_compatible`). Returns the adapters and the weights
    (`loramix.schedule.parse`d: a `loramix.schedule.Schedule` each, a `Constant` for a number)."""
    if isinstance(sources, (str, Path, LoraAdapter)) or live.is_live(sources):
        raise ArgumentError(f"adapters must be a list of sources, not a single one (each source: {live.ACCEPTED})")
    if not isinstance(sources, (list, tuple)):
        raise ArgumentError(
            f"adapters must be a list of sources, not a {type(sources).__name__} (each: {live.ACCEPTED})"
        )
    if weights is not None and (not isinstance(weights, Iterable) or isinstance(weights, (str, bytes, dict))):
        raise ArgumentError(f"weights must be a list of numbers, one per adapter, got {type(weights).__name__}")
    loaded = [
        load_adapter(s, allow_nonfinite=allow_nonfinite, log_warnings=log_warnings, **(load_options or {}))
        for s in sources
    ]
    if not loaded:
        raise SettingError("no adapters given")
    weights = [1.0 / len(loaded)] * len(loaded) if weights is None else list(weights)
    if len(weights) != len(loaded):
        raise SettingError(f"{len(weights)} weight(s) for {len(loaded)} adapter(s)")
    weights = [parse(w, what=f"weight {i + 1}") for i, w in enumerate(weights)]
    loaded = _one_naming(_align_flat_conv(loaded), (load_options or {}).get("base_model"))
    check_compatible(loaded, allow_different_bases=allow_different_bases)
    if len(loaded) > 1 and log_warnings:  # said once, where the adapter was read (not for LoraAdapters passed in)
        for source, adapter in zip(sources, loaded):
            if not adapter.base_model and not isinstance(source, LoraAdapter):
                log.warning(
                    "%s: base model unknown; only module shapes can be checked against the others", adapter.name
                )
    return loaded, weights


_LAYER_TAIL = re.compile(r"(?:^|\.)(layers\.\d+\..*)$")
_PER_EXPERT = re.compile(r"\.experts\.\d+\.")


def _one_naming(adapters: list[LoraAdapter], base_model: str | None) -> list[LoraAdapter]:
    """Adapters under transformers' in-memory names of their base's architecture (its checkpoint conversion mapping:
    a module named as the checkpoint stores it and as the model holds it is one module): always when ``base_model``
    is given and its config.json is at hand, else when the adapters' module names differ (from the config of a base
    an adapter names). Without one at hand, names that look like two namings of one module are refused."""
    given = local_config(base_model) if base_model else None
    if given is None and (len(adapters) < 2 or all(a.modules.keys() == adapters[0].modules.keys() for a in adapters)):
        return adapters
    bases = [a.base_model for a in adapters]
    folder = given or next((f for base in bases if base for f in [local_config(base)] if f), None)
    names = model_names(folder) if folder is not None else None
    if names is None:
        _refuse_two_namings(adapters)
        return adapters
    renamed = [in_memory(a, names) for a in adapters]
    for before, after in zip(adapters, renamed):
        if after is not before:
            after.provenance = {**after.provenance, "renamed": str(folder)}
            log.info("%s: module names mapped onto transformers' in-memory names (%s)", before.name, folder)
    return renamed


def _refuse_two_namings(adapters: list[LoraAdapter]) -> None:
    fused = next((a for a in adapters if experts.is_expert_adapter(a)), None)
    listed = next(
        ((a, n) for a in adapters for n, m in a.modules.items() if m.expert is None and _PER_EXPERT.search(n)), None
    )
    if fused is not None and listed is not None:
        raise IncompatibleAdaptersError(
            f"{fused.name} adapts fused expert parameters and {listed[0].name} per-expert modules ({listed[1]}): "
            "loramix maps one onto the other through transformers' conversion mapping of the base, whose config.json "
            "is not at hand (give base_model as a local folder or a Hub id in the local cache)"
        )
    tails: dict[str, tuple[LoraAdapter, str]] = {}
    for a in adapters:
        for name in a.modules:
            found = _LAYER_TAIL.search(name)
            if found is None:
                continue
            other = tails.setdefault(found.group(1), (a, name))
            if other[1] != name:
                raise IncompatibleAdaptersError(
                    f"{other[0].name} names {other[1]} and {a.name} names {name}: two namings of one module? loramix "
                    "maps them through transformers' conversion mapping of the base, whose config.json is not at hand "
                    "(give base_model as a local folder or a Hub id in the local cache)"
                )


def _align_flat_conv(adapters: list[LoraAdapter]) -> list[LoraAdapter]:
    """A module read flat (a plain LyCORIS conv LoHa/LoKr: out × in·kh·kw, no kernel in the file) takes the kernel of
    the same module in another adapter (`LoraModule.on_weight`); the adapters given are left as they are."""
    convs = {name: m.base_shape for a in adapters for name, m in a.modules.items() if m.layout == "conv2d"}
    aligned = []
    for a in adapters:
        laid = {n: m.on_weight(convs[n]) for n, m in a.modules.items() if n in convs and m.layout == "out_in"}
        changed = {n: m for n, m in laid.items() if m.layout == "conv2d"}
        aligned.append(a.with_modules({**a.modules, **changed}) if changed else a)
    return aligned


def default_format(adapters: list[LoraAdapter]) -> str:
    """The output format the inputs' own ecosystem loads: a kohya file (what diffusers, ComfyUI and A1111 read; for
    a diffusion transformer the file both load, `loramix.formats.diffusion.file_naming`) when every input was read
    from a kohya, diffusers or LyCORIS file or is named as one (a combination of such files included), else a PEFT
    folder."""
    return file_naming(adapters) if adapters and all(_diffusion_lora(a) for a in adapters) else "peft"


def _diffusion_lora(adapter: LoraAdapter) -> bool:
    formats = adapter.provenance.get("formats") or [adapter.provenance.get("format")]
    dit = fits_a_family(adapter.modules)  # a diffusion transformer's modules (its PEFT folder's included)
    return all(f in DIFFUSION_FORMATS for f in formats) or kohya.kohya_named(adapter.modules) or dit


def write_adapter(adapter: LoraAdapter, folder: Path, *, format: str = "peft", **options) -> Path:
    """Write ``adapter`` into the existing ``folder`` in ``format`` (a registered `loramix.writers.Writer`: peft,
    kohya, comfyui, diffusers, gguf, ...); returns the main file."""
    writer = writers.get(format)
    if not writer.experts:
        experts.refuse(adapter, f"the {format} format")
    return writer.function()(adapter, folder, **options)
