"""Errors name the kind of mistake: a device, an output format, a setting's value or a wrong kind of object each
has its class, and every one of them is still a `MethodError` (what callers caught before)."""

from __future__ import annotations

import re
import sys

import pytest

import loramix
from loramix.errors import (
    ArgumentError,
    DeviceError,
    MethodError,
    MissingPackageError,
    OutputFormatError,
    SettingError,
)
from loramix.examples import path as example
from loramix.runtime import resolve_device


def test_each_kind_is_its_own_class_and_still_a_method_error(tmp_path):
    with pytest.raises(DeviceError, match="unknown device"):
        resolve_device("tpu9")
    with pytest.raises(OutputFormatError, match="unknown output format"):
        loramix.save_adapter(loramix.load_adapter(example("summarize")), tmp_path / "x", format="onnx")
    with pytest.raises(SettingError, match="energy must be in"):
        loramix.combine([example("summarize"), example("formal")], method="svd", rank_rule=loramix.RankRule(energy=2.0))
    with pytest.raises(ArgumentError, match="not a single one"):
        loramix.combine(example("summarize"))
    with pytest.raises(MethodError, match="unknown method"):
        loramix.combine([example("summarize"), example("formal")], method="nonesuch")
    for kind in (DeviceError, OutputFormatError, SettingError, ArgumentError):
        assert issubclass(kind, MethodError) and issubclass(kind, ValueError)
    assert issubclass(ArgumentError, TypeError)
    assert not issubclass(SettingError, ArgumentError)


def _gguf_output(tmp_path) -> None:
    loramix.save_adapter(loramix.load_adapter(example("summarize")), tmp_path / "x", format="gguf")


def _gguf_base(tmp_path) -> None:
    from loramix.io.gguf_base import open_gguf

    open_gguf(tmp_path / "base.gguf")


def _plots(tmp_path) -> None:
    from loramix.render.plots import analysis_plots

    analysis_plots(loramix.analyze([example("summarize")]))


def _bitsandbytes(tmp_path) -> None:
    from loramix.quantize import _functional

    _functional()


def _accelerate(tmp_path) -> None:
    from loramix.weight_search.run import _split_memory

    _split_memory([])


@pytest.mark.parametrize(
    "blocked, call, extra",
    [
        (("gguf",), _gguf_output, "loramix[gguf]"),
        (("gguf",), _gguf_base, "loramix[gguf]"),
        (("matplotlib", "matplotlib.figure"), _plots, "loramix[plot]"),
        (("bitsandbytes.functional",), _bitsandbytes, "loramix[qlora]"),
        (("accelerate",), _accelerate, "pip install accelerate"),
    ],
)
def test_a_missing_optional_package_is_a_missing_package_error(blocked, call, extra, tmp_path, monkeypatch):
    """Every call that needs an optional package that is not installed raises `MissingPackageError` (an
    `ImportError` and a `LoramixError`) naming what to install."""
    for name in blocked:
        monkeypatch.setitem(sys.modules, name, None)  # importing it now raises ModuleNotFoundError
    with pytest.raises(MissingPackageError, match=re.escape(extra)) as raised:
        call(tmp_path)
    assert isinstance(raised.value, ImportError) and isinstance(raised.value, loramix.LoramixError)
