"""`loramix convert`: adapters engines refuse, as the plain LoRA closest to them, against PEFT as the oracle.

- DoRA: the base with the converted LoRA at full rank gives PEFT's DoRA logits to float32 rounding (GPT-2's Conv1D
  with fan_in_fan_out too; within 1e-6 + 1e-5·|logit|, a few float32 ulps); at a smaller rank, each module's
  reported relative error is the one measured against PEFT's merged weights (‖W_dora − W − B·A‖/‖W_dora − W‖,
  float64, to 1e-4 relative).
- PEFT LoHa/LoKr (rank/alpha patterns, LoKr full and decomposed halves): converted with no base, PEFT's merged
  weights of the LoRA equal PEFT's merged LoHa/LoKr to 1e-6 relative (float32 weights).
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from click.testing import CliRunner
from helpers import example_inputs, make_peft_adapter, model_output, tiny_gpt2, tiny_llama
from peft import PeftModel

from loramix.cli import main
from loramix.convert import CONVERSION_FILE, convert
from loramix.linalg import RankRule

DORA = {"target_modules": ["q_proj", "v_proj", "down_proj"], "use_dora": True, "r": 4, "lora_alpha": 8}
GPT2_DORA = {"target_modules": ["c_attn", "c_fc"], "fan_in_fan_out": True, "use_dora": True}


def _base(factory, folder):
    factory().save_pretrained(str(folder))
    return folder


def _dora_merged(made) -> dict[str, torch.Tensor]:
    """PEFT's merge_and_unload of the adapter: the base weights with each DoRA update merged (float64 differences)."""
    merged = made.load_with_peft().merge_and_unload()
    return {k: v.double() for k, v in merged.state_dict().items()}


@pytest.mark.parametrize("factory, lora", [(tiny_llama, DORA), (tiny_gpt2, GPT2_DORA)], ids=["llama", "gpt2"])
def test_dora_at_full_rank_gives_peft_dora_logits(factory, lora, tmp_path):
    base = _base(factory, tmp_path / "base")
    made = make_peft_adapter(factory, tmp_path, "dora", **lora)
    out = tmp_path / "lora"
    result = CliRunner().invoke(main, ["convert", str(made.path), "--base", str(base), "-o", str(out)])
    assert result.exit_code == 0, result.output
    assert result.output.startswith(f"wrote {out}: ")
    config = json.loads((out / "adapter_config.json").read_text())
    assert not config.get("use_dora")
    inputs = example_inputs(factory)
    expected = model_output(made.load_with_peft(), inputs)
    converted = PeftModel.from_pretrained(factory(), str(out)).eval()
    got = model_output(converted, inputs)
    assert torch.allclose(got, expected, rtol=1e-5, atol=1e-6), float((got - expected).abs().max())
    assert not torch.allclose(expected, model_output(factory(), inputs), atol=1e-3)  # DoRA changed the logits
    report = json.loads((out / CONVERSION_FILE).read_text())
    assert report["kinds"] == {"DoRA": len(report["modules"])}
    assert all(m["relative_error"] < 1e-5 for m in report["modules"].values())
    card = (out / "README.md").read_text()
    assert "## Conversion" in card and "exact to float rounding" in card


def test_dora_at_smaller_rank_reports_the_measured_error(tmp_path):
    base = _base(tiny_llama, tmp_path / "base")
    made = make_peft_adapter(tiny_llama, tmp_path, "dora", **DORA)
    result = convert(made.path, tmp_path / "lora", base=base, rank_rule=RankRule(rank=3), rank_layout="exact")
    merged, original = _dora_merged(made), {k: v.double() for k, v in tiny_llama().state_dict().items()}
    assert len(result.modules) == 2 * 3
    for name, account in result.modules.items():
        key = name + ".weight"
        effective = merged[key] - original[key]
        module = result.adapter.modules[name]
        stored = module.B.double() @ module.A.double() * module.scale
        measured = float(torch.linalg.norm(effective - stored) / torch.linalg.norm(effective))
        assert account.rank == 3
        assert measured > 1e-3  # truncated: the error is real
        assert math.isclose(account.error, measured, rel_tol=1e-4), (name, account.error, measured)
        singular = torch.linalg.svdvals(effective)
        kept = float(singular[:3].square().sum() / singular.square().sum())
        assert math.isclose(account.kept, kept, rel_tol=1e-5)


def test_dora_without_base_is_one_line(tmp_path):
    made = make_peft_adapter(tiny_llama, tmp_path, "dora", **DORA)
    result = CliRunner().invoke(main, ["convert", str(made.path), "-o", str(tmp_path / "out")])
    assert result.exit_code == 2
    assert result.output.startswith("error: ") and result.output.count("\n") == 1
    assert "DoRA" in result.output and "--base" in result.output


def test_check_sends_dora_to_convert():
    """`check` on a DoRA adapter: the engines that refuse it get `loramix convert` as the fix (not a merged model)."""
    from loramix.compat import check_source
    from loramix.examples import path

    report = check_source(str(path("dora")))
    fixes = {v.consumer: v.fix for v in report.verdicts if v.status != "yes"}
    assert all(fixes[c].startswith("loramix convert ") for c in ("vLLM", "SGLang", "llama.cpp")), fixes


# ----------------------------------------------------------------------------------------------- PEFT LoHa / LoKr

LYCORIS_CONFIGS = {
    "loha": ("LoHaConfig", dict(r=4, alpha=8, rank_pattern={"q_proj": 2}, alpha_pattern={"down_proj": 3})),
    "lokr": ("LoKrConfig", dict(r=4, alpha=6)),
    "lokr_decomposed": ("LoKrConfig", dict(r=1, alpha=3, decompose_both=True)),
}


def _merged_delta(model, base) -> dict[str, torch.Tensor]:
    """ΔW per weight of a merged PEFT model against its base (float64), the weights that changed."""
    merged = {k: v.double() for k, v in model.merge_and_unload().state_dict().items()}
    original = {k: v.double() for k, v in base.state_dict().items()}
    return {k: merged[k] - original[k] for k in merged if not torch.equal(merged[k], original[k])}


@pytest.mark.parametrize("case", list(LYCORIS_CONFIGS))
def test_peft_loha_lokr_convert_exactly_without_a_base(case, tmp_path):
    import peft

    config_class, options = LYCORIS_CONFIGS[case]
    config = getattr(peft, config_class)(
        target_modules=["q_proj", "v_proj", "down_proj"], init_weights=False, **options
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(3)
        model = peft.get_peft_model(tiny_llama(), config).eval()
    model.save_pretrained(str(tmp_path / case))
    expected = _merged_delta(model, tiny_llama())
    out = tmp_path / "lora"
    result = CliRunner().invoke(main, ["convert", str(tmp_path / case), "-o", str(out)])
    assert result.exit_code == 0, result.output
    converted = PeftModel.from_pretrained(tiny_llama(), str(out)).eval()
    got = _merged_delta(converted, tiny_llama())
    assert sorted(got) == sorted(expected) and len(expected) == 3 * 2
    for key, delta in expected.items():
        error = float(torch.linalg.norm(got[key] - delta) / torch.linalg.norm(delta))
        assert error < 1e-6, (key, error)
    kind = "LoHa" if case == "loha" else "LoKr"
    assert json.loads((out / CONVERSION_FILE).read_text())["kinds"] == {kind: 6}


# ----------------------------------------------------------------------------------------------- VeRA, (IA)³


def _vera():
    from peft import VeraConfig

    return VeraConfig(r=4, target_modules=["q_proj", "v_proj", "down_proj"], init_weights=False)


def _ia3():
    from peft import IA3Config

    return IA3Config(target_modules=["q_proj", "down_proj"], feedforward_modules=["down_proj"])


def _oft():
    from peft import OFTConfig

    return OFTConfig(r=0, oft_block_size=8, target_modules=["q_proj", "down_proj"], init_weights=False)


def _oft_exact_shared():
    from peft import OFTConfig

    config = dict(use_cayley_neumann=False, block_share=True, init_weights=False)
    return OFTConfig(r=0, oft_block_size=4, target_modules=["v_proj", "up_proj"], **config)


def _fourierft():
    from peft import FourierFTConfig

    config = dict(n_frequency=50, scaling=20.0, random_loc_seed=11, init_weights=False)
    return FourierFTConfig(target_modules=["q_proj", "v_proj", "down_proj"], **config)


def _gpt2_ia3():
    from peft import IA3Config

    return IA3Config(target_modules=["c_attn", "c_fc"], feedforward_modules=["c_fc"], fan_in_fan_out=True)


@pytest.mark.parametrize(
    "factory, make",
    [
        (tiny_llama, _vera),
        (tiny_llama, _ia3),
        (tiny_gpt2, _gpt2_ia3),
        (tiny_llama, _oft),
        (tiny_llama, _oft_exact_shared),
        (tiny_llama, _fourierft),
    ],
    ids=["vera", "ia3", "gpt2_ia3", "oft", "oft_exact_shared", "fourierft"],
)
def test_vera_ia3_oft_at_full_rank_equal_peft_merged_weights(factory, make, tmp_path):
    """VeRA (targets of different input widths), (IA)³ (output and input side; GPT-2's Conv1D with biases, which
    (IA)³ rescales: a lora_B bias) and OFT (Cayley–Neumann; exact Cayley with one block shared) converted at full
    rank, and FourierFT (targets of different shapes, so different entries): PEFT's merged LoRA equals PEFT's merged
    adapter."""
    import peft

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(5)
        model = peft.get_peft_model(factory(), make()).eval()
        with torch.no_grad():  # (IA)³ starts at ones: move the vectors, as training does
            for key, param in model.named_parameters():
                if "ia3_l" in key:
                    param.add_(0.2 * torch.randn(param.shape))
    model.save_pretrained(str(tmp_path / "adapter"))
    expected = _merged_delta(model, factory())
    base = _base(factory, tmp_path / "base")
    out = tmp_path / "lora"
    result = CliRunner().invoke(main, ["convert", str(tmp_path / "adapter"), "--base", str(base), "-o", str(out)])
    assert result.exit_code == 0, result.output
    got = _merged_delta(PeftModel.from_pretrained(factory(), str(out)).eval(), factory())
    assert sorted(got) == sorted(expected) and len(expected) >= 4
    for key, delta in expected.items():
        error = float(torch.linalg.norm(got[key] - delta) / torch.linalg.norm(delta))
        assert error < 1e-5, (key, error)


def test_types_that_cannot_be_converted_are_named_in_one_line(tmp_path):
    import peft

    for name, config in {
        "boft": peft.BOFTConfig(boft_block_size=4, target_modules=["q_proj"]),
        "prompt": peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=2),
    }.items():
        peft.get_peft_model(tiny_llama(), config).save_pretrained(str(tmp_path / name))
        result = CliRunner().invoke(main, ["convert", str(tmp_path / name), "-o", str(tmp_path / "out")])
        assert result.exit_code == 2 and result.output.count("\n") == 1, result.output
        assert result.output.startswith("error: ")
        assert ("'BOFT'" if name == "boft" else "'PROMPT_TUNING'") in result.output


# ----------------------------------------------------------------------------------------------- DoRA in combine


def test_two_dora_adapters_combined_on_a_base_equal_the_weighted_sum_of_their_effective_updates(tmp_path):
    """combine --base: each DoRA adapter is its effective update (PEFT's merge_and_unload − W, float64), and the
    exact methods sum those with their weights (to 1e-6 relative, float32 factors)."""
    import loramix

    base = _base(tiny_llama, tmp_path / "base")
    first = make_peft_adapter(tiny_llama, tmp_path, "a", seed=1, **DORA)
    second = make_peft_adapter(tiny_llama, tmp_path, "b", seed=2, **{**DORA, "target_modules": ["q_proj", "o_proj"]})
    weights = [0.7, -0.4]
    updates = [_merged_delta(made.load_with_peft(), tiny_llama()) for made in (first, second)]
    expected = {}
    for weight, update in zip(weights, updates):
        for key, delta in update.items():
            expected[key] = expected.get(key, 0) + weight * delta
    out = tmp_path / "sum"
    args = ["combine", str(first.path), str(second.path), "-w", "0.7,-0.4", "-m", "cat", "--base", str(base)]
    result = CliRunner().invoke(main, [*args, "-o", str(out)])
    assert result.exit_code == 0, result.output
    combined = loramix.load_adapter(out)
    assert sorted(n + ".weight" for n in combined.modules) == sorted(expected)
    for name, module in combined.modules.items():
        got = module.B.double() @ module.A.double() * module.scale
        want = expected[name + ".weight"]
        assert float(torch.linalg.norm(got - want) / torch.linalg.norm(want)) < 1e-6, name
    refused = CliRunner().invoke(main, ["-q", *args[:-2], "-o", str(tmp_path / "never")])
    assert refused.exit_code == 2 and "--base BASE" in refused.output and refused.output.count("\n") == 1
