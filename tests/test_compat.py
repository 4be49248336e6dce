"""`loramix check` and the portable layout against each consumer's own rule.

Oracles: each engine's scale formula, rebuilt here from its source (not from loramix.compat): vLLM
(vllm/lora/peft_helper.py, PEFTHelper.__post_init__: lora_alpha/r for every module), SGLang (lora.py,
LoRAAdapter.__init__: lora_alpha/r, and every tensor must have rank r), LoRAX/TGI (adapters/lora.py, LoraWeights.load:
lora_alpha/config.r after padding r to 8 or a multiple of 16), llama.cpp (llama-adapter.h, get_scale:
lora_alpha/each tensor's rank), and PEFT itself (PeftModel.from_pretrained, get_delta_weight) for the intended ΔW.
Tolerance: relative 1e-6 on ΔW (float32 factors, one scale folded in float32).
"""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner
from helpers import REAL, make_peft_adapter, read_folder, requires_real, tiny_llama

import loramix
from loramix import save_adapter
from loramix.cli import main
from loramix.compat import VLLM_MAX_RANKS, check_source
from loramix.formats.peft import CONFIG_DEFAULTS

CONSUMERS = ("PEFT", "transformers", "vLLM", "SGLang", "LoRAX/TGI", "llama.cpp", "diffusers/ComfyUI")
WEIGHTS = [0.6, -0.3, 0.45]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("compat")
    return {
        "a": make_peft_adapter(tiny_llama, root, "a", seed=1, r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
        "b": make_peft_adapter(
            tiny_llama, root, "b", seed=2, r=8, lora_alpha=16, use_rslora=True, target_modules=["q_proj", "o_proj"]
        ),
        # per-module alphas and ranks, and rsLoRA: what only PEFT reads right as it is
        "c": make_peft_adapter(
            tiny_llama,
            root,
            "c",
            seed=3,
            r=6,
            lora_alpha=12,
            use_rslora=True,
            target_modules=["q_proj", "v_proj", "o_proj", "up_proj"],
            rank_pattern={"up_proj": 2},
            alpha_pattern={"o_proj": 3},
        ),
    }


def _outputs(inputs, root):
    paths = [str(inputs[k].path) for k in "abc"]
    one = [str(inputs["c"].path)]
    runs = {
        "cat": loramix.combine(paths, weights=WEIGHTS, method="cat"),
        "svd_rank": loramix.combine(paths, weights=WEIGHTS, method="svd", rank_rule=loramix.RankRule(rank=5)),
        "svd_energy": loramix.combine(paths, weights=WEIGHTS, method="svd", rank_rule=loramix.RankRule(energy=0.9)),
        "resize": loramix.combine(one, weights=[1.0], method="svd", rank_rule=loramix.RankRule(rank=3)),
        "pass_through": loramix.combine(one, weights=[1.0], method="cat"),
    }
    return {name: save_adapter(adapter, root / name) for name, adapter in runs.items()}


@pytest.fixture(scope="module")
def written(inputs, tmp_path_factory):
    return _outputs(inputs, tmp_path_factory.mktemp("written"))


CASES = ("cat", "svd_rank", "svd_energy", "resize", "pass_through")


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


@pytest.mark.parametrize("case", CASES)
def test_default_output_obeys_every_engines_rule(case, inputs, written):
    folder = written[case]
    config, tensors = read_folder(folder)
    # no key at its default value, no patterns, no rsLoRA: PEFT 0.5+ and every engine parse it
    assert not {k for k, v in config.items() if k in CONFIG_DEFAULTS and v == CONFIG_DEFAULTS[k]}
    assert {"rank_pattern", "alpha_pattern", "use_rslora", "lora_bias"}.isdisjoint(config)
    r, alpha = config["r"], config["lora_alpha"]
    ranks = {t.shape[0] for k, t in tensors.items() if k.endswith("lora_A.weight")}
    assert ranks == {r}  # SGLang slices every buffer to r; r ≥ every tensor's rank
    assert r == 8 or r % 16 == 0  # LoRAX/TGI's pad_rank keeps it, so config.r is not rewritten
    assert any(m >= r for m in VLLM_MAX_RANKS)
    # the ΔW each engine computes equals PEFT's for every module
    peft_model = inputs["a"].load_with_peft(folder)
    checked = 0
    for name, module in peft_model.named_modules():
        if not (hasattr(module, "lora_A") and "default" in module.lora_A):
            continue
        key = name.removeprefix("base_model.model.")
        A = tensors[f"base_model.model.{key}.lora_A.weight"].double()
        B = tensors[f"base_model.model.{key}.lora_B.weight"].double()
        intended = module.get_delta_weight("default").double()
        for label, scale in (
            ("vLLM/SGLang", alpha / r),
            ("LoRAX/TGI", alpha / (8 if r <= 8 else -(-r // 16) * 16)),
            ("llama.cpp", alpha / A.shape[0]),
        ):
            assert _rel(scale * B @ A, intended) < 1e-6, (label, key)
        checked += 1
    assert checked == len([k for k in tensors if k.endswith("lora_A.weight")])
    report = check_source(folder)
    statuses = {v.consumer: v.status for v in report.verdicts}
    assert statuses == dict(zip(CONSUMERS, ["yes"] * 6 + ["n/a"]))
    assert report.verdicts[0].note == "PEFT 0.5+"


def test_cat_output_is_the_weighted_sum_in_every_engine(inputs, written):
    config, tensors = read_folder(written["cat"])
    deltas = {}
    for key, w in zip("abc", WEIGHTS):
        for name, module in inputs[key].peft_model.named_modules():
            if hasattr(module, "lora_A") and "default" in module.lora_A:
                name = name.removeprefix("base_model.model.")
                deltas[name] = deltas.get(name, 0) + w * module.get_delta_weight("default").double()
    for name, expected in deltas.items():
        A = tensors[f"base_model.model.{name}.lora_A.weight"].double()
        B = tensors[f"base_model.model.{name}.lora_B.weight"].double()
        assert _rel(config["lora_alpha"] / A.shape[0] * B @ A, expected) < 1e-6, name


def test_exact_layout_is_flagged_with_the_fix(inputs, tmp_path):
    merged = loramix.combine([str(inputs[k].path) for k in "abc"], weights=WEIGHTS, method="cat")
    folder = save_adapter(merged, tmp_path / "exact", rank_layout="exact")
    statuses = {v.consumer: (v.status, v.fix) for v in check_source(folder).verdicts}
    assert statuses["PEFT"][0] == statuses["vLLM"][0] == "yes"  # vLLM: fine only because scales are folded to 1
    assert statuses["SGLang"][0] == "no" and "-m cat -o OUT" in statuses["SGLang"][1]
    assert statuses["llama.cpp"][0] == "wrong"
    # the input with per-module alphas and rsLoRA: vLLM and SGLang scale it wrong, llama.cpp too
    raw = {v.consumer: v for v in check_source(inputs["c"].path).verdicts}
    assert raw["vLLM"].status == "wrong" and raw["vLLM"].note == "--max-lora-rank 8"
    assert raw["SGLang"].status == "no" and raw["llama.cpp"].status == "wrong"
    assert raw["PEFT"].note.startswith("PEFT 0.14+")  # PEFT 0.21 writes keys 0.6–0.13 refuse


def test_cli_check_text_and_json(written):
    result = CliRunner().invoke(main, ["check", str(written["cat"])])
    assert result.exit_code == 0, result.output
    assert "vLLM" in result.output and "--max-lora-rank 32" in result.output
    result = CliRunner().invoke(main, ["check", "--json", str(written["cat"])])
    (report,) = json.loads(result.stdout)
    assert [v["consumer"] for v in report["verdicts"]] == list(CONSUMERS)


# statuses in CONSUMERS order, checked by hand against each engine's rule (see loramix/compat.py)
REAL_VERDICTS = {
    "bert__emotion_seqcls": "yes yes no wrong wrong no n/a",  # classifier head: vLLM/llama.cpp refuse, others drop
    "bert__multitask_seqcls": "yes yes no wrong wrong no n/a",
    "distilbert__imdb_qv": "yes yes no wrong wrong no n/a",
    "distilbert__mediabias_qkvo": "yes yes no wrong wrong no n/a",
    "distilbert__qkv_a8_khaja": "yes yes no wrong wrong no n/a",
    "distilgpt2__groundup": "yes yes yes yes wrong yes n/a",  # LoRAX/TGI build no layer for c_attn
    "distilgpt2__pipeline": "yes yes yes yes wrong yes n/a",
    "gemma_2b__sql_f16": "yes yes yes yes yes yes n/a",
    "gpt2__carinfo_doubleprefix": "yes yes yes yes wrong yes n/a",
    "gpt2__customer_support_tasknone": "yes yes yes yes wrong yes n/a",
    "gpt2__ironhack_r4_biaslora_clm": "yes yes yes yes wrong yes n/a",  # also r=4: padded to 8 and read as r
    "gpt2__pseudo2code_clm": "yes yes yes yes wrong yes n/a",
    "gpt2__seqcls_deepbiolab": "yes yes no wrong wrong no n/a",  # score head
    "gpt2__tigrinya_clm": "yes yes yes yes wrong yes n/a",
    "qwen05__inference_engine": "yes yes yes yes yes yes n/a",
    "qwen05__posttrain_v1": "yes yes yes yes yes yes n/a",
    "qwen05__posttrain_v2": "yes yes yes yes yes yes n/a",
    "smollm2_360m__lora_test_base": "yes yes yes yes yes yes n/a",
    "smollm2_360m__mltutor_instruct": "yes yes yes yes yes yes n/a",
}
REAL_PEFT = {  # PEFT releases that read it: 0.6–0.13 refuse the newest key the config carries
    "gpt2__pseudo2code_clm": "PEFT 0.5, 0.7+",  # loftq_config (0.7)
    "gpt2__ironhack_r4_biaslora_clm": "PEFT 0.5, 0.8+",  # use_rslora (0.8)
    "qwen05__inference_engine": "PEFT 0.5, 0.9+",  # use_dora (0.9)
    "gpt2__customer_support_tasknone": "PEFT 0.5, 0.10+",  # layer_replication (0.10)
    "qwen05__posttrain_v1": "PEFT 0.5, 0.14+",  # alora_invocation_tokens (0.18): dropped with a warning from 0.14
}


@requires_real
@pytest.mark.parametrize("name", sorted(REAL_VERDICTS))
def test_real_adapter_verdicts(name):
    report = check_source(REAL / name, allow_nonfinite=True)
    assert [v.consumer for v in report.verdicts] == list(CONSUMERS)
    assert " ".join(v.status for v in report.verdicts) == REAL_VERDICTS[name]
    if name in REAL_PEFT:
        assert report.verdicts[0].note.startswith(REAL_PEFT[name])
    assert all(v.reason for v in report.verdicts if v.status != "yes")


@requires_real
def test_real_adapters_combined_are_portable(tmp_path):
    sources = [str(REAL / n) for n in ("qwen05__posttrain_v1", "qwen05__posttrain_v2", "qwen05__inference_engine")]
    folder = save_adapter(
        loramix.combine(sources, method="svd", rank_rule=loramix.RankRule(energy=0.99)), tmp_path / "out"
    )
    assert " ".join(v.status for v in check_source(folder).verdicts) == "yes yes yes yes yes yes n/a"


def test_peft_folder_of_kohya_names_loads_nowhere(tmp_path):
    """A PEFT folder whose target modules are kohya names (what loramix once wrote for kohya inputs): PEFT itself
    finds none of them in a model (the oracle), and `check` says "no" for every PEFT consumer, with the fix."""
    from peft import PeftModel
    from safetensors.torch import save_file

    name = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    folder = tmp_path / "kohya-as-peft"
    folder.mkdir()
    config = {**CONFIG_DEFAULTS, "peft_type": "LORA", "r": 2, "lora_alpha": 2, "target_modules": [name]}
    (folder / "adapter_config.json").write_text(json.dumps(config))
    tensors = {
        f"base_model.model.{name}.lora_A.weight": torch.ones(2, 32),
        f"base_model.model.{name}.lora_B.weight": torch.ones(32, 2),
    }
    save_file(tensors, str(folder / "adapter_model.safetensors"))
    with pytest.raises(ValueError, match="not found in the base model"):
        PeftModel.from_pretrained(tiny_llama(), str(folder))
    verdicts = {v.consumer: v for v in check_source(str(folder)).verdicts}
    assert set(verdicts) == set(CONSUMERS) and all(v.status == "no" for v in verdicts.values()), verdicts
    assert "kohya names no model has" in verdicts["vLLM"].reason and "--format kohya" in verdicts["PEFT"].fix


def test_peft_key_table_knows_the_installed_release():
    """Every config field of the installed PEFT's LoraConfig/PeftConfig is in the key table, introduced no later than
    the installed release: the table (read from PEFT's tags) cannot have missed a key this release reads."""
    import dataclasses

    import peft
    from peft import LoraConfig

    from loramix.compat.peft_versions import PEFT_05_KEYS, PEFT_KEY_SINCE

    installed = tuple(int(x) for x in peft.__version__.split(".")[:2])
    fields = {f.name for f in dataclasses.fields(LoraConfig)}
    unknown = sorted(k for k in fields if k not in PEFT_05_KEYS and k not in PEFT_KEY_SINCE)
    assert not unknown, unknown
    assert all(PEFT_KEY_SINCE[k] <= installed for k in fields - PEFT_05_KEYS)
