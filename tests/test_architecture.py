"""The house rules of the code (README "How the code is laid out"): one-way imports, no circle, small modules, a
torch-free CLI start, methods whose options are their signatures, one base-name rule, library calls that leave
process-wide state alone, and the CLI's one call (`loramix.run`) usable from Python."""

from __future__ import annotations

import ast
import json
import logging
import subprocess
import sys
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

# The layers from the top down (README's map): a module may import only from its own layer's package or below.
LAYERS = [
    ["loramix.__main__"],
    ["loramix.cli"],
    ["loramix.convert", "loramix.align"],
    ["loramix.pipeline", "loramix.merging", "loramix.analysis_files"],
    ["loramix.recipe"],
    ["loramix.hub"],
    ["loramix.render"],
    ["loramix.weight_search"],
    ["loramix.live"],
    ["loramix.diffusers_merge", "loramix.extraction", "loramix.merge_processes"],
    ["loramix.checkpoint", "loramix.quantized_merge"],
    ["loramix.merge_chunk"],
    ["loramix.kernels"],
    ["loramix.analysis"],
    ["loramix.combination"],
    ["loramix.methods"],
    ["loramix.compat"],
    ["loramix.formats"],
    ["loramix.linalg"],
    ["loramix.quantize"],
    ["loramix.io"],
    ["loramix.sources"],
    ["loramix.runtime"],
    ["loramix.examples"],
    ["loramix.schedule"],
    ["loramix.experts"],
    ["loramix.adapter"],
    ["loramix.lazy"],
    ["loramix.errors"],
]


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


GRAPH = {
    _module_name(p): _imports(p)
    for p in sorted(PACKAGE.rglob("*.py"))
    if "examples" not in p.parts or p.stem == "__init__"
}


def _layer(module: str) -> int:
    for index, prefixes in enumerate(LAYERS):
        if any(module == p or module.startswith(p + ".") for p in prefixes):
            return index
    raise AssertionError(f"{module} is in no layer of the map")


def test_every_module_is_on_the_map_and_imports_point_down():
    upward = []
    for module, imports in GRAPH.items():
        if module == "loramix":
            continue  # the package's lazy re-exports name modules as strings only
        for target, _ in imports:
            same_package = target.split(".")[:2] == module.split(".")[:2]
            if not same_package and _layer(target) < _layer(module):
                upward.append(f"{module} -> {target}")
    assert not upward, upward


def test_no_import_circle():
    edges = {m: {t for t, _ in imports if t in GRAPH and t != m} for m, imports in GRAPH.items()}
    state: dict[str, int] = {}

    def visit(node: str, trail: list[str]) -> None:
        state[node] = 1
        for nxt in edges[node]:
            if state.get(nxt) == 1:
                raise AssertionError("import circle: " + " -> ".join([*trail, node, nxt]))
            if nxt not in state:
                visit(nxt, [*trail, node])
        state[node] = 2

    for node in edges:
        if node not in state:
            visit(node, [])


def test_no_function_local_loramix_import_outside_the_cli():
    local = [
        (m, t) for m, imports in GRAPH.items() for t, inside in imports if inside and not m.startswith("loramix.cli")
    ]
    assert not local, local


def test_no_module_over_450_lines():
    long = {str(p.relative_to(ROOT)): n for p in PACKAGE.rglob("*.py") if (n := len(p.read_text().splitlines())) > 450}
    assert not long, long


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


def test_run_is_what_the_cli_does(tmp_path):
    """`loramix.run(plan)` writes the same folder the CLI writes for that plan: adapter, card, recipe."""
    from click.testing import CliRunner

    from loramix.cli import main

    recipe = ROOT / "recipes" / "quickstart.yaml"
    plan = load_recipe(recipe)
    plan.output = str(tmp_path / "api")
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
