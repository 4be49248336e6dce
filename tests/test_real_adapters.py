"""Real adapters trained by other people (../shared/real-adapters): each loads and inspects as CATALOGUE.md says.

The oracle is the catalogue's own table (parsed here, not restated): base, r, alpha, task, dtype, the number of
LoRA pairs (= modules) and the extra tensors of each folder. For one real GPT-2 adapter PEFT is the oracle too:
it must give the same logits with loramix's rewrite as with the original, on a random-weight base of the real
shape. Every test here skips when the folder is absent.
"""

from __future__ import annotations

import copy
import json

import pytest
import torch
from click.testing import CliRunner
from helpers import REAL, read_folder, requires_real

from loramix import load_adapter, save_adapter
from loramix.cli import main
from loramix.errors import AdapterFormatError

pytestmark = requires_real

POISONED = "gemma_2b__sql_f16"  # every element NaN: refused unless allow_nonfinite


def catalogue() -> dict[str, dict]:
    """CATALOGUE.md's table as {folder: {column: value}} (empty when the folder is absent)."""
    path = REAL / "CATALOGUE.md"
    if not path.is_file():
        return {}
    lines = [line.strip() for line in path.read_text().splitlines()]
    rows = [line.strip("|").split("|") for line in lines if line.startswith("|") and not set(line) <= set("|-: ")]
    header = [c.strip() for c in rows[0]]
    return {cells[0].strip(): dict(zip(header, (c.strip() for c in cells))) for cells in rows[1:]}


CATALOGUE = catalogue()
CLEAN = sorted(n for n in CATALOGUE if n != POISONED)


def none_or(value: str) -> str | None:
    return None if value == "None" else value


def expected_extras(row: dict) -> list[str]:
    cell = row["extra tensors"]
    return [] if cell == "—" else sorted(c.strip() for c in cell.split(","))


def test_catalogue_lists_every_adapter_folder():
    folders = {p.name for p in REAL.iterdir() if (p / "adapter_config.json").is_file()}
    assert folders == set(CATALOGUE)
    assert len(CLEAN) >= 15


@pytest.mark.parametrize("name", CLEAN)
def test_loads_as_catalogued(name):
    row = CATALOGUE[name]
    a = load_adapter(REAL / name, log_warnings=False)
    r, alpha = int(row["r"]), float(row["alpha"])
    assert len(a.modules) == int(row["LoRA pairs"])
    assert a.ranks == [r]
    assert {m.scale for m in a.modules.values()} == {alpha / r}
    assert str(a.dtype) == f"torch.{row['dtype']}"
    assert a.base_model == none_or(row["base (config)"])
    assert a.task_type == none_or(row["task"])
    assert sorted(a.extra) == expected_extras(row)
    targets = row["target_modules"].split(",")
    for module in a.modules:
        assert not module.startswith("base_model") and ".default" not in module, module
        assert module.rsplit(".", 1)[-1] in targets, module
    assert all(m.A.shape[0] == m.B.shape[1] == r for m in a.modules.values())


@pytest.mark.parametrize("name", [n for n in CLEAN if "clean" in CATALOGUE[n]["notes"].split(";")[0]])
def test_clean_adapters_have_no_warnings(name):
    assert load_adapter(REAL / name, log_warnings=False).warnings == []


def test_extras_are_kept_with_their_values():
    """Heads saved by modules_to_save come through bit for bit, named as the base model names them."""
    for name in CLEAN:
        expected = expected_extras(CATALOGUE[name])
        if not expected:
            continue
        a = load_adapter(REAL / name, log_warnings=False)
        _, raw = read_folder(REAL / name)
        for extra in expected:
            assert a.extra[extra].kind == "modules_to_save"
            assert torch.equal(a.extra[extra].tensor, raw[f"base_model.model.{extra}"]), (name, extra)


def test_doubled_prefix_and_all_zero_adapter_warn():
    a = load_adapter(REAL / "gpt2__carinfo_doubleprefix", log_warnings=False)
    assert any("every lora_B is zero" in w for w in a.warnings)
    assert any("repeated" in w and "normalised" in w for w in a.warnings)
    assert "transformer.h.0.attn.c_attn" in a.modules  # not base_model.model.transformer...
    assert all(not m.B.any() for m in a.modules.values())
    b = load_adapter(REAL / "smollm2_360m__lora_test_base", log_warnings=False)
    assert any("repeated" in w for w in b.warnings)
    assert "model.layers.0.self_attn.q_proj" in b.modules


def test_config_bias_without_bias_tensors_warns():
    a = load_adapter(REAL / "gpt2__ironhack_r4_biaslora_clm", log_warnings=False)
    assert any("bias='lora_only'" in w for w in a.warnings)


def test_fan_in_fan_out_follows_the_config_on_conv1d():
    """The stored factors are the same either way; only the layout flag differs, with a warning when false."""
    assert {m.layout for m in load_adapter(REAL / "gpt2__tigrinya_clm").modules.values()} == {"conv1d_fan_in_fan_out"}
    odd = load_adapter(REAL / "distilgpt2__pipeline", log_warnings=False)
    assert {m.layout for m in odd.modules.values()} == {"out_in"}
    assert any("fan_in_fan_out=false" in w for w in odd.warnings)


def test_nan_adapter_is_refused_naming_file_and_tensor():
    with pytest.raises(AdapterFormatError) as info:
        load_adapter(REAL / POISONED)
    message = str(info.value)
    assert str(REAL / POISONED / "adapter_model.safetensors") in message
    assert "base_model.model.model.layers." in message and "lora_" in message
    assert "NaN" in message and "allow_nonfinite" in message


def test_nan_adapter_loads_when_allowed():
    a = load_adapter(REAL / POISONED, allow_nonfinite=True, log_warnings=False)
    assert len(a.modules) == int(CATALOGUE[POISONED]["LoRA pairs"])
    assert a.dtype == torch.float16 and a.ranks == [16]
    assert all(m.A.isnan().all() and m.B.isnan().all() for m in a.modules.values())


def test_cli_inspect_json_keys():
    result = CliRunner().invoke(main, ["inspect", "--json", *(str(REAL / n) for n in CLEAN)])
    assert result.exit_code == 0, result.output
    summaries = json.loads(result.stdout)
    assert len(summaries) == len(CLEAN)
    keys = {"source", "base_model", "dtype", "num_modules", "ranks", "extra_tensors", "warnings"}
    for name, s in zip(CLEAN, summaries):
        assert keys <= set(s), name
        row = CATALOGUE[name]
        assert s["source"] == str(REAL / name)
        assert (s["base_model"], s["dtype"], s["num_modules"]) == (
            none_or(row["base (config)"]),
            row["dtype"],
            int(row["LoRA pairs"]),
        )
        assert s["ranks"] == [int(row["r"])]
        assert s["extra_tensors"] == expected_extras(row)
        assert isinstance(s["warnings"], list)


def test_cli_inspect_text_mentions_warnings():
    result = CliRunner().invoke(main, ["inspect", str(REAL / "gpt2__carinfo_doubleprefix")])
    assert result.exit_code == 0, result.output
    assert "every lora_B is zero" in result.stdout and "(unknown)" in result.stdout


def test_cli_nan_adapter_exits_2_with_one_error_line():
    result = CliRunner().invoke(main, ["inspect", str(REAL / POISONED)])
    assert result.exit_code == 2
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:"), result.stderr
    assert POISONED in lines[0]
    allowed = CliRunner().invoke(main, ["inspect", "--json", "--allow-nonfinite", str(REAL / POISONED)])
    assert allowed.exit_code == 0 and json.loads(allowed.stdout)[0]["num_modules"] == 36


@pytest.mark.parametrize("name", ["gpt2__seqcls_deepbiolab", "gpt2__carinfo_doubleprefix", "bert__emotion_seqcls"])
def test_real_adapter_round_trip(name, tmp_path):
    """load → save → load gives equal tensors, names, scales and extras; the rewrite has no prefix left to fix."""
    a = load_adapter(REAL / name, log_warnings=False)
    b = load_adapter(save_adapter(a, tmp_path / name), log_warnings=False)
    assert sorted(b.modules) == sorted(a.modules)
    for module, m in a.modules.items():
        n = b.modules[module]
        assert torch.equal(n.A, m.A) and torch.equal(n.B, m.B), module
        assert (n.scale, n.layout) == (m.scale, m.layout), module
    assert sorted(b.extra) == sorted(a.extra)
    assert all(torch.equal(b.extra[k].tensor, e.tensor) for k, e in a.extra.items())
    assert (b.base_model, b.task_type, b.dtype) == (a.base_model, a.task_type, a.dtype)
    assert not any("repeated" in w for w in b.warnings)


@pytest.mark.parametrize("name", ["distilgpt2__groundup", "distilgpt2__pipeline"])
def test_real_gpt2_adapter_through_peft(name, tmp_path):
    """PEFT gives the same logits with loramix's rewrite of a real distilgpt2 adapter as with the original.

    The base is GPT-2's real config cut to distilgpt2's 6 layers (and a 64-token vocabulary, which the adapter does
    not touch, to keep it fast), random weights. Tolerance: float32 atol 1e-5 on logits of order 1: the factors are
    copied bit for bit and the scales are exact (alpha/r = 2 and 4), so only summation order could differ; the
    adapters (pipeline's is catalogued as a tiny delta) move the logits by more than 100 times that.
    """
    from peft import PeftModel
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config.from_pretrained(str(REAL / "base_gpt2_config_only"), n_layer=6, vocab_size=64, n_positions=16)
    out = save_adapter(load_adapter(REAL / name), tmp_path / name)
    torch.manual_seed(0)
    base = GPT2LMHeadModel(config).eval()
    ids = torch.randint(0, config.vocab_size, (1, 8))

    def logits(folder=None) -> torch.Tensor:
        model = copy.deepcopy(base)
        with torch.no_grad():
            return (PeftModel.from_pretrained(model, str(folder)) if folder else model).eval()(input_ids=ids).logits

    original = logits(REAL / name)
    assert (original - logits()).abs().max() > 1e-3, "the adapter must change the logits for this to test anything"
    torch.testing.assert_close(logits(out), original, rtol=0, atol=1e-5)
