"""One plan per command (#27): every command's output carries the recipe that re-runs it (`loramix run RECIPE`) to
the same bytes; a bad recipe value fails in one line naming its field before any adapter or model is read; one
`loramix.run(plan)` loads and checks its adapters once; and an output format is one registered writer.

Oracles: the first output itself, re-run from its recipe by another process (hash maps iterate in another order
there): every file byte-identical (tensor files of every output format, merged shards, config and index, recipes),
the JSON reports equal but for the wall time they record, the card different only in the command line it records;
and call counts of the library's own front doors.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

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
    """What is compared of a file: a JSON report that records wall times as JSON, less those times; every other file
    (tensor files, recipes, configs, indexes) as bytes."""
    report = json.loads(data) if path.suffix == ".json" else None
    if isinstance(report, dict) and {"seconds", "read_wait_seconds"} & set(report):
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


def _flux_lora(path: Path) -> Path:
    """A tiny Flux LoRA in kohya's names (two modules, rank 2), for the diffusion formats."""
    gen = torch.Generator().manual_seed(0)
    tensors = {}
    for module, (out, inp) in {"double_blocks_0_img_attn_qkv": (48, 16), "single_blocks_0_linear2": (16, 80)}.items():
        name = f"lora_unet_{module}"
        tensors[f"{name}.lora_down.weight"] = torch.randn(2, inp, generator=gen)
        tensors[f"{name}.lora_up.weight"] = torch.randn(out, 2, generator=gen)
        tensors[f"{name}.alpha"] = torch.tensor(1.0)
    save_file(tensors, str(path))
    return path


OUT, FLUX = "<out>", "<flux>"  # in `COMMANDS`: the output folder, a Flux LoRA file (for the diffusion formats)
# Each command's arguments; ``combine-<format>`` for every registered output format.
COMMANDS = {
    "combine-peft": ["combine", example("summarize"), example("translate"), "-w", "0.6,0.4", "--rank", "4", "-o", OUT],
    "combine-kohya": ["combine", example("summarize"), "-m", "cat", "--format", "kohya", "-o", OUT],
    "combine-gguf": [
        "combine",
        example("summarize"),
        "--format",
        "gguf",
        "--gguf-base",
        example("tiny-llama"),
        "-o",
        OUT,
    ],
    "combine-comfyui": ["combine", FLUX, "-w", "0.5", "--format", "comfyui", "-o", OUT],
    "combine-diffusers": ["combine", FLUX, "-w", "0.5", "--format", "diffusers", "-o", OUT],
    "combine-merged": [
        *("combine", example("summarize"), example("translate"), "-m", "ties", "--merge-into", example("tiny-llama")),
        *("--dtype", "bfloat16", "--shard-size", "60KB", "-o", OUT),
    ],
    "extract": ["extract", example("tiny-llama"), example("tiny-llama-tuned"), "--rank", "4", "-o", OUT],
    "convert": ["convert", example("dora"), "--base", example("tiny-llama"), "--rank", "4", "-o", OUT],
    "align": ["align", example("summarize"), example("translate"), "-o", OUT],
    "search": [
        *("search", example("summarize"), example("translate"), "--base", example("tiny-llama"), "--steps", "3"),
        *("--examples", Path(example("few-shot")) / "formal.jsonl", "--composition", "delta", "-o", OUT),
    ],
    "search-subset": [
        *("search", example("summarize"), example("translate"), "--base", example("tiny-llama"), "--steps", "3"),
        *("--examples", Path(example("few-shot")) / "formal.jsonl", "--subset", "layer", "-m", "ties"),
        *("--option", "density=0.5", "--rank", "4", "-o", OUT),
    ],
}
# the searches' own plans (their adapter's recipe combines what they found)
RECIPES = {"search": "search_recipe.yaml", "search-subset": "search_recipe.yaml"}
# The re-runs, all in one process of their own (a hash seed of its own, Python's and safetensors' hash maps iterating
# in another order than in this one): ``loramix run RECIPE -o AGAIN`` for each pair of arguments.
_RERUN = """
import sys
from click.testing import CliRunner
from loramix.cli import main
for recipe, again in zip(sys.argv[1::2], sys.argv[2::2]):
    result = CliRunner().invoke(main, ["-q", "run", recipe, "-o", again])
    assert result.exit_code == 0, (recipe, result.output)
"""


@pytest.fixture(scope="module")
def reruns(tmp_path_factory) -> Path:
    """Every command of `COMMANDS` run here into ``ROOT/<command>/first/out``, then re-run from its recipe by
    another process into ``ROOT/<command>/again/out``."""
    root = tmp_path_factory.mktemp("reruns")
    flux = _flux_lora(root / "flux.safetensors")
    pairs = []
    for command, arguments in COMMANDS.items():
        first = root / command / "first" / "out"  # a file is named after its folder: the same name in both
        _invoke(*({OUT: first, FLUX: flux}.get(a, a) for a in arguments))
        pairs += [first / RECIPES.get(command, RECIPE), root / command / "again" / "out"]
    seed = "2" if os.environ.get("PYTHONHASHSEED") == "1" else "1"  # not this process's seed
    env = {**os.environ, "PYTHONHASHSEED": seed}
    subprocess.run([sys.executable, "-c", _RERUN, *map(str, pairs)], env=env, check=True)
    return root


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_every_commands_recipe_reruns_it_to_the_same_bytes(reruns, command):
    first, again = reruns / command / "first" / "out", reruns / command / "again" / "out"
    recipe = yaml.safe_load((first / RECIPES.get(command, RECIPE)).read_text())
    assert recipe.get("command", "combine") == command.split("-")[0] and "output" not in recipe
    if command == "search":
        assert recipe["steps"] == 3
    _same_output(first, again)


def test_every_output_format_is_rerun():
    assert {c.removeprefix("combine-") for c in COMMANDS} >= set(writers.names())


def test_a_subset_search_recipe_is_its_own_plan(reruns):
    """`search --subset` writes its own plan (`search_recipe.yaml`, with its merge's method, options and rank rule),
    which `loramix run` repeats (`test_every_commands_recipe_reruns_it_to_the_same_bytes`)."""
    recipe = yaml.safe_load((reruns / "search-subset" / "first" / "out" / "search_recipe.yaml").read_text())
    assert recipe["command"] == "search" and recipe["subset"] == "layer" and recipe["method"] == "ties"
    assert recipe["rank"] == 4 and recipe["options"] == {"density": 0.5} and "composition" not in recipe


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


# the fewest arguments each command takes: every optional flag left out
BARE = {
    "combine": ["a", "b", "-o", "out"],
    "extract": ["base", "tuned", "-o", "out"],
    "convert": ["source", "-o", "out"],
    "align": ["a", "b", "-o", "out"],
    "search": ["a", "b", "--base", "model", "--examples", "examples.jsonl", "-o", "out"],
    "analyze": ["a", "b"],
}


def _plan_default(kind, name: str):
    """The default of a plan's setting read flat: its field's, or, in a group, the value the plan's default group
    holds (`ConvertPlan`'s output defaults to format peft, where `AdapterOutput`'s own format is None)."""
    import dataclasses

    def default(f: dataclasses.Field):
        return f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default

    path, own, _ = kind.members()[name]
    if not path:
        return default(own)
    holder = default(next(f for f in dataclasses.fields(kind) if f.name == path[0]))
    for step in path[1:]:
        holder = getattr(holder, step)
    return getattr(holder, name)


@pytest.mark.parametrize("command", ["combine", "extract", "convert", "align", "search", "analyze"])
def test_each_flag_is_a_setting_of_its_plan_with_its_choices(command, monkeypatch):
    """The flags and the plan cannot drift: every flag that is no CLI-only switch names a setting of the command's
    plan (flat, as its recipe does), a flag with choices offers exactly what the setting's type allows, and its
    default is the setting's: the plan the command builds with the flag left out holds the setting's default, and a
    default the help shows (``[default: X]``, or click's shown default) is that value."""
    import re

    import click

    import loramix.pipeline
    from loramix.plans import PLANS
    from loramix.settings import choices

    cli_only = {"force", "quiet", "verbose", "threads", "as_json", "json_file", "plot_dir", "top", "push_repo"}
    cli_only |= {"recipe", "lbws", "method_options", "density", "majority_sign", "seed", "space", "examples"}
    kind = PLANS[command]
    hints = kind.hints()
    built = []

    def capture(plan, **_):
        built.append(plan)
        raise SystemExit(0)

    monkeypatch.setattr(loramix.pipeline, "run", capture)
    result = CliRunner().invoke(main, [command, *BARE[command]])
    assert len(built) == 1, result.output
    named = 0
    for param in main.commands[command].params:
        if param.name in cli_only and param.name not in hints:
            continue
        assert param.name in hints, param.name
        if isinstance(param.type, click.Choice):
            assert tuple(param.type.choices) == choices(hints[param.name]), param.name
        if not isinstance(param, click.Option) or set(param.opts) & set(BARE[command]):
            continue
        default = _plan_default(kind, param.name)
        assert getattr(built[0], param.name) == default, param.name
        shown = re.search(r"\[default: ([^]]*)\]", param.help or "")
        if shown and default is not None:  # None means something the help describes in words ("the inputs'")
            assert shown.group(1).split(";")[0] == str(default), (param.name, shown.group(1), default)
        if param.show_default:
            assert param.show_default is True and param.default is not None, param.name
            with click.Context(main.commands[command]) as ctx:
                value = param.process_value(ctx, param.default)
            assert (list(value) if isinstance(value, tuple) else value) == default, param.name
        named += 1
    assert named
