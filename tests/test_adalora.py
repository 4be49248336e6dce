"""AdaLoRA adapters made by PEFT itself: loramix's ΔW against PEFT's get_delta_weight, pruned ranks, combining.

Tolerances: everything is float32. loramix folds E into A and multiplies by one scale; PEFT multiplies by lora_alpha
and divides by ranknum + 1e-5 afterwards: the same numbers in another order, so ΔW agrees to a few ulps of its
largest entry (entries are O(1) here: random factors). 1e-5 absolute / relative bounds that with room; logits go
through two layers of such sums and get the same bound.
"""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner
from helpers import example_inputs, make_peft_adapter, model_output, read_folder, tiny_llama, write_folder
from peft import AdaLoraConfig, PeftModel, get_peft_model

from loramix import combine, load_adapter, save_adapter
from loramix.cli import main
from loramix.errors import AdapterFormatError
from loramix.formats import peft as peft_format

INIT_R, TARGET_R, ALPHA = 6, 3, 8
TARGETS = ["q_proj", "v_proj", "down_proj"]
PREFIX = "base_model.model."
TOL = {"atol": 1e-5, "rtol": 1e-5}


def _adalora_model(seed: int = 3, **config) -> PeftModel:
    settings = {
        "init_r": INIT_R,
        "target_r": TARGET_R,
        "lora_alpha": ALPHA,
        "target_modules": TARGETS,
        "total_step": 12,
        "tinit": 2,
        "tfinal": 3,
        "deltaT": 1,
        "init_lora_weights": False,  # random A, E, B: every module changes the outputs
        "lora_dropout": 0.0,
        **config,
    }
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return get_peft_model(tiny_llama(), AdaLoraConfig(**settings))


def _svd_layers(model) -> dict[str, torch.nn.Module]:
    """PEFT's LoRA / AdaLoRA layers by loramix module name."""
    return {
        name.removeprefix(PREFIX): module
        for name, module in model.named_modules()
        if hasattr(module, "lora_A") and "default" in module.lora_A
    }


def _peft_deltas(model) -> dict[str, torch.Tensor]:
    with torch.no_grad():
        return {name: layer.get_delta_weight("default") for name, layer in _svd_layers(model).items()}


@pytest.fixture(scope="module")
def allocated(tmp_path_factory):
    """An AdaLoRA adapter trained a few steps with PEFT's rank allocator, which prunes ranks; saved by PEFT."""
    model = _adalora_model()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=1e-2)
    ids = torch.randint(0, 64, (2, 10), generator=torch.Generator().manual_seed(0))
    for step in range(12):
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        model.base_model.update_and_allocate(step)
        optimizer.zero_grad()
    model.eval()
    folder = tmp_path_factory.mktemp("adalora") / "allocated"
    model.save_pretrained(str(folder))
    return folder, model


def _load_with_peft(folder) -> PeftModel:
    return PeftModel.from_pretrained(tiny_llama(), str(folder)).eval()


def _assert_deltas_match(adapter, oracle: dict[str, torch.Tensor]) -> None:
    live = {n for n, d in oracle.items() if d.abs().max() > 0}
    assert set(adapter.modules) == live
    for name in live:
        torch.testing.assert_close(adapter.modules[name].delta(), oracle[name], **TOL)


def test_allocated_adapter_matches_peft_delta_weight(allocated):
    folder, trained = allocated
    adapter = load_adapter(folder)
    config, tensors = read_folder(folder)
    pattern = {k.removesuffix(".lora_E"): v for k, v in config["rank_pattern"].items()}
    # the allocator pruned ranks: each module's rank is its live rank, below init_r somewhere
    assert {n: m.rank for n, m in adapter.modules.items()} == {n: sum(v) for n, v in pattern.items() if any(v)}
    assert min(m.rank for m in adapter.modules.values()) < INIT_R
    assert adapter.warnings == []
    # the oracle twice: the model that trained it, and PEFT's own loading of the saved folder
    _assert_deltas_match(adapter, _peft_deltas(trained))
    _assert_deltas_match(adapter, _peft_deltas(_load_with_peft(folder)))


def test_allocated_adapter_written_as_lora_gives_peft_outputs(allocated, tmp_path):
    folder, _ = allocated
    save_adapter(load_adapter(folder), tmp_path / "as-lora")
    inputs = example_inputs(tiny_llama)
    expected = model_output(_load_with_peft(folder), inputs)
    got = model_output(_load_with_peft(tmp_path / "as-lora"), inputs)
    assert peft_format.read(tmp_path / "as-lora").modules  # a plain LoRA folder now
    torch.testing.assert_close(got, expected, **TOL)


@pytest.mark.parametrize("lora_alpha", [ALPHA, 0])  # 0: PEFT scales by the layer's rank instead
def test_hand_pruned_ranks_are_dropped(tmp_path, lora_alpha):
    model = _adalora_model(lora_alpha=lora_alpha)
    layers = _svd_layers(model)
    names = sorted(layers)
    with torch.no_grad():
        layers[names[0]].lora_E["default"][[1, 3]] = 0  # two ranks pruned
        layers[names[1]].lora_E["default"].zero_()  # every rank pruned: the module changes nothing
    model.save_pretrained(str(tmp_path / "pruned"))
    adapter = load_adapter(tmp_path / "pruned")
    assert adapter.modules[names[0]].rank == INIT_R - 2
    assert names[1] not in adapter.modules
    assert any("no live rank" in w and names[1] in w for w in adapter.warnings)
    assert all(adapter.modules[n].rank == INIT_R for n in names[2:])
    _assert_deltas_match(adapter, _peft_deltas(_load_with_peft(tmp_path / "pruned")))


def test_saved_ranknum_is_used_as_peft_loads_it(allocated, tmp_path):
    folder, _ = allocated
    config, tensors = read_folder(folder)
    name = sorted(load_adapter(folder).modules)[0]
    tensors[f"{PREFIX}{name}.ranknum"] = torch.tensor([2.5])
    write_folder(tmp_path / "ranknum", config, tensors)
    adapter = load_adapter(tmp_path / "ranknum")
    assert adapter.modules[name].scale == pytest.approx(ALPHA / (2.5 + 1e-5))
    _assert_deltas_match(adapter, _peft_deltas(_load_with_peft(tmp_path / "ranknum")))


def test_unsliced_tensors_get_the_rank_pattern_applied(allocated, tmp_path):
    """A file holding all init_r ranks plus a rank_pattern: read as PEFT's own save would have sliced it."""
    folder, trained = allocated
    config, tensors = read_folder(folder)
    name, mask = next((k.removesuffix(".lora_E"), v) for k, v in config["rank_pattern"].items() if 0 < sum(v) < INIT_R)
    layer = _svd_layers(trained)[name]
    for kind in ("lora_A", "lora_E", "lora_B"):
        tensors[f"{PREFIX}{name}.{kind}"] = getattr(layer, kind)["default"].detach().clone()
    write_folder(tmp_path / "unsliced", config, tensors)
    adapter = load_adapter(tmp_path / "unsliced")
    assert adapter.modules[name].rank == sum(mask)
    assert any("applied its rank_pattern" in w for w in adapter.warnings)
    _assert_deltas_match(adapter, _peft_deltas(trained))


def test_combined_with_plain_lora(allocated, tmp_path):
    folder, _ = allocated
    lora = make_peft_adapter(tiny_llama, tmp_path, "lora", target_modules=["q_proj", "k_proj"])
    weights = [0.7, 0.3]
    save_adapter(combine([folder, lora.path], weights=weights), tmp_path / "combined")
    # the oracle: PEFT's ΔW of each adapter added into a fresh base, weighted
    merged = tiny_llama()
    params = dict(merged.named_parameters())
    for w, model in zip(weights, (_load_with_peft(folder), lora.load_with_peft())):
        for name, delta in _peft_deltas(model).items():
            params[f"{name}.weight"].data += w * delta
    inputs = example_inputs(tiny_llama)
    got = model_output(_load_with_peft(tmp_path / "combined"), inputs)
    torch.testing.assert_close(got, model_output(merged, inputs), **TOL)


def test_plain_peft_reader_still_refuses_adalora(allocated):
    folder, _ = allocated
    with pytest.raises(AdapterFormatError, match=r"adapter_config.json: peft_type 'ADALORA' is not supported"):
        peft_format.read(folder)


def _damaged(folder, tmp_path, edit) -> str:
    config, tensors = read_folder(folder)
    edit(config, tensors)
    return str(write_folder(tmp_path / "damaged", config, tensors))


def _first(tensors, kind):
    return next(k for k in sorted(tensors) if k.endswith(kind))


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda c, t: t.pop(_first(t, "lora_E")), "has no lora_E tensor"),
        (lambda c, t: t.update({_first(t, "lora_E"): torch.ones(INIT_R + 3, 1)}), "disagree on the rank"),
        (lambda c, t: t.update({_first(t, "lora_A"): t[_first(t, "lora_A")] * float("nan")}), "NaN/Inf"),
        (lambda c, t: c["rank_pattern"].update({next(iter(c["rank_pattern"])): [True] * 9 + [False]}), "keeps 9"),
        (lambda c, t: c.update(rank_pattern={"x.lora_E": "all"}), "must be a list of booleans"),
        (lambda c, t: t.update({_first(t, "lora_A").replace("lora_A", "ranknum"): torch.ones(3)}), "ranknum has 3"),
    ],
    ids=["no-E", "E-shape", "nan", "pattern-rank", "pattern-type", "ranknum-shape"],
)
def test_damaged_files_are_refused_naming_the_file(allocated, tmp_path, edit, message):
    folder, _ = allocated
    damaged = _damaged(folder, tmp_path, edit)
    with pytest.raises(AdapterFormatError, match=message) as info:
        load_adapter(damaged)
    assert str(tmp_path / "damaged") in str(info.value) and "\n" not in str(info.value)


def test_cli_inspect_reads_adalora(allocated):
    folder, _ = allocated
    result = CliRunner().invoke(main, ["inspect", "--json", str(folder)])
    assert result.exit_code == 0, result.output
    (summary,) = json.loads(result.output)
    assert summary["ranks"] == load_adapter(folder).ranks and summary["num_modules"] == 2 * len(TARGETS)
