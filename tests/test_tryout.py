"""What issue 26's newcomer tryout hit, each against the files or the command itself: a diffusers file named after
its folder, one base however its folder is spelled, the card's recipe command runs as printed, and flags that do not
apply are refused."""

from __future__ import annotations

import shlex

import pytest
import torch
from click.testing import CliRunner
from helpers import make_peft_adapter, tiny_llama
from safetensors.torch import load_file, save_file

import loramix
from loramix.cli import main
from loramix.examples import path as example


def test_diffusers_default_file_is_named_after_its_folder(tmp_path, monkeypatch):
    """``pytorch_lora_weights.safetensors`` (diffusers' one file name) given from inside its folder."""
    folder = tmp_path / "watercolor"
    folder.mkdir()
    gen = torch.Generator().manual_seed(0)
    key = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
    save_file(
        {
            f"{key}.lora_A.weight": torch.randn(2, 8, generator=gen),
            f"{key}.lora_B.weight": torch.randn(8, 2, generator=gen),
        },
        str(folder / "pytorch_lora_weights.safetensors"),
    )
    monkeypatch.chdir(folder)
    assert loramix.load_adapter("pytorch_lora_weights.safetensors").name == "watercolor"
    result = CliRunner().invoke(main, ["inspect", "pytorch_lora_weights.safetensors"])
    assert result.exit_code == 0 and result.output.startswith("watercolor\n"), result.output


@pytest.mark.parametrize("where", ["beside", "elsewhere"])
def test_one_base_however_its_folder_is_spelled(where, tmp_path, monkeypatch):
    """Adapters recording ``base`` and ``./base`` (and the absolute path) name one base, whether or not that folder
    is in the current directory."""
    spellings = ["base", "./base/", str(tmp_path / "base")] if where == "beside" else ["base", "./base"]
    made = [
        make_peft_adapter(tiny_llama, tmp_path, f"a{i}", seed=i, target_modules=["q_proj"], base_model_name_or_path=b)
        for i, b in enumerate(spellings)
    ]
    if where == "beside":
        (tmp_path / "base").mkdir()
    monkeypatch.chdir(tmp_path)
    combined = loramix.combine([m.path for m in made], method="cat")
    assert len(combined.modules) == 2
    other = make_peft_adapter(tiny_llama, tmp_path, "other", target_modules=["q_proj"], base_model_name_or_path="x/y")
    with pytest.raises(loramix.LoramixError, match="different base models"):
        loramix.combine([made[0].path, other.path], method="cat")


def test_the_cards_recipe_command_runs_as_printed(tmp_path, monkeypatch):
    """The card's "`loramix combine --recipe loramix_recipe.yaml -o OUT` repeats the run", run in the output folder
    exactly as printed, gives the same adapter bytes."""
    out = tmp_path / "out"
    first = CliRunner().invoke(main, ["combine", str(example("summarize")), str(example("formal")), "-o", str(out)])
    assert first.exit_code == 0, first.output
    card = (out / "README.md").read_text()
    command = next(line for line in card.split("`") if line.startswith("loramix combine --recipe"))
    assert command == "loramix combine --recipe loramix_recipe.yaml -o OUT"
    monkeypatch.chdir(out)
    again = CliRunner().invoke(main, shlex.split(command)[1:])
    assert again.exit_code == 0, again.output
    one, two = (load_file(str(folder / "adapter_model.safetensors")) for folder in (out, out / "OUT"))
    assert one.keys() == two.keys() and all(torch.equal(one[k], two[k]) for k in one)


@pytest.mark.parametrize(
    "flags, named",
    [
        (["--merge-into", "BASE", "--format", "kohya"], "--format sets the adapter file written; with --merge-into"),
        (["--merge-into", "BASE", "--rank-layout", "exact"], "leave --rank-layout out"),
        (["--gguf-base", "BASE"], "--gguf-base names the architecture of a GGUF file: it needs --format gguf"),
        (["--format", "peft", "--gguf-base", "BASE"], "it needs --format gguf"),
        (["--shard-size", "1GB"], "--shard-size applies to a merged checkpoint: it needs --merge-into BASE"),
    ],
)
def test_flags_that_do_not_apply_are_refused_in_one_line(flags, named, tmp_path):
    base = str(example("tiny-llama"))
    flags = [base if f == "BASE" else f for f in flags]
    result = CliRunner().invoke(main, ["combine", str(example("summarize")), *flags, "-o", str(tmp_path / "out")])
    assert result.exit_code == 2 and result.output.count("\n") == 1 and named in result.output, result.output
    assert not (tmp_path / "out").exists()


def test_merge_into_warns_when_the_adapter_names_another_base(tmp_path, caplog):
    """--merge-into compares the base the adapter names with BASE: a warning when they clearly differ, none for the
    same model under another path (``someorg/tiny-llama`` into a folder ``tiny-llama``)."""
    base = tmp_path / "tiny-llama"
    tiny_llama().save_pretrained(str(base))
    for name, declared in (("same", "someorg/tiny-llama"), ("other", "meta-llama/Llama-3.1-8B")):
        made = make_peft_adapter(
            tiny_llama, tmp_path, name, target_modules=["q_proj"], base_model_name_or_path=declared
        )
        caplog.clear()
        loramix.merge_into_base(made.path, base, tmp_path / f"out-{name}")
        said = [r.getMessage() for r in caplog.records if "check that this is the model" in r.getMessage()]
        assert said == (
            []
            if name == "same"
            else [
                f"{name}: made for {declared}, but merged into {base}: check that this is the model it was trained on"
            ]
        )


def test_an_earlier_merge_recipe_with_the_adapter_files_defaults_still_runs(tmp_path):
    """Recipes of merges written before these settings were refused with merge_into recorded format: peft and
    rank_layout: portable (their defaults then): they load as no setting, while a kohya format is refused."""
    from loramix.recipe import load_recipe

    sources = f"adapters: [{example('summarize')}]\nmerge_into: {example('tiny-llama')}\n"
    text = sources + "format: peft\nrank_layout: portable\n"
    (tmp_path / "old.yaml").write_text(text)
    plan = load_recipe(tmp_path / "old.yaml")
    assert plan.format is None and plan.rank_layout is None
    plan.check()
    (tmp_path / "kohya.yaml").write_text(text.replace("format: peft", "format: kohya"))
    with pytest.raises(loramix.LoramixError, match="`format` sets the adapter file written"):
        load_recipe(tmp_path / "kohya.yaml").check()
