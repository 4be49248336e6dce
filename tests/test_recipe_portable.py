"""A recipe written with an output, moved with its output folder (and the sources beside it) to another place,
reproduces the output bit for bit: every method family, seeded DARE, and a merge into a base.

The oracle is the first output itself: the re-run's tensor files (and a merged checkpoint's config.json and index)
must be byte-identical, and its recipe identical to the first (the paths in both are relative to their own output
folder). Search outputs are covered in test_search.py; re-runs by another process in test_plans.py.
"""

from __future__ import annotations

import shutil

import pytest
import yaml
from click.testing import CliRunner

from loramix import examples
from loramix.cli import main
from loramix.methods import REGISTRY

RECIPE = "loramix_recipe.yaml"
RUNS = {
    "cat": [],
    "svd": ["--rank", "6"],
    "linear": [],
    "ties": ["--density", "0.3"],
    "dare_ties": ["--seed", "7"],
    "tsv": [],
    "iso_c": [],
    "knots": [],
}


@pytest.fixture
def tree(tmp_path):
    """A work folder holding copies of the example adapters and base, as a user's project would."""
    root = tmp_path / "project"
    for name in ("summarize", "translate", "formal", "tiny-llama"):
        shutil.copytree(examples.path(name), root / "src" / name)
    return root


def combine(*args) -> None:
    result = CliRunner().invoke(main, ["-q", "combine", *map(str, args)])
    assert result.exit_code == 0, result.output


def rerun_after_move(root, tmp_path, output: str, tensors: str) -> None:
    moved = tmp_path / "elsewhere" / "project"
    shutil.move(root, moved)
    combine("--recipe", moved / output / RECIPE, "-o", moved / "again")
    first, again = moved / output, moved / "again"
    for name in sorted(p.name for p in first.glob(tensors)):
        assert (again / name).read_bytes() == (first / name).read_bytes(), name
    assert list(first.glob(tensors))
    assert (again / RECIPE).read_text() == (first / RECIPE).read_text()


@pytest.mark.parametrize("method", list(RUNS))
def test_recipe_moved_with_its_output_reproduces_the_adapter(tree, tmp_path, method):
    second = "formal" if method == "linear" else "translate"  # linear needs equal ranks (8)
    a, b = tree / "src" / "summarize", tree / "src" / second
    combine(a, b, "-w", "0.7,0.4", "-m", method, *RUNS[method], "-o", tree / "out")
    recipe = yaml.safe_load((tree / "out" / RECIPE).read_text())
    assert recipe["method"] == method
    assert [s["source"] for s in recipe["adapters"]] == ["../src/summarize", f"../src/{second}"]
    assert recipe["options"] == {**REGISTRY[method].defaults, **recipe["options"]}  # every option, defaults included
    assert set(recipe["options"]) == set(REGISTRY[method].defaults)
    card = (tree / "out" / "README.md").read_text()
    for key, value in recipe["options"].items():
        assert f"{key}={value}" in card
    rerun_after_move(tree, tmp_path, "out", "adapter_model.safetensors")


def test_recipe_of_a_merge_into_a_base_reproduces_the_checkpoint(tree, tmp_path):
    src = tree / "src"
    combine(src / "summarize", src / "translate", "-m", "ties", "--merge-into", src / "tiny-llama", "-o", tree / "m")
    assert yaml.safe_load((tree / "m" / RECIPE).read_text())["merge_into"] == "../src/tiny-llama"
    rerun_after_move(tree, tmp_path, "m", "*.safetensors")
    moved = tmp_path / "elsewhere" / "project"
    for name in ("config.json", "model.safetensors.index.json"):  # the base's sharded layout kept, with its index
        assert (moved / "again" / name).read_bytes() == (moved / "m" / name).read_bytes(), name
