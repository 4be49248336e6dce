"""Turn a source string into a local path: a folder or file as given, or a Hub id fetched by huggingface_hub.

Hub ids: ``org/name``, ``org/name@revision``, ``org/name:subfolder`` (and both). Only the named files are fetched;
HF_HOME, HF_HUB_OFFLINE and HF_ENDPOINT are honoured by huggingface_hub itself.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from loramix.errors import SourceError

_HUB_ID = re.compile(r"^(?P<repo>[\w.\-]+/[\w.\-]+)(?:@(?P<revision>[^:\s]+))?(?::(?P<subfolder>[\w.\-/]+))?$")

ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors", "adapter_model.bin")


@dataclass(frozen=True)
class HubRef:
    repo_id: str
    revision: str | None = None
    subfolder: str | None = None


def parse_hub_id(src: str) -> HubRef | None:
    """Parse ``org/name[@rev][:subfolder]``; None when ``src`` does not have that shape."""
    match = _HUB_ID.match(src)
    if match is None:
        return None
    return HubRef(match["repo"], match["revision"], match["subfolder"])


def resolve(src: str | Path, *, files: tuple[str, ...] = ADAPTER_FILES, what: str = "no such file or folder") -> Path:
    """A local path for ``src``: an existing path as is, else a Hub id downloaded (only ``files``). ``what`` names
    the kind of thing asked for in the error when it is neither."""
    path = Path(src).expanduser()
    if path.exists():
        return path
    ref = parse_hub_id(str(src))
    if ref is None:
        raise SourceError(f"{src}: {what}, and not a Hub id (org/name[@revision][:subfolder])")
    _check_ref(str(src), ref)
    return _download(ref, files)


def _check_ref(src: str, ref: HubRef) -> None:
    """Refuse a subfolder or revision that would lead outside the repository's snapshot in the local cache."""
    for label, value in (("subfolder", ref.subfolder), ("revision", ref.revision)):
        if value is None:
            continue
        parts = value.replace("\\", "/").split("/")
        if value.startswith("/") or any(p in ("..", ".") for p in parts) or (label == "subfolder" and "" in parts[:-1]):
            raise SourceError(f"{src}: {label} {value!r} is not a path inside the repository")


def _download(ref: HubRef, files: tuple[str, ...]) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, RepositoryNotFoundError

    prefix = f"{ref.subfolder.strip('/')}/" if ref.subfolder else ""
    label = ref.repo_id + (f"@{ref.revision}" if ref.revision else "") + (f":{ref.subfolder}" if ref.subfolder else "")
    try:
        root = snapshot_download(ref.repo_id, revision=ref.revision, allow_patterns=[prefix + f for f in files])
    except RepositoryNotFoundError:
        raise SourceError(f"{label}: no such repository on the Hub (or it is private: set HF_TOKEN)") from None
    except LocalEntryNotFoundError:
        raise SourceError(
            f"{label}: not in the local Hub cache and the Hub cannot be reached (HF_HUB_OFFLINE?)"
        ) from None
    except (HfHubHTTPError, OSError, ValueError) as exc:
        raise SourceError(f"{label}: download failed ({str(exc).splitlines()[0]})") from None
    folder = Path(root) / prefix if prefix else Path(root)
    if not folder.is_dir() or not any(folder.iterdir()):
        raise SourceError(
            f"{label}: the repository has none of {', '.join(files)}" + (f" in {prefix}" if prefix else "")
        )
    return folder


def local_config(base: str) -> Path | None:
    """A folder holding ``base``'s config.json without fetching anything: a local folder, or the snapshot of a Hub
    id in the local cache; None when there is neither."""
    path = Path(base).expanduser()
    if (path / "config.json").is_file():
        return path
    ref = parse_hub_id(base)
    if ref is None or ref.subfolder:
        return None
    from huggingface_hub import try_to_load_from_cache

    found = try_to_load_from_cache(ref.repo_id, "config.json", revision=ref.revision)
    return Path(found).parent if isinstance(found, str) else None
