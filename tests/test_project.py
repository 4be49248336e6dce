"""The project's promises about itself: README commands, CI, bundled examples."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
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


def _same_tokenizer(new: Path, old: Path) -> None:
    """Two tokenizer folders tokenize alike: same class, vocabulary, special tokens, ids and decoding of a sample.

    tokenizer.json itself is not compared: its serialisation belongs to the `tokenizers` version that wrote it."""
    from transformers import AutoTokenizer

    a, b = (AutoTokenizer.from_pretrained(str(folder)) for folder in (new, old))
    assert type(a) is type(b) and a.get_vocab() == b.get_vocab(), new
    for special in ("bos_token_id", "eos_token_id", "pad_token_id", "unk_token_id"):
        assert getattr(a, special) == getattr(b, special), special
    sample = "Hey, what's up? 1 + 1 = 2 ~ é\n"
    assert a(sample)["input_ids"] == b(sample)["input_ids"]
    assert a.decode(a(sample)["input_ids"]) == b.decode(b(sample)["input_ids"])


def test_bundled_examples_are_what_the_script_builds(tmp_path):
    """Rebuilding with tests/make_examples.py gives the same tensors, configs, texts and tokenizer (so they never go
    stale). Compared by content, never by what the writing library's version changes: configs without version
    fields, .pth pickles by their tensors, the tokenizer by what it does."""
    import json
    import runpy

    from loramix.examples import names

    runpy.run_path(str(ROOT / "tests" / "make_examples.py"), run_name="examples")["build"](tmp_path)
    bundled = ROOT / "loramix" / "examples"
    assert sorted(p.name for p in tmp_path.iterdir()) == names()  # every bundled example is one the script builds
    for folder in tmp_path.iterdir():
        for file in folder.iterdir():
            ours = bundled / folder.name / file.name
            assert ours.is_file(), f"{ours} is missing: copy it from a rebuild (python tests/make_examples.py DIR)"
            if file.name == "tokenizer.json":  # compared by behaviour below
                continue
            if file.suffix == ".safetensors":
                new, old = load_file(str(file)), load_file(str(ours))
                assert new.keys() == old.keys()
                assert all(torch.equal(new[k], old[k]) for k in new), file
            elif file.suffix == ".pth":
                new, old = (torch.load(f, weights_only=True) for f in (file, ours))
                assert new.keys() == old.keys()
                assert all(new[k].dtype == old[k].dtype and torch.equal(new[k], old[k]) for k in new), file
            elif file.suffix == ".json":
                new, old = json.loads(file.read_text()), json.loads(ours.read_text())
                for config in (new, old):
                    # the writing library's version says nothing about what the example is: compare model fields only
                    config.pop("peft_version", None)
                    config.pop("transformers_version", None)
                    if "target_modules" in config:  # PEFT writes a set's order
                        config["target_modules"] = sorted(config["target_modules"])
                assert new == old, file
            else:  # texts written by the script itself (.jsonl, .yaml)
                assert file.read_text() == ours.read_text(), file
        if (folder / "tokenizer.json").is_file():
            _same_tokenizer(folder, bundled / folder.name)
    assert sum(f.stat().st_size for f in bundled.rglob("*") if f.is_file()) < 2_000_000


def test_package_data_installs_every_bundled_file():
    """pyproject.toml's package-data patterns cover every file of loramix/examples (else a wheel lacks it)."""
    from fnmatch import fnmatch

    tomllib = pytest.importorskip("tomllib")
    patterns = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
    bundled = ROOT / "loramix" / "examples"
    files = [f.relative_to(bundled).as_posix() for f in bundled.glob("*/*") if f.is_file()]
    missed = [
        f for f in files if "__pycache__" not in f and not any(fnmatch(f, p) for p in patterns["loramix.examples"])
    ]
    assert not missed


def test_bundled_tokenizer_fits_the_tiny_llama():
    """The tiny Llama's tokenizer loads offline with AutoTokenizer and its ids fit the model (vocab 256, bos/eos)."""
    from transformers import AutoConfig, AutoTokenizer

    from loramix.examples import path

    tokenizer = AutoTokenizer.from_pretrained(str(path("tiny-llama")))
    config = AutoConfig.from_pretrained(str(path("tiny-llama")))
    assert len(tokenizer) <= config.vocab_size
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id) == (config.bos_token_id, config.eos_token_id)
    ids = tokenizer("Thank you.")["input_ids"]
    assert ids[0] == tokenizer.bos_token_id and len(ids) == 1 + len("Thank you.")
    assert tokenizer.decode(ids, skip_special_tokens=True) == "Thank you."


def test_bundled_state_dict_maps_onto_the_tiny_llama():
    """minimind_lora.pth, renamed by module_map.yaml, names modules of the tiny Llama with matching shapes."""
    import json

    from loramix import load_adapter
    from loramix.examples import path

    folder = path("minimind")
    adapter = load_adapter(folder / "minimind_lora.pth", module_map=folder / "module_map.yaml", log_warnings=False)
    base = path("tiny-llama")
    index = json.loads((base / "model.safetensors.index.json").read_text())["weight_map"]
    weights = {}
    for shard in sorted(set(index.values())):
        weights.update(load_file(str(base / shard)))
    assert len(adapter.modules) == 6
    for name, module in adapter.modules.items():
        assert name + ".weight" in weights, name
        assert tuple(weights[name + ".weight"].shape) == (module.B.shape[0], module.A.shape[1]), name
