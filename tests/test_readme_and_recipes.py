"""The README's Python examples run as written, and every recipe in recipes/ runs through the CLI."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from huggingface_hub import ModelCard

from loramix import load_adapter
from loramix.cli import main
from loramix.recipe import load_recipe
from loramix.schedule import count_layers, parse

ROOT = Path(__file__).resolve().parents[1]
PYTHON_BLOCKS = re.findall(r"^```python\n(.*?)^```$", (ROOT / "README.md").read_text(), re.S | re.M)
RECIPES = sorted((ROOT / "recipes").glob("*.yaml"))


def test_readme_has_python_examples_and_recipes_cover_every_family():
    assert len(PYTHON_BLOCKS) >= 3
    methods = {load_recipe(r).method for r in RECIPES}
    assert {"cat", "svd", "linear", "ties", "dare_ties", "tsv", "iso_c", "knots"} <= methods
    assert any(load_recipe(r).merge_into for r in RECIPES)


@pytest.mark.parametrize("index", range(len(PYTHON_BLOCKS)))
def test_readme_python_example_runs(index, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # examples write out/... in the current folder and must not need the repository
    exec(compile(PYTHON_BLOCKS[index], f"README.md python block {index + 1}", "exec"), {"__name__": "__readme__"})


def _weighted_sum(plan, name: str) -> torch.Tensor:
    """Σ wᵢ·ΔWᵢ in float64, each weight resolved for the module (`loramix.schedule`: numbers stay as they are)."""
    adapters = [load_adapter(source) for source in plan.adapters]
    layers = count_layers(n for a in adapters for n in a.modules)
    total = 0
    for adapter, weight in zip(adapters, plan.weights):
        module = adapter.modules.get(name)
        if module is not None:
            total = total + parse(weight).at(name, layers) * module.delta(dtype=torch.float64)
    return total


@pytest.mark.parametrize("recipe", RECIPES, ids=[r.stem for r in RECIPES])
def test_recipe_runs_and_writes_card_and_recipe(recipe, tmp_path):
    out = tmp_path / "out"
    result = CliRunner().invoke(main, ["-q", "combine", "--recipe", str(recipe), "-o", str(out)])
    assert result.exit_code == 0, result.output
    plan = load_recipe(recipe)
    card = ModelCard.load(out / "README.md")
    assert "loramix" in card.data.tags and plan.method in card.data.tags
    assert load_recipe(out / "loramix_recipe.yaml").method == plan.method
    if plan.merge_into:
        assert card.data.to_dict()["base_model_relation"] == "merge"
        # the base's own shard files and index (an unsharded base would give model.safetensors)
        base = (recipe.parent / plan.merge_into).resolve()
        shards = sorted(p.name for p in base.glob("*.safetensors"))
        assert (out / "config.json").is_file() and shards and all((out / name).is_file() for name in shards)
        assert (out / "model.safetensors.index.json").is_file() == (base / "model.safetensors.index.json").is_file()
        return
    assert card.data.to_dict()["base_model_relation"] == "adapter"
    adapter = load_adapter(out)
    assert adapter.modules
    if plan.method == "cat":  # exact: the output's ΔW is the weighted sum, computed here in float64
        for name, module in adapter.modules.items():
            expected = _weighted_sum(plan, name)
            assert (module.delta(dtype=torch.float64) - expected).norm() <= 1e-5 * expected.norm(), name


def test_readme_names_only_api_that_exists():
    """Every `Name.attr` the README gives for a public loramix name (and every `loramix.module.name`) exists: a
    field or attribute of the class, a function of the module."""
    import dataclasses
    import importlib

    import loramix

    refs = set(re.findall(r"`((?:loramix|[A-Z]\w*)(?:\.\w+)+)`", (ROOT / "README.md").read_text()))
    checked = 0
    for ref in sorted(refs):
        head, *rest = ref.split(".")
        if head == "loramix":
            module, name = ".".join([head, *rest[:-1]]), rest[-1]
            assert hasattr(importlib.import_module(module), name), ref
        elif head in loramix.__all__:
            owner = getattr(loramix, head)
            fields = {f.name for f in dataclasses.fields(owner)} if dataclasses.is_dataclass(owner) else set()
            assert rest[0] in fields or hasattr(owner, rest[0]), f"README names {ref}, which does not exist"
        else:
            continue
        checked += 1
    assert checked >= 2
