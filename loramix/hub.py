"""The Hugging Face Hub beyond downloads (`loramix.sources` fetches): `revision` says which commit a Hub source
resolved to (from the local cache only, never the network), and `push_to_hub` creates a repository (``exist_ok``)
and uploads an output folder. The token comes from where huggingface_hub looks (``HF_TOKEN``, the login cache) and
never appears in a message.
"""

from __future__ import annotations

from pathlib import Path

from safetensors import safe_open

from loramix.errors import HubError
from loramix.render.card import loramix_version
from loramix.runtime import require_path
from loramix.sources import parse_hub_id


def _cached_commit(source: str):
    """(the parsed Hub id, the revision asked for, the commit the local cache resolved it to or None); None for a
    local path."""
    ref = parse_hub_id(source) if not Path(source).exists() else None
    if ref is None:
        return None
    asked = ref.revision or "main"
    from huggingface_hub import snapshot_download  # here: its client costs 0.25 s to import, local runs skip it

    try:  # the source was just fetched, so the cache answers without the network
        folder = Path(snapshot_download(ref.repo_id, revision=ref.revision, local_files_only=True, allow_patterns=[]))
    except Exception:  # noqa: BLE001 — the caller then names the revision asked for only
        return ref, asked, None
    return ref, asked, folder.name if folder.parent.name == "snapshots" else None


def revision(source: str) -> str:
    """``local`` for a path; for a Hub id the revision asked for and the commit the local cache resolved it to."""
    found = _cached_commit(source)
    if found is None:
        return "local"
    _, asked, commit = found
    return f"{asked} (commit {commit})" if commit and commit != asked else asked


def pinned(source: str) -> str:
    """A Hub id pinned to the commit its revision resolved to (``org/name@commit[:subfolder]``, from the local
    cache); a local path or an id the cache does not know is returned as it is."""
    found = _cached_commit(source)
    if found is None or found[2] is None:
        return source
    ref, _, commit = found
    return f"{ref.repo_id}@{commit}" + (f":{ref.subfolder}" if ref.subfolder else "")


def revisions(sources: list) -> dict[str, str]:
    """`revision` of each source given as a string (a model card's "revision" column)."""
    return {s: revision(s) for s in sources if isinstance(s, str)}


def _http_client():
    """The HTTP client module (huggingface_hub 2.x talks through httpx2, older versions httpx)."""
    try:
        import httpx2 as client
    except ImportError:
        import httpx as client
    return client


_MODEL_WEIGHTS = ("*.safetensors", "*.bin", "*.safetensors.index.json", "*.bin.index.json")


def _holds_adapter_or_model(folder: Path) -> bool:
    """A PEFT adapter, a kohya file loramix wrote (its metadata names loramix's base), or config.json + weights."""
    if (folder / "adapter_config.json").is_file():
        return True
    if (folder / "config.json").is_file() and any(any(folder.glob(p)) for p in _MODEL_WEIGHTS):
        return True
    for file in folder.glob("*.safetensors"):
        try:
            with safe_open(str(file), "pt") as f:
                if "loramix_base_model" in (f.metadata() or {}):
                    return True
        except Exception:  # noqa: BLE001 — an unreadable file is no adapter
            continue
    return False


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
    folder = require_path(folder, "folder (the output folder to push)")
    if not folder.is_dir() or not any(folder.iterdir()):
        raise HubError(f"{folder}: not a folder with files to push")
    if not _holds_adapter_or_model(folder):
        raise HubError(
            f"{folder}: holds no adapter or model (no adapter_config.json, no config.json with weights, no kohya "
            "file that loramix wrote); not pushing it"
        )
    if parse_hub_id(repo_id) is None or "@" in repo_id or ":" in repo_id:
        raise HubError(f"{repo_id}: not a Hub repository id (expected org/name)")
    from huggingface_hub import HfApi, get_token
    from huggingface_hub.errors import HfHubHTTPError

    token = token or get_token()
    if not token:
        raise HubError("not logged in to the Hugging Face Hub: run `hf auth login` or set HF_TOKEN")
    api = HfApi(endpoint=endpoint, token=token)
    client = _http_client()
    message = commit_message or f"Upload {folder.name} with loramix {loramix_version()}"
    try:
        api.create_repo(repo_id, private=private or None, exist_ok=True)
        if revision:
            api.create_branch(repo_id, branch=revision, exist_ok=True)
        info = api.upload_folder(repo_id=repo_id, folder_path=folder, revision=revision, commit_message=message)
    except (HfHubHTTPError, client.HTTPError, OSError, ValueError, KeyError, TypeError) as exc:
        detail = (str(exc).splitlines() or [type(exc).__name__])[0].replace(token, "***")
        if isinstance(exc, (client.TransportError, ConnectionError)):  # refused, DNS, timeouts: nothing answered
            detail = f"cannot reach {api.endpoint} ({detail})"
        elif isinstance(exc, (KeyError, TypeError)):  # huggingface_hub reading an answer that lacks what it needs
            detail = f"the endpoint gave an unexpected answer ({type(exc).__name__}: {detail})"
        raise HubError(f"push of {folder} to {repo_id} failed: {detail}") from None
    return str(info.commit_url)
