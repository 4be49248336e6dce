"""Errors name the kind of mistake: a device, an output format, a setting's value or a wrong kind of object each
has its class, and every one of them is still a `MethodError` (what callers caught before)."""

from __future__ import annotations

import pytest

import loramix
from loramix.errors import ArgumentError, DeviceError, MethodError, OutputFormatError, SettingError
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
