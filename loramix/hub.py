"""The Hugging Face Hub beyond downloads (`loramix.sources` fetches): `revision` says which commit a Hub source
resolved to (from the local cache only, never the network), and `push_to_hub` creates a repository (``exist_ok``)
and uploads an output folder. The token comes from where huggingface_hub looks (``HF_TOKEN``, the login cache) and
never appears in a message.
"""

from __future__ import annotations

from pathlib import Path

from huggingface_hub import HfApi, get_token, snapshot_download
from huggingface_hub.errors import HfHubHTTPError

from loramix.errors import HubError
from loramix.render.card import loramix_version
from loramix.sources import parse_hub_id


def revision(source: str) -> str:
    """``local`` for a path; for a Hub id the revision asked for and the commit the local cache resolved it to."""
    ref = parse_hub_id(source) if not Path(source).exists() else None
    if ref is None:
        return "local"
    asked = ref.revision or "main"
    try:  # the source was just fetched, so the cache answers without the network
        folder = Path(snapshot_download(ref.repo_id, revision=ref.revision, local_files_only=True, allow_patterns=[]))
    except Exception:  # noqa: BLE001 — the card then names the revision asked for only
        return asked
    commit = folder.name if folder.parent.name == "snapshots" else None
    return f"{asked} (commit {commit})" if commit and commit != asked else asked


def revisions(sources: list) -> dict[str, str]:
    """`revision` of each source given as a string (a model card's "revision" column)."""
    return {s: revision(s) for s in sources if isinstance(s, str)}


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
    except (HfHubHTTPError, _http_error(), OSError, ValueError, KeyError, TypeError) as exc:
        detail = (str(exc).splitlines() or [type(exc).__name__])[0].replace(token, "***")
        if isinstance(exc, (KeyError, TypeError)):  # huggingface_hub reading an answer that lacks what it needs
            detail = f"the endpoint gave an unexpected answer ({type(exc).__name__}: {detail})"
        raise HubError(f"push of {folder} to {repo_id} failed: {detail}") from None
    return str(info.commit_url)
