"""Merging an adapter into a diffusers pipeline folder (what kohya's ``merge_lora.py`` and diffusers' ``fuse_lora``
do, streamed like any `loramix.merge.checkpoint` merge).

The adapter's modules are split by component (`loramix.io.diffusers.split_adapter`: kohya and diffusers names);
each component it changes is written by `loramix.merge.checkpoint.write_merged` into the output's folder of the same
name, in its own files (the same file names, each tensor in the file it was in, the same index); every other file
and component folder (model_index.json, scheduler, tokenizer, vae, an untouched text encoder) is copied unchanged.
A changed component's other weight files (a ``diffusion_pytorch_model.fp16.safetensors`` variant) would hold the
unmerged weights, so they are left out, with a note.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import torch

from loramix.adapter import LoraAdapter
from loramix.io.diffusers import Pipeline, split_adapter
from loramix.io.shards import WEIGHT_SUFFIXES
from loramix.merge.checkpoint import MergeReport, write_merged

log = logging.getLogger(__name__)


def write_merged_pipeline(
    adapter: LoraAdapter,
    pipeline: Pipeline,
    folder: Path,
    *,
    dtype: torch.dtype | None = None,
    device: torch.device | None = None,
    progress: bool = False,
    workers: int | None = None,
) -> MergeReport:
    """Write ``pipeline`` with ``adapter`` merged into the existing folder ``folder`` (see the module docstring).
    The report's shards and module names carry their component (``unet/diffusion_pytorch_model.safetensors``,
    ``unet.down_blocks.0.attentions.0.proj_in``); each changed component keeps its own dtype unless ``dtype`` asks
    for another (the report's ``base_dtype`` and ``dtype``: the first changed component's)."""
    parts = split_adapter(adapter, pipeline)
    report = MergeReport(path=folder, shards=[], total_size=0, tensors=0, dtype=dtype)
    for component, part in parts.items():
        (folder / component).mkdir()
        base = pipeline.components[component]
        merged = write_merged(
            part, base, folder / component, dtype=dtype, device=device, progress=progress, workers=workers
        )
        report.shards += [f"{component}/{name}" for name in merged.shards]
        report.total_size += merged.total_size
        report.tensors += merged.tensors
        report.survival |= {f"{component}.{name}": value for name, value in merged.survival.items()}
        report.notes += [f"{component}: {note}" for note in merged.notes]
        report.dtype, report.base_dtype = merged.dtype, report.base_dtype or merged.base_dtype
        kept = {path.name for path in base.weight_files}
        for item in sorted((pipeline.folder / component).iterdir()):
            if item.is_file() and item.name.endswith(WEIGHT_SUFFIXES) and item.name not in kept:
                report.notes.append(f"{component}/{item.name} is not copied: it holds the unmerged weights")
                log.warning("%s: %s", adapter.name, report.notes[-1])
    for item in sorted(pipeline.folder.iterdir()):
        if item.name.startswith(".") or item.name in parts:
            continue
        if item.is_dir():
            shutil.copytree(item, folder / item.name)
        elif item.is_file():
            shutil.copyfile(item, folder / item.name)
    return report
