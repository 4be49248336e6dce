"""The house rules of the code (README "How the code is laid out"): layers whose packages import only downward,
no circle between modules or between packages, a size budget per package, module names that say what they are, a
torch-free CLI start, methods and compatibility rules registered where they are defined, one base-name rule, library
calls that leave process-wide state alone, and the CLI's one call (`loramix.run`) usable from Python."""

from __future__ import annotations

import ast
import dataclasses
import json
import logging
import re
import subprocess
import sys
from collections import Counter, defaultdict
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import loramix
from loramix.adapter import LoraAdapter, LoraModule
from loramix.examples import path as example
from loramix.methods import REGISTRY, method
from loramix.recipe import Plan, load_recipe

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "loramix"

# The layers from the bottom up (README's map), each a list of units: a top-level module or a package (everything
# under it, so a new module in a package needs no entry here). A module imports only from its own layer or below.
LAYERS = {
    "core": [
        "errors",
        "lazy",
        "writers",
        "settings",
        "architecture",
        "adapter",
        "experts",
        "schedule",
        "examples",
        "runtime",
        "sources",
        "linalg",
    ],
    "io and formats": ["io", "formats", "quantize"],
    "engines": ["methods", "compat", "combination", "analysis", "extraction", "merge", "weight_search"],
    "surfaces": [
        "render",
        "hub",
        "plans",
        "recipe",
        "outputs",
        "pipeline",
        "merging",
        "analysis_files",
        "convert",
        "align",
    ],
    "cli": ["cli", "__main__"],
}
# The lines a unit's modules may hold together. Past it, a package is split by concern into subpackages (as
# formats/diffusion), never a file by its length; a top-level module past the default becomes a package.
DEFAULT_BUDGET = 2500
BUDGETS = {"formats": 3500, "io": 3000}
MODULE_SANITY_CAP = 1000  # one module read top to bottom; the budget per package is the rule that shapes the code
# Module names that may repeat because they mean the same subject in each place: a command's module in cli/ or
# pipeline/ and the engine behind it; the experts' structure, checks and analysis; a file format read in one package
# and written in another (gguf); running one engine's work across processes (distributed).
SAME_SUBJECT = {"experts", "gguf", "distributed"}
PER_COMMAND = ("loramix.cli", "loramix.pipeline")


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> list[tuple[str, bool]]:
    """(imported loramix module, imported inside a function?) for every import in ``path``."""
    tree = ast.parse(path.read_text())
    found = []
    functions = [n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]
    local = {id(n) for f in functions for n in ast.walk(f) if isinstance(n, (ast.Import, ast.ImportFrom))}
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("loramix"):
            for alias in node.names:
                candidate = f"{node.module}.{alias.name}"
                is_module = (ROOT / Path(*candidate.split("."))).with_suffix(".py").exists() or (
                    ROOT / Path(*candidate.split("."))
                ).is_dir()
                found.append((candidate if is_module else node.module, id(node) in local))
        elif isinstance(node, ast.Import):
            found += [(a.name, id(node) in local) for a in node.names if a.name.startswith("loramix")]
    return found


SOURCES = [p for p in sorted(PACKAGE.rglob("*.py")) if "examples" not in p.parts or p.stem == "__init__"]
GRAPH = {_module_name(p): _imports(p) for p in SOURCES}


def _unit(module: str) -> str:
    """The top-level module or package ``module`` belongs to (``loramix.formats.diffusion.flux`` → ``formats``)."""
    return module.split(".")[1]


def _layer(module: str) -> int:
    for index, units in enumerate(LAYERS.values()):
        if _unit(module) in units:
            return index
    raise AssertionError(f"{module} is in no layer: add {_unit(module)} to LAYERS and to the README's map")


def test_every_module_is_in_a_layer_and_imports_point_down():
    upward = []
    for module, imports in GRAPH.items():
        if module == "loramix":
            continue  # the package's lazy re-exports name modules as strings only
        for target, _ in imports:
            if _layer(target) > _layer(module):
                upward.append(f"{module} ({list(LAYERS)[_layer(module)]}) -> {target} ({list(LAYERS)[_layer(target)]})")
    assert not upward, upward


def _circle(edges: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}

    def visit(node: str, trail: list[str]) -> list[str] | None:
        state[node] = 1
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == 1:
                return [*trail, node, nxt]
            if nxt not in state and (found := visit(nxt, [*trail, node])):
                return found
        state[node] = 2
        return None

    return next((c for node in sorted(edges) if node not in state and (c := visit(node, []))), None)


def test_no_import_circle_between_modules():
    edges = {m: {t for t, _ in imports if t in GRAPH and t != m} for m, imports in GRAPH.items()}
    circle = _circle(edges)
    assert circle is None, "import circle: " + " -> ".join(circle)


def test_no_import_circle_between_packages():
    """Within a layer, packages may import each other in one direction only: the layer stays a ladder of its own."""
    edges = defaultdict(set)
    for module, imports in GRAPH.items():
        if module != "loramix":
            edges[_unit(module)] |= {_unit(t) for t, _ in imports if _unit(t) != _unit(module)}
    circle = _circle(edges)
    assert circle is None, "packages import each other: " + " -> ".join(circle)


def test_no_function_local_loramix_import_outside_the_cli():
    local = [
        (m, t) for m, imports in GRAPH.items() for t, inside in imports if inside and not m.startswith("loramix.cli")
    ]
    assert not local, local


def test_each_package_keeps_to_its_size_budget():
    """A package's own modules (a subpackage counts apart) and each top-level module keep to their budget."""
    lines = Counter()
    for path in SOURCES:
        folder = path.parent.relative_to(ROOT).parts
        unit = ".".join(folder[1:]) if len(folder) > 1 else path.stem
        lines[unit] += len(path.read_text().splitlines())
    lines.pop("__init__")  # the package's lazy re-exports
    over = {
        u: f"{n} lines > {BUDGETS.get(u, DEFAULT_BUDGET)}"
        for u, n in lines.items()
        if n > BUDGETS.get(u, DEFAULT_BUDGET)
    }
    assert not over, over
    long = {str(p.relative_to(ROOT)): n for p in SOURCES if (n := len(p.read_text().splitlines())) > MODULE_SANITY_CAP}
    assert not long, long


def test_module_names_say_what_they_are():
    """No two modules share a name unless they mean the same subject (a command's module in cli/ or pipeline/ and
    the module behind it; `SAME_SUBJECT`)."""
    places = defaultdict(list)
    for module in GRAPH:
        if module != "loramix" and not (PACKAGE / Path(*module.split(".")[1:])).is_dir():
            places[module.rsplit(".", 1)[-1]].append(module)
    clashes = {
        name: found
        for name, found in places.items()
        if name not in SAME_SUBJECT and len([m for m in found if not m.startswith(PER_COMMAND)]) > 1
    }
    assert not clashes, clashes


def test_the_readme_map_names_every_package_and_top_level_module():
    section = (ROOT / "README.md").read_text().split("## How the code is laid out", 1)[1]
    rows = [line.split("|")[1] for line in section.split("\n\n")[2].splitlines() if line.startswith("| `")]
    mapped = {name for row in rows for name in re.findall(r"`(\w+)(?:/|\.py)`", row)}
    units = {_unit(m) for m in GRAPH if m != "loramix"} - {"__main__", "examples", "lazy"}
    assert units <= mapped, f"not in the README's map: {sorted(units - mapped)}"
    assert mapped <= units, f"in the README's map but not in the code: {sorted(mapped - units)}"


@pytest.mark.parametrize(
    "command", [["--help"], ["methods"], ["combine", "--help"], ["analyze", "--help"], ["extract", "--help"]]
)
def test_cli_help_and_methods_do_not_import_torch(command):
    code = (
        "import sys\nfrom loramix.cli import main\n"
        f"try:\n    main({command!r})\nexcept SystemExit as exit:\n    assert not exit.code, exit.code\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip()


def test_method_options_are_the_functions_keyword_only_parameters():
    import inspect
    import keyword as python

    def option(parameter: str) -> str:  # lambda_ stands for the option lambda (a Python keyword)
        return parameter[:-1] if parameter.endswith("_") and python.iskeyword(parameter[:-1]) else parameter

    for name, m in REGISTRY.items():
        parameters = inspect.signature(m.fn).parameters.values()
        keyword = {option(p.name): p.default for p in parameters if p.kind is inspect.Parameter.KEYWORD_ONLY}
        keyword.pop("rule")
        assert m.defaults == keyword, name
    listed = subprocess.run(
        [sys.executable, "-m", "loramix", "methods"], capture_output=True, text=True, cwd=ROOT, timeout=120
    ).stdout
    for m in REGISTRY.values():
        for option, default in m.defaults.items():
            assert f"{option}={default}" in listed, (m.name, option)


def test_a_new_method_is_one_decorated_function():
    @method(name="_scaled_cat_for_test")
    def scaled_cat(terms, *, rule, factor: float = 2.0):
        """Twice the exact sum (a test method)."""
        B = torch.cat([t.B.double() * t.coef * factor for t in terms], dim=1)
        return B, torch.cat([t.A.double() for t in terms], dim=0)

    try:
        summed = loramix.combine([example("summarize")], weights=[1.0], method="cat")
        doubled = loramix.combine([example("summarize")], weights=[1.0], method="_scaled_cat_for_test", factor=3.0)
        for name, module in summed.modules.items():
            torch.testing.assert_close(
                doubled.modules[name].delta(dtype=torch.float64), 3 * module.delta(dtype=torch.float64)
            )
        assert REGISTRY["_scaled_cat_for_test"].description == "Twice the exact sum (a test method)"
    finally:
        del REGISTRY["_scaled_cat_for_test"]


def test_a_new_consumer_is_one_decorated_function():
    """A compatibility rule for PEFT folders registers where it is defined, as a method does; `check` then lists its
    verdict after the documented consumers, and a kohya file gets its "no" like every reader of PEFT folders."""
    from loramix.compat import check_source
    from loramix.compat.facts import RULES, Verdict, consumer

    @consumer("_engine for test")
    def reads(facts, src):
        return Verdict("_engine for test", "yes" if facts.max_rank <= 8 else "no")

    try:
        verdicts = check_source(str(example("summarize"))).verdicts
        names = [v.consumer for v in verdicts]
        assert names[:6] == ["PEFT", "transformers", "vLLM", "SGLang", "LoRAX/TGI", "llama.cpp"]
        assert names[6:] == ["_engine for test", "diffusers/ComfyUI"] and verdicts[6].status == "yes"
    finally:
        del RULES["_engine for test"]


def test_analyze_base_and_merge_use_the_same_base_tensor(tmp_path):
    """Keys `layers.0.q_proj.weight` and `decoder.model.layers.0.q_proj.weight`: the module `model.layers.0.q_proj`
    ends the second key, and both analyze --base and the merge pick that one."""
    gen = torch.Generator().manual_seed(0)
    base = tmp_path / "base"
    base.mkdir()
    weights = {
        "layers.0.q_proj.weight": torch.randn(6, 5, generator=gen),
        "decoder.model.layers.0.q_proj.weight": 10 * torch.randn(6, 5, generator=gen),
    }
    save_file(weights, str(base / "model.safetensors"))
    (base / "config.json").write_text(json.dumps({"model_type": "llama"}))
    module = LoraModule(A=torch.randn(2, 5, generator=gen), B=torch.randn(6, 2, generator=gen), scale=0.5)
    adapter = LoraAdapter(modules={"model.layers.0.q_proj": module}, name="x")
    norm = loramix.analyze([adapter], base=base).adapters[0].modules["model.layers.0.q_proj"].base_norm
    assert norm == pytest.approx(float(weights["decoder.model.layers.0.q_proj.weight"].double().norm()), rel=1e-12)
    report = loramix.merge_into_base(adapter, base, tmp_path / "out", dtype="float32")
    from safetensors.torch import load_file

    merged = load_file(str(tmp_path / "out" / "model.safetensors"))
    assert torch.equal(merged["layers.0.q_proj.weight"], weights["layers.0.q_proj.weight"])
    expected = weights["decoder.model.layers.0.q_proj.weight"] + module.delta()
    torch.testing.assert_close(merged["decoder.model.layers.0.q_proj.weight"], expected)
    assert list(report.survival) == ["model.layers.0.q_proj"]


def test_library_calls_leave_process_wide_state_alone(tmp_path):
    threads, level = torch.get_num_threads(), logging.getLogger("loramix").level
    sources = [example("summarize"), example("formal")]
    loramix.analyze(sources)
    loramix.merge_into_base(example("summarize"), example("tiny-llama"), tmp_path / "merged")
    plan = Plan(adapters=[str(s) for s in sources], method="svd", rank=4, output=str(tmp_path / "run"))
    loramix.run(plan)  # writes a card with the sources' overlap (an analysis inside)
    assert torch.get_num_threads() == threads
    assert logging.getLogger("loramix").level == level
    matplotlib = pytest.importorskip("matplotlib")
    backend = matplotlib.get_backend()
    from loramix.analysis_files import write_plots

    write_plots(loramix.analyze(sources), tmp_path / "plots")
    assert matplotlib.get_backend() == backend


def test_a_command_run_in_process_leaves_the_loramix_logger_alone(tmp_path):
    """-v/-q set the ``loramix`` logger's handler, level and propagation for a command's length only: a command run
    inside Python (CliRunner, a notebook) hands it back as it was, so later log capture (pytest's caplog) sees it."""
    from click.testing import CliRunner

    from loramix.cli import main

    logger = logging.getLogger("loramix")
    before = (list(logger.handlers), logger.level, logger.propagate)
    result = CliRunner().invoke(main, ["-v", "inspect", str(example("summarize"))])
    assert result.exit_code == 0, result.output
    assert (list(logger.handlers), logger.level, logger.propagate) == before


def test_run_is_what_the_cli_does(tmp_path):
    """`loramix.run(plan)` writes the same folder the CLI writes for that plan: adapter, card, recipe."""
    from click.testing import CliRunner

    from loramix.cli import main

    recipe = ROOT / "recipes" / "quickstart.yaml"
    plan = load_recipe(recipe)
    plan = dataclasses.replace(plan, output=str(tmp_path / "api"))
    report = loramix.run(plan)
    assert report.path == tmp_path / "api" and report.format == "peft" and report.sources == 3
    result = CliRunner().invoke(main, ["-q", "combine", "--recipe", str(recipe), "-o", str(tmp_path / "cli")])
    assert result.exit_code == 0, result.output
    names = sorted(p.name for p in (tmp_path / "api").iterdir())
    assert names == sorted(p.name for p in (tmp_path / "cli").iterdir())
    assert names == ["README.md", "adapter_config.json", "adapter_model.safetensors", "loramix_recipe.yaml"]
    api, cli = (tmp_path / d / "adapter_model.safetensors" for d in ("api", "cli"))
    assert api.read_bytes() == cli.read_bytes()
    card = (tmp_path / "api" / "README.md").read_text()
    assert "github.com/loramix" not in card  # no invented link: only a URL the package's metadata declares
    assert "stored in float32" in card  # the output's dtype is one of the settings the card records


def test_every_command_loads_adapters_through_one_front_door():
    """combine, analyze and search take the same loading options (one prelude: formats.load_adapters)."""
    import inspect

    from loramix import analyze, combine, search

    for fn in (combine, analyze, search):
        parameters = inspect.signature(fn).parameters
        assert {"allow_different_bases", "allow_nonfinite", "load_options"} <= set(parameters), fn.__name__
    for path in ("combination.py", "analysis/__init__.py", "weight_search/run.py"):
        source = (PACKAGE / path).read_text()
        assert "load_adapters(" in source and "load_adapter(" not in source, path
