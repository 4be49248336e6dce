"""What a newcomer runs into (issue 13): inspect reports every input, non-finite counts, LyCORIS and state-dict
folders, -q/-v anywhere, progress bars, --help, API misuse, push refusals, and tidy messages."""

from __future__ import annotations

import dataclasses
import inspect as pyinspect
import json
import logging
import os
import pty
import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import click
import pytest
import torch
from click.testing import CliRunner
from helpers import make_peft_adapter, read_folder, tiny_gpt2, write_folder
from safetensors.torch import load_file, save_file

import loramix
from loramix import runtime
from loramix.analysis.report import analysis_text
from loramix.cli import main
from loramix.errors import AdapterFormatError, HubError, LoramixError, MethodError
from loramix.examples import names as example_names
from loramix.examples import path as example
from loramix.linalg import RankRule
from loramix.recipe import Plan, load_recipe

ROOT = Path(__file__).resolve().parents[1]
REAL = ROOT.parent / "shared" / "real-adapters"


def cli(*args: str):
    return CliRunner().invoke(main, list(args))


def _nan_copy(tmp_path: Path, rows: int = 2) -> tuple[Path, int]:
    """The bundled summarize adapter with ``rows`` rows of one lora_A set to NaN; returns it and the NaN count."""
    config, tensors = read_folder(example("summarize"))
    key = next(k for k in sorted(tensors) if "lora_A" in k)
    tensors[key] = tensors[key].clone()
    tensors[key][:rows] = float("nan")
    folder = write_folder(tmp_path / "nan_adapter", config, tensors)
    written = load_file(str(folder / "adapter_model.safetensors"))
    return folder, sum(int(torch.isnan(t).sum()) for t in written.values())


# 1. inspect reports every input


def test_inspect_reports_every_input_and_fails_at_the_end(tmp_path):
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(b"not a tensor file")
    good = [str(example("translate")), str(example("formal"))]
    result = cli("inspect", good[0], str(broken), str(tmp_path / "missing"), good[1])
    assert result.exit_code == 2
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 2 and str(broken) in errors[0] and "missing" in errors[1]
    for name in ("translate", "formal"):  # the full report of each readable input, after the broken ones
        assert re.search(rf"^{name}\n  source +{re.escape(str(example(name)))}$", result.stdout, re.M)
    assert "\n\n\n" not in result.stdout and not result.stdout.startswith("\n")

    as_json = cli("inspect", "--json", good[0], str(broken), good[1])
    assert as_json.exit_code == 2
    items = json.loads(as_json.stdout)
    assert [i["source"] for i in items] == [good[0], str(broken), good[1]]
    assert "error" in items[1] and str(broken) in items[1]["error"]
    assert items[0]["num_modules"] == len(loramix.load_adapter(good[0]).modules)

    assert cli("inspect", *good).exit_code == 0


# 2. inspect --allow-nonfinite says how many values are non-finite


def test_inspect_allow_nonfinite_counts_the_values(tmp_path):
    folder, nans = _nan_copy(tmp_path)
    assert nans > 0
    refused = cli("inspect", str(folder))
    assert refused.exit_code == 2 and "--allow-nonfinite" in refused.stderr
    text = cli("inspect", "--allow-nonfinite", str(folder))
    assert text.exit_code == 0
    total = loramix.load_adapter(folder, allow_nonfinite=True).num_params()
    assert f"warning       {nans:,} of {total:,} values are NaN/Inf, in 1 tensor(s)" in text.stdout
    (item,) = json.loads(cli("inspect", "--json", "--allow-nonfinite", str(folder)).stdout)
    assert item["nonfinite_values"] == nans
    assert list(item["nonfinite_tensors"].values()) == [nans]
    assert any("NaN/Inf" in w for w in item["warnings"])
    (clean,) = json.loads(cli("inspect", "--json", str(example("summarize"))).stdout)
    assert clean["nonfinite_values"] == 0 and clean["nonfinite_tensors"] == {}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.float8_e4m3fn])
def test_the_nonfinite_count_equals_isfinite_also_where_a_sum_overflows(dtype):
    from loramix.io.files import nonfinite_count

    huge = torch.finfo(dtype).max  # finite values whose sum overflows (float32, float64: in their own dtype)
    values = torch.tensor([1.0, -2.0, huge, huge, huge], dtype=torch.float64)
    for poison in ([], [0], [0, 3]):
        t = values.clone()
        t[poison] = float("nan")
        if dtype.is_floating_point and torch.finfo(dtype).bits > 8 and poison:
            t[1] = float("-inf")
        t = t.to(dtype)
        counted = t.float() if t.element_size() == 1 else t  # float8 has no isfinite
        assert nonfinite_count(t) == int((~torch.isfinite(counted)).sum())  # the independent count
    assert nonfinite_count(torch.arange(5)) == 0


@pytest.mark.parametrize("enabled", [True, False])
def test_the_cli_start_up_collects_no_garbage_and_leaves_the_collector_as_it_was(enabled):
    import gc

    from loramix.cli.options import start_up

    was = gc.isenabled()
    (gc.enable if enabled else gc.disable)()
    try:
        with start_up():
            assert not gc.isenabled()
            made = [[] for _ in range(1000)]
        assert gc.isenabled() == enabled and gc.get_freeze_count() >= len(made)  # frozen out of later collections
    finally:
        gc.unfreeze()
        (gc.enable if was else gc.disable)()


def test_a_command_run_in_process_leaves_nothing_frozen_out_of_garbage_collection(tmp_path):
    import gc

    gc.unfreeze()
    result = cli("combine", str(example("translate")), "--method", "cat", "-o", str(tmp_path / "out"))
    assert result.exit_code == 0, result.output
    assert gc.get_freeze_count() == 0


def test_inspect_all_nan_real_adapter():
    source = REAL / "gemma_2b__sql_f16"
    if not source.is_dir():
        pytest.skip(f"{source} is absent")
    tensors = load_file(str(source / "adapter_model.safetensors"))
    bad = sum(int((~torch.isfinite(t)).sum()) for t in tensors.values())
    (item,) = json.loads(cli("inspect", "--json", "--allow-nonfinite", str(source)).stdout)
    assert item["nonfinite_values"] == bad == item["num_params"]  # entirely NaN


# 3. LyCORIS files are read as what they are (exactly: tests/test_lycoris.py), state-dict folders are read


def _lycoris(path: Path, kind: str) -> Path:
    gen = torch.Generator().manual_seed(0)
    stem = "lora_unet_down_blocks_0_attentions_0_proj_in"
    if kind == "loha":  # hada_w1_a is out×r: these (4, 8) factors do not chain
        parts = {f"hada_w{i}_{s}": torch.randn(4, 8, generator=gen) for i in (1, 2) for s in "ab"}
    else:
        parts = {"lokr_w1": torch.randn(2, 2, generator=gen), "lokr_w2_a": torch.randn(4, 2, generator=gen)}
        parts["lokr_w2_b"] = torch.randn(2, 4, generator=gen)
    tensors = {f"{stem}.{k}": v for k, v in parts.items()} | {f"{stem}.alpha": torch.tensor(4.0)}
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path))
    return path


def test_lycoris_files_are_named_not_misread(tmp_path):
    file = _lycoris(tmp_path / "folder" / "lokr.safetensors", "lokr")
    for source in (file, file.parent):
        adapter = loramix.load_adapter(source)
        assert adapter.provenance["format"] == "lycoris" and "lora_down" not in str(adapter.warnings)
        assert adapter.provenance["lycoris"] == ["LoKr full ⊗ rank 2 → exact LoRA rank 4 (1 module)"]
    result = cli("inspect", str(file))
    assert result.exit_code == 0 and "LoKr full ⊗ rank 2" in result.stdout
    broken = _lycoris(tmp_path / "loha.safetensors", "loha")
    with pytest.raises(AdapterFormatError, match=r"loha\.safetensors: module lora_unet_\S+proj_in: LoHa factors"):
        loramix.load_adapter(broken)
    result = cli("inspect", str(broken))
    assert result.exit_code == 2 and "LoHa" in result.stderr and result.stderr.count("\n") == 1


def test_state_dict_folder_with_one_file_is_read(tmp_path):
    folder = example("minimind")
    file = folder / "minimind_lora.pth"
    from_folder, from_file = loramix.load_adapter(folder), loramix.load_adapter(file)
    assert from_folder.modules.keys() == from_file.modules.keys()
    for name, m in from_file.modules.items():
        assert torch.equal(from_folder.modules[name].A, m.A) and torch.equal(from_folder.modules[name].B, m.B)
    result = cli("inspect", str(folder))
    assert result.exit_code == 0
    assert f"source        {folder} (minimind_lora.pth)" in result.stdout
    two = tmp_path / "two"
    two.mkdir()
    shutil.copy(file, two / "a.pth")
    shutil.copy(file, two / "b.pth")
    with pytest.raises(AdapterFormatError, match="not a recognised adapter"):
        loramix.load_adapter(two)


# 4. -q/-v before and after the subcommand


@pytest.mark.parametrize("where", ["before", "after"])
def test_quiet_and_verbose_anywhere(where, monkeypatch):
    source = str(example("minimind"))  # warns: no scale in the file
    loud = cli("analyze", source)
    assert loud.exit_code == 0 and "warning: minimind_lora: the file holds no scale" in loud.stderr
    quiet = cli("-q", "analyze", source) if where == "before" else cli("analyze", "-q", source)
    assert quiet.exit_code == 0, quiet.output
    assert "warning" not in quiet.stderr and quiet.stdout == loud.stdout
    methods = main.commands["methods"]
    seen = []  # the loramix logger's level while the command runs (it is handed back as it was afterwards)
    callback = methods.callback
    monkeypatch.setattr(
        methods, "callback", lambda *a, **k: (seen.append(logging.getLogger("loramix").level), callback(*a, **k))[1]
    )
    for flags, level in ((["-v"], logging.INFO), (["-vv"], logging.DEBUG), (["--quiet"], logging.ERROR)):
        args = [*flags, "methods"] if where == "before" else ["methods", *flags]
        assert cli(*args).exit_code == 0
        assert seen.pop() == level
    both = cli("-q", "methods", "-v")
    assert both.exit_code == 2 and "not both" in both.output


# 5. progress bars


def test_api_progress_defaults_off():
    for name in loramix.__all__:
        fn = getattr(loramix, name)
        if callable(fn) and not isinstance(fn, type):
            parameter = pyinspect.signature(fn).parameters.get("progress")
            assert parameter is None or parameter.default is False, name


def test_bar_only_for_slow_work(monkeypatch, capsys):
    sources = [example("summarize"), example("translate")]
    loramix.combine(sources, progress=True)  # fast: under the delay, nothing is drawn
    assert "combine (svd)" not in capsys.readouterr().err
    monkeypatch.setattr(runtime, "PROGRESS_DELAY", 0.0)  # as if every module took long
    loramix.combine(sources, progress=True)
    assert "combine (svd)" in capsys.readouterr().err
    loramix.combine(sources)
    assert capsys.readouterr().err == ""


def test_cli_bars_only_in_a_terminal(monkeypatch, tmp_path):
    monkeypatch.setattr(runtime, "PROGRESS_DELAY", 0.0)
    result = cli("combine", str(example("summarize")), str(example("translate")), "-o", str(tmp_path / "out"))
    assert result.exit_code == 0 and "combine (svd)" not in result.stderr  # CliRunner's stderr is no terminal


KEPT_ALL = (
    "; energy kept min 1.0000 (model.layers.0.self_attn.q_proj), median 1.0000; relative error max 0.0000, "
    "median 0.0000"
)


def test_no_bar_and_no_blank_line_in_a_terminal(tmp_path):
    """A quick combine in a terminal prints its one line: no bar for 2 tiny adapters, no blank line."""
    command = [sys.executable, "-c", "from loramix.cli import main; main()", "combine"]
    command += [str(example("summarize")), str(example("translate")), "-o", str(tmp_path / "out")]
    leader, follower = pty.openpty()
    env = {**os.environ, "PYTHONPATH": str(ROOT), "COLUMNS": "100"}
    process = subprocess.Popen(command, stdin=follower, stdout=follower, stderr=follower, env=env, cwd=ROOT)
    os.close(follower)
    output = b""
    while True:
        try:
            chunk = os.read(leader, 4096)
        except OSError:
            break
        if not chunk:
            break
        output += chunk
    assert process.wait() == 0
    text = output.decode()
    padded = "rank 4–10, stored as 16 for engines that need it (--rank-layout exact for 4–10)"
    assert text == f"wrote {tmp_path / 'out'}: 8 modules, {padded}, svd of 2 adapters{KEPT_ALL}\r\n", repr(text)


def test_gpt2_fan_in_fan_out_warned_once(tmp_path, caplog):
    base = tmp_path / "base"
    tiny_gpt2().save_pretrained(str(base))
    made = make_peft_adapter(tiny_gpt2, tmp_path, "adapter", target_modules=["c_attn"], fan_in_fan_out=True)
    config_path = made.path / "adapter_config.json"
    config_path.write_text(json.dumps({**json.loads(config_path.read_text()), "fan_in_fan_out": False}))
    with caplog.at_level(logging.INFO, logger="loramix"):
        loramix.run(Plan(adapters=[str(made.path)], merge_into=str(base), output=str(tmp_path / "out"), method="cat"))
    said = [r for r in caplog.records if "fan_in_fan_out" in r.getMessage()]
    assert [r.levelno for r in said].count(logging.WARNING) == 1
    assert any(r.levelno == logging.INFO and "disagreed with the base" in r.getMessage() for r in said)


# 6. --help is true and complete


def test_every_help_renders_and_every_option_is_described():
    for name, command in main.commands.items():
        result = cli(name, "--help")
        assert result.exit_code == 0, name
        for param in command.params:
            if isinstance(param, click.Option):
                assert param.help and param.help.strip(), f"{name} {param.opts[0]} has no help"
                assert "README" not in param.help, f"{name} {param.opts[0]} sends the reader elsewhere"
    combine, search = main.commands["combine"], main.commands["search"]
    options = {p.name: p for p in combine.params}
    assert "[default: dense]" in options["space"].help and "[default: refuse]" in options["heads"].help
    for rule in ("sv_ratio", "sv_fro", "sv_cumulative"):
        assert rule in options["rule_value"].help
    device = {p.name: p for p in search.params}["device"]
    assert options["device"].help == device.help and "[default: auto]" in device.help and device.default == "auto"
    assert pyinspect.signature(loramix.combine).parameters["device"].default == "auto" == Plan(adapters=[]).device
    for name in example_names():
        assert name in cli("examples", "--help").stdout


def test_rule_value_without_rule_is_an_error():
    with pytest.raises(MethodError, match="without a rule"):
        RankRule(rule_value=0.9)
    with pytest.raises(MethodError, match="without a rule"):
        loramix.combine([example("summarize"), example("formal")], rank_rule=loramix.RankRule(rule_value=0.9))
    result = cli("combine", str(example("summarize")), "--rule-value", "0.9", "-o", "out/never")
    assert result.exit_code == 2 and "without a rule" in result.stderr and not Path("out/never").exists()


# 7. API misuse raises a LoramixError saying what is accepted


MISUSE = {
    "merge_into_base: a module as base": (
        lambda a: loramix.merge_into_base(a, torch.nn.Linear(2, 2), "out/never"),
        "a base model is a folder or Hub id, not a Linear",
    ),
    "merge_into_base: no output": (
        lambda a: loramix.merge_into_base(a, example("tiny-llama"), None),
        "out .* must be a non-empty str or Path",
    ),
    "combine: one path": (lambda a: loramix.combine("single/path"), "must be a list of sources"),
    "combine: None": (lambda a: loramix.combine(None), "must be a list of sources.*NoneType"),
    "analyze: None": (lambda a: loramix.analyze(None), "must be a list of sources.*NoneType"),
    "analyze: a module as base": (
        lambda a: loramix.analyze([a], base=torch.nn.Linear(2, 2)),
        "folder or Hub id, not a Linear",
    ),
    "weights: a string": (lambda a: loramix.combine([a, a], weights="0.5,0.5"), "weights must be a list of numbers"),
    "weights: a number": (lambda a: loramix.combine([a, a], weights=0.5), "weights must be a list of numbers"),
    "rank: loose, not a RankRule": (
        lambda a: loramix.combine([a, a], rank=8, energy=0.9),
        r"rank_rule=loramix\.RankRule\(rank=8, energy=0\.9\), not rank=8, energy=0\.9",
    ),
    "rank: a string": (lambda a: loramix.combine([a, a], rank_rule=loramix.RankRule(rank="8")), "rank must be an int"),
    "energy: a string": (
        lambda a: loramix.analyze([a], rank_rule=loramix.RankRule(energy="0.9")),
        "energy must be a number",
    ),
    "save_adapter: no folder": (lambda a: loramix.save_adapter(a, None), "folder .* str or Path"),
    "run: a dict": (lambda a: loramix.run({"adapters": [a]}), "run takes a Plan"),
    "push_to_hub: a number": (lambda a: loramix.push_to_hub(3, "org/name"), "folder .* str or Path"),
    "load_adapter: a dict": (lambda a: loramix.load_adapter({"path": a}), "cannot load an adapter from a dict"),
}


@pytest.mark.parametrize("case", sorted(MISUSE))
def test_api_misuse_is_a_loramix_error(case):
    call, message = MISUSE[case]
    with pytest.raises(LoramixError, match=message):
        call(str(example("summarize")))
    assert not Path("out/never").exists()


# 8. push refuses what is not an output and names the endpoint it cannot reach


def test_push_refuses_a_folder_without_adapter_or_model(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "hf_not_a_real_token")
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "todo.txt").write_text("hello")
    (tmp_path / "notes" / "weights.safetensors").write_bytes(b"")  # weights without any config
    with pytest.raises(HubError, match="holds no adapter or model"):
        loramix.push_to_hub(tmp_path / "notes", "org/name")
    result = cli("push", str(tmp_path / "notes"), "org/name")
    assert result.exit_code == 2 and "holds no adapter or model" in result.stderr


@pytest.mark.parametrize("fmt", ["peft", "kohya"])
def test_push_network_failure_is_one_line_naming_the_endpoint(fmt, tmp_path):
    out = tmp_path / "out"
    loramix.save_adapter(loramix.load_adapter(example("summarize")), out, format=fmt)
    with socket.socket() as probe:  # a local port that nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    endpoint = f"http://127.0.0.1:{port}"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_ENDPOINT": endpoint, "HF_TOKEN": "hf_not_a_real_token"}
    env["HF_HUB_OFFLINE"] = "0"  # really try: the refusal must come from the closed port
    done = subprocess.run(
        [sys.executable, "-c", "from loramix.cli import main; main()", "push", str(out), "org/name"],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and f"cannot reach {endpoint}" in lines[0], done.stderr
    assert "Connection refused" in lines[0] and "hf_not_a_real_token" not in done.stderr


# 9. cosmetics


def test_recipe_sources_are_normalised_and_stay_relative(monkeypatch):
    monkeypatch.chdir(ROOT)
    plan = load_recipe("recipes/quickstart.yaml")
    assert plan.adapters[0] == os.path.join("loramix", "examples", "summarize")
    assert all(".." not in a and not Path(a).is_absolute() for a in plan.adapters)


def _scaled(adapter, factor: float, name: str):
    modules = {n: dataclasses.replace(m, scale=m.scale * factor) for n, m in adapter.modules.items()}
    return adapter.with_modules(modules, name=name)


def test_analyze_columns_have_one_format():
    """‖ΔW‖ of 1.86 and 1.918 (the issue's case) print as 1.860 and 1.918: one format per column."""
    summarize = loramix.load_adapter(example("summarize"))
    norm = loramix.analyze([summarize]).adapters[0].norm
    pair = [_scaled(summarize, 1.86 / norm, "a"), _scaled(summarize, 1.918 / norm, "b")]
    lines = analysis_text(loramix.analyze(pair)).splitlines()
    header = next(i for i, line in enumerate(lines) if line.strip().startswith("adapter "))
    rows = [line.split() for line in lines[header + 1 : header + 3]]
    assert [r[-2] for r in rows] == ["1.860", "1.918"]
    for column in range(1, len(rows[0])):
        decimals = {len(r[column].partition(".")[2]) for r in rows if r[column][0].isdigit()}
        assert len(decimals) <= 1, (lines[header], [r[column] for r in rows])
