"""Hub ids through the real huggingface_hub client, with no network: a local Hub cache built in a temporary folder.

The cache is laid out as huggingface_hub writes it (``models--org--name/refs/main`` holding a commit hash,
``snapshots/<hash>/...`` holding the files) and the client is put offline. huggingface_hub reads HF_HUB_CACHE and
HF_HUB_OFFLINE into ``huggingface_hub.constants`` once, at import, and ``snapshot_download`` then looks them up there
on each call (``constants.HF_HUB_CACHE`` for the cache, ``constants.is_offline_mode()`` before any request), so the
tests patch both the environment and those constants.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from helpers import COMMIT, publish, raw_lora_folder

from loramix import load_adapter
from loramix.errors import SourceError
from loramix.sources import HubRef, parse_hub_id, resolve

OTHER = "fedcba9876543210fedcba9876543210fedcba98"


def same_factors(a, b) -> bool:
    return sorted(a.modules) == sorted(b.modules) and all(
        torch.equal(a.modules[n].A, m.A) and torch.equal(a.modules[n].B, m.B) for n, m in b.modules.items()
    )


def test_hub_id_loads_from_the_cache(hub_cache, tmp_path):
    local = raw_lora_folder(tmp_path / "made")
    publish(hub_cache, "org/name", local)
    a = load_adapter("org/name")
    assert a.source == "org/name" and a.name == "name"  # named after the repository, not the snapshot hash
    assert same_factors(a, load_adapter(local))
    assert resolve("org/name") == hub_cache / "models--org--name" / "snapshots" / COMMIT


def test_hub_id_at_a_revision(hub_cache, tmp_path):
    old = raw_lora_folder(tmp_path / "old", seed=1)
    new = raw_lora_folder(tmp_path / "new", seed=2)
    publish(hub_cache, "org/name", old, commit=OTHER, ref="v1")
    publish(hub_cache, "org/name", new, commit=COMMIT)
    assert same_factors(load_adapter("org/name"), load_adapter(new))
    assert same_factors(load_adapter(f"org/name@{OTHER}"), load_adapter(old))
    assert same_factors(load_adapter("org/name@v1"), load_adapter(old))
    assert not same_factors(load_adapter(old), load_adapter(new))


def test_hub_id_with_a_subfolder(hub_cache, tmp_path):
    first = raw_lora_folder(tmp_path / "first", seed=1)
    second = raw_lora_folder(tmp_path / "second", seed=2)
    publish(hub_cache, "org/multi", first, sub="adapters/first")
    publish(hub_cache, "org/multi", second, sub="adapters/second")
    assert same_factors(load_adapter("org/multi:adapters/second"), load_adapter(second))
    assert same_factors(load_adapter(f"org/multi@{COMMIT}:adapters/first"), load_adapter(first))
    with pytest.raises(SourceError, match="org/multi:adapters/third: the repository has none of"):
        load_adapter("org/multi:adapters/third")


@pytest.mark.parametrize("src", ["org/missing", f"org/missing@{COMMIT}", "org/missing:sub", "org/name@v9"])
def test_missing_repo_or_revision_is_a_one_line_source_error(hub_cache, tmp_path, src):
    publish(hub_cache, "org/name", raw_lora_folder(tmp_path / "made"))
    with pytest.raises(SourceError) as info:
        load_adapter(src)
    message = str(info.value)
    assert message.startswith(src + ":") and "\n" not in message
    assert "cache" in message


def test_not_a_path_and_not_a_hub_id(hub_cache, tmp_path):
    for src in (str(tmp_path / "nowhere"), "a/b/c", "just-a-name", "org/name@"):
        with pytest.raises(SourceError, match="no such file or folder, and not a Hub id"):
            resolve(src)


def test_existing_path_wins_over_hub_id(hub_cache, tmp_path, monkeypatch):
    """A local folder named like a Hub id is read from disk (no Hub look-up at all)."""
    monkeypatch.chdir(tmp_path)
    raw_lora_folder(tmp_path / "org" / "name")
    assert resolve("org/name") == Path("org/name")
    assert len(load_adapter("org/name").modules) == 2


@pytest.mark.parametrize(
    "src, ref",
    [
        ("org/name", HubRef("org/name")),
        ("org/name@v1.0", HubRef("org/name", "v1.0")),
        ("org/name:sub/dir", HubRef("org/name", None, "sub/dir")),
        ("org/na.me-x_y@refs/pr/3:a", HubRef("org/na.me-x_y", "refs/pr/3", "a")),
        ("name", None),
        ("/abs/path", None),
        ("org/name@", None),
    ],
)
def test_parse_hub_id(src, ref):
    assert parse_hub_id(src) == ref
