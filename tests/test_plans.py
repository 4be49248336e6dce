"""One plan per command (#27): every command's output carries the recipe that re-runs it (`loramix run RECIPE`) to
the same bytes; a bad recipe value fails in one line naming its field before any adapter or model is read; one
`loramix.run(plan)` loads and checks its adapters once; and an output format is one registered writer.

Oracles: the first output itself (the re-run's tensor files and recipe byte-identical; its JSON reports equal but for
the wall time they record; the card differs only in the command line it records), and call counts of the library's
own front doors.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner
from safetensors.torch import load_file

import loramix
from loramix import writers
from loramix.cli import main
from loramix.examples import path as example
from loramix.recipe import load_recipe

RECIPE = "loramix_recipe.yaml"


def _invoke(*args) -> str:
    result = CliRunner().invoke(main, ["-q", *map(str, args)])
    assert result.exit_code == 0, result.output
    return result.output


def _parts(path: Path, data: bytes):
    """What is compared of a file: a safetensors file's header as JSON (its metadata mapping is written in
    whatever order safetensors' hash map iterates, which varies between processes) and its tensor bytes; a JSON
    report as JSON, less the wall time it records; other files as bytes."""
    if path.suffix == ".safetensors":
        size = int.from_bytes(data[:8], "little")
        return json.loads(data[8 : 8 + size]), data[8 + size :]
    if path.suffix == ".json":
        report = json.loads(data)
        report.pop("seconds", None)
        report.pop("read_wait_seconds", None)
        return report
    return data


def _same_output(first: Path, again: Path) -> None:
    """Every file of ``again`` as in ``first`` (`_parts`), but the card, which records the command line."""
    names = sorted(p.relative_to(first) for p in first.rglob("*") if p.is_file())
    assert names == sorted(p.relative_to(again) for p in again.rglob("*") if p.is_file())
    for name in names:
        if name.name != "README.md":
            assert _parts(name, (first / name).read_bytes()) == _parts(name, (again / name).read_bytes()), name


COMMANDS = {
    "combine": lambda out: [
        "combine",
        example("summarize"),
        example("translate"),
        "-w",
        "0.6,0.4",
        "--rank",
        "4",
        "-o",
        out,
    ],
    "combine-kohya": lambda out: ["combine", example("summarize"), "-m", "cat", "--format", "kohya", "-o", out],
    "extract": lambda out: ["extract", example("tiny-llama"), example("tiny-llama-tuned"), "--rank", "4", "-o", out],
    "convert": lambda out: ["convert", example("dora"), "--base", example("tiny-llama"), "--rank", "4", "-o", out],
    "align": lambda out: ["align", example("summarize"), example("translate"), "-o", out],
}


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_every_commands_recipe_reruns_it_to_the_same_bytes(tmp_path, command):
    first, again = tmp_path / "first" / "out", tmp_path / "again" / "out"  # a file is named after its folder
    _invoke(*COMMANDS[command](first))
    recipe = yaml.safe_load((first / RECIPE).read_text())
    assert recipe.get("command", "combine") == command.split("-")[0] and "output" not in recipe
    _invoke("run", first / RECIPE, "-o", again)
    _same_output(first, again)


def test_search_recipe_reruns_the_search(tmp_path):
    """The search's own plan (`search_recipe.yaml`) repeats the search: the same weights, adapter bytes and recipes."""
    first, again = tmp_path / "first" / "out", tmp_path / "again" / "out"
    sources = [example("summarize"), example("translate")]
    examples = Path(example("few-shot")) / "formal.jsonl"
    _invoke(
        "search",
        *sources,
        "--base",
        example("tiny-llama"),
        "--examples",
        examples,
        "--steps",
        "3",
        "--composition",
        "delta",
        "-o",
        first,
    )
    recipe = yaml.safe_load((first / "search_recipe.yaml").read_text())
    assert recipe["command"] == "search" and recipe["steps"] == 3
    _invoke("run", first / "search_recipe.yaml", "-o", again)
    _same_output(first, again)


def test_a_subset_search_recipe_reruns_the_subset_search(tmp_path):
    """`search --subset` writes its own plan (`search_recipe.yaml`, with its merge's method, options and rank rule),
    which `loramix run` repeats: the same modules dropped, the same adapter bytes and recipes."""
    first, again = tmp_path / "first" / "out", tmp_path / "again" / "out"
    sources = [example("summarize"), example("translate")]
    examples = Path(example("few-shot")) / "formal.jsonl"
    subset = ["--subset", "layer", "-m", "ties", "--option", "density=0.5", "--rank", "4", "--steps", "3"]
    _invoke("search", *sources, "--base", example("tiny-llama"), "--examples", examples, *subset, "-o", first)
    recipe = yaml.safe_load((first / "search_recipe.yaml").read_text())
    assert recipe["command"] == "search" and recipe["subset"] == "layer" and recipe["method"] == "ties"
    assert recipe["rank"] == 4 and recipe["options"] == {"density": 0.5} and "composition" not in recipe
    _invoke("run", first / "search_recipe.yaml", "-o", again)
    _same_output(first, again)


@pytest.mark.parametrize(
    ("text", "field"),
    [
        ("adapters: [{source: a}]\nformat: kohyaa\n", "format must be one of peft, kohya"),
        ("adapters: [{source: a}]\nheads: keep\n", "heads must be one of refuse, average, drop"),
        ("command: extract\nbase: a\nfinetuned: b\nrule: sv_rato\n", "rule must be one of sv_ratio"),
        ("command: convert\nsource: a\nformat: diffusers\n", "format must be one of peft, kohya, gguf"),
        ("command: search\nbase: a\nadapters: [b]\nexamples: c\noptimizer: sgd\n", "optimizer must be one of"),
        ("command: extract\nbase: a\n", "needs finetuned"),
        ("command: merge\n", "`command` must be one of combine, extract"),
    ],
)
def test_a_bad_recipe_value_fails_in_one_line_before_anything_is_read(tmp_path, monkeypatch, text, field):
    def never(*args, **kwargs):
        raise AssertionError("an adapter or model was read")

    for module in [m for name, m in sys.modules.items() if name.startswith("loramix")]:
        for reader in ("load_adapters", "load_adapter", "extract_lora", "read_source", "search"):
            function = getattr(module, reader, None)
            if callable(function) and getattr(function, "__module__", "").startswith("loramix."):
                monkeypatch.setattr(module, reader, never)
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(text + "output: out\n")
    result = CliRunner().invoke(main, ["run", str(recipe)])
    assert result.exit_code == 2, result.output
    line = result.output.strip()
    assert "\n" not in line and field in line and str(recipe) in line, line


def _counted(monkeypatch, name: str, owner) -> list:
    """Count the calls of ``owner.name`` through every loramix module that imported it."""
    original, calls = getattr(owner, name), []

    def counting(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    for module in [m for n, m in sys.modules.items() if n.startswith("loramix")]:
        if getattr(module, name, None) is original:
            monkeypatch.setattr(module, name, counting)
    return calls


@pytest.mark.parametrize("merge", [False, True], ids=["adapter", "merge"])
def test_run_loads_and_checks_its_adapters_once(tmp_path, monkeypatch, merge):
    from loramix import adapter, formats, merging, pipeline  # every module that could load, imported before counting

    assert pipeline.run is loramix.run
    loads = _counted(monkeypatch, "load_adapters", formats)
    checks = _counted(monkeypatch, "check_compatible", adapter)
    accepted = _counted(monkeypatch, "load_adapter", formats)  # the front door of one adapter
    front_doors = _counted(monkeypatch, "merge_into_base", merging)
    cores = _counted(monkeypatch, "merge_loaded", merging)
    plan = loramix.Plan(
        adapters=[str(example("summarize")), str(example("translate"))],
        rank=4,
        output=str(tmp_path / "out"),
        merge_into=str(example("tiny-llama")) if merge else None,
    )
    loramix.run(plan)
    assert (len(loads), len(checks)) == (1, 1)
    assert len(accepted) == len(plan.adapters)  # each source once; the merge takes the combined adapter as it is
    assert (len(front_doors), len(cores)) == (0, int(merge))


@pytest.fixture
def toy_format(monkeypatch):
    """A toy output format, registered the way a new format module registers itself."""
    monkeypatch.setattr(writers, "WRITERS", dict(writers.WRITERS))

    @writers.writer("toy", "module names and ranks as JSON", single_file=True, suffix=".toy")
    def write(adapter, folder, *, dtype=None, file_name=None):
        path = Path(folder) / file_name
        path.write_text(json.dumps({name: m.rank for name, m in adapter.modules.items()}, sort_keys=True))
        return path

    return write


def test_a_registered_writer_is_a_format_everywhere(tmp_path, toy_format):
    assert "toy" in _invoke("combine", "--help") and "toy" in _invoke("extract", "--help")
    recipe = tmp_path / "recipe.yaml"
    source = Path(example("summarize"))
    recipe.write_text(yaml.safe_dump({"adapters": [{"source": str(source)}], "method": "cat", "format": "toy"}))
    assert load_recipe(recipe).format == "toy"
    _invoke("run", recipe, "-o", tmp_path / "toy")
    written = json.loads((tmp_path / "toy" / "toy.toy").read_text())
    peft = load_file(str(source / "adapter_model.safetensors"))  # the oracle: PEFT's own tensor names and ranks
    expected = {k.removeprefix("base_model.model.").removesuffix(".lora_A.weight"): v.shape[0] for k, v in peft.items()}
    assert written == {k: v for k, v in expected.items() if not k.endswith("lora_B.weight")}
    again = yaml.safe_load((tmp_path / "toy" / RECIPE).read_text())
    assert again["format"] == "toy"


def test_an_analyze_recipe_is_what_analyze_prints_and_writes(tmp_path):
    sources = [str(example("summarize")), str(example("translate"))]
    recipe = tmp_path / "analyze.yaml"
    recipe.write_text(yaml.safe_dump({"command": "analyze", "adapters": sources, "rank": 4}))
    printed = _invoke("run", recipe, "-o", tmp_path / "run.json")
    assert printed == _invoke("analyze", *sources, "--rank", "4", "--json-file", tmp_path / "cli.json").replace(
        "cli.json", "run.json"
    )
    assert (tmp_path / "run.json").read_text() == (tmp_path / "cli.json").read_text()


@pytest.mark.parametrize("command", ["combine", "extract", "convert", "align", "search", "analyze"])
def test_each_flag_is_a_setting_of_its_plan_with_its_choices(command):
    """The flags and the plan cannot drift: every flag that is no CLI-only switch names a setting of the command's
    plan (flat, as its recipe does), and a flag with choices offers exactly what the setting's type allows."""
    import click

    from loramix.plans import PLANS
    from loramix.settings import choices

    cli_only = {"force", "quiet", "verbose", "threads", "as_json", "json_file", "plot_dir", "top", "push_repo"}
    cli_only |= {"recipe", "lbws", "method_options", "density", "majority_sign", "seed", "space", "examples"}
    hints = PLANS[command].hints()
    for param in main.commands[command].params:
        if param.name in cli_only and param.name not in hints:
            continue
        assert param.name in hints, param.name
        if isinstance(param.type, click.Choice):
            assert tuple(param.type.choices) == choices(hints[param.name]), param.name
