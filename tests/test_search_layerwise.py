"""`loramix search` with an init that varies by layer or module: the search runs over the numbers of each form.

The oracle for the per-module mapping is `loramix.combine` with the same forms as weights (itself checked against
mergekit's gradients/filters in test_layerwise and against PEFT in test_combine) loaded into PEFT; a 4-layer random
Llama so that a 3-value gradient is really interpolated (t = 0, 1/3, 2/3, 1). Models are tiny and CPU-only.
"""

from __future__ import annotations

import json
import random
from functools import partial

import pytest
import torch
import yaml
from click.testing import CliRunner
from peft import PeftModel
from test_search import EXAMPLES, Setup, _peft_loss, llama

import loramix
from loramix import save_adapter
from loramix.cli import main
from loramix.schedule import count_layers, layer_index, parse, sd_block

FORMS = [[0.0, 0.0, 0.0], {"q_proj": [0.0, 0.0], "v_proj": 0.0, "default": 0.0}, 0.0]  # 3 + 4 + 1 numbers
THETA = [0.4, -1.1, 0.9, 1.3, -0.2, 0.7, 0.3, -0.5]


@pytest.fixture(scope="module")
def deep(tmp_path_factory):
    return Setup(tmp_path_factory.mktemp("deep"), partial(llama, layers=4), ["q_proj", "v_proj", "down_proj"])


def _forms(theta) -> list:
    maps = [parse(f) for f in FORMS]
    out, start = [], 0
    for m in maps:
        out.append(m.with_numbers(theta[start : start + len(m.numbers)]).data())
        start += len(m.numbers)
    return out


NAMES = [
    "model.layers.0.self_attn.q_proj",
    "model.layers.2.mlp.down_proj",
    "lora_te_text_model_encoder_layers_3_mlp_fc1",
    "lora_unet_down_blocks_1_attentions_0_proj_in",
    "lora_unet_up_blocks_2_resnets_1_conv1",
    "lora_unet_conv_in",
    "lm_head",
]
SPECS = [
    0.7,
    [0.2, -1.0, 0.5],
    {"self_attn.q_proj": [1.0, 0.0], "mlp": 0.3, "default": -0.4},
    {"lbw": [0.1 * i for i in range(17)], "ratio": 0.8},
    {"lbw": [1 - 0.05 * i for i in range(12)], "ratio": 1.5},
]


@pytest.mark.parametrize("spec", SPECS, ids=["number", "gradient", "filters", "lbw17", "lbw12"])
def test_every_module_weight_is_linear_in_the_numbers_of_its_form(spec):
    # Oracle: resolve (mergekit's interpolation and filters, sd-scripts' blocks, tested in test_layerwise) of the form
    # rebuilt with other numbers; float64 throughout, so the row·numbers sum agrees to a few ulps (1e-12).
    form = parse(spec)
    assert form.with_numbers(form.numbers) == parse(spec)
    rng = random.Random(0)
    other = [rng.uniform(-2, 2) for _ in form.numbers]
    for name in NAMES:
        for layers in (1, 4, 7):
            row, constant = form.affine(name, layers)
            assert len(row) == len(form.numbers)
            for values in (form.numbers, other):
                expected = form.with_numbers(values).at(name, layers)
                assert sum(c * v for c, v in zip(row, values)) + constant == pytest.approx(expected, abs=1e-12)
    assert sd_block(NAMES[3]) is not None and layer_index(NAMES[1]) == 2  # the names exercise blocks and layers
    with pytest.raises(loramix.errors.MethodError, match="holds"):
        form.with_numbers([*form.numbers, 1.0])


@pytest.mark.parametrize("composition", ["lorahub", "delta"])
def test_evaluator_loss_equals_the_combined_adapter_with_those_forms(deep, composition, tmp_path):
    forms = _forms(THETA)
    with deep.evaluator(EXAMPLES, composition, forms=[parse(f) for f in FORMS]) as ev:
        assert ev.k == len(THETA)
        population = torch.tensor([THETA, [0.0] * 8, [1.0] * 8])
        losses = ev.cross_entropy(population)
        # the maps themselves: each module's weights are parse().at() of the rebuilt forms
        layers = count_layers(ev.factors)
        assert layers == 4
        for name, f in ev.factors.items():
            expected = [parse(w).at(name, layers) for w in forms]
            torch.testing.assert_close(f.mix @ torch.tensor(THETA) + f.offset, torch.tensor(expected))
    # Oracle: PEFT loading what combine writes for these forms (method lorahub = LoRAHub's mixing, cat = Σ wᵢsᵢBᵢAᵢ).
    method = "lorahub" if composition == "lorahub" else "cat"
    save_adapter(loramix.combine(deep.adapters, weights=forms, method=method), tmp_path / "c")
    model = PeftModel.from_pretrained(deep.factory(), str(tmp_path / "c")).eval()
    # 1e-4 relative, as test_search's TOL: float32 products in a different order, through a 4-layer network.
    assert float(losses[0]) == pytest.approx(_peft_loss(deep, model, EXAMPLES), rel=1e-4)
    # all-ones forms are the plain weights (1, 1, 1): the mapping agrees with a number-only evaluator
    with deep.evaluator(EXAMPLES, composition) as plain:
        assert plain.k == 3 and all(f.mix is None for f in plain.factors.values())
        assert float(losses[2]) == pytest.approx(float(plain.cross_entropy([[1.0, 1.0, 1.0]])[0]), rel=1e-5)
    assert len({round(float(x), 6) for x in losses}) == 3  # the candidates really differ


def test_number_inits_take_the_plain_path_bit_for_bit(deep):
    # A form of one number each (number, one-value gradient, a lone default) is that number everywhere: no map is
    # built and the losses are bitwise those of the plain evaluator.
    w = [[0.3, -0.6, 0.9], [-1.2, 0.1, 0.4]]
    with deep.evaluator(EXAMPLES, "delta") as plain:
        expected = plain.cross_entropy(w)
    with deep.evaluator(EXAMPLES, "delta", forms=[0.5, [0.2], {"default": 0.1}]) as ev:
        assert ev.k == 3 and all(f.mix is None for f in ev.factors.values())
        assert torch.equal(ev.cross_entropy(w), expected)
    a = loramix.search(deep.base, deep.adapters, EXAMPLES, optimizer="cma", steps=2, seed=3, device="cpu")
    b = loramix.search(deep.base, deep.adapters, EXAMPLES, optimizer="cma", steps=2, seed=3, device="cpu",
                       init=[0.0, 0.0, 0.0])  # fmt: skip
    assert a.weights == b.weights and a.history == b.history and all(isinstance(x, float) for x in a.weights)


@pytest.mark.parametrize("optimizer", ["cma", "adam"])
def test_search_over_a_gradient_and_filters_improves_and_its_recipe_reruns(deep, optimizer, tmp_path):
    examples = tmp_path / "ex.jsonl"
    examples.write_text("".join(json.dumps(e) + "\n" for e in EXAMPLES))
    out = tmp_path / "out"
    init = "[0, 0, 0],{q_proj: [0, 0], v_proj: 0, default: 0},0"
    args = ["-q", "search", "--base", str(deep.base), "--examples", str(examples), *map(str, deep.adapters)]
    args += ["--composition", "delta", "--optimizer", optimizer, "--steps", "6", "--l1", "0.01", "--lr", "0.2"]
    result = CliRunner().invoke(main, [*args, "--init", init, "--bounds=-1,1", "--device", "cpu", "-o", str(out)])
    assert result.exit_code == 0, result.output
    assert "across layers, {q_proj: [" in result.output, result.output
    report = json.loads((out / "search.json").read_text())
    found = report["weights"]
    assert len(found[0]) == 3 and list(found[1]) == ["q_proj", "v_proj", "default"] and isinstance(found[2], float)
    assert len(found[1]["q_proj"]) == 2 and report["settings"]["init"][1]["default"] == 0.0
    theta = [*found[0], *found[1]["q_proj"], found[1]["v_proj"], found[1]["default"], found[2]]
    assert all(-1 <= x <= 1 for x in theta) and len(set(theta)) > 3  # bounds hold per number; they moved apart
    with deep.evaluator(EXAMPLES, "delta", forms=[parse(f) for f in FORMS]) as ev:
        start, end = ev.cross_entropy([[0.0] * 8, theta]).tolist()
    assert report["cross_entropy"] == pytest.approx(end, rel=1e-5)
    assert report["loss"] == pytest.approx(end + 0.01 * sum(map(abs, theta)) / 8, rel=1e-5)  # l1 over the numbers
    assert end < start - 1e-3, (start, end)  # the search improved on its starting point
    recipe = yaml.safe_load((out / "loramix_recipe.yaml").read_text())
    assert [a["weight"] for a in recipe["adapters"]] == found and recipe["method"] == "cat"
    assert "across layers" in (out / "README.md").read_text()
    again = CliRunner().invoke(main, ["-q", "combine", "--recipe", str(out / "loramix_recipe.yaml"),
                                      "-o", str(tmp_path / "again")])  # fmt: skip
    assert again.exit_code == 0, again.output
    for name in sorted(p.name for p in out.glob("*.safetensors")):
        assert (tmp_path / "again" / name).read_bytes() == (out / name).read_bytes(), name
