"""Runs end to end, each writing one atomic output folder: `run` (a `Plan`: combine, then write an adapter or a
merged checkpoint with its card and recipe; the merge is `loramix.merging.merge_into_base`), `save_adapter`, `extract`
(a LoRA from a fine-tuned model, with its card and account) and `write_search` (`loramix.analysis_files` writes the
analysis' files).

Every output is assembled in a temporary folder beside the target and renamed into place at the end
(`loramix.io.files.atomic_output`): a failure leaves no partial output and never touches an input.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from loramix.adapter import LoraAdapter, portable_layout
from loramix.analysis import Analysis, analyze
from loramix.checkpoint import MergeReport
from loramix.combination import check_settings
from loramix.errors import CheckpointError, IncompatibleAdaptersError, MethodError
from loramix.extraction import Extraction, extract_lora
from loramix.extraction.conversion import effective_adapters
from loramix.formats import default_format, load_adapter, load_adapters, split_source_options, write_adapter
from loramix.hub import pinned, revisions
from loramix.io.diffusers import is_pipeline
from loramix.io.files import atomic_output, check_output
from loramix.linalg import RankRule
from loramix.merging import merge_into_base, write_files
from loramix.recipe import Plan
from loramix.render.card import CARD_FILE, RECIPE_FILE, extraction_section, model_card
from loramix.runtime import parse_dtype, require_path
from loramix.weight_search import SearchResult, combine

log = logging.getLogger(__name__)

SEARCH_FILE = "search.json"
EXTRACTION_FILE = "extraction.json"
LAID_OUT = ("peft", "gguf")  # formats written in one rank layout (kohya keeps every module's rank and alpha)
# The sources' overlap goes into a card only when it is cheap: few sources, at most this many LoRA parameters.
CHEAP_ANALYSIS_PARAMS = 5_000_000
CHEAP_ANALYSIS_SOURCES = 8


@dataclass
class RunReport:
    """What `run` wrote: the folder, the combined adapter, and for a merge the checkpoint's `MergeReport`."""

    path: Path
    adapter: LoraAdapter
    sources: int
    format: str
    merge: MergeReport | None = None


def _cheap_analysis(loaded: list[LoraAdapter], weights: list[float]) -> Analysis | None:
    """The sources' analysis for a card, when there are 2–8 small sources."""
    if not 2 <= len(loaded) <= CHEAP_ANALYSIS_SOURCES or sum(a.num_params() for a in loaded) > CHEAP_ANALYSIS_PARAMS:
        return None
    return analyze(loaded, weights=weights, allow_different_bases=True)


def _repeatable(plan: Plan, adapter: LoraAdapter, rule: RankRule | None = None) -> Plan:
    """``plan`` as a recipe to publish with its output: local paths relative to the output folder (where the recipe
    lies; a recipe's paths are read relative to it), Hub ids pinned to the commit they resolved to, the weights,
    rank rule, method options and dtype that were used, defaults included."""
    folder = Path(plan.output).resolve()

    def portable(item):  # a source's own options (path::scale=0.5) stay with it
        if not isinstance(item, str):
            return item
        path, sep, options = item.partition("::")
        if not Path(path).exists():
            return pinned(path) + sep + options
        return os.path.relpath(Path(path).resolve(), folder) + sep + options

    provenance = adapter.provenance
    weights = provenance.get("weights") or plan.weights
    rule = rule or RankRule(
        rank=plan.rank, energy=plan.energy, rule=plan.rule, value=plan.rule_value, conv_rank=plan.conv_rank
    )
    dtype = plan.dtype or (None if plan.merge_into else str(adapter.dtype).removeprefix("torch."))  # None: the base's
    return replace(
        plan,
        adapters=[portable(a) for a in plan.adapters],
        weights=list(weights) if weights else None,
        rank=rule.rank,
        energy=rule.energy,
        rule=rule.rule,
        rule_value=rule.value,
        conv_rank=rule.conv_rank,
        options=provenance.get("options", plan.options),
        dtype=dtype,
        module_map=portable(plan.module_map),
        merge_into=portable(plan.merge_into),
        base=portable(plan.base),
        gguf_base=portable(plan.gguf_base),
        output=None,
    )


def run(plan: Plan, *, overwrite: bool = False, progress: bool = False, argv: list[str] | None = None) -> RunReport:
    """Run ``plan``: combine its adapters, then write ``plan.output`` — a PEFT or kohya adapter (``plan.format``;
    None: kohya when every input is a kohya, diffusers or LyCORIS file, else PEFT), or with
    ``plan.merge_into`` that base with the result merged — with a model card and the recipe that repeats the run.

    ``argv`` is the command line to record in the card (None: the card says the Python API made it). A single
    DoRA adapter is merged into a base as it is; otherwise each DoRA adapter is its effective update on ``plan.base``
    (or ``plan.merge_into``), exact at full rank (`loramix.extraction.conversion.effective_adapters`).
    """
    if not isinstance(plan, Plan):
        raise MethodError(
            f"run takes a Plan (loramix.Plan(adapters=[...]) or a loaded recipe), got {type(plan).__name__}"
        )
    if not plan.output:
        raise IncompatibleAdaptersError("the plan names no output folder (output)")
    protect = [*(split_source_options(a)[0] for a in plan.adapters), *([plan.merge_into] if plan.merge_into else [])]
    check_output(plan.output, overwrite=overwrite, protect=protect)
    if plan.quantized_as not in (None, "none") and not plan.merge_into:
        raise IncompatibleAdaptersError(
            "`quantized_as` round-trips a base through 4-bit before merging: it needs a base", option="merge_into"
        )
    plan.check_settings_apply()
    kwargs = plan.combine_kwargs()
    load_options = kwargs.pop("load_options")
    settings = ("method", "heads", "rank", "energy", "rule", "rule_value", "conv_rank")
    _, rule = check_settings(options=plan.options, **{key: getattr(plan, key) for key in settings})
    loaded, weights = load_adapters(
        plan.adapters,
        weights=plan.weights,
        allow_different_bases=plan.allow_different_bases,
        allow_nonfinite=plan.allow_nonfinite,
        load_options=load_options,
    )
    if not plan.merge_into:  # the format the inputs' own ecosystem loads unless one was asked for
        plan = replace(plan, format=plan.format or default_format(loaded), rank_layout=plan.rank_layout or "portable")
    if plan.merge_into:  # keep the factors' precision; plan.dtype is the checkpoint's; no file layout to prepare
        kwargs["dtype"] = None
        kwargs["rank_layout"] = "exact"
    if plan.merge_into and _is_single_dora(loaded, weights, plan):
        adapter = loaded[0]
    else:  # DoRA adapters become their effective updates on the base, which combine as LoRAs do
        loaded = effective_adapters(loaded, plan.base or plan.merge_into, device=plan.device, progress=progress)
        adapter = combine(loaded, progress=progress, **{**kwargs, "weights": weights})
    if plan.format in LAID_OUT and plan.rank_layout == "portable" and not plan.merge_into:
        adapter = portable_layout(adapter)  # what the file holds, for the card and the report
    files = {RECIPE_FILE: _repeatable(plan, adapter, rule).to_yaml()}
    files[CARD_FILE] = model_card(
        adapter,
        argv=argv,
        merged_into=plan.merge_into,
        analysis=_cheap_analysis(loaded, weights),
        revisions=revisions(plan.adapters),
        output_format=plan.format,
        recipe=True,
        dtype=(plan.dtype or "the base's dtype") if plan.merge_into else None,
    )
    if plan.merge_into:
        merge = merge_into_base(
            adapter,
            plan.merge_into,
            plan.output,
            dtype=parse_dtype(plan.dtype),
            shard_size=plan.shard_size,
            device=plan.device,
            workers=plan.workers,
            overwrite=overwrite,
            progress=progress,
            files=files,
            quantized_as=plan.quantized_as,
            double_quant=plan.double_quant,
            blocksize=plan.blocksize,
            round_trip=plan.round_trip,
        )
        return RunReport(Path(plan.output), adapter, len(loaded), "checkpoint", merge)
    with atomic_output(plan.output, overwrite=overwrite, protect=[*protect, adapter.source]) as tmp:
        write_adapter(adapter, tmp, **format_options(plan.format, plan.output, plan.rank_layout, plan.gguf_base))
        write_files(tmp, files)
    return RunReport(Path(plan.output), adapter, len(loaded), plan.format)


def _is_single_dora(loaded: list[LoraAdapter], weights: list[float], plan: Plan) -> bool:
    """One DoRA adapter at weight 1 with nothing to re-factorise: merged into the base exactly as it is."""
    untouched = plan.rank is None and plan.energy is None and plan.rule is None and not plan.options
    alone = len(loaded) == 1 and loaded[0].has_dora and weights == [1.0]
    return alone and plan.method in ("cat", "svd") and untouched


def format_options(fmt: str, output: str | Path, rank_layout: str = "portable", base: str | None = None) -> dict:
    options: dict = {"format": fmt}
    if fmt in LAID_OUT:
        options["rank_layout"] = rank_layout
    if fmt in ("kohya", "comfyui", "gguf"):
        options["file_name"] = Path(output).resolve().name + (".gguf" if fmt == "gguf" else ".safetensors")
    if fmt == "gguf" and base is not None:
        options["base"] = base
    return options


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
    format = format or default_format([adapter])
    require_path(folder, "folder (the output folder)")
    protect = [adapter.source, *adapter.provenance.get("sources", [])]
    files = {CARD_FILE: model_card(adapter, revisions=revisions(protect), output_format=format)} if card else {}
    with atomic_output(folder, overwrite=overwrite, protect=protect) as tmp:
        write_adapter(adapter, tmp, dtype=parse_dtype(dtype), **format_options(format, folder, rank_layout), **options)
        write_files(tmp, files)
    return Path(folder)


def write_search(
    result: SearchResult,
    folder: str | Path,
    *,
    overwrite: bool = False,
    merge_into: str | None = None,
    shard_size: int | str | None = None,
    device: str | torch.device = "auto",
    progress: bool = False,
    argv: list[str] | None = None,
) -> Path:
    """Write a search's output folder atomically: the searched adapter (PEFT) — or, with ``merge_into``, that base
    with it merged — plus ``search.json`` (weights, loss, history, settings), a model card, and a recipe.

    The recipe repeats the searched combination, not the search: the sources with the weights found and the method
    of the search's composition (``lorahub``, or ``cat`` for ``delta``); `loramix combine --recipe` rebuilds the
    same adapter (or merged checkpoint) bit for bit without the base, the examples or the optimiser."""
    adapter = result.adapter
    plan = Plan(
        adapters=list(adapter.provenance.get("sources", [])),
        weights=list(result.weights),
        method=adapter.provenance["method"],
        **result.settings.get("rank_rule", {}),  # a subset search's merge: its rank rule
        device=str(device),
        merge_into=merge_into,
        shard_size=None if shard_size is None else str(shard_size),
        output=str(folder),
    )
    files = {
        SEARCH_FILE: json.dumps(result.to_json(), indent=2) + "\n",
        RECIPE_FILE: _repeatable(plan, adapter).to_yaml(),
        CARD_FILE: model_card(
            adapter,
            argv=argv,
            merged_into=merge_into,
            revisions=revisions(adapter.provenance.get("sources", [])),
            recipe=True,
            searched=True,
        ),
    }
    if merge_into:
        merge_into_base(
            adapter,
            merge_into,
            folder,
            shard_size=shard_size,
            device=device,
            overwrite=overwrite,
            progress=progress,
            files=files,
        )
        return Path(folder)
    protect = [*adapter.provenance.get("sources", []), result.settings.get("base", "")]
    with atomic_output(folder, overwrite=overwrite, protect=[p for p in protect if p]) as tmp:
        write_adapter(adapter, tmp)
        write_files(tmp, files)
    return Path(folder)


def extract(
    base: str | Path,
    finetuned: str | Path,
    output: str | Path,
    *,
    format: str | None = None,
    rank_layout: str = "portable",
    overwrite: bool = False,
    progress: bool = False,
    argv: list[str] | None = None,
    **settings,
) -> Extraction:
    """Extract the LoRA that best reproduces ``finetuned`` on ``base`` (``settings``: the rank rule, ``device`` and
    ``dtype`` of `loramix.extraction.extract_lora`) and write it to ``output``, atomically: a PEFT adapter
    (``rank_layout`` as `save_adapter`), or a kohya/GGUF file with ``format``, with a model card and
    `EXTRACTION_FILE`, the per-module account (rank, kept energy, measured relative error) that the returned
    `Extraction` holds too. Tensors carried whole (norms, biases, resized embeddings) go into PEFT's
    modules_to_save; kohya and GGUF cannot hold them, so there they are listed as not carried, with a warning.

    Two diffusers pipelines give one kohya file (read by diffusers' ``load_lora_weights`` and the pipeline merge), at
    one rank with alpha = rank (diffusers misreads some per-module alphas); changed norms etc. are not carried."""
    require_path(output, "output (the output folder)")
    pipelines = is_pipeline(Path(base)) and is_pipeline(Path(finetuned))
    format = format or ("kohya" if pipelines else "peft")
    if format not in LAID_OUT + ("kohya",):
        raise MethodError(f"unknown output format {format!r}; choose from peft, kohya, gguf")
    if pipelines and format != "kohya":
        wrong = f"{finetuned}: a diffusers pipeline's LoRA is written as one kohya file, not {format}"
        raise MethodError(wrong, option="format", value="kohya")
    protect = [base, finetuned]
    check_output(output, overwrite=overwrite, protect=protect)
    result = extract_lora(base, finetuned, progress=progress, **settings)
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
    if pipelines and rank_layout == "portable":
        adapter = result.adapter = portable_layout(adapter)
    shown = portable_layout(adapter) if format in LAID_OUT and rank_layout == "portable" else adapter
    report = {**result.to_json(), "revisions": revisions(protect), "format": format, "rank_layout": rank_layout}
    files = {
        CARD_FILE: model_card(shown, argv=argv, output_format=format) + extraction_section(report),
        EXTRACTION_FILE: json.dumps(report, indent=2) + "\n",
    }
    with atomic_output(output, overwrite=overwrite, protect=protect) as tmp:
        write_adapter(adapter, tmp, **format_options(format, output, rank_layout, str(base)))
        write_files(tmp, files)
    return result
