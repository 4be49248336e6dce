"""The project's promises about itself: README commands, CI, bundled examples."""

from __future__ import annotations

import re
from pathlib import Path

import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]


def _readme_commands() -> list[str]:
    block = re.search(r"^```bash\n(.*?)^```$", (ROOT / "README.md").read_text(), re.S | re.M)
    return [line for line in block.group(1).splitlines() if line.strip()]


def test_readme_opens_with_two_commands_that_ci_runs():
    commands = _readme_commands()
    assert len(commands) == 2
    assert "loramix combine --recipe recipes/quickstart.yaml" in commands[0]
    assert "pytest" in commands[1]
    ci = (ROOT / ".ci" / "run").read_text()
    assert "pip install --quiet torch==2.13.0" in ci and "README.md" in ci


def test_bundled_examples_are_what_the_script_builds(tmp_path):
    """Rebuilding with tests/make_examples.py gives the same tensors and configs (so they never go stale)."""
    import json
    import runpy

    runpy.run_path(str(ROOT / "tests" / "make_examples.py"), run_name="examples")["build"](tmp_path)
    bundled = ROOT / "loramix" / "examples"
    for folder in tmp_path.iterdir():
        for file in folder.iterdir():
            ours = bundled / folder.name / file.name
            if file.suffix == ".safetensors":
                new, old = load_file(str(file)), load_file(str(ours))
                assert new.keys() == old.keys()
                assert all(torch.equal(new[k], old[k]) for k in new), file
            elif file.suffix == ".json":
                new, old = json.loads(file.read_text()), json.loads(ours.read_text())
                for config in (new, old):
                    # the writing library's version says nothing about what the example is: compare model fields only
                    config.pop("peft_version", None)
                    config.pop("transformers_version", None)
                    if "target_modules" in config:  # PEFT writes a set's order
                        config["target_modules"] = sorted(config["target_modules"])
                assert new == old, file
    assert sum(f.stat().st_size for f in bundled.rglob("*") if f.is_file()) < 2_000_000
