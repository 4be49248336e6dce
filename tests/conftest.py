"""Shared pytest fixtures. The factories themselves live in tests/helpers.py (importable from any test file)."""

from __future__ import annotations

import logging
import os
from pathlib import Path

# No test may reach the Hub: PEFT and transformers look up base ids (config.json) when saving and loading.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
from helpers import REAL  # noqa: E402


@pytest.fixture
def real_adapters():
    """The folder of real third-party adapters (tests using it skip when it is absent)."""
    if not REAL.is_dir():
        pytest.skip(f"{REAL} is absent")
    return REAL


def pytest_configure(config):
    """PEFT and transformers warn about tiny configs and non-standard models; those warnings are not ours."""
    logging.getLogger("transformers").setLevel(logging.ERROR)
    for module in ("peft", "transformers"):
        config.addinivalue_line("filterwarnings", f"ignore::UserWarning:{module}.*")
        config.addinivalue_line("filterwarnings", f"ignore::FutureWarning:{module}.*")


@pytest.fixture
def hub_cache(tmp_path, monkeypatch) -> Path:
    """An empty offline Hub cache that the real huggingface_hub client reads."""
    from huggingface_hub import constants

    cache = tmp_path / "hf" / "hub"
    cache.mkdir(parents=True)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return cache
