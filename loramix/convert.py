"""`loramix convert`: the plain LoRA closest to an adapter that serving engines refuse (DoRA; PEFT LoHa/LoKr, VeRA,
(IA)³, OFT, FourierFT), written in one atomic output folder with a card that says it is a conversion and how exact, and
`CONVERSION_FILE`, the per-module account (`loramix.extraction.conversion.convert_lora` does the work)."""

from __future__ import annotations

import json
import logging
from collections import Counter
from pathlib import Path

import torch

from loramix.adapter import LoraAdapter
from loramix.errors import AdapterFormatError
from loramix.extraction import Extraction
from loramix.extraction.conversion import WeightUpdate, base_updates, convert_lora
from loramix.formats import load_adapter, peft_other, write_adapter
from loramix.formats._keys import folder_peft_type
from loramix.hub import revisions
from loramix.linalg import RankRule
from loramix.outputs import Output, recipe_file
from loramix.plans import ConvertPlan
from loramix.render.card import CARD_FILE, conversion_section, model_card
from loramix.runtime import require_path
from loramix.settings import AdapterOutput, Compute, named
from loramix.writers import check_model_format

log = logging.getLogger(__name__)

CONVERSION_FILE = "conversion.json"
# PEFT types that are not a change of weights at all (virtual tokens, prompts): nothing a LoRA could hold
PROMPTS = ("PROMPT_TUNING", "MULTITASK_PROMPT_TUNING", "P_TUNING", "PREFIX_TUNING", "ADAPTION_PROMPT", "CPT")
CONVERTED = "LORA (DoRA too), ADALORA, LOHA, LOKR, VERA, IA3, OFT, FOURIERFT"


def convert(
    source: str | Path,
    output: str | Path,
    *,
    base: str | Path | None = None,
    rank_rule: RankRule | None = None,
    format: str = "peft",
    rank_layout: str = "portable",
    device: str | torch.device = "auto",
    dtype: str | torch.dtype | None = None,
    allow_nonfinite: bool = False,
    overwrite: bool = False,
    progress: bool = False,
    argv: list[str] | None = None,
) -> Extraction:
    """Convert the adapter ``source`` into a plain LoRA and write it to ``output`` (a PEFT folder, or a kohya/GGUF
    file with ``format``; ``rank_layout`` as `loramix.pipeline.save_adapter`), with a model card, `CONVERSION_FILE`
    and the recipe that repeats it. ``rank_rule`` (a `loramix.RankRule`; none: full rank, exact to float rounding),
    ``device`` and ``dtype`` as `convert_lora` takes them; ``base`` is needed for DoRA."""
    require_path(output, "output (the output folder)")
    plan = ConvertPlan(
        source=str(source),
        output=str(output),
        base=None if base is None else str(base),
        rank_rule=RankRule.given(rank_rule),
        compute=Compute(named(device), named(dtype)),
        written=AdapterOutput(format=format, rank_layout=rank_layout),
        allow_nonfinite=allow_nonfinite,
    )
    return run_convert(plan, overwrite=overwrite, progress=progress, argv=argv)


def run_convert(
    plan: ConvertPlan, *, overwrite: bool = False, progress: bool = False, argv: list[str] | None = None
) -> Extraction:
    """Run a `ConvertPlan` (see `convert`)."""
    check_model_format(plan.format)
    adapter, updates = read_source(plan.source, allow_nonfinite=plan.load.allow_nonfinite)
    out = Output.of(plan, overwrite=overwrite)
    kinds = Counter(u.kind for u in [*base_updates(adapter).values(), *updates.values()])
    kinds[adapter.provenance.get("peft_type", "LoRA")] += len(adapter.modules) + len(updates) - sum(kinds.values())
    result = convert_lora(
        adapter,
        plan.base,
        updates=updates,
        rank_rule=plan.rank_rule,
        device=plan.device,
        dtype=plan.dtype,
        progress=progress,
    )
    converted, format = result.adapter, plan.format
    if format != "peft" and converted.extra:
        log.warning(
            "%s files cannot hold whole tensors: %d head(s) are not carried (%s); --format peft carries them",
            format,
            len(converted.extra),
            ", ".join(sorted(converted.extra)[:3]),
        )
        converted.extra = {}
    report = conversion_report(result, dict(kinds), revisions(out.protect), format, plan.rank_layout)
    files = {
        CARD_FILE: model_card(converted, argv=argv, output_format=format) + conversion_section(report),
        CONVERSION_FILE: json.dumps(report, indent=2) + "\n",
        **recipe_file(plan),
    }
    out.write(files, lambda tmp: write_adapter(converted, tmp, **plan.written.write_options(plan.output, plan.base)))
    return result


def read_source(source: str | Path, *, allow_nonfinite: bool = False) -> tuple[LoraAdapter, dict[str, WeightUpdate]]:
    """(the adapter, the modules whose update is a function of the base weight) of ``source``: any adapter
    `load_adapter` reads (DoRA modules included), or a PEFT VeRA or (IA)³ folder (an adapter of no LoRA modules
    and its updates); `AdapterFormatError` naming the PEFT type that cannot be converted."""
    peft_type = folder_peft_type(Path(source))
    if peft_type in peft_other.KINDS:
        config, updates, extra = peft_other.read_updates(source, allow_nonfinite=allow_nonfinite)
        shell = LoraAdapter(
            modules={},
            base_model=config.get("base_model_name_or_path"),
            extra=extra,
            task_type=config.get("task_type"),
            source=str(source),
            name=Path(source).resolve().name,
        )
        return shell, updates
    if peft_type in PROMPTS:
        raise AdapterFormatError(f"{source}: peft_type {peft_type!r} learns prompts, not weights: no LoRA holds it")
    if peft_type not in (None, "LORA", "ADALORA", "LOHA", "LOKR"):
        raise AdapterFormatError(
            f"{source}: peft_type {peft_type!r} cannot be converted (loramix converts {CONVERTED})"
        )
    return load_adapter(source, allow_nonfinite=allow_nonfinite), {}


def conversion_report(result: Extraction, kinds: dict[str, int], pinned: dict, format: str, rank_layout: str) -> dict:
    """The account of a conversion as JSON: the source, the base, the kinds of module converted, the rule and per
    module the rank, kept energy and measured relative error."""
    report = result.to_json()
    source = report.pop("finetuned")
    for key in ("carried", "not_carried", "unchanged", "rounding_only"):  # an extraction's, not a conversion's
        del report[key]
    return {
        "source": source,
        "kinds": {kind: count for kind, count in kinds.items() if count},
        **report,
        "carried": sorted(result.adapter.extra),
        "revisions": pinned,
        "format": format,
        "rank_layout": rank_layout,
    }
