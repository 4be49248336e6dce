"""`loramix align` and `check` on a folder of adapters: serving sets, against PEFT as the oracle.

Three PEFT adapters of one tiny Llama with different ranks, alphas (one rsLoRA) and target modules are aligned: each
aligned folder, loaded by PEFT, gives its source's logits (to 1e-5 relative + 1e-6: the scale folded into B in
float32), and PEFT's ``hotswap_adapter`` swaps each into one model compiled with ``torch.compile`` (the eager
backend: dynamo's guards, no code generation) with no shape error and no recompilation (torch's
``fail_on_recompile`` stance), giving each source's logits again.
"""

from __future__ import annotations

import json

import torch
from click.testing import CliRunner
from helpers import example_inputs, make_peft_adapter, model_output, tiny_llama
from peft import PeftModel
from peft.utils.hotswap import hotswap_adapter

from loramix.align import SET_FILE
from loramix.cli import main

SOURCES = {
    "a": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
    "b": dict(r=8, lora_alpha=4, use_rslora=True, target_modules=["q_proj", "k_proj", "o_proj"]),
    "c": dict(r=2, lora_alpha=2, target_modules=["gate_proj", "down_proj"]),
}


def _close(got: torch.Tensor, expected: torch.Tensor) -> bool:
    return torch.allclose(got, expected, rtol=1e-5, atol=1e-6)


def test_an_aligned_set_hot_swaps_under_one_compiled_model(tmp_path):
    made = {
        name: make_peft_adapter(tiny_llama, tmp_path, name, seed=i, **lora)
        for i, (name, lora) in enumerate(SOURCES.items(), 1)
    }
    inputs = example_inputs(tiny_llama)
    expected = {name: model_output(m.load_with_peft(), inputs) for name, m in made.items()}
    out = tmp_path / "set"
    result = CliRunner().invoke(main, ["-q", "align", *(str(m.path) for m in made.values()), "-o", str(out)])
    assert result.exit_code == 0, result.output
    assert result.output == f"wrote {out}: 3 adapters (a, b, c), rank 8, the same 12 modules; vLLM --max-lora-rank 8\n"
    configs = {name: json.loads((out / name / "adapter_config.json").read_text()) for name in SOURCES}
    assert len({json.dumps(c, sort_keys=True) for c in configs.values()}) == 1  # one config: r, alpha, targets
    assert json.loads((out / SET_FILE).read_text())["rank"] == 8
    for name in SOURCES:  # each aligned adapter does what its source does
        assert _close(model_output(made[name].load_with_peft(out / name), inputs), expected[name]), name

    model = PeftModel.from_pretrained(tiny_llama(), str(out / "a")).eval()
    compiled = torch.compile(model, backend="eager")
    assert _close(model_output(compiled, inputs), expected["a"])
    with torch.compiler.set_stance("fail_on_recompile"):
        for name in ("b", "c", "a"):
            hotswap_adapter(model, str(out / name), adapter_name="default")
            assert _close(model_output(compiled, inputs), expected[name]), name


def test_check_says_whether_a_folder_of_adapters_is_a_serving_set(tmp_path):
    raw = tmp_path / "raw"
    for i, (name, lora) in enumerate(SOURCES.items(), 1):
        make_peft_adapter(tiny_llama, raw, name, seed=i, **lora)
    result = CliRunner().invoke(main, ["-q", "check", str(raw)])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[0] == "set raw"
    assert lines[1].split()[:3] == ["serving", "set", "no"] and "ranks differ" in lines[1]
    assert "target modules differ" in lines[1] and "scales differ" in lines[1]
    assert lines[2].strip() == f"fix: loramix align {raw}/a {raw}/b {raw}/c -o OUT"
    assert "--max-lora-rank 8" in result.output
    out = tmp_path / "set"
    assert CliRunner().invoke(main, ["align", *(str(p) for p in sorted(raw.iterdir())), "-o", str(out)]).exit_code == 0
    result = CliRunner().invoke(main, ["check", str(out)])
    assert result.output.splitlines()[1].split()[:3] == ["serving", "set", "yes"], result.output
    assert "vLLM         yes    --max-lora-rank 8 --max-loras 3" in result.output


def test_dora_is_refused_with_a_pointer_to_convert(tmp_path):
    dora = make_peft_adapter(tiny_llama, tmp_path, "dora", target_modules=["q_proj"], use_dora=True)
    plain = make_peft_adapter(tiny_llama, tmp_path, "plain", target_modules=["q_proj"])
    result = CliRunner().invoke(main, ["-q", "align", str(dora.path), str(plain.path), "-o", str(tmp_path / "out")])
    assert result.exit_code == 2 and result.output.count("\n") == 1
    assert "DoRA" in result.output and "loramix convert" in result.output and not (tmp_path / "out").exists()
