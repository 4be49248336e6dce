"""PEFT round trip: PEFT writes an adapter, loramix reads it and writes it again, PEFT loads loramix's copy.

The oracle is PEFT itself: ``PeftModel.from_pretrained`` of loramix's output must give the same logits as
``PeftModel.from_pretrained`` of PEFT's original folder on the same (deterministically rebuilt) base, and every
module's ΔW must equal PEFT's ``get_delta_weight``.

Tolerances. Logits: float32, atol 1e-5. The factors are copied bit for bit; the only rounding is the scale, which
the writer turns back into lora_alpha (= scale·r, or scale·√r with rsLoRA) for PEFT to divide again — a few ulps of
a number of order 1, i.e. ~1e-7 on logits of order 1. 1e-5 leaves room for that and is still ≥10⁴ times smaller
than what each adapter changes (asserted, so a test cannot pass by comparing two base models). ΔW: relative 1e-6,
a few float32 ulps from computing scale·B·A in a different order than PEFT.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from helpers import (
    example_inputs,
    make_peft_adapter,
    model_output,
    read_folder,
    seeded,
    tiny_bert_seqcls,
    tiny_convnet,
    tiny_gemma,
    tiny_gpt2,
    tiny_llama,
    tiny_qwen2,
    write_folder,
)
from peft.tuners.lora import LoraLayer
from safetensors import safe_open
from torch import nn

from loramix import load_adapter, save_adapter
from loramix.adapter import portable_rank
from loramix.cli import main
from loramix.formats.peft import CONFIG_DEFAULTS
from loramix.render.inspect import adapter_summary

LOGITS_ATOL = 1e-5
DELTA_RTOL = 1e-6

CASES = {
    "llama": (tiny_llama, dict(target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")),
    "qwen2": (tiny_qwen2, dict(target_modules=["q_proj", "k_proj", "v_proj", "o_proj"], task_type="CAUSAL_LM")),
    "gemma": (tiny_gemma, dict(target_modules=["q_proj", "v_proj", "gate_proj"], task_type="CAUSAL_LM")),
    "gpt2_conv1d": (tiny_gpt2, dict(target_modules=["c_attn", "c_proj", "c_fc"], fan_in_fan_out=True)),
    "bert_seqcls_head": (tiny_bert_seqcls, dict(target_modules=["query", "value"], task_type="SEQ_CLS")),
    "rslora": (tiny_llama, dict(target_modules=["q_proj", "v_proj"], r=8, lora_alpha=6, use_rslora=True)),
    "rank_alpha_pattern": (
        tiny_llama,
        dict(
            target_modules=["q_proj", "v_proj", "o_proj"],
            r=4,
            lora_alpha=8,
            rank_pattern={"o_proj": 2, "model.layers.1.self_attn.q_proj": 6},
            alpha_pattern={"v_proj": 3, "model.layers.0.self_attn.o_proj": 5},
        ),
    ),
    "dora": (tiny_llama, dict(target_modules=["q_proj", "v_proj"], use_dora=True)),
    "lora_bias": (tiny_llama, dict(target_modules=["q_proj", "v_proj"], lora_bias=True)),
    "embedding": (tiny_llama, dict(target_modules=["embed_tokens", "q_proj"])),
    "conv2d": (tiny_convnet, dict(target_modules=["conv", "head"])),
    "gpt2_bias_all": (tiny_gpt2, dict(target_modules=["c_attn"], fan_in_fan_out=True, bias="all")),
    "dora_conv2d": (tiny_convnet, dict(target_modules=["conv", "head"], use_dora=True)),
    "dora_embedding": (tiny_llama, dict(target_modules=["embed_tokens", "q_proj"], use_dora=True)),
    "gpt2_lora_bias": (tiny_gpt2, dict(target_modules=["c_attn", "c_proj"], fan_in_fan_out=True, lora_bias=True)),
    "bert_extra_module": (
        tiny_bert_seqcls,
        dict(target_modules=["query"], modules_to_save=["pooler.dense"], task_type="SEQ_CLS"),
    ),
    "lm_head": (tiny_qwen2, dict(target_modules=["q_proj", "lm_head"])),
}


class RoundTrip:
    def __init__(self, case: str, root: Path) -> None:
        factory, options = CASES[case]
        self.made = make_peft_adapter(factory, root, case, base_model_name_or_path=f"tests/{case}", **options)
        self.adapter = load_adapter(self.made.path)
        self.out = save_adapter(self.adapter, root / f"{case}-loramix")
        self.exact = save_adapter(self.adapter, root / f"{case}-exact", rank_layout="exact")
        self.inputs = example_inputs(factory)


@pytest.fixture(scope="module", params=sorted(CASES))
def trip(request, tmp_path_factory) -> RoundTrip:
    return RoundTrip(request.param, tmp_path_factory.mktemp(request.param))


def lora_layers(model) -> dict[str, LoraLayer]:
    """PEFT's LoRA layers by their base-model module name (the names loramix uses)."""
    prefix = "base_model.model."
    return {n.removeprefix(prefix): m for n, m in model.named_modules() if isinstance(m, LoraLayer)}


def assert_rel_close(actual: torch.Tensor, expected: torch.Tensor, rtol: float, what: str) -> None:
    err = (actual.double() - expected.double()).norm() / expected.double().norm().clamp_min(1e-30)
    assert err <= rtol, f"{what}: relative error {err:.2e} > {rtol:.0e}"


@pytest.mark.parametrize("layout", ["portable", "exact"])
def test_peft_loads_loramix_output_with_the_same_logits(trip, layout):
    original = model_output(trip.made.load_with_peft(), trip.inputs)
    ours = model_output(trip.made.load_with_peft(trip.out if layout == "portable" else trip.exact), trip.inputs)
    base = model_output(trip.made.base(), trip.inputs)
    assert (original - base).abs().max() > 1e4 * LOGITS_ATOL, "the adapter must change the outputs for this to test"
    torch.testing.assert_close(ours, original, rtol=0, atol=LOGITS_ATOL)


def test_every_module_delta_matches_peft(trip):
    layers = lora_layers(trip.made.peft_model)
    assert sorted(trip.adapter.modules) == sorted(layers)
    for name, module in trip.adapter.modules.items():
        layer = layers[name]
        assert module.rank == layer.r["default"], name
        assert module.scale == pytest.approx(layer.scaling["default"], rel=1e-12), name
        expected = layer.get_delta_weight("default")
        assert module.delta().shape == expected.shape == layer.get_base_layer().weight.shape, name
        assert_rel_close(module.delta(), expected, DELTA_RTOL, name)


def test_written_modules_reload_in_peft_with_the_same_rank_scale_and_delta(trip):
    """rank_layout="exact" keeps each module's rank and scale; the default portable layout gives every module one
    rank (the largest rounded up to 8 or a multiple of 16) and one scale, with the same ΔW (by design)."""
    original = lora_layers(trip.made.peft_model)
    exact = lora_layers(trip.made.load_with_peft(trip.exact))
    portable = lora_layers(trip.made.load_with_peft(trip.out))
    assert sorted(exact) == sorted(portable) == sorted(original)
    rank = portable_rank(layer.r["default"] for layer in original.values())
    assert len({layer.scaling["default"] for layer in portable.values()}) == 1
    for name, layer in exact.items():
        assert layer.r["default"] == original[name].r["default"], name
        assert layer.scaling["default"] == pytest.approx(original[name].scaling["default"], rel=1e-12), name
        assert portable[name].r["default"] == rank, name
        for reloaded in (layer, portable[name]):
            assert_rel_close(
                reloaded.get_delta_weight("default"), original[name].get_delta_weight("default"), 1e-6, name
            )


def test_written_tensors_are_peft_keys_and_values(trip):
    """loramix writes PEFT's own key layout back, every tensor bit for bit (no dtype change was asked for)."""
    _, theirs = read_folder(trip.made.path)
    _, ours = read_folder(trip.exact)
    assert sorted(ours) == sorted(theirs)
    for key, tensor in theirs.items():
        assert ours[key].dtype == tensor.dtype, key
        assert torch.equal(ours[key], tensor), key
    with safe_open(str(trip.exact / "adapter_model.safetensors"), "pt") as f:
        assert f.metadata() == {"format": "pt"}


def test_written_config_fields(trip):
    """Keys at PEFT's default value are left out (by design: PEFT 0.6–0.13 refuse keys they do not know)."""
    theirs, tensors = read_folder(trip.made.path)
    ours = json.loads((trip.exact / "adapter_config.json").read_text())
    assert ours["peft_type"] == "LORA"
    for key in (
        "base_model_name_or_path",
        "task_type",
        "use_rslora",
        "use_dora",
        "lora_bias",
        "fan_in_fan_out",
        "bias",
    ):
        assert ours.get(key, CONFIG_DEFAULTS[key]) == theirs[key], key
    assert all(ours[key] != value for key, value in CONFIG_DEFAULTS.items() if key in ours)
    assert ours["base_model_name_or_path"] == f"tests/{trip.made.path.name}"
    assert set(ours["target_modules"]) == set(trip.adapter.modules)
    assert ours["inference_mode"] is True
    # PEFT lists its task's default heads (SEQ_CLS: classifier and score); loramix lists those the file holds
    # (loramix writes full module names, PEFT the names as given: "bert.pooler.dense" for "pooler.dense")
    heads = [h for h in theirs["modules_to_save"] or [] if any(f".{h}." in key for key in tensors)]
    written = ours.get("modules_to_save") or []
    assert len(written) == len(heads)
    assert all(any(w == h or w.endswith("." + h) for w in written) for h in heads)
    portable = json.loads((trip.out / "adapter_config.json").read_text())
    assert {k: v for k, v in portable.items() if k not in ("r", "lora_alpha", "use_rslora")} == {
        k: v for k, v in ours.items() if k not in ("r", "lora_alpha", "use_rslora", "rank_pattern", "alpha_pattern")
    }


def test_features_are_recognised(trip):
    case = trip.made.path.name
    a = trip.adapter
    assert a.use_rslora == (case == "rslora")
    assert a.has_dora == case.startswith("dora")
    assert a.has_lora_bias == case.endswith("lora_bias")
    layouts = {m.layout for m in a.modules.values()}
    expected = {
        "gpt2_conv1d": {"conv1d_fan_in_fan_out"},
        "gpt2_bias_all": {"conv1d_fan_in_fan_out"},
        "gpt2_lora_bias": {"conv1d_fan_in_fan_out"},
        "embedding": {"embedding", "out_in"},
        "dora_embedding": {"embedding", "out_in"},
        "conv2d": {"conv2d", "out_in"},
        "dora_conv2d": {"conv2d", "out_in"},
    }
    assert layouts == expected.get(case, {"out_in"})
    assert a.warnings == []
    features = {
        "rslora": ["rslora"],
        "dora": ["dora"],
        "lora_bias": ["lora_bias"],
        "embedding": ["embedding"],
        "conv2d": ["conv2d"],
        "gpt2_conv1d": ["conv1d_fan_in_fan_out"],
        "gpt2_bias_all": ["conv1d_fan_in_fan_out"],
        "dora_conv2d": ["dora", "conv2d"],
        "dora_embedding": ["dora", "embedding"],
        "gpt2_lora_bias": ["lora_bias", "conv1d_fan_in_fan_out"],
    }
    assert adapter_summary(a)["features"] == features.get(case, [])


def test_cli_inspect_json_agrees_with_peft(trip):
    result = CliRunner().invoke(main, ["inspect", "--json", str(trip.made.path)])
    assert result.exit_code == 0, result.output
    (summary,) = json.loads(result.stdout)
    layers = lora_layers(trip.made.peft_model)
    assert summary["num_modules"] == len(layers)
    assert summary["ranks"] == sorted({layer.r["default"] for layer in layers.values()})
    assert summary["scales"] == pytest.approx(sorted({layer.scaling["default"] for layer in layers.values()}))
    assert summary["base_model"] == f"tests/{trip.made.path.name}" and summary["dtype"] == "float32"


def test_rank_and_alpha_patterns_resolve_per_module(tmp_path):
    made = make_peft_adapter(tiny_llama, tmp_path, "patterns", **CASES["rank_alpha_pattern"][1])
    a = load_adapter(made.path)
    # independent of PEFT: alpha/r from the patterns as written in CASES
    expected = {
        "model.layers.0.self_attn.q_proj": (4, 8 / 4),
        "model.layers.1.self_attn.q_proj": (6, 8 / 6),
        "model.layers.0.self_attn.v_proj": (4, 3 / 4),
        "model.layers.0.self_attn.o_proj": (2, 5 / 2),
        "model.layers.1.self_attn.o_proj": (2, 8 / 2),
    }
    for name, (rank, scale) in expected.items():
        assert (a.modules[name].rank, a.modules[name].scale) == (rank, pytest.approx(scale, rel=1e-12)), name


def test_head_is_kept_with_its_values(tmp_path):
    made = make_peft_adapter(tiny_bert_seqcls, tmp_path, "bert", target_modules=["query", "value"], task_type="SEQ_CLS")
    a = load_adapter(made.path)
    assert sorted(a.extra) == ["classifier.bias", "classifier.weight"]
    trained = made.peft_model.base_model.model.classifier.modules_to_save["default"].weight
    assert torch.equal(a.extra["classifier.weight"].tensor, trained.detach())
    base_head = made.base().classifier.weight
    assert not torch.equal(trained, base_head), "the head must differ from the base's to test that it is kept"


def test_dtype_is_kept_and_cast_once_on_request(tmp_path):
    made = make_peft_adapter(tiny_llama, tmp_path, "f32", target_modules=["q_proj"])
    config, tensors = read_folder(made.path)
    half = write_folder(tmp_path / "bf16", config, {k: v.to(torch.bfloat16) for k, v in tensors.items()})
    a = load_adapter(half)
    assert a.dtype == torch.bfloat16
    _, kept = read_folder(save_adapter(a, tmp_path / "bf16-out"))
    assert {t.dtype for t in kept.values()} == {torch.bfloat16}
    # exact layout: the rank-4 factors as they are (the portable layout pads them to 8 with zeros)
    _, cast = read_folder(
        save_adapter(load_adapter(made.path), tmp_path / "cast", dtype=torch.float16, rank_layout="exact")
    )
    assert {t.dtype for t in cast.values()} == {torch.float16}
    for key, tensor in tensors.items():
        assert torch.equal(cast[key], tensor.to(torch.float16)), key


class NestedNames(nn.Module):
    """Three Linear layers named ``a.x``, ``b.x`` and ``z.a.x``: one module's name is the tail of another's."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.z = nn.Module(), nn.Module(), nn.Module()
        self.z.a = nn.Module()
        for parent in (self.a, self.b, self.z.a):
            parent.x = nn.Linear(6, 6)

    def forward(self, inp: torch.Tensor) -> torch.Tensor:
        return self.z.a.x(self.b.x(self.a.x(inp)))


def nested_names(seed: int = 0) -> nn.Module:
    return seeded(seed, NestedNames)


def test_pattern_keys_do_not_leak_onto_modules_whose_name_ends_the_same(tmp_path):
    """rank_pattern {"a.x": 2} would also give z.a.x rank 2 in PEFT (keys match name tails): written anchored."""
    made = make_peft_adapter(
        nested_names, tmp_path, "nested", target_modules=["x"], r=4, rank_pattern={"^a.x": 2}, alpha_pattern={"^a.x": 3}
    )
    a = load_adapter(made.path)
    assert {n: (m.rank, m.scale) for n, m in a.modules.items()} == {"a.x": (2, 1.5), "b.x": (4, 2.0), "z.a.x": (4, 2.0)}
    out = save_adapter(a, tmp_path / "out", rank_layout="exact")
    inputs = {"inp": torch.randn(2, 6, generator=torch.Generator().manual_seed(0))}
    reloaded = made.load_with_peft(out)
    assert {n: layer.r["default"] for n, layer in lora_layers(reloaded).items()} == {"a.x": 2, "b.x": 4, "z.a.x": 4}
    torch.testing.assert_close(model_output(reloaded, inputs), model_output(made.peft_model, inputs), rtol=0, atol=1e-5)
    assert load_adapter(out).modules["a.x"].scale == 1.5
    portable = made.load_with_peft(save_adapter(a, tmp_path / "portable"))  # no patterns at all: nothing to leak
    assert {n: layer.r["default"] for n, layer in lora_layers(portable).items()} == {"a.x": 8, "b.x": 8, "z.a.x": 8}
    torch.testing.assert_close(model_output(portable, inputs), model_output(made.peft_model, inputs), rtol=0, atol=1e-5)
