"""Model cards: the README.md of every output folder, rendered from what was done (pure: data in, text out).

The YAML front matter is huggingface_hub's `ModelCardData` (base_model, base_model_relation ``adapter`` or
``merge``, library_name ``peft`` or ``transformers``, tags); the body says how the output was made: the method and
its paper, each source with its weight and revision, the result's ranks and (when given) the sources' overlap, the
exact command line (or that the Python API made it) and the loramix version.
"""

from __future__ import annotations

import math
import re
import shlex
from importlib import metadata
from pathlib import Path

from huggingface_hub import ModelCardData

from loramix import experts
from loramix.adapter import LoraAdapter, unpadded_rank
from loramix.analysis.results import Analysis
from loramix.errors import counted
from loramix.merge.checkpoint import MergeReport
from loramix.methods import REGISTRY
from loramix.quantize import Quantization
from loramix.schedule import parse, varies
from loramix.sources import parse_hub_id

CARD_FILE = "README.md"
RECIPE_FILE = "loramix_recipe.yaml"


def loramix_version() -> str:
    try:
        return metadata.version("loramix")
    except metadata.PackageNotFoundError:
        return "unknown"


def _loramix_link() -> str:
    """``[loramix](URL)`` with the home page the installed package declares, else plain ``loramix``."""
    try:
        urls = metadata.metadata("loramix").get_all("Project-URL") or []
    except metadata.PackageNotFoundError:
        urls = []
    url = next((u.split(",", 1)[1].strip() for u in urls if "," in u), None)
    return f"[loramix]({url})" if url else "loramix"


def _paper_links(paper: str) -> str:
    """The registry's paper text with each arXiv id turned into a link."""
    return re.sub(r"arXiv:(\d{4}\.\d{4,5})", r"[arXiv:\1](https://arxiv.org/abs/\1)", paper)


def _hub_base(base: str | None) -> str | None:
    """``base`` when it reads as a Hub id (metadata must name a Hub model, not a local folder)."""
    if not base:
        return None
    ref = parse_hub_id(base)
    return ref.repo_id if ref is not None and not Path(base).exists() else None


def rank_span(ranks: list[int]) -> str:
    """``rank 24`` or ``rank 8–24`` for the sorted ranks of a result."""
    return f"rank {ranks[0]}" + (f"–{ranks[-1]}" if ranks[-1] != ranks[0] else "")


def rank_text(adapter: LoraAdapter) -> str:
    """``rank 8``, or where the stored factors are zero-padded to one rank (`loramix.adapter.portable_layout`) the rank
    without the padding and the rank stored: ``rank 4, stored as 8 for engines that need it (--rank-layout exact for
    4)``."""
    stored = adapter.ranks
    used = sorted({unpadded_rank(m) for m in adapter.modules.values()})
    if used == stored:
        return rank_span(stored)
    shown = rank_span(used)
    return (
        f"{shown}, stored as {rank_span(stored).removeprefix('rank ')} for engines that need it "
        f"(--rank-layout exact for {shown.removeprefix('rank ')})"
    )


def _median(values: list[float]) -> float:
    ordered = sorted(values)
    middle = len(ordered) // 2
    return ordered[middle] if len(ordered) % 2 else (ordered[middle - 1] + ordered[middle]) / 2


def kept_summary(provenance: dict) -> str | None:
    """What the truncation kept: the least and median share of each module's energy (Σσ² of the untruncated
    result) and the largest and median relative error √(1 − kept); None when nothing was truncated."""
    kept = provenance.get("kept_energy") or {}
    if not kept:
        return None
    worst = min(kept, key=kept.get)
    errors = [math.sqrt(max(0.0, 1 - v)) for v in kept.values()]
    return (
        f"energy kept min {kept[worst]:.4f} ({worst}), median {_median(list(kept.values())):.4f}; "
        f"relative error max {max(errors):.4f}, median {_median(errors):.4f}"
    )


def _method_section(provenance: dict) -> list[str]:
    method = provenance.get("method")
    if method is None:
        return []
    info = REGISTRY.get(method)
    lines = ["## Method", ""]
    if info is None:
        lines.append(f"`{method}`")
    else:
        paper = f" Paper: {_paper_links(info.paper)}." if info.paper else ""
        lines.append(f"`{method}` — {info.description.rstrip('.')}.{paper}")
    details = []
    if provenance.get("truncation"):
        details.append(f"truncation: {provenance['truncation']}")
    if provenance.get("options"):
        details.append("options: " + ", ".join(f"{k}={v}" for k, v in sorted(provenance["options"].items())))
    if details:
        lines += ["", "; ".join(details)]
    summary = kept_summary(provenance)
    if summary:
        lines += ["", "Truncation per module (share of the untruncated merge's Σσ² kept; ‖ΔW_full − ΔW‖/‖ΔW_full‖):"]
        lines += [f"{summary}.", "", "<details><summary>Per module</summary>", ""]
        lines += ["| module | energy kept | relative error |", "|---|---|---|"]
        for name, share in provenance["kept_energy"].items():
            lines.append(f"| `{name}` | {share:.6f} | {math.sqrt(max(0.0, 1 - share)):.6f} |")
        lines += ["", "</details>"]
    return [*lines, ""]


def _sources_section(provenance: dict, revisions: dict[str, str]) -> list[str]:
    sources = provenance.get("sources") or []
    if not sources:
        return []
    weights = provenance.get("weights") or [None] * len(sources)
    lines = ["## Source adapters", "", "| adapter | weight | revision |", "|---|---|---|"]
    for source, weight in zip(sources, weights):
        shown = "-" if weight is None else parse(weight).describe()
        lines.append(f"| `{source}` | {shown} | {revisions.get(source, 'local')} |")
    options = (provenance.get("options") or {}).values()
    if any(varies(w) for w in weights) or any(varies(v) for v in options):
        lines += [
            "",
            f"Weights or method options vary by layer or module: gradients interpolate across "
            f"{provenance.get('num_layers')} layers "
            "as mergekit's do, name filters take the first match, `lbw` lists weight Stable Diffusion blocks as "
            "kohya's merge scripts do; `loramix analyze` with the same weights lists each module's weight.",
        ]
    return [*lines, ""]


def _rank_line(adapter: LoraAdapter) -> str:
    ranks = sorted(m.rank for m in adapter.modules.values())
    if not ranks:
        return "no LoRA modules"
    median = f" (median {ranks[len(ranks) // 2]})" if ranks[0] != ranks[-1] else ""
    return f"{counted(len(ranks), 'module')}, {rank_span(ranks)}{median}, {adapter.num_params():,} parameters"


def _overlap_lines(analysis: Analysis) -> list[str]:
    lines = []
    for pair in analysis.pairs:
        o = pair.overall
        values = (("cosine", o.cosine), ("φ_A", o.phi_a), ("φ_B", o.phi_b))
        parts = [f"{label} {value:.3f}" for label, value in values if value is not None]
        lines.append(f"- `{pair.a}` vs `{pair.b}`: " + (", ".join(parts) or "no shared modules"))
    return lines


def _layout_lines(adapter: LoraAdapter) -> list[str]:
    """What the card says about expert modules and module names the inputs held under another naming."""
    lines = []
    found = experts.groups(adapter.modules)
    if found:
        counts = "/".join(map(str, sorted({m.expert.count for ms in found.values() for m in ms.values()})))
        lines += [
            "",
            f"Experts: {len(found)} fused expert parameters with {counts} experts each, one LoRA per expert, written "
            "as PEFT `target_parameters` pairs (PEFT 0.20+ loads them; vLLM, SGLang and LoRAX do not apply them: "
            "serve the model merged, `--merge-into`).",
        ]
    if adapter.provenance.get("renamed"):
        lines += [
            "",
            "Module names: transformers' in-memory naming of the base's architecture (its checkpoint conversion "
            f"mapping, from {adapter.provenance['renamed']}), the naming the installed transformers and PEFT load; "
            "sources named as the checkpoint stores them were mapped onto it.",
        ]
    return lines


def _analysis_section(adapter: LoraAdapter, analysis: Analysis | None) -> list[str]:
    lines = ["## Analysis", "", f"Result: {_rank_line(adapter)}.", *_layout_lines(adapter)]
    if analysis is not None and analysis.pairs:
        overlap = _overlap_lines(analysis)
        if overlap:
            lines += ["", "Overlap of the sources (cosine of the ΔWs; φ of the input (A) and output (B) subspaces,"]
            lines += ["see `loramix analyze`):", ""]
            lines += overlap
    return [*lines, ""]


def model_card(
    adapter: LoraAdapter,
    *,
    argv: list[str] | None = None,
    merged_into: str | None = None,
    analysis: Analysis | None = None,
    revisions: dict[str, str] | None = None,
    output_format: str = "peft",
    recipe: bool = False,
    searched: bool = False,
    dtype: str | None = None,
) -> str:
    """README.md text for an output folder holding ``adapter`` (or, with ``merged_into``, that base merged).

    ``argv`` is the command line that made it (``sys.argv``, the program shown by its name); without it the card
    says the Python API made it. ``dtype`` is the output's stored dtype (default: the adapter's factors').
    ``analysis`` (of the sources, already computed) adds their pairwise overlap; ``revisions`` maps each Hub source
    to the revision and commit it resolved to (local sources say ``local``); ``recipe`` says a recipe file lies
    beside the card (with ``searched``, it repeats the combination with the searched weights, not the search).
    ``output_format``
    ``kohya`` describes a kohya/A1111 file (no library_name: neither PEFT nor transformers loads it).
    """
    merged = merged_into is not None
    base = _hub_base(merged_into) if merged else None
    base = base or _hub_base(adapter.base_model)
    provenance = adapter.provenance or {}
    method = provenance.get("method")
    kohya = output_format == "kohya" and not merged
    tags = ["loramix", "lora", *([method] if method else []), *(["merge"] if merged else [])]
    tags += ["kohya"] if kohya else []
    data = ModelCardData(
        base_model=base,
        base_model_relation="merge" if merged else "adapter",
        library_name="transformers" if merged else (None if kohya else "peft"),
        tags=tags,
    )
    kind = "checkpoint" if merged else "LoRA adapter"
    base_text = f"`{merged_into if merged else adapter.base_model}`" if (merged_into or adapter.base_model) else "?"
    if merged:
        what = f"The base model {base_text} with a LoRA merged into its weights"
    else:
        what = f"A {'kohya/A1111' if kohya else 'PEFT'} LoRA adapter for {base_text}"
    made = f"made by {_loramix_link()} {loramix_version()}"
    if method:
        made += f" with the `{method}` method from {len(provenance.get('sources') or [])} source adapter(s)"
    command = shlex.join([Path(argv[0]).name, *argv[1:]]) if argv else None  # the program's name, not its path
    body = [
        f"# {f'{method} merge of LoRA adapters' if method else adapter.name}",
        "",
        f"{what}, {made}.",
        "",
        *_method_section(provenance),
        *_sources_section(provenance, revisions or {}),
        *_analysis_section(adapter, analysis),
        "## How it was made",
        "",
    ]
    if command:
        body += ["```bash", command, "```", ""]
    else:
        body += ["Written through the loramix Python API (no command line).", ""]
    if recipe:
        body += [f"The recipe is saved beside this card as `{RECIPE_FILE}`: in this folder,"]
        repeats = "the combination with the searched weights (the search is in search.json)" if searched else "the run"
        body += [f"`loramix combine --recipe {RECIPE_FILE} -o OUT` repeats {repeats} into a new folder OUT.", ""]
    stored = dtype or str(adapter.dtype).removeprefix("torch.")
    ranks = "" if merged or not adapter.modules else f"; {rank_text(adapter)}"
    body += [f"loramix version: {loramix_version()}; output: {kind}, stored in {stored}{ranks}.", ""]
    return f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(body)


def extraction_section(report: dict) -> str:
    """The card's account of an extraction (`loramix.pipeline.extract`'s report): the two models, the rule, and per
    module the rank, the share of ‖ΔW‖² kept and the relative error measured with the stored factors; what was
    carried whole, not carried, or unchanged."""
    revisions = report.get("revisions", {})
    lines = ["", "## Extraction", ""]
    lines.append(
        f"ΔW = W(`{report['finetuned']}`, revision {revisions.get(report['finetuned'], 'local')}) − "
        f"W(`{report['base']}`, revision {revisions.get(report['base'], 'local')}) per module, truncated by "
        f"{report['rule']} (computed in float32 on {report['device']})."
    )
    lines += _module_account(report["modules"])
    for title, items in (
        ("Carried whole (modules_to_save)", report["carried"]),
        ("Not carried", report["not_carried"]),
    ):
        if items:
            lines += ["", f"{title}:", "", *(f"- `{name}`: {why}" for name, why in items.items())]
    lines += ["", f"Unchanged: {report['unchanged']} identical tensor(s)"]
    if report["rounding_only"]:
        lines[-1] += f"; {len(report['rounding_only'])} changed by no more than rounding, left out"
    lines[-1] += "."
    return "\n".join(lines) + "\n"


# How `loramix convert` forms each kind's ΔW (the kinds of module `loramix.convert.convert` reports)
CONVERSIONS = {
    "DoRA": "DoRA: ΔW = m·(W + sBA)/‖W + sBA‖ − W with PEFT's weight norm per output row, in float64 from the base "
    "weight.",
    "VeRA": "VeRA: ΔW = (λ_b ⊙ B)(λ_d ⊙ A) with the shared projections cut to the base weight's shape, in float64.",
    "(IA)³": "(IA)³: ΔW = W ⊙ (l − 1), in float64 from the base weight; an output-side vector's change of the base "
    "bias is a lora_B bias.",
    "OFT": "OFT: ΔW = W·(blockdiag(R)ᵀ − I), R the Cayley transform of its skew-symmetric blocks as PEFT computes it, "
    "in float64 from the base weight.",
    "FourierFT": "FourierFT: ΔW = Re(ifft2(S))·scaling, S its coefficients at the entries PEFT draws for the base "
    "weight's shape, in float64.",
}
FACTORED = "Products of factors (LoRA, LoHa, LoKr: their exact LoRAs) are re-factorised in factor space, with no base."


def conversion_section(report: dict) -> str:
    """The card's account of a conversion (`loramix.convert.convert`'s report): that this LoRA is a conversion, of
    what (the kinds of module), how exact (the rule; kept energy and relative error per module, measured with the
    stored factors)."""
    revisions = report.get("revisions", {})
    kinds = ", ".join(f"{kind} ×{count}" for kind, count in report["kinds"].items())
    base = (
        f" on the base `{report['base']}` (revision {revisions.get(report['base'], 'local')})" if report["base"] else ""
    )
    exact = (
        "full numerical rank: exact to float rounding" if report["rule"] == "full numerical rank" else report["rule"]
    )
    how = [CONVERSIONS.get(kind, FACTORED) for kind in report["kinds"]]
    lines = [
        "",
        "## Conversion",
        "",
        f"This LoRA is a conversion of `{report['source']}` ({kinds}): each module's effective update ΔW{base} "
        f"re-factorised as B·A, truncated by {exact}. {' '.join(dict.fromkeys(how))}",
    ]
    lines += _module_account(report["modules"])
    if report["carried"]:
        lines += ["", "Carried as they are (modules_to_save):", "", *(f"- `{name}`" for name in report["carried"])]
    return "\n".join(lines) + "\n"


def _module_account(modules: dict) -> list[str]:
    """Energy kept and measured relative error: the summary, and per module a table."""
    if not modules:
        return []
    kept = [m["kept_energy"] for m in modules.values()]
    errors = [m["relative_error"] for m in modules.values()]
    worst = max(modules, key=lambda name: modules[name]["relative_error"])
    lines = [
        "",
        f"Energy kept (share of ‖ΔW‖²): min {min(kept):.4f}, median {_median(kept):.4f}; "
        f"relative error ‖ΔW − B·A‖/‖ΔW‖ measured with the stored factors: max {max(errors):.4f} (`{worst}`), "
        f"median {_median(errors):.4f}.",
        "",
        "<details><summary>Per module</summary>",
        "",
        "| module | rank | energy kept | relative error | ‖ΔW‖/‖W‖ |",
        "|---|---|---|---|---|",
    ]
    for name, m in modules.items():
        change = "–" if m["relative_change"] is None else f"{m['relative_change']:.3g}"
        lines.append(f"| `{name}` | {m['rank']} | {m['kept_energy']:.6f} | {m['relative_error']:.6f} | {change} |")
    return [*lines, "", "</details>"]


def quantization_section(card: str, report: MergeReport) -> str:
    """``card`` with the account of a merge into a quantized base or a QLoRA-faithful one (as it was for neither);
    a quantized base written in its own format is "stored as" that format, not in the dense dtype."""
    if report.written_as is not None:
        if report.in_own_format:
            stored = r", stored in (?:the base's dtype|\S+)\.$"  # the CLI's card names no dtype for a merge
            card = re.sub(stored, f", stored as {report.written_as}.", card, count=1, flags=re.M)
        return card + quantized_base_section(report)
    if report.quantization is None:
        return card
    return card + qlora_section(report.quantization, report.round_tripped, list(report.survival))


def quantized_summary(report: MergeReport) -> str:
    """The "wrote" line's account of a merge into a quantized base ("" for a dense base)."""
    if report.written_as is None:
        return ""
    shares = [v for v in report.below_step.values() if not math.isnan(v)]
    below = f"; ΔW below half a quantization step: {min(shares):.1%}–{max(shares):.1%}" if shares else ""
    return f"; written as {report.written_as}{below}"


def quantized_base_section(report: MergeReport) -> str:
    """The card's account of a merge into a quantized base: how it was written and how much of ΔW survived."""
    shares = [v for v in report.below_step.values() if not math.isnan(v)]
    lines = [
        "",
        "## Quantized base",
        "",
        f"The base is quantized; the adapter was merged onto its dequantized weights (the weights a model loaded "
        f"from it computes with) and the checkpoint is written as {report.written_as}.",
    ]
    if shares:
        lines += [
            "",
            f"Of ΔW's energy, {min(shares):.1%}–{max(shares):.1%} per module lies below half the base's "
            "local quantization step (it only moves a weight within its cell, so re-quantization may drop it).",
        ]
    kept = [v.kept for v in report.survival.values() if not math.isnan(v.kept)]
    if kept:
        lines += ["", f"Stored update vs ΔW: ‖stored‖/‖ΔW‖ from {min(kept):.3f} to {max(kept):.3f} per module."]
    return "\n".join(lines) + "\n"


def qlora_section(settings: Quantization, round_tripped: list[str], modules: list[str]) -> str:
    """The card's account of a QLoRA-faithful merge: the 4-bit settings and which base tensors (keys) were
    round-tripped, of them those of the adapter's ``modules`` (appended to the card once the merge has said which)."""
    targeted = set(modules)
    changed = sorted(k for k in round_tripped if k.removesuffix(".weight") in targeted)
    others = len(round_tripped) - len(changed)
    library = "; bitsandbytes" if settings.bitsandbytes else ""
    kept = (
        "- every other tensor (attention, router, embeddings, norms, output head) was left as it is (transformers' "
        "MXFP4 quantizes only the experts)."
        if settings.mxfp4
        else "- embeddings, norms and the output head were left as they are (the quantized model keeps them "
        "unquantized)" + (f", as were the skipped modules {', '.join(settings.skip)}." if settings.skip else ".")
    )
    lines = [
        "",
        "## QLoRA-faithful merge",
        "",
        f"The adapter was trained on a quantized base ({settings.describe()}{library}). Before ΔW was added, "
        f"{len(round_tripped)} base weight(s) went through that quantization's round trip (quantize → dequantize), "
        "so this checkpoint is the model the adapter was trained with, not the bf16 base plus ΔW:",
        "",
        f"- {len(changed)} weight(s) the adapter changes"
        + (f" (e.g. `{changed[0]}`)" if changed else "")
        + f", and {others} other weight(s) the quantized model quantizes (round trip `{settings.round_trip}`);",
        kept,
    ]
    return "\n".join(lines) + "\n"


def dtype_section(base: str, stored: str) -> str:
    """The card's note that a merged checkpoint is stored in another dtype than its base (asked for with dtype)."""
    return (
        f"\nThe base is stored in {base}; this checkpoint was converted to {stored} as asked (`--dtype`): every "
        f"floating-point tensor, the untouched ones included, is the base's rounded to {stored}.\n"
    )
