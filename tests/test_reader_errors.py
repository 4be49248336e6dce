"""The reader against damaged and odd input, and the atomic writer against failure.

Property tests throw truncated, byte-swapped, mis-shaped and garbage-config folders at `load_adapter`: the only
exception allowed out is a `LoramixError` whose message names the file (a traceback would be a bug). The rest
covers legacy pickles (read only through ``torch.load(weights_only=True)``), the writer's safety rules, and config
quirks real files have (config/tensor disagreement, regex target_modules, old schemas).
"""

from __future__ import annotations

import io
import json
import math
import pickle
import random
import tempfile
from pathlib import Path

import pytest
import safetensors.torch
import torch
from helpers import (
    example_inputs,
    make_peft_adapter,
    model_output,
    raw_lora_folder,
    tiny_llama,
    write_folder,
)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from loramix import load_adapter, save_adapter
from loramix.errors import AdapterFormatError, LoramixError, OutputError
from loramix.io.files import atomic_output

FUZZ = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])

Q = "model.layers.0.self_attn.q_proj"
V = "model.layers.0.self_attn.v_proj"


def template_tensors() -> dict[str, torch.Tensor]:
    """One valid hand-made adapter's tensors (q_proj 8×6 and v_proj 4×6, r=4), in PEFT's key layout."""
    gen = torch.Generator().manual_seed(0)
    return {
        f"base_model.model.{name}.{kind}.weight": torch.randn(shape, generator=gen)
        for name, out in ((Q, 8), (V, 4))
        for kind, shape in (("lora_A", (4, 6)), ("lora_B", (out, 4)))
    }


TENSORS = template_tensors()
WEIGHTS = safetensors.torch.save(TENSORS, metadata={"format": "pt"})
CONFIG = {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"]}


def load_or_error(folder: Path):
    """Load ``folder``; return the adapter, or the LoramixError (which must name a file of the folder)."""
    try:
        return load_adapter(folder, log_warnings=False)
    except LoramixError as exc:
        message = str(exc)
        assert str(folder) in message, f"error does not name the file: {message}"
        assert "\n" not in message, f"error is not one line: {message!r}"
        return exc


def load_bytes(weights: bytes | None = None, config: bytes | None = None, name: str = "adapter_model.safetensors"):
    """`load_or_error` on a temporary folder holding these bytes (the template's where None)."""
    with tempfile.TemporaryDirectory(prefix="loramix-fuzz-") as tmp:
        folder = Path(tmp)
        (folder / name).write_bytes(WEIGHTS if weights is None else weights)
        (folder / "adapter_config.json").write_bytes(json.dumps(CONFIG).encode() if config is None else config)
        return load_or_error(folder)


@pytest.fixture
def template(tmp_path) -> Path:
    return write_folder(tmp_path / "template", CONFIG, TENSORS)


def test_template_is_valid():
    a = load_bytes()
    assert sorted(a.modules) == [Q, V] and a.warnings == []
    assert {m.scale for m in a.modules.values()} == {2.0}


# ----------------------------------------------------------------------------------------------- damaged bytes


@FUZZ
@given(cut=st.integers(min_value=0, max_value=len(WEIGHTS) - 1))
def test_truncated_weights_are_refused(cut):
    result = load_bytes(weights=(WEIGHTS[:cut]))
    assert isinstance(result, AdapterFormatError)
    assert "adapter_model.safetensors" in str(result)


@FUZZ
@given(swaps=st.lists(st.tuples(st.integers(0, len(WEIGHTS) - 1), st.integers(0, len(WEIGHTS) - 1)), max_size=8))
def test_swapped_bytes_load_or_fail_cleanly(swaps):
    data = bytearray(WEIGHTS)
    for i, j in swaps:
        data[i], data[j] = data[j], data[i]
    load_bytes(weights=(bytes(data)))


@FUZZ
@given(at=st.integers(0, 200), junk=st.binary(min_size=1, max_size=16))
def test_overwritten_header_bytes_load_or_fail_cleanly(at, junk):
    """The first ~200 bytes are the length prefix and the JSON header: damage there is the interesting kind."""
    data = bytearray(WEIGHTS)
    data[at : at + len(junk)] = junk
    load_bytes(weights=(bytes(data[: len(WEIGHTS)])))


@FUZZ
@given(data=st.binary(max_size=64))
def test_garbage_weights_are_refused(data):
    assert isinstance(load_bytes(weights=(data)), AdapterFormatError)


@FUZZ
@given(data=st.binary(max_size=64))
def test_garbage_config_bytes_load_or_fail_cleanly(data):
    load_bytes(config=(data))


# ----------------------------------------------------------------------------------------------- garbage configs

json_scalars = st.none() | st.booleans() | st.integers(-3, 70) | st.floats() | st.text(max_size=6)
json_values = st.recursive(
    json_scalars, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3)
)
regexish = st.text(alphabet="()[]*+?|.\\^$q_projv", max_size=10)
config_fields = {
    "peft_type": st.sampled_from(["LORA", "lora", "ADALORA", "IA3"]) | json_values,
    "r": json_values,
    "lora_alpha": json_values,
    "use_rslora": json_values,
    "use_dora": json_values,
    "fan_in_fan_out": json_values,
    "bias": st.sampled_from(["none", "all", "lora_only"]) | json_values,
    "target_modules": regexish | st.lists(regexish | json_scalars, max_size=3) | json_values,
    "modules_to_save": st.lists(st.text(max_size=6) | json_scalars, max_size=2) | json_values,
    "rank_pattern": st.dictionaries(regexish, json_scalars, max_size=3) | json_values,
    "alpha_pattern": st.dictionaries(regexish, json_scalars, max_size=3) | json_values,
    "base_model_name_or_path": json_values,
    "task_type": json_values,
}


@FUZZ
@given(changes=st.fixed_dictionaries({}, optional=config_fields))
def test_garbage_config_values_load_or_fail_cleanly(changes):
    result = load_bytes(config=(json.dumps({**CONFIG, **changes}).encode()))
    if not isinstance(result, LoramixError):
        # what loads must be usable: finite scales, and a summary that serialises
        from loramix.render.inspect import adapter_summary

        assert all(math.isfinite(m.scale) for m in result.modules.values())
        json.dumps(adapter_summary(result))


@FUZZ
@given(value=json_values)
def test_config_that_is_not_an_object_is_refused(value):
    if isinstance(value, dict):
        value = [value]
    assert isinstance(load_bytes(config=(json.dumps(value).encode())), AdapterFormatError)


# ----------------------------------------------------------------------------------------------- mis-shaped factors

dims = st.integers(1, 5)
shapes = st.lists(dims, min_size=0, max_size=4).map(tuple)


@FUZZ
@given(a_shape=shapes, b_shape=shapes)
def test_mis_shaped_factors_are_refused_naming_the_module(a_shape, b_shape):
    ok_2d = len(a_shape) == 2 and len(b_shape) == 2 and b_shape[1] == a_shape[0]
    ok_4d = len(a_shape) == 4 and len(b_shape) == 4 and b_shape[1] == a_shape[0] and b_shape[2:] == (1, 1)
    tensors = {
        f"base_model.model.{Q}.lora_A.weight": torch.ones(a_shape),
        f"base_model.model.{Q}.lora_B.weight": torch.ones(b_shape),
    }
    result = load_bytes(weights=safetensors.torch.save(tensors))
    if ok_2d or ok_4d:
        assert not isinstance(result, LoramixError), result
    else:
        assert isinstance(result, AdapterFormatError)
        assert Q in str(result) and "adapter_model.safetensors" in str(result)


@pytest.mark.parametrize("missing", ["lora_A", "lora_B"])
def test_missing_factor_is_refused(missing, tmp_path):
    config, tensors = CONFIG, dict(TENSORS)
    del tensors[f"base_model.model.{Q}.{missing}.weight"]
    with pytest.raises(AdapterFormatError, match=rf"module {Q} has no {missing} tensor"):
        load_adapter(write_folder(tmp_path / "a", config, tensors))


def test_vector_of_the_wrong_length_is_refused(tmp_path):
    config, tensors = CONFIG, dict(TENSORS)
    tensors[f"base_model.model.{Q}.lora_magnitude_vector"] = torch.ones(3)  # q_proj has 8 outputs
    with pytest.raises(AdapterFormatError, match="lora_magnitude_vector has 3 values, expected 8"):
        load_adapter(write_folder(tmp_path / "a", config, tensors))


def test_integer_factors_are_refused(tmp_path):
    config, tensors = CONFIG, dict(TENSORS)
    key = f"base_model.model.{Q}.lora_A.weight"
    tensors[key] = tensors[key].to(torch.int32)
    with pytest.raises(AdapterFormatError, match="not floating point"):
        load_adapter(write_folder(tmp_path / "a", config, tensors))


def test_no_lora_tensors_is_refused(tmp_path):
    folder = write_folder(tmp_path / "a", CONFIG, {"base_model.model.classifier.weight": torch.ones(2, 2)})
    with pytest.raises(AdapterFormatError, match="no LoRA tensors"):
        load_adapter(folder)


def test_missing_files_are_refused(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "adapter_config.json").write_text(json.dumps(CONFIG))
    with pytest.raises(AdapterFormatError, match="no adapter_model.safetensors or adapter_model.bin"):
        load_adapter(tmp_path / "a")
    (tmp_path / "b").mkdir()
    with pytest.raises(AdapterFormatError, match="no adapter_config.json"):
        load_adapter(tmp_path / "b")


# ----------------------------------------------------------------------------------------------- legacy pickles


def legacy_folder(folder: Path, state) -> Path:
    folder.mkdir()
    (folder / "adapter_config.json").write_text(json.dumps(CONFIG))
    torch.save(state, folder / "adapter_model.bin")
    return folder


def test_legacy_bin_reads_like_safetensors(tmp_path):
    tensors = TENSORS
    a = load_adapter(legacy_folder(tmp_path / "bin", tensors))
    b = load_bytes()
    assert sorted(a.modules) == sorted(b.modules)
    for name, m in b.modules.items():
        assert torch.equal(a.modules[name].A, m.A) and torch.equal(a.modules[name].B, m.B)
        assert a.modules[name].scale == m.scale


class Payload:
    """A pickled object whose unpickling would run code: weights_only must refuse it before it runs."""

    marker: Path | None = None

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_pickle_with_an_object_is_refused_without_running_it(tmp_path):
    tensors = TENSORS
    payload = Payload()
    payload.marker = tmp_path / "ran"
    folder = legacy_folder(tmp_path / "evil", {**tensors, "x": payload})
    with pytest.raises(AdapterFormatError, match="adapter_model.bin: not a readable tensor file"):
        load_adapter(folder)
    assert not payload.marker.exists(), "unpickling ran code from the file"


def test_pickle_with_plain_non_tensor_values_is_refused(tmp_path):
    tensors = TENSORS
    folder = legacy_folder(tmp_path / "mixed", {**tensors, "step": 3})
    with pytest.raises(AdapterFormatError, match="expected a flat mapping of names to tensors"):
        load_adapter(folder)
    raw = tmp_path / "raw"
    raw.mkdir()
    (raw / "adapter_config.json").write_text(json.dumps(CONFIG))
    (raw / "adapter_model.bin").write_bytes(pickle.dumps(["not", "a", "dict"], protocol=2))
    with pytest.raises(AdapterFormatError, match="adapter_model.bin"):
        load_adapter(raw)


def legacy_bytes() -> bytes:
    buffer = io.BytesIO()
    torch.save(TENSORS, buffer)
    return buffer.getvalue()


LEGACY = legacy_bytes()


@FUZZ
@given(cut=st.integers(0, len(LEGACY)), seed=st.integers(0, 2**16))
def test_damaged_legacy_bin_fails_cleanly(cut, seed):
    data = bytearray(LEGACY)
    rng = random.Random(seed)
    for _ in range(4):
        i, j = rng.randrange(len(data)), rng.randrange(len(data))
        data[i], data[j] = data[j], data[i]
    load_bytes(weights=bytes(data[: cut or len(data)]), name="adapter_model.bin")


# ----------------------------------------------------------------------------------------------- the writer


def listing(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_failed_write_leaves_nothing(template, tmp_path, monkeypatch):
    adapter = load_adapter(template)
    out = tmp_path / "outputs"
    out.mkdir()
    import loramix.formats.peft as peft_format

    def broken_save(path, tensors, metadata=None):
        Path(path).write_bytes(b"partial")  # a half-written file, then the disk fills up
        raise OSError("No space left on device")

    monkeypatch.setattr(peft_format, "write_safetensors", broken_save)
    with pytest.raises(OSError):
        save_adapter(adapter, out / "out")
    assert list(out.iterdir()) == []  # no output, no temporary folder


def test_failed_overwrite_keeps_the_old_output(template, tmp_path, monkeypatch):
    old = save_adapter(load_adapter(template), tmp_path / "out")
    before = listing(old)
    import loramix.formats.peft as peft_format

    monkeypatch.setattr(peft_format, "config_dict", lambda adapter: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        save_adapter(load_adapter(template), tmp_path / "out", overwrite=True)
    assert listing(tmp_path / "out") == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "template"]


def test_failed_final_rename_restores_the_old_output(template, tmp_path, monkeypatch):
    """If moving the new output into place fails, the output it was replacing is put back, not lost."""
    old = save_adapter(load_adapter(template), tmp_path / "out")
    before = listing(old)
    import loramix.io.files

    real_replace = loramix.io.files.os.replace

    def replace(src, dst):
        if Path(src).name.endswith(".tmp"):
            raise OSError("Read-only file system")
        return real_replace(src, dst)

    monkeypatch.setattr(loramix.io.files.os, "replace", replace)
    with pytest.raises(OSError, match="Read-only"):
        save_adapter(load_adapter(template), tmp_path / "out", overwrite=True)
    assert listing(tmp_path / "out") == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "template"]


def test_empty_adapter_is_not_written(tmp_path):
    from loramix.adapter import LoraAdapter

    with pytest.raises(OutputError, match="no LoRA modules"):
        save_adapter(LoraAdapter(modules={}), tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


def test_atomic_output_cleans_up_on_error(tmp_path):
    with pytest.raises(RuntimeError), atomic_output(tmp_path / "target") as tmp:
        (tmp / "file").write_text("half")
        raise RuntimeError("interrupted")
    assert list(tmp_path.iterdir()) == []


def test_existing_non_empty_folder_needs_overwrite(template, tmp_path):
    adapter = load_adapter(template)
    target = tmp_path / "out"
    target.mkdir()
    (target / "keep.txt").write_text("mine")
    with pytest.raises(OutputError, match="exists and is not empty"):
        save_adapter(adapter, target)
    assert listing(target) == {"keep.txt": b"mine"}
    with pytest.raises(OutputError, match="not an earlier output"):  # overwrite replaces outputs, not any folder
        save_adapter(adapter, target, overwrite=True)
    assert listing(target) == {"keep.txt": b"mine"}
    (target / "adapter_config.json").write_text("{}")  # an adapter folder loramix did not write: still refused
    with pytest.raises(OutputError, match="not an earlier output"):
        save_adapter(adapter, target, overwrite=True)
    (target / "loramix_recipe.yaml").write_text("adapters: []\n")  # an earlier output: replaced as a whole
    save_adapter(adapter, target, overwrite=True)
    written = listing(target)
    assert "keep.txt" not in written and {"adapter_config.json", "adapter_model.safetensors"} <= set(written)
    (tmp_path / "empty").mkdir()
    save_adapter(adapter, tmp_path / "empty")  # an empty folder is fine
    (tmp_path / "file").write_text("x")
    with pytest.raises(OutputError, match="not a folder"):
        save_adapter(adapter, tmp_path / "file", overwrite=True)


def test_writer_refuses_its_own_input(tmp_path):
    source = raw_lora_folder(tmp_path / "parent" / "input")
    before = listing(source)
    adapter = load_adapter(source)
    for target in (source, source.parent, tmp_path / "parent" / "." / "input"):
        with pytest.raises(OutputError, match="would replace the input"):
            save_adapter(adapter, target, overwrite=True)
    assert listing(source) == before


# ----------------------------------------------------------------------------------------------- config quirks


def test_config_rank_disagreeing_with_tensors_warns_and_tensors_win(tmp_path):
    shapes = {Q: (8, 8, 6), V: (4, 4, 6), "model.layers.1.self_attn.q_proj": (8, 8, 6)}
    folder = raw_lora_folder(tmp_path / "a", shapes=shapes, config={"r": 4, "lora_alpha": 16})
    a = load_adapter(folder, log_warnings=False)
    assert a.modules[Q].rank == 8 and a.modules[Q].scale == 16 / 8
    assert a.modules[V].rank == 4 and a.modules[V].scale == 16 / 4
    (warning,) = a.warnings
    assert "r=4" in warning and "rank 8" in warning and "2 module(s)" in warning and Q in warning
    assert V not in warning


def test_target_modules_regex_string(tmp_path):
    """PEFT takes a string target_modules as a full-match regex; loramix reads and writes such adapters."""
    regex = r".*\.layers\.1\.self_attn\.(q_proj|v_proj)"
    made = make_peft_adapter(tiny_llama, tmp_path, "regex", target_modules=regex)
    a = load_adapter(made.path)
    assert sorted(a.modules) == ["model.layers.1.self_attn.q_proj", "model.layers.1.self_attn.v_proj"]
    assert a.warnings == []
    inputs = example_inputs(tiny_llama)
    # float32, same factors, scale alpha/r = 2 exactly: only summation order could differ
    torch.testing.assert_close(
        model_output(made.load_with_peft(save_adapter(a, tmp_path / "out")), inputs),
        model_output(made.load_with_peft(), inputs),
        rtol=0,
        atol=1e-5,
    )
    narrow = raw_lora_folder(tmp_path / "narrow", config={"target_modules": r".*\.q_proj"})
    (note,) = load_adapter(narrow, log_warnings=False).warnings
    assert "does not name" in note and V in note


def test_old_config_without_newer_fields(tmp_path):
    config = {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"]}
    a = load_adapter(raw_lora_folder(tmp_path / "old", config=config))  # no use_rslora/use_dora/... keys
    assert not a.use_rslora and not a.has_dora and a.warnings == []
    assert {m.scale for m in a.modules.values()} == {2.0}
    minimal = {"r": 4, "lora_alpha": 8}  # not even peft_type or target_modules
    assert {m.scale for m in load_adapter(raw_lora_folder(tmp_path / "min", config=minimal)).modules.values()} == {2.0}


def test_adapter_name_and_wrapper_keys_are_normalised(tmp_path):
    """Keys with the adapter name (``.default.``) and a ModulesToSaveWrapper copy read as their plain names."""
    tensors = TENSORS
    named = {k.replace(".weight", ".default.weight"): v for k, v in tensors.items()}
    named["base_model.model.score.modules_to_save.default.weight"] = torch.ones(2, 4)
    named["base_model.model.score.original_module.weight"] = torch.zeros(2, 4)
    a = load_adapter(write_folder(tmp_path / "named", CONFIG, named), log_warnings=False)
    assert sorted(a.modules) == [Q, V]
    assert sorted(a.extra) == ["score.weight"] and torch.equal(a.extra["score.weight"].tensor, torch.ones(2, 4))
    assert any("original_module" in w for w in a.warnings)


@pytest.mark.parametrize(
    "changes, field",
    [
        ({"alpha_pattern": {"q_proj": "x"}}, "alpha_pattern"),
        ({"alpha_pattern": {"q_proj": None}}, "alpha_pattern"),
        ({"rank_pattern": {"(": 2}}, "rank_pattern"),
        ({"rank_pattern": {"?": 2}}, "rank_pattern"),
        ({"target_modules": 5}, "target_modules"),
        ({"target_modules": ["q_proj", 5]}, "target_modules"),
        ({"modules_to_save": 5}, "modules_to_save"),
        ({"lora_alpha": float("nan")}, "lora_alpha"),
        ({"lora_alpha": float("inf")}, "lora_alpha"),
        ({"r": True}, "r"),
        ({"use_rslora": "false"}, "use_rslora"),  # truthy: would silently switch to alpha/√r
        ({"bias": 5}, "bias"),
        ({"base_model_name_or_path": ["a"]}, "base_model_name_or_path"),
    ],
)
def test_wrong_config_types_are_refused_naming_the_field(changes, field, tmp_path):
    folder = write_folder(tmp_path / "a", {**CONFIG, **changes}, TENSORS)
    with pytest.raises(AdapterFormatError) as info:
        load_adapter(folder)
    assert str(folder / "adapter_config.json") in str(info.value) and field in str(info.value)


def test_cli_reports_a_damaged_file_as_one_error_line(tmp_path):
    from click.testing import CliRunner

    from loramix.cli import main

    folder = write_folder(tmp_path / "a", CONFIG, TENSORS)
    (folder / "adapter_model.safetensors").write_bytes(WEIGHTS[:100])
    result = CliRunner().invoke(main, ["inspect", str(folder)])
    assert result.exit_code == 2 and result.stdout == ""
    (line,) = result.stderr.splitlines()
    assert line.startswith(f"error: {folder / 'adapter_model.safetensors'}: not a readable tensor file")


STORED_DTYPES = [
    torch.float64,
    torch.float32,
    torch.float16,
    torch.bfloat16,
    torch.float8_e4m3fn,
    torch.float8_e5m2,
    torch.int8,
    torch.uint8,
    torch.int64,
    torch.bool,
]


@pytest.mark.parametrize("dtype", STORED_DTYPES, ids=str)
def test_every_stored_dtype_loads_or_is_refused_cleanly(dtype, tmp_path):
    """Float factors of any width load (and inspect); integer/bool factors are refused. NaN is caught in each."""
    from loramix.render.inspect import adapter_summary

    tensors = {k: v.to(dtype, copy=True) for k, v in TENSORS.items()}
    result = load_or_error(write_folder(tmp_path / "a", CONFIG, tensors))
    if dtype.is_floating_point:
        assert not isinstance(result, LoramixError), result
        assert result.dtype == dtype and adapter_summary(result)["dtype"] == str(dtype).removeprefix("torch.")
        # ΔW in float32 against float64 maths on the same stored factors: a rank-4 sum, float32 rounding only
        expected = (
            2.0
            * tensors[f"base_model.model.{Q}.lora_B.weight"].double()
            @ tensors[f"base_model.model.{Q}.lora_A.weight"].double()
        )
        torch.testing.assert_close(result.modules[Q].delta(), expected.float(), rtol=1e-6, atol=1e-6)
        tensors[f"base_model.model.{Q}.lora_B.weight"][0, 0] = float("nan")
        with pytest.raises(AdapterFormatError, match="NaN/Inf"):
            load_adapter(write_folder(tmp_path / "nan", CONFIG, tensors))
    else:
        assert isinstance(result, AdapterFormatError) and "not floating point" in str(result)


def test_keys_that_normalise_to_the_same_tensor(tmp_path):
    """The same tensor under two spellings (doubled prefix, adapter name) is read once; different values refuse."""
    key = f"base_model.model.{Q}.lora_A.weight"
    twice = {**TENSORS, "base_model.model." + key: TENSORS[key].clone()}
    a = load_adapter(write_folder(tmp_path / "same", CONFIG, twice), log_warnings=False)
    assert torch.equal(a.modules[Q].A, TENSORS[key])
    assert any("repeat an equal tensor" in w for w in a.warnings)
    differing = {**TENSORS, key.replace(".weight", ".default.weight"): TENSORS[key] + 1}
    folder = write_folder(tmp_path / "differ", CONFIG, differing)
    with pytest.raises(AdapterFormatError, match="name one tensor with different values") as info:
        load_adapter(folder)
    assert str(folder / "adapter_model.safetensors") in str(info.value) and key in str(info.value)
    head = {
        **TENSORS,
        "base_model.model.score.weight": torch.ones(2),
        "score.modules_to_save.default.weight": torch.ones(3),
    }
    with pytest.raises(AdapterFormatError, match="score"):
        load_adapter(write_folder(tmp_path / "head", CONFIG, head))
