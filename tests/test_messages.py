"""What loramix prints, from the CLI and the API (issue 26): short reprs, a text form of an analysis, warnings as
`warning:` lines that -q hides, options spelled as the interface that prints them (--force on the CLI, overwrite in
Python), help that names every input and default, method tags from the methods' own defaults, reasons that fit a
line, and "1 module" rather than "1 modules"."""

from __future__ import annotations

import inspect
import warnings

import click
import pytest
import torch
from click.testing import CliRunner

import loramix
from loramix import LoraAdapter, LoraModule, save_adapter
from loramix.analysis.report import analysis_text
from loramix.cli import main
from loramix.cli.options import as_flags
from loramix.errors import MethodError
from loramix.examples import path as example
from loramix.methods import REGISTRY


def cli(*args: str):
    return CliRunner().invoke(main, [str(a) for a in args])


def _adapter(types: tuple[str, ...], layers: int = 2, rank: int = 4) -> LoraAdapter:
    gen = torch.Generator().manual_seed(0)
    factors = {f"model.layers.{i}.mlp.{t}": (rank, 12) for i in range(layers) for t in types}
    modules = {
        name: LoraModule(torch.randn(r, inp, generator=gen), torch.randn(8, r, generator=gen), 1.0)
        for name, (r, inp) in factors.items()
    }
    return LoraAdapter(modules=modules, name="many", base_model="test/base")


def test_reprs_are_summaries_not_tensor_dumps():
    adapter = _adapter(tuple(f"w{k}" for k in range(40)))
    text = repr(adapter)
    assert text == str(adapter) and "tensor(" not in text and len(text) < 200, text
    assert "'many'" in text and "80 modules" in text and "rank 4" in text and "test/base" in text
    module = next(iter(adapter.modules.values()))
    assert repr(module) == "LoraModule(8×12, rank 4, scale 1, out_in, float32)"
    one = LoraAdapter(modules=dict(list(adapter.modules.items())[:1]), name="one")
    assert "1 module," in repr(one) and "base unknown" in repr(one)


def test_an_analysis_prints_as_its_text():
    result = loramix.analyze([example("summarize"), example("formal")])
    assert str(result) == analysis_text(result)
    assert str(result).startswith("2 adapters, 6 modules; rank rule: energy 0.99")


def test_python_warnings_are_warning_lines_that_quiet_hides(monkeypatch, tmp_path):
    """A warning raised inside a command (matplotlib's, say) prints as `warning: ...`; -q hides it; the process's
    warning state is as it was after the command."""
    import loramix.analysis_files as files

    def plots(analysis):
        warnings.warn("Tight layout not applied", UserWarning, stacklevel=1)
        return {}

    monkeypatch.setattr(files, "analysis_plots", plots)
    before = (warnings.showwarning, list(warnings.filters))
    loud = cli("analyze", example("summarize"), "--plot", tmp_path / "p")
    assert loud.exit_code == 0, loud.output
    assert "warning: Tight layout not applied (UserWarning from " in loud.output
    quiet = cli("-q", "analyze", example("summarize"), "--plot", tmp_path / "q")
    assert quiet.exit_code == 0 and "Tight layout" not in quiet.output
    assert (warnings.showwarning, list(warnings.filters)) == before


def test_other_libraries_log_records_are_warning_lines_that_quiet_hides(monkeypatch, tmp_path):
    """What bitsandbytes logs at import on AVX512-BF16 CPUs ("Failed to load CPU gemm_4bit_forward ...") reached the
    terminal as a bare line through logging's last resort, in the README's own QLoRA example: now a `warning:` line
    naming the library, hidden by -q; the root logger's handlers are as they were after the command."""
    import logging

    import loramix.analysis_files as files

    def plots(analysis):
        logging.getLogger("bitsandbytes.backends.cpu.ops").warning("Failed to load CPU gemm_4bit_forward")
        return {}

    monkeypatch.setattr(files, "analysis_plots", plots)
    before = list(logging.getLogger().handlers)
    loud = cli("analyze", example("summarize"), "--plot", tmp_path / "p")
    assert loud.exit_code == 0, loud.output
    assert "warning: Failed to load CPU gemm_4bit_forward (from bitsandbytes)\n" in loud.output
    quiet = cli("-q", "analyze", example("summarize"), "--plot", tmp_path / "q")
    assert quiet.exit_code == 0 and "gemm_4bit" not in quiet.output
    assert logging.getLogger().handlers == before


def test_messages_name_flags_on_the_cli_and_keywords_in_python(tmp_path):
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    (theirs / "notes.txt").write_text("mine")
    forced = cli("combine", example("summarize"), "-o", theirs, "--force")
    assert forced.exit_code == 2 and "not replacing it even with --force" in forced.output, forced.output
    with pytest.raises(loramix.LoramixError, match="not replacing it even with `overwrite`"):
        save_adapter(example("summarize"), theirs, overwrite=True)

    cat = cli("combine", example("summarize"), example("formal"), "-m", "cat", "--rank", "4", "-o", tmp_path / "o")
    assert "--rank/--energy/--rule/--conv-rank apply to re-factorising methods" in cat.output, cat.output
    with pytest.raises(MethodError, match="`rank`/`energy`/`rule`/`conv_rank`"):
        loramix.combine([example("summarize")], method="cat", rank_rule=loramix.RankRule(rank=4))

    quantized = cli("combine", example("summarize"), "--quantized-as", "nf4", "-o", tmp_path / "q")
    assert quantized.output.startswith("error: --quantized-as round-trips a base") and "(pass --merge-into BASE)" in (
        quantized.output
    )
    with click.Context(main):  # the CLI's own spelling of what a logged warning names
        assert as_flags("give `rank` or `energy` to make it smaller") == "give --rank or --energy to make it smaller"
        assert as_flags("instead (`merge_into`)") == "instead (--merge-into BASE)"
        assert (
            as_flags("with `rank_layout='exact'`, see `loramix check`")
            == "with --rank-layout exact, see `loramix check`"
        )
        assert as_flags("merge in float32 (`dtype=float32`)") == "merge in float32 (--dtype float32)"


def test_help_names_every_input_and_the_real_dtype_default():
    text = " ".join(cli("combine", "-h").output.split())
    for kind in ("PEFT", "kohya", "diffusers", "LyCORIS", "state dicts", "Hub ids"):
        assert kind in text, kind
    assert "[default: the inputs'; with --merge-into, the base's]" in text and "bf16 by default" not in text


def test_methods_are_tagged_by_where_they_work_by_default():
    """The tag follows each method's `space` default as its function's signature declares it: `dense ΔW` for
    space="dense", `core space` for space="core", neither for a method without that option."""
    listed = {line.split()[0]: line for line in cli("methods").output.splitlines() if line[:1].strip()}
    for name, m in REGISTRY.items():
        parameters = inspect.signature(m.fn).parameters
        space = parameters["space"].default if "space" in parameters else None
        line = listed[name]
        tags = line.rsplit(" [", 1)[1] if line.endswith("]") else ""  # the tags, not the description's words
        assert ("dense ΔW" in tags) == (space == "dense") and ("core space" in tags) == (space == "core"), line
        assert "[dense]" not in line
    assert "core space" in listed["slerp"].rsplit(" [", 1)[1]


def test_check_summarises_long_name_lists(tmp_path):
    folder = save_adapter(_adapter(tuple(f"w{k}" for k in range(40))), tmp_path / "many", rank_layout="exact")
    result = cli("check", folder)
    line = next(line for line in result.output.splitlines() if "LoRAX/TGI" in line)
    assert "ignores module types w0, w1, w10, ... (40 in all)" in line and len(line) < 200, line


def test_one_module_is_one_module(tmp_path):
    adapter = _adapter(("w1",), layers=1)
    source = save_adapter(adapter, tmp_path / "one")
    result = cli("-q", "combine", source, "-o", tmp_path / "out")
    assert result.exit_code == 0, result.output
    assert result.output.startswith(f"wrote {tmp_path / 'out'}: 1 module, rank ") and ", svd of 1 adapter;" in (
        result.output
    )
    analysed = cli("-q", "analyze", source)
    assert analysed.output.startswith("1 adapter, 1 module; rank rule"), analysed.output


def test_errors_name_the_kind_of_mistake():
    from loramix.errors import ArgumentError, MethodDefinitionError, SettingError
    from loramix.methods.registry import method
    from loramix.recipe import check_plan

    with pytest.raises(ArgumentError, match="run takes a Plan"):  # the calling code passed the wrong object
        loramix.run({"adapters": [str(example("summarize"))]})
    with pytest.raises(MethodDefinitionError, match="registered twice"):  # a method defined wrongly, not misused
        method(name="cat")(lambda terms, *, rule: None)
    with pytest.raises(SettingError, match="rank"):  # a plan's field holding a value it cannot take
        check_plan(loramix.Plan(adapters=[str(example("summarize"))], rank="8"))
    assert not issubclass(SettingError, MethodDefinitionError) and issubclass(MethodDefinitionError, MethodError)
