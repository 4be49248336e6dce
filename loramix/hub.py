"""Model cards for every output folder, and pushing a folder to the Hugging Face Hub.

`model_card` writes a README.md whose YAML front matter is huggingface_hub's `ModelCardData` (base_model,
base_model_relation ``adapter`` or ``merge``, library_name ``peft`` or ``transformers``, tags) and whose body says
how the output was made: the method and its paper, each source with its weight and revision, a cheap analysis
summary, the exact command line (or that the Python API made it) and the loramix version. `push_to_hub` creates the
repository (``exist_ok``) and uploads the folder through huggingface_hub. The token comes from where
huggingface_hub looks (``HF_TOKEN``, the login cache) and never appears in a message.
"""

from __future__ import annotations

import logging
import re
from importlib import metadata
from pathlib import Path

from loramix.adapter import LoraAdapter
from loramix.errors import LoramixError
from loramix.sources import parse_hub_id

log = logging.getLogger(__name__)

CARD_FILE = "README.md"
RECIPE_FILE = "loramix_recipe.yaml"
REPO_URL = "https://github.com/loramix/loramix"
# Analysis in the card only when it is cheap: at most this many LoRA parameters in the result.
CHEAP_ANALYSIS_PARAMS = 5_000_000


class HubError(LoramixError):
    """Pushing to the Hub failed (no token, no access, the Hub refused or could not be reached)."""


def loramix_version() -> str:
    try:
        return metadata.version("loramix")
    except metadata.PackageNotFoundError:
        return "unknown"


def _paper_links(paper: str) -> str:
    """The registry's paper text with each arXiv id turned into a link."""
    return re.sub(r"arXiv:(\d{4}\.\d{4,5})", r"[arXiv:\1](https://arxiv.org/abs/\1)", paper)


def _hub_base(base: str | None) -> str | None:
    """``base`` when it reads as a Hub id (metadata must name a Hub model, not a local folder)."""
    if not base:
        return None
    ref = parse_hub_id(base)
    return ref.repo_id if ref is not None and not Path(base).exists() else None


def _revision(source: str) -> str:
    """``local`` for a path; for a Hub id the revision asked for and the commit the local cache resolved it to."""
    ref = parse_hub_id(source) if not Path(source).exists() else None
    if ref is None:
        return "local"
    asked = ref.revision or "main"
    try:  # the source was just fetched, so the cache answers without the network
        from huggingface_hub import snapshot_download

        folder = Path(snapshot_download(ref.repo_id, revision=ref.revision, local_files_only=True, allow_patterns=[]))
    except Exception:  # noqa: BLE001 — the card then names the revision asked for only
        return asked
    commit = folder.name if folder.parent.name == "snapshots" else None
    return f"{asked} (commit {commit})" if commit and commit != asked else asked


def _method_section(provenance: dict) -> list[str]:
    from loramix.methods import REGISTRY

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
    return [*lines, ""]


def _sources_section(provenance: dict) -> list[str]:
    sources = provenance.get("sources") or []
    if not sources:
        return []
    weights = provenance.get("weights") or [None] * len(sources)
    lines = ["## Source adapters", "", "| adapter | weight | revision |", "|---|---|---|"]
    for source, weight in zip(sources, weights):
        shown = f"{weight:g}" if isinstance(weight, (int, float)) else "-"
        lines.append(f"| `{source}` | {shown} | {_revision(source)} |")
    return [*lines, ""]


def _rank_line(adapter: LoraAdapter) -> str:
    ranks = sorted(m.rank for m in adapter.modules.values())
    if not ranks:
        return "no LoRA modules"
    median = ranks[len(ranks) // 2]
    return f"{len(ranks)} modules, rank {ranks[0]}–{ranks[-1]} (median {median}), {adapter.num_params():,} parameters"


def _overlap_lines(provenance: dict) -> list[str]:
    """Pairwise overlap of the sources, when they are few and small; nothing when it cannot be had cheaply."""
    sources = provenance.get("sources") or []
    if len(sources) < 2 or len(sources) > 8:
        return []
    from loramix.analysis import analyze

    quiet = logging.getLogger("loramix")
    level = quiet.level
    quiet.setLevel(logging.CRITICAL)
    try:
        result = analyze(sources, weights=provenance.get("weights"), allow_different_bases=True)
    except (LoramixError, OSError, RuntimeError, ValueError) as exc:
        log.debug("no analysis in the card: %s", exc)
        return []
    finally:
        quiet.setLevel(level)
    lines = []
    for pair in result.pairs:
        o = pair.overall
        values = (("cosine", o.cosine), ("φ_A", o.phi_a), ("φ_B", o.phi_b))
        parts = [f"{label} {value:.3f}" for label, value in values if value is not None]
        lines.append(f"- `{pair.a}` vs `{pair.b}`: " + (", ".join(parts) or "no shared modules"))
    return lines


def _analysis_section(adapter: LoraAdapter, *, analysis: bool) -> list[str]:
    lines = ["## Analysis", "", f"Result: {_rank_line(adapter)}."]
    if analysis and adapter.num_params() <= CHEAP_ANALYSIS_PARAMS:
        overlap = _overlap_lines(adapter.provenance)
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
    analysis: bool = True,
    output_format: str = "peft",
) -> str:
    """README.md text for an output folder holding ``adapter`` (or, with ``merged_into``, that base merged).

    ``argv`` is the command line that made it (``sys.argv``, the program shown by its name); without it the card
    says the Python API made it.
    ``analysis`` adds the sources' pairwise overlap when the adapters are small (it reloads them). ``output_format``
    ``kohya`` describes a kohya/A1111 file (no library_name: neither PEFT nor transformers loads it).
    """
    import shlex

    from huggingface_hub import ModelCardData

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
    made = f"made by [loramix]({REPO_URL}) {loramix_version()}"
    if method:
        made += f" with the `{method}` method from {len(provenance.get('sources') or [])} source adapter(s)"
    command = shlex.join([Path(argv[0]).name, *argv[1:]]) if argv else None  # the program's name, not its path
    body = [
        f"# {f'{method} merge of LoRA adapters' if method else adapter.name}",
        "",
        f"{what}, {made}.",
        "",
        *_method_section(provenance),
        *_sources_section(provenance),
        *_analysis_section(adapter, analysis=analysis),
        "## How it was made",
        "",
    ]
    if command:
        body += ["```bash", command, "```", ""]
    else:
        body += ["Written through the loramix Python API (no command line).", ""]
    if provenance.get("recipe"):
        body += [f"The recipe is saved beside this card as `{RECIPE_FILE}`: `loramix combine --recipe {RECIPE_FILE}`"]
        body += ["repeats the run.", ""]
    body += [f"loramix version: {loramix_version()}; output: {kind}.", ""]
    return f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(body)


def _repeatable(plan, adapter: LoraAdapter):
    """``plan`` as a recipe that repeats the run from anywhere: local paths made absolute, the weights used."""
    from dataclasses import replace

    def anchored(item):
        return str(Path(item).resolve()) if isinstance(item, str) and Path(item).exists() else item

    weights = adapter.provenance.get("weights") or plan.weights
    return replace(
        plan,
        adapters=[anchored(a) for a in plan.adapters],
        weights=list(weights) if weights else None,
        module_map=anchored(plan.module_map),
    )


def output_files(
    adapter: LoraAdapter,
    *,
    plan=None,
    argv: list[str] | None = None,
    merged_into: str | None = None,
    output_format: str = "peft",
) -> dict[str, str]:
    """The card and, with a `recipe.Plan`, the recipe (``loramix_recipe.yaml``) to write beside an output."""
    files = {}
    if plan is not None:
        files[RECIPE_FILE] = _repeatable(plan, adapter).to_yaml()
        adapter.provenance = {**adapter.provenance, "recipe": True}
    files[CARD_FILE] = model_card(adapter, argv=argv, merged_into=merged_into, output_format=output_format)
    return files


def _http_error() -> type[Exception]:
    """The HTTP client's error base class (huggingface_hub 2.x talks through httpx2, older versions httpx)."""
    try:
        import httpx2 as client
    except ImportError:
        import httpx as client
    return client.HTTPError


def push_to_hub(
    folder: str | Path,
    repo_id: str,
    *,
    private: bool = False,
    revision: str | None = None,
    commit_message: str | None = None,
    token: str | None = None,
    endpoint: str | None = None,
) -> str:
    """Create ``repo_id`` (if needed) and upload ``folder`` to it; returns the commit URL.

    ``token`` defaults to huggingface_hub's own lookup (``HF_TOKEN``, then the login cache); ``endpoint`` to
    ``HF_ENDPOINT`` / the public Hub. With ``revision`` the branch is created when missing and the upload goes there.
    """
    from huggingface_hub import HfApi, get_token
    from huggingface_hub.errors import HfHubHTTPError

    folder = Path(folder)
    if not folder.is_dir() or not any(folder.iterdir()):
        raise HubError(f"{folder}: not a folder with files to push")
    if parse_hub_id(repo_id) is None or "@" in repo_id or ":" in repo_id:
        raise HubError(f"{repo_id}: not a Hub repository id (expected org/name)")
    token = token or get_token()
    if not token:
        raise HubError("not logged in to the Hugging Face Hub: run `hf auth login` or set HF_TOKEN")
    api = HfApi(endpoint=endpoint, token=token)
    message = commit_message or f"Upload {folder.name} with loramix {loramix_version()}"
    try:
        api.create_repo(repo_id, private=private or None, exist_ok=True)
        if revision:
            api.create_branch(repo_id, branch=revision, exist_ok=True)
        info = api.upload_folder(repo_id=repo_id, folder_path=folder, revision=revision, commit_message=message)
    except (HfHubHTTPError, _http_error(), OSError, ValueError) as exc:
        detail = (str(exc).splitlines() or [type(exc).__name__])[0].replace(token, "***")
        raise HubError(f"push of {folder} to {repo_id} failed: {detail}") from None
    return str(info.commit_url)
