"""Runs end to end, each writing one atomic output folder: `run` (a `Plan`: combine, then write an adapter or a
merged checkpoint with its card and recipe), `save_adapter`, `merge_into_base`, `extract` (a LoRA from a fine-tuned
model, with its card and account), `write_search`, and the analysis outputs (`write_analysis_json`, `write_plots`).

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
from loramix.checkpoint import MergeReport, write_merged
from loramix.combination import check_settings, combine
from loramix.diffusers_merge import write_merged_pipeline
from loramix.errors import CheckpointError, IncompatibleAdaptersError, MethodError
from loramix.extraction import Extraction, extract_lora
from loramix.formats import load_adapter, load_adapters, split_source_options, write_adapter
from loramix.hub import pinned, revisions
from loramix.io.base import open_base, resolve_base, with_base_names
from loramix.io.diffusers import is_pipeline, open_pipeline
from loramix.io.files import atomic_output, check_output, refuse_inputs, write_text_atomic
from loramix.linalg import RankRule
from loramix.quantize import quantization_settings
from loramix.recipe import Plan
from loramix.render.analysis import analysis_json
from loramix.render.card import CARD_FILE, RECIPE_FILE, extraction_section, model_card, quantization_section
from loramix.render.plots import analysis_plots
from loramix.runtime import parse_dtype, require_path, resolve_device
from loramix.weight_search import SearchResult

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
    dtype = plan.dtype or (None if plan.merge_into else str(adapter.dtype).removeprefix("torch."))
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
        gguf_base=portable(plan.gguf_base),
        output=None,
    )


def _write_files(folder: Path, files: dict[str, str]) -> None:
    for name, text in files.items():
        (folder / name).write_text(text)


def run(plan: Plan, *, overwrite: bool = False, progress: bool = False, argv: list[str] | None = None) -> RunReport:
    """Run ``plan``: combine its adapters, then write ``plan.output`` — a PEFT or kohya adapter, or with
    ``plan.merge_into`` that base with the result merged — with a model card and the recipe that repeats the run.

    ``argv`` is the command line to record in the card (None: the card says the Python API made it). A single
    DoRA adapter is merged into a base as it is (DoRA is exact only there); DoRA adapters cannot be combined.
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
            "quantized_as round-trips a base through 4-bit before merging: it needs merge_into", option="merge_into"
        )
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
    if plan.merge_into:  # keep the factors' precision; plan.dtype is the checkpoint's; no file layout to prepare
        kwargs["dtype"] = None
        kwargs["rank_layout"] = "exact"
    if plan.merge_into and _is_single_dora(loaded, weights, plan):
        adapter = loaded[0]
    else:
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
        dtype=(plan.dtype or "bfloat16") if plan.merge_into else None,
    )
    if plan.merge_into:
        merge = merge_into_base(
            adapter,
            plan.merge_into,
            plan.output,
            dtype=plan.dtype,
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
        write_adapter(adapter, tmp, **_format_options(plan.format, plan.output, plan.rank_layout, plan.gguf_base))
        _write_files(tmp, files)
    return RunReport(Path(plan.output), adapter, len(loaded), plan.format)


def _is_single_dora(loaded: list[LoraAdapter], weights: list[float], plan: Plan) -> bool:
    """One DoRA adapter at weight 1 with nothing to re-factorise: merged into the base exactly as it is."""
    if not any(a.has_dora for a in loaded):
        return False
    untouched = plan.rank is None and plan.energy is None and plan.rule is None and not plan.options
    if len(loaded) == 1 and weights == [1.0] and plan.method in ("cat", "svd") and untouched:
        return True
    raise IncompatibleAdaptersError(
        f"{next(a.source for a in loaded if a.has_dora)}: a DoRA adapter can be merged into a base only alone, at "
        "weight 1, with method cat or svd and no truncation (its magnitude rescales W+ΔW, so it cannot be combined "
        "with other adapters or re-weighted)"
    )


def _format_options(fmt: str, output: str | Path, rank_layout: str = "portable", base: str | None = None) -> dict:
    options: dict = {"format": fmt}
    if fmt in LAID_OUT:
        options["rank_layout"] = rank_layout
    if fmt in ("kohya", "gguf"):
        options["file_name"] = Path(output).resolve().name + (".safetensors" if fmt == "kohya" else ".gguf")
    if fmt == "gguf" and base is not None:
        options["base"] = base
    return options


def save_adapter(
    adapter: LoraAdapter,
    folder: str | Path,
    *,
    format: str = "peft",
    dtype: torch.dtype | str | None = None,
    rank_layout: str = "portable",
    overwrite: bool = False,
    card: bool = True,
    **options,
) -> Path:
    """Write ``adapter`` to ``folder`` (atomically) as a PEFT folder, a kohya file or a llama.cpp GGUF, with a
    README.md model card unless ``card`` is false; refuses to replace any of the adapter's own inputs. Returns the
    folder. ``adapter`` may also be any source `load_adapter` takes (a live PeftModel, for one). ``rank_layout``
    (PEFT and GGUF): "portable", one rank every engine reads, or "exact" (see `loramix.formats.peft.write`); other
    ``options`` go to the format's writer (GGUF: ``base``)."""
    adapter = load_adapter(adapter)
    require_path(folder, "folder (the output folder)")
    protect = [adapter.source, *adapter.provenance.get("sources", [])]
    files = {CARD_FILE: model_card(adapter, revisions=revisions(protect), output_format=format)} if card else {}
    with atomic_output(folder, overwrite=overwrite, protect=protect) as tmp:
        write_adapter(adapter, tmp, dtype=parse_dtype(dtype), **_format_options(format, folder, rank_layout), **options)
        _write_files(tmp, files)
    return Path(folder)


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
) -> MergeReport:
    """Merge ``adapter`` (a `LoraAdapter` or a source) into the ``base`` checkpoint (a folder or Hub id) and write the
    merged checkpoint to ``out``, atomically, without touching any input (see `loramix.checkpoint.write_merged` for
    the layout and the report). kohya module names (``lora_…``) are matched to the base's own module paths. A
    diffusers pipeline folder (``model_index.json``) is written as a pipeline: each component the adapter changes
    merged in its own files, the rest copied (see `loramix.diffusers_merge`). ``files`` (name → text: card, recipe)
    go into the same folder; without them a README.md model card says what is known. ``shard_size`` None keeps a
    safetensors base's own shard files (a size lays the tensors out anew); ``workers`` tensors are merged at once
    (default: one per CPU, 4 on a GPU; the bytes are the same for any count). ``dtype`` None: bfloat16, or for a
    quantized base its own format, re-quantized where ΔW changes it (`loramix.quantized_merge`).

    QLoRA-faithful merge: with ``quantized_as`` ("nf4" or "fp4"), or a ``quantization_config`` loading in 4 bit in
    the base's or the adapter's config (transformers' `BitsAndBytesConfig` fields; the arguments override them,
    ``quantized_as="none"`` turns it off), each base weight a 4-bit model quantizes first goes through bitsandbytes'
    quantize_4bit → dequantize_4bit round trip (``blocksize``, ``double_quant``: compress_statistics), then ΔW is
    added. ``round_trip="all"`` (the default) round-trips every such weight — the model the adapter was trained
    with; ``"targeted"`` only those the adapter changes. Needs ``pip install 'loramix[qlora]'``."""
    require_path(out, "out (the output folder)")
    if workers is not None and (isinstance(workers, bool) or not isinstance(workers, int) or workers < 1):
        raise MethodError(f"workers must be a positive int (tensors merged at once), got {workers!r}")
    adapter = load_adapter(adapter)
    target_dtype = parse_dtype(dtype)
    target = resolve_device(device)
    folder = resolve_base(base)
    pipeline = open_pipeline(folder) if is_pipeline(folder) else None
    checkpoint = None if pipeline else open_base(folder)
    if pipeline and quantized_as not in (None, "none"):
        raise CheckpointError(f"{folder}: a diffusers pipeline; quantized_as applies to transformers bases only")
    quantization = None
    if checkpoint is not None:
        adapter = with_base_names(adapter, checkpoint)  # kohya names → the base's own
        quantization = quantization_settings(
            [(str(folder), checkpoint.config), *_adapter_configs(adapter)],
            quantized_as=quantized_as,
            double_quant=double_quant,
            blocksize=blocksize,
            round_trip=round_trip,
        )
    if files is None:
        files = {CARD_FILE: model_card(adapter, merged_into=str(base))}
    protect = [folder, adapter.source, *adapter.provenance.get("sources", [])]
    with atomic_output(out, overwrite=overwrite, protect=protect, finite=False) as tmp:  # write_merged checks
        options = {"dtype": target_dtype, "device": target, "progress": progress, "workers": workers}
        if pipeline is not None:
            report = write_merged_pipeline(adapter, pipeline, tmp, **options)
        else:
            report = write_merged(
                adapter, checkpoint, tmp, shard_size=shard_size, quantization=quantization, **options
            )  # fmt: skip
        if CARD_FILE in files:  # a quantized base or a QLoRA-faithful merge: what was done, in the card
            files = {**files, CARD_FILE: quantization_section(files[CARD_FILE], report)}
        _write_files(tmp, files)
    report.path = Path(out)
    return report


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
        _write_files(tmp, files)
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
        write_adapter(adapter, tmp, **_format_options(format, output, rank_layout, str(base)))
        _write_files(tmp, files)
    return result


def write_analysis_json(analysis: Analysis, path: str | Path) -> Path:
    """The analysis as JSON in the file ``path`` (atomically; never over one of the analysed adapters)."""
    return write_text_atomic(path, analysis_json(analysis) + "\n", protect=[a.source for a in analysis.adapters])


def write_plots(analysis: Analysis, folder: str | Path) -> list[Path]:
    """The analysis' heatmaps as PNG files in ``folder`` (created if needed; never inside an input); returns their
    paths."""
    folder = refuse_inputs(folder, [a.source for a in analysis.adapters])
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for name, figure in analysis_plots(analysis).items():
        figure.savefig(folder / name, dpi=110, bbox_inches="tight")
        written.append(folder / name)
    return written
