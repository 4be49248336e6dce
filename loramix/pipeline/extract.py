"""`loramix extract` end to end: the LoRA that best reproduces a fine-tuned model on its base
(`loramix.extraction.extract_lora`), written with its card, `EXTRACTION_FILE` (the per-module account) and the
recipe that repeats it. `extract` accepts loose arguments and builds the `ExtractPlan` that `run_extract` runs."""

from __future__ import annotations

import json
import logging
from dataclasses import replace
from pathlib import Path

import torch

from loramix import writers
from loramix.adapter import portable_layout
from loramix.errors import CheckpointError, OutputFormatError
from loramix.extraction import Extraction, extract_lora
from loramix.formats import write_adapter
from loramix.hub import revisions
from loramix.io.diffusers import is_pipeline
from loramix.linalg import RankRule
from loramix.outputs import Output, recipe_file
from loramix.plans import ExtractPlan
from loramix.render.card import CARD_FILE, extraction_section, model_card
from loramix.runtime import require_path
from loramix.settings import AdapterOutput, Compute, named

log = logging.getLogger(__name__)

EXTRACTION_FILE = "extraction.json"


def extract(
    base: str | Path,
    finetuned: str | Path,
    output: str | Path,
    *,
    format: str | None = None,
    rank_rule: RankRule | None = None,
    rank_layout: str = "portable",
    device: str | torch.device = "auto",
    dtype: str | torch.dtype | None = None,
    overwrite: bool = False,
    progress: bool = False,
    argv: list[str] | None = None,
) -> Extraction:
    """Extract the LoRA that best reproduces ``finetuned`` on ``base`` (``rank_rule``, ``device`` and ``dtype`` as
    `loramix.extraction.extract_lora` takes them) and write it to ``output``, atomically: a PEFT adapter
    (``rank_layout`` as `save_adapter`), or a kohya/GGUF file with ``format``, with a model card,
    `EXTRACTION_FILE`, the per-module account (rank, kept energy, measured relative error) that the returned
    `Extraction` holds too, and the recipe that repeats it. Tensors carried whole (norms, biases, resized embeddings)
    go into PEFT's modules_to_save; kohya and GGUF cannot hold them, so there they are listed as not carried, with a
    warning.

    Two diffusers pipelines give one kohya file (read by diffusers' ``load_lora_weights`` and the pipeline merge), at
    one rank with alpha = rank (diffusers misreads some per-module alphas); changed norms etc. are not carried."""
    require_path(output, "output (the output folder)")
    plan = ExtractPlan(
        base=str(base),
        finetuned=str(finetuned),
        output=str(output),
        rank_rule=RankRule.given(rank_rule, conv=False),
        compute=Compute(named(device), named(dtype)),
        written=AdapterOutput(format=format, rank_layout=rank_layout),
    )
    return run_extract(plan, overwrite=overwrite, progress=progress, argv=argv)


def run_extract(
    plan: ExtractPlan, *, overwrite: bool = False, progress: bool = False, argv: list[str] | None = None
) -> Extraction:
    """Run an `ExtractPlan` (see `extract`)."""
    base, finetuned = plan.base, plan.finetuned
    pipelines = is_pipeline(Path(base)) and is_pipeline(Path(finetuned))
    format = plan.format or ("kohya" if pipelines else "peft")
    writers.check_model_format(format)
    if pipelines and format != "kohya":
        wrong = f"{finetuned}: a diffusers pipeline's LoRA is written as one kohya file, not {format}"
        raise OutputFormatError(wrong, option="format", value="kohya")
    out = Output.of(plan, overwrite=overwrite)
    result = extract_lora(
        base, finetuned, rank_rule=plan.rank_rule, device=plan.device, dtype=plan.dtype, progress=progress
    )
    adapter = result.adapter
    if not adapter.modules:
        carried = f" (only {', '.join(sorted(adapter.extra)[:3])} changed)" if adapter.extra else ""
        raise CheckpointError(f"{finetuned}: no linear, embedding or conv weight differs from {base}{carried}")
    if format != "peft" and adapter.extra:
        result.dropped = {name: f"{format} files cannot hold it" for name in adapter.extra}
        hint = "" if pipelines else "; --format peft carries them"
        text = "%s files cannot hold whole tensors: %d changed tensor(s) are not carried (%s)%s"
        log.warning(text, format, len(adapter.extra), ", ".join(sorted(adapter.extra)[:3]), hint)
        adapter.extra = {}
    if pipelines and plan.rank_layout == "portable":
        adapter = result.adapter = portable_layout(adapter)
    written = replace(plan.written, format=format)
    shown = portable_layout(adapter) if written.writer.laid_out and plan.rank_layout == "portable" else adapter
    report = {
        **result.to_json(),
        "revisions": revisions(out.protect),
        "format": format,
        "rank_layout": plan.rank_layout,
    }
    files = {
        CARD_FILE: model_card(shown, argv=argv, output_format=format) + extraction_section(report),
        EXTRACTION_FILE: json.dumps(report, indent=2) + "\n",
        **recipe_file(plan, format=format),
    }
    out.write(files, lambda tmp: write_adapter(adapter, tmp, **written.write_options(plan.output, base)))
    return result
