"""Weights and method options that vary by layer or module (`loramix.schedule`), --conv-rank and SD block weights.

Oracles: mergekit's own ``evaluate_setting`` (gradients and filters), float64 Σ wᵢ(module)·ΔWᵢ, PEFT's
add_weighted_adapter run once per layer with that layer's weights, the method run with plain numbers, dense SVD
truncation, and sd-scripts' block numbering (networks/svd_merge_lora.py ``get_lbw_block_index``) written out by hand.
"""

from __future__ import annotations

import inspect
import json

import pytest
import torch
from click.testing import CliRunner
from helpers import make_peft_adapter, tiny_llama
from safetensors.torch import save_file

import loramix
from loramix.cli import main
from loramix.errors import MethodError, RecipeError
from loramix.recipe import load_recipe
from loramix.schedule import BlockWeights, Constant, Filtered, Gradient, count_layers, layer_index, parse, sd_block

mergekit_config = pytest.importorskip("mergekit.config")

# float64 references against float32 factors: a few float32 ulps of the product
REL = 1e-5


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def mergekit_value(setting, name: str, t: float) -> float:
    """mergekit's own resolution of a parameter setting at ``t`` (its ``validate`` keyword where it has one)."""
    kwargs = {"validate": float} if "validate" in inspect.signature(mergekit_config.evaluate_setting).parameters else {}
    return float(mergekit_config.evaluate_setting(name, setting, t, **kwargs))


def mergekit_t(index: int, num_layers: int) -> float:
    """mergekit/plan.py MergePlanner.plan_slice: t = idx/(n-1), or 1 for a single layer."""
    return index / (num_layers - 1) if num_layers > 1 else 1


@pytest.mark.parametrize("values", [[0.0, 1.0], [1.0, 0.2, 0.7], [0.3], [0.1, 0.9, -0.4, 0.5, 2.0]])
@pytest.mark.parametrize("num_layers", [1, 2, 5, 7, 32])
def test_gradient_equals_mergekit(values, num_layers):
    for i in range(num_layers):
        name = f"model.layers.{i}.self_attn.q_proj"
        assert parse(values).at(name, num_layers) == pytest.approx(
            mergekit_value(values, name, mergekit_t(i, num_layers)), abs=1e-12
        ), (i, num_layers)
    # outside layers mergekit plans at t = 0 (plan_module's pre/post weights): the first value
    assert parse(values).at("lm_head", num_layers) == pytest.approx(mergekit_value(values, "lm_head", 0))


KINDS = [
    (0.5, Constant),
    ([0.0, 1.0, 0.25], Gradient),
    ({"self_attn": [0.0, 1.0], "mlp": 0.3, "default": 0.2}, Filtered),
    ({"lbw": [0.1 * i for i in range(12)], "ratio": 0.8}, BlockWeights),
]


@pytest.mark.parametrize(("value", "kind"), KINDS, ids=[k.__name__ for _, k in KINDS])
def test_each_kind_is_its_class_and_writes_back_as_given(value, kind):
    # Oracles: the value as written (its JSON, what a recipe and a card hold) and mergekit's evaluate_setting.
    parsed = parse(value)
    assert type(parsed) is kind and parse(parsed) is parsed
    assert json.dumps(parsed.data()) == json.dumps(value)
    assert parsed.varies == (kind is not Constant)
    if kind is Filtered:  # mergekit's own spelling of filters
        value = [
            mergekit_config.ConditionalParameter(filter=None if k == "default" else k, value=v)
            for k, v in value.items()
        ]
    if kind is not BlockWeights:  # mergekit has no SD blocks (test_lbw_* checks those against sd-scripts)
        for i, module in [(i, m) for i in range(5) for m in ("self_attn.q_proj", "mlp.up_proj", "input_layernorm")]:
            name = f"model.layers.{i}.{module}"
            assert parsed.at(name, 5) == pytest.approx(mergekit_value(value, name, mergekit_t(i, 5)), abs=1e-12)


def test_filters_first_match_equals_mergekit():
    ours = parse({"q_proj": [0.0, 1.0], "self_attn": 0.5, "default": 0.1})
    conditions = [
        mergekit_config.ConditionalParameter(filter="q_proj", value=[0.0, 1.0]),
        mergekit_config.ConditionalParameter(filter="self_attn", value=0.5),
        mergekit_config.ConditionalParameter(value=0.1),
    ]
    for name in ["model.layers.3.self_attn.q_proj", "model.layers.1.self_attn.v_proj", "model.layers.2.mlp.up_proj"]:
        t = mergekit_t(layer_index(name), 5)
        assert ours.at(name, 5) == pytest.approx(mergekit_value(conditions, name, t)), name
    # mergekit's own list form reads as the same mapping; kohya's flattened names match a dotted filter
    assert parse([{"filter": "q_proj", "value": [0, 1]}, {"filter": "self_attn", "value": 0.5}, {"value": 0.1}]) == ours
    assert (
        parse({"self_attn.q_proj": 2.0, "default": 0.0}).at("lora_te_text_model_encoder_layers_0_self_attn_q_proj", 1)
        == 2.0
    )


def test_layer_index_and_count():
    assert [layer_index(n) for n in ("model.layers.12.mlp", "transformer.h.3.attn", "encoder.layer.5.x")] == [12, 3, 5]
    assert layer_index("encoder.block.2.layer.0.SelfAttention.q") == 2
    assert layer_index("lora_te_text_model_encoder_layers_7_mlp_fc1") == 7
    assert layer_index("lora_unet_middle_block_1_transformer_blocks_0_attn1_to_q") is None
    assert layer_index("lora_unet_down_blocks_0_attentions_0_proj_in") is None
    assert count_layers(["model.layers.0.q", "model.layers.5.q", "lm_head"]) == 6


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    root = tmp_path_factory.mktemp("layerwise")
    targets = ["q_proj", "v_proj", "o_proj"]
    return [
        make_peft_adapter(tiny_llama, root, "a", seed=11, r=4, lora_alpha=8, target_modules=targets),
        make_peft_adapter(tiny_llama, root, "b", seed=12, r=4, lora_alpha=16, target_modules=targets),
    ]


WEIGHTS = [[0.25, 1.5], {"q_proj": [0.9, 0.4], "default": 0.6}]


def test_combine_per_layer_equals_float64_sum_and_peft_per_layer(pair):
    merged = loramix.combine([p.path for p in pair], weights=WEIGHTS, method="cat")
    loaded = [loramix.load_adapter(p.path) for p in pair]
    layers = count_layers(merged.modules)
    assert layers == 2
    for name, module in merged.modules.items():
        expected = sum(
            parse(w).at(name, layers) * a.modules[name].delta(dtype=torch.float64) for a, w in zip(loaded, WEIGHTS)
        )
        assert rel(module.delta(dtype=torch.float64), expected) < REL, name
    # PEFT has one weight per adapter for the whole model: run it once per layer with that layer's weights
    model = pair[0].load_with_peft()
    model.load_adapter(str(pair[1].path), adapter_name="b")
    for layer in range(layers):
        weights = [parse(w).at(f"model.layers.{layer}.self_attn.v_proj", layers) for w in WEIGHTS]
        model.add_weighted_adapter(["default", "b"], weights, f"l{layer}", combination_type="cat")
        for name, submodule in model.named_modules():
            short = name.removeprefix("base_model.model.")
            if short.startswith(f"model.layers.{layer}.") and short.endswith("v_proj") and hasattr(submodule, "lora_A"):
                theirs = submodule.get_delta_weight(f"l{layer}").detach()
                assert rel(merged.modules[short].delta(), theirs) < REL, short


def test_options_per_layer_equal_the_method_with_plain_numbers(pair):
    sources = [p.path for p in pair]
    varying = loramix.combine(sources, weights=[1.0, 1.0], method="ties", density=[0.3, 0.9], rank_layout="exact")
    for layer, density in ((0, 0.3), (1, 0.9)):
        plain = loramix.combine(sources, weights=[1.0, 1.0], method="ties", density=density, rank_layout="exact")
        for name, module in plain.modules.items():
            if f".layers.{layer}." in name:
                assert torch.equal(varying.modules[name].delta(), module.delta()), name
    assert varying.provenance["options"]["density"] == [0.3, 0.9]


def test_weights_per_layer_reach_methods_that_count_absent_adapters(pair):
    """karcher counts an adapter that lacks a module as a zero update whose weight still normalises the others':
    that weight is the module's own (resolved per layer), as when the method runs with each layer's plain numbers."""
    first = loramix.load_adapter(pair[0].path)
    dropped = next(n for n in first.modules if ".layers.1." in n)
    sources = [first.with_modules({n: m for n, m in first.modules.items() if n != dropped}), pair[1].path]
    varying = loramix.combine(sources, weights=[[0.2, 0.7], 0.5], method="karcher", rank_layout="exact")
    plain = loramix.combine(sources, weights=[0.7, 0.5], method="karcher", rank_layout="exact")
    other = loramix.combine(sources, weights=[0.2, 0.5], method="karcher", rank_layout="exact")
    torch.testing.assert_close(varying.modules[dropped].delta(), plain.modules[dropped].delta(), rtol=0, atol=0)
    assert not torch.allclose(other.modules[dropped].delta(), plain.modules[dropped].delta())  # the weight counts


def test_recipe_records_varying_weights_and_reruns_identically(pair, tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        "adapters:\n"
        f"  - {{source: {pair[0].path}, weight: [0.25, 1.5]}}\n"
        f"  - {{source: {pair[1].path}, weight: {{q_proj: [0.9, 0.4], default: 0.6}}}}\n"
        "method: ties\noptions: {density: [0.5, 1.0]}\n"
    )
    first, second = tmp_path / "one", tmp_path / "two"
    result = CliRunner().invoke(main, ["-q", "combine", "--recipe", str(recipe), "-o", str(first)])
    assert result.exit_code == 0, result.output
    written = load_recipe(first / "loramix_recipe.yaml")
    assert written.weights == WEIGHTS and written.options["density"] == [0.5, 1.0]
    card = (first / "README.md").read_text()
    assert "[0.25, 1.5] across layers" in card and "{q_proj: [0.9, 0.4], default: 0.6}" in card
    assert "interpolate across 2 layers" in card and "density=[0.5, 1.0]" in card
    result = CliRunner().invoke(
        main, ["-q", "combine", "--recipe", str(first / "loramix_recipe.yaml"), "-o", str(second)]
    )
    assert result.exit_code == 0, result.output
    a, b = loramix.load_adapter(first), loramix.load_adapter(second)
    assert a.modules.keys() == b.modules.keys()
    for name in a.modules:
        assert torch.equal(a.modules[name].A, b.modules[name].A) and torch.equal(a.modules[name].B, b.modules[name].B)


def test_analyze_shows_effective_weight_per_module(pair):
    sources = [str(p.path) for p in pair]
    flags = ["-w", "[0.25,1.5],{q_proj: [0.9, 0.4], default: 0.6}"]
    result = CliRunner().invoke(main, ["-q", "analyze", *sources, *flags, "--json", "-"])
    assert result.exit_code == 0, result.output
    modules = json.loads(result.output)["merge"]["modules"]
    for name, item in modules.items():
        assert item["weights"] == pytest.approx([parse(w).at(name, 2) for w in WEIGHTS]), name
    text = CliRunner().invoke(main, ["-q", "analyze", *sources, *flags]).output
    assert "effective weight" in text
    row = next(line for line in text.splitlines() if line.strip().startswith("model.layers.1.self_attn.q_proj"))
    assert row.split()[1:] == ["1.5", "0.4"]


# -------------------------------------------------------------------------------------------- kohya: conv, blocks


def _kohya_file(path, modules: dict[str, tuple], seed: int = 0, alpha: float = 4.0):
    """A kohya LoRA file: name → (out, in, kernel, rank)."""
    gen = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, (out, inp, k, r) in modules.items():
        down_shape = (r, inp, k, k) if k else (r, inp)
        up_shape = (out, r, 1, 1) if k else (out, r)
        tensors[f"{name}.lora_down.weight"] = torch.randn(*down_shape, generator=gen)
        tensors[f"{name}.lora_up.weight"] = torch.randn(*up_shape, generator=gen)
        tensors[f"{name}.alpha"] = torch.tensor(alpha)
    save_file(tensors, str(path))
    return path


def test_conv_rank_caps_kxk_convs_only(tmp_path):
    file = _kohya_file(
        tmp_path / "conv.safetensors",
        {
            "lora_unet_down_blocks_0_resnets_0_conv1": (6, 5, 3, 6),
            "lora_unet_down_blocks_0_attentions_0_proj_in": (6, 5, 1, 6),
            "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q": (6, 6, 0, 6),
        },
    )
    merged = loramix.combine(
        [file], weights=[1.0], method="svd", rank_rule=loramix.RankRule(rank=4, conv_rank=2), rank_layout="exact"
    )
    source = loramix.load_adapter(file)
    ranks = {name.rsplit("_", 2)[-2] + "_" + name.rsplit("_", 1)[-1]: m.rank for name, m in merged.modules.items()}
    assert ranks == {"0_conv1": 2, "proj_in": 4, "to_q": 4}
    for name, module in merged.modules.items():  # each the best rank-k of its ΔW (Eckart–Young, dense float64 SVD)
        delta = source.modules[name].delta(dtype=torch.float64).reshape(module.out_features, -1)
        U, S, Vh = torch.linalg.svd(delta, full_matrices=False)
        k = module.rank
        assert rel(module.delta(dtype=torch.float64).reshape(delta.shape), (U[:, :k] * S[:k]) @ Vh[:k]) < REL, name
    assert merged.provenance["truncation"] == "rank 4, conv rank 2"
    # the CLI: a kohya file keeps each module's rank; the written recipe records conv_rank
    out = tmp_path / "out"
    flags = ["-m", "svd", "--rank", "4", "--conv-rank", "2", "--format", "kohya", "-o", str(out)]
    result = CliRunner().invoke(main, ["-q", "combine", str(file), *flags])
    assert result.exit_code == 0, result.output
    assert sorted(m.rank for m in loramix.load_adapter(out).modules.values()) == [2, 4, 4]
    assert load_recipe(out / "loramix_recipe.yaml").conv_rank == 2


# sd-scripts' get_lbw_block_index, by hand: SD 1.x names (diffusers layout) and SDXL names (original UNet layout)
SD_BLOCKS = {
    "lora_te_text_model_encoder_layers_0_self_attn_q_proj": 0,
    "lora_te1_text_model_encoder_layers_3_mlp_fc1": 0,
    "lora_unet_down_blocks_0_attentions_0_proj_in": 2,  # IN01
    "lora_unet_down_blocks_0_attentions_1_proj_in": 3,  # IN02
    "lora_unet_down_blocks_0_downsamplers_0_conv": 4,  # IN03
    "lora_unet_down_blocks_1_resnets_1_conv1": 6,  # IN05
    "lora_unet_down_blocks_3_resnets_1_conv2": 12,  # IN11
    "lora_unet_mid_block_attentions_0_proj_out": 13,  # MID
    "lora_unet_up_blocks_0_resnets_2_conv1": 16,  # OUT02
    "lora_unet_up_blocks_0_upsamplers_0_conv": 16,  # OUT02
    "lora_unet_up_blocks_3_attentions_2_proj_out": 25,  # OUT11
    "lora_unet_input_blocks_4_1_proj_in": 5,  # IN04 (SDXL)
    "lora_unet_middle_block_1_proj_in": 13,
    "lora_unet_output_blocks_5_1_proj_out": 19,  # OUT05
    "lora_unet_conv_in": None,
}


def test_sd_block_numbering_follows_sd_scripts():
    assert {name: sd_block(name) for name in SD_BLOCKS} == SD_BLOCKS
    assert sd_block("unet.down_blocks.1.resnets.1.conv1") == 6  # diffusers' dotted names alike


def test_lbw_weights_kohya_sd_state_dict(tmp_path):
    names = [n for n in SD_BLOCKS if "input_blocks" not in n and "output_blocks" not in n and "middle" not in n]
    file = _kohya_file(tmp_path / "sd.safetensors", {n: (6, 5, 0, 3) for n in names}, seed=3)
    lbw = [0.1 * (i + 1) for i in range(17)]  # BASE, IN01, IN02, IN04, IN05, IN07, IN08, MID, OUT03–OUT11
    covered = [0, 2, 3, 5, 6, 8, 9, 13, *range(17, 26)]
    merged = loramix.combine([file], weights=[{"lbw": lbw, "ratio": 0.5}], method="cat")
    source = loramix.load_adapter(file)
    for name in names:
        block = SD_BLOCKS[name]
        factor = lbw[covered.index(block)] if block in covered else 1.0  # as svd_merge_lora: others keep the ratio
        expected = 0.5 * factor * source.modules[name].delta(dtype=torch.float64)
        assert rel(merged.modules[name].delta(dtype=torch.float64), expected) < REL, name
    # the CLI's --lbws builds the same weights from --weights ratios
    out = tmp_path / "cli"
    result = CliRunner().invoke(
        main, ["-q", "combine", str(file), "-w", "0.5", "--lbws", json.dumps(lbw), "-m", "cat", "-o", str(out)]
    )
    assert result.exit_code == 0, result.output
    assert load_recipe(out / "loramix_recipe.yaml").weights == [{"lbw": pytest.approx(lbw), "ratio": 0.5}]


# -------------------------------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    "value,message",
    [
        ([], "empty list"),
        ([0.1, "x"], r"weight\[1\] must be a finite number"),
        ({"q_proj": 1.0}, "need a final 'default'"),
        ({"default": 0.1, "q_proj": 1.0}, "never reached"),
        ({"lbw": [1.0, 2.0]}, "12 or 20"),
        ({"q_proj": {"x": 1}, "default": 0}, "must be a finite number"),
        ([{"filter": "q", "val": 1}], "filter: NAME, value: V"),
    ],
)
def test_malformed_forms_are_one_line_errors(value, message):
    with pytest.raises(MethodError, match=message) as info:
        parse(value)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(
    "flags,message",
    [
        (["-w", "[0,1"], "weights: not a comma-separated YAML flow list"),
        (["-w", "{q_proj: 1},0.5"], "need a final 'default'"),
        (["--lbws", "[1,2,3],[1]"], "12 or 20"),
        (["-m", "ties", "--option", "density=[0.5, x]"], r"option density\[1\] must be a finite number"),
        (["--conv-rank", "0"], "conv-rank"),
    ],
)
def test_cli_one_line_errors(pair, tmp_path, flags, message):
    result = CliRunner().invoke(
        main, ["combine", str(pair[0].path), str(pair[1].path), *flags, "-o", str(tmp_path / "o")]
    )
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:"), result.output
    assert __import__("re").search(message, lines[0]), lines[0]
    assert not (tmp_path / "o").exists()


def test_recipe_errors_name_the_file(tmp_path):
    recipe = tmp_path / "bad.yaml"
    recipe.write_text("adapters:\n  - {source: x, weight: {default: 0.2, q_proj: 1}}\n")
    with pytest.raises(RecipeError, match=r"bad.yaml: adapters\[0\].weight: filters after default are never reached"):
        load_recipe(recipe)
    recipe.write_text("adapters: [x]\noptions: {density: [0.5, []]}\n")
    with pytest.raises(RecipeError, match=r"bad.yaml: option density\[1\] must be a finite number"):
        load_recipe(recipe)


def test_search_init_is_read_as_any_weight(pair):
    # A varying init is searched in its form (tests/test_search_layerwise.py); a malformed one is refused as any
    # weight is, and a wrong count names both counts, before the base is ever read.
    from loramix.errors import MethodError, SearchError

    with pytest.raises(MethodError, match="init 1: filters after default are never reached"):
        loramix.search(
            "unused", [p.path for p in pair], [{"input": "a", "output": "b"}], init=[{"default": 0.2, "q": 1}, 0.5]
        )
    with pytest.raises(SearchError, match=r"init has 1 value\(s\) for 2 adapter\(s\)"):
        loramix.search("unused", [p.path for p in pair], [{"input": "a", "output": "b"}], init=[[0, 1]])
