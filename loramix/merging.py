"""`merge_into_base`: an adapter merged into a base checkpoint (a transformers folder or a diffusers pipeline), written
as one atomic output folder with its card, the QLoRA-faithful round trip where the base was trained in 4 bit.

`merge_into_base` accepts what users pass (a source, loose values) once and calls `merge_loaded`, the core that takes
only a loaded adapter, a `loramix.settings.MergeTarget` and a device; `loramix.pipeline.run` calls that core for
``--merge-into``. The merge itself is `loramix.merge.checkpoint.write_merged` (or
`loramix.merge.diffusers_pipeline.write_merged_pipeline`), this module only opens the base and assembles the output.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

from loramix.adapter import LoraAdapter, canonical_base
from loramix.errors import CheckpointError, SettingError
from loramix.formats import load_adapter
from loramix.formats.diffusion import onto_base
from loramix.io.base import open_base, require_base, resolve_base, with_base_names
from loramix.io.diffusers import is_pipeline, open_pipeline
from loramix.io.disk.early_copy import claim
from loramix.io.files import atomic_output
from loramix.io.gguf_base import gguf_base_file, open_gguf
from loramix.merge.checkpoint import MergeReport, write_merged
from loramix.merge.diffusers_pipeline import write_merged_pipeline
from loramix.merge.gguf import safetensors_written_as, save_tokenizer, write_merged_gguf
from loramix.merge.processes import place, shared, shared_output, write_in_parts
from loramix.quantize import quantization_settings
from loramix.render.card import CARD_FILE, dtype_section, model_card, quantization_section
from loramix.runtime import parse_dtype, require_path, resolve_device
from loramix.settings import MergeTarget, QuantizedBase

log = logging.getLogger(__name__)


def merge_into_base(
    adapter: LoraAdapter | str | Path,
    base: str | Path,
    out: str | Path,
    *,
    dtype: torch.dtype | str | None = None,
    shard_size: int | str | None = None,
    device: str | torch.device = "auto",
    overwrite: bool = False,
    progress: bool = False,
    workers: int | None = None,
    files: dict[str, str] | None = None,
    quantized_as: str | None = None,
    double_quant: bool | None = None,
    blocksize: int | None = None,
    round_trip: str = "all",
    merged_format: str | None = None,
) -> MergeReport:
    """Merge ``adapter`` (a `LoraAdapter` or a source) into the ``base`` checkpoint (a folder or Hub id) and write the
    merged checkpoint to ``out``, atomically, without touching any input (see `loramix.merge.checkpoint.write_merged`
    for the layout and the report). kohya module names (``lora_…``) are matched to the base's own module paths. A
    diffusers pipeline folder (``model_index.json``) is written as a pipeline: each component the adapter changes merged
    in its own files, the rest copied (see `loramix.merge.diffusers_pipeline`). ``files`` (name → text: card, recipe) go
    into the same folder; without them a README.md model card says what is known. ``shard_size`` None keeps a
    safetensors base's own shard files (a size lays the tensors out anew); ``workers`` tensors are merged at once
    (default: one per CPU; on a GPU 8, or 4 where a tensor is one chunk: fused experts, DoRA, conv; the bytes are the
    same for any count). The checkpoint keeps the base's dtype (tensors the adapter leaves alone byte for byte)
    unless ``dtype`` asks for another, which the card then says; a quantized base keeps its own format, re-quantized
    where ΔW changes it (`loramix.merge.quantized_base`).

    QLoRA-faithful merge: with ``quantized_as`` ("nf4" or "fp4"; "fp8": transformers' block FP8; "mxfp4": gpt-oss's
    experts in MXFP4, see `loramix.quantize`), or a ``quantization_config`` loading in 4 bit in
    the base's or the adapter's config (transformers' `BitsAndBytesConfig` fields; the arguments override them,
    ``quantized_as="none"`` turns it off), each base weight a 4-bit model quantizes first goes through bitsandbytes'
    quantize_4bit → dequantize_4bit round trip (``blocksize``, ``double_quant``: compress_statistics), then ΔW is
    added. ``round_trip="all"`` (the default) round-trips every such weight — the model the adapter was trained
    with; ``"targeted"`` only those the adapter changes. Needs ``pip install 'loramix[qlora]'``.

    A GGUF base file (or a folder holding one) is written as a GGUF file again (`loramix.merge.gguf`); with
    ``merged_format="safetensors"`` as the transformers model folder it holds instead (`loramix.io.gguf_model`:
    transformers' names and config, every tensor dequantized, then stored in ``dtype``, else float32 for quantized
    types and F32/F16/BF16 tensors as they were). ``merged_format="gguf"`` needs a GGUF base."""
    out = require_path(out, "out (the output folder)")
    target = MergeTarget(
        merge_into=require_base(base),
        shard_size=None if shard_size is None else str(shard_size),
        workers=workers,
        quantized=QuantizedBase(quantized_as, double_quant, blocksize, round_trip),
        merged_format=merged_format,
    )
    return merge_loaded(
        load_adapter(adapter),
        target,
        out,
        dtype=dtype,
        device=resolve_device(device),
        overwrite=overwrite,
        progress=progress,
        files=files,
    )


def merge_loaded(
    adapter: LoraAdapter,
    target: MergeTarget,
    out: Path,
    *,
    dtype: torch.dtype | str | None,
    device: torch.device,
    overwrite: bool = False,
    progress: bool = False,
    files: dict[str, str] | None = None,
) -> MergeReport:
    """`merge_into_base`'s work, for callers that hold what it accepts: a loaded ``adapter``, a ``target``, the
    stored ``dtype`` (None: the base's) and a resolved ``device`` (`loramix.outputs.Output.merge`, which the pipeline
    and the search write through)."""
    base, shard_size, quantized = target.merge_into, target.shard_size, target.quantized
    quantized_as = quantized.quantized_as
    target_dtype = parse_dtype(dtype)
    gguf_file = gguf_base_file(base)
    if target.merged_format == "gguf" and gguf_file is None:
        raise SettingError(
            f"{base}: `merged_format` gguf writes a GGUF base as GGUF again; this base is no GGUF file (llama.cpp's "
            "convert_hf_to_gguf.py converts a merged folder)"
        )
    if gguf_file is not None and target.merged_format != "safetensors":  # a GGUF file again (`loramix.merge.gguf`)
        if quantized_as not in (None, "none") or shard_size is not None:
            raise CheckpointError(f"{gguf_file}: a GGUF base; quantized_as and shard_size do not apply to it")
        if place()[1] > 1:
            raise CheckpointError(f"{gguf_file}: a GGUF base is merged in one process (not under torchrun)")
        gguf_base = open_gguf(gguf_file)
        files = files if files is not None else {CARD_FILE: model_card(adapter, merged_into=str(base))}
        with atomic_output(out, overwrite=overwrite, protect=[gguf_file, adapter.source], finite=False) as tmp:
            report = write_merged_gguf(adapter, gguf_base, tmp, target_dtype)
            if CARD_FILE in files:
                files = {**files, CARD_FILE: quantization_section(files[CARD_FILE], report)}
            write_files(tmp, files)
        report.path = Path(out)
        return report
    folder = resolve_base(base)
    pipeline = open_pipeline(folder) if is_pipeline(folder) else None
    checkpoint = None if pipeline else open_base(folder)
    if pipeline and quantized_as not in (None, "none"):
        raise CheckpointError(f"{folder}: a diffusers pipeline; quantized_as applies to transformers bases only")
    quantization = None
    if checkpoint is not None:
        _warn_other_base(adapter, str(base), folder, checkpoint.config)
        adapter = with_base_names(onto_base(adapter, checkpoint.tensors), checkpoint)  # kohya, DiT names → base's
        quantization = quantization_settings(
            [(str(folder), checkpoint.config), *_adapter_configs(adapter)],
            quantized_as=quantized_as,
            double_quant=quantized.double_quant,
            blocksize=quantized.blocksize,
            round_trip=quantized.round_trip,
        )
    if files is None:
        files = {CARD_FILE: model_card(adapter, merged_into=str(base))}
    protect = [folder, adapter.source, *adapter.provenance.get("sources", [])]
    rank, world = place()  # under torchrun: this process's share of the shards (`loramix.merge.processes`)
    if world > 1 and pipeline is not None:
        raise CheckpointError(f"{folder}: a diffusers pipeline is merged in one process (not under torchrun)")
    adapter = shared(adapter)
    # the CLI's copy of the base, begun before torch was imported: its staging folder becomes the output folder (no
    # folder is left to remove at the end, which on a file system that discards freed blocks waits for the disk)
    early = claim(folder) if checkpoint is not None else None
    with shared_output(out, overwrite=overwrite, protect=protect, made=early and early.staging) as tmp:
        options = {
            "dtype": target_dtype,
            "device": device,
            "progress": progress and rank == 0,
            "workers": target.workers,
        }
        if pipeline is not None:
            report = write_merged_pipeline(adapter, pipeline, tmp, **options)
        else:
            report = write_in_parts(
                lambda part: write_merged(
                    adapter,
                    checkpoint,
                    tmp,
                    shard_size=shard_size,
                    quantization=quantization,
                    part=part,
                    early=early,
                    **options,
                )
            )
        if gguf_file is not None and rank == 0:  # a GGUF base written as the transformers folder it holds
            report.written_as = safetensors_written_as(checkpoint, target_dtype, save_tokenizer(gguf_file, tmp))
        if CARD_FILE in files:  # a quantized base or a QLoRA-faithful merge: what was done, in the card
            files = {**files, CARD_FILE: quantization_section(files[CARD_FILE], report)}
        if report.dtype != report.base_dtype and report.written_as is None:  # else quantization_section says
            names = (str(d).removeprefix("torch.") for d in (report.base_dtype, report.dtype))
            files = {**files, CARD_FILE: files.get(CARD_FILE, "") + dtype_section(*names)}
        if rank == 0:  # the card and recipe last, by one rank
            write_files(tmp, files)
    report.path = Path(out)
    return report


def _warn_other_base(adapter: LoraAdapter, base: str, folder: Path, config: dict | None) -> None:
    """Warn when the base the adapter names is clearly not ``base``: neither the same Hub id or folder, nor the same
    last name (``org/gpt2`` and ``./models/gpt2``), nor the ``_name_or_path`` its config.json records. (A diffusers
    pipeline is not checked: kohya files name a model family, ``sd_v1``, not a model.)"""
    if not adapter.base_model:
        return
    names = [base, str(folder), *([config["_name_or_path"]] if (config or {}).get("_name_or_path") else [])]
    known = {canonical_base(n) for n in names} | {_last_name(n) for n in names}
    declared = canonical_base(adapter.base_model)
    if declared not in known and _last_name(declared) not in known:
        log.warning(
            "%s: made for %s, but merged into %s: check that this is the model it was trained on",
            adapter.name,
            adapter.base_model,
            base,
        )


def _last_name(name: str) -> str:
    return name.rstrip("/").rsplit("/", 1)[-1].lower()


def _adapter_configs(adapter: LoraAdapter) -> list[tuple[str, dict]]:
    """The adapter_config.json of the adapter's folder and its sources' folders, where they have one (for a
    ``quantization_config``)."""
    found = []
    for source in dict.fromkeys([adapter.source, *adapter.provenance.get("sources", [])]):
        path = Path(source) / "adapter_config.json"
        try:
            found.append((str(source), json.loads(path.read_text())))
        except (OSError, ValueError):
            continue
    return found


def write_files(folder: Path, files: dict[str, str]) -> None:
    for name, text in files.items():
        (folder / name).write_text(text)
