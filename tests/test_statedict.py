"""Plain LoRA state dicts from hand-written LoRA layers (MiniMind-style), checked against the hand-made model.

A tiny Llama gets hand-written LoRA layers next to its Linear layers (monkey-patched forwards, as MiniMind does),
trains them a few steps, and saves the LoRA state dict with torch.save and with safetensors. loramix reads it,
combines it and writes a PEFT adapter; PeftModel.from_pretrained on the same base must give the hand-made model's
logits. Tolerance: float32 throughout, the same products summed in another order (PEFT's lora_B(lora_A(x)) vs
the hand-made layers, SVD re-factorisation for svd): a few ulps of O(1) logits, bounded by 1e-5.
"""

from __future__ import annotations

import json
import os

import pytest
import torch
import yaml
from click.testing import CliRunner
from helpers import example_inputs, make_peft_adapter, model_output, tiny_llama
from peft import PeftModel
from safetensors.torch import save_file
from torch import nn

from loramix import combine, load_adapter, save_adapter
from loramix.cli import main
from loramix.errors import AdapterFormatError

TOL = {"atol": 1e-5, "rtol": 1e-5}
RANK = 4
TARGETS = ("q_proj", "v_proj", "down_proj")
STYLES = ("lora.A/lora.B", "lora_A/lora_B", "x@A@B", "lora_down/lora_up")


class TwoLinearLoRA(nn.Module):
    """MiniMind's LoRA module: two Linears, saved as ``<module>.lora.A.weight`` / ``<module>.lora.B.weight``."""

    def __init__(self, inp: int, out: int, rank: int) -> None:
        super().__init__()
        self.A = nn.Linear(inp, rank, bias=False)
        self.B = nn.Linear(rank, out, bias=False)
        nn.init.zeros_(self.B.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.B(self.A(x))


def _attach(linear: nn.Linear, style: str) -> None:
    """Give ``linear`` a hand-written LoRA branch in ``style``; returns nothing, patches its forward."""
    inp, out = linear.in_features, linear.out_features
    if style == "lora.A/lora.B":
        linear.lora = TwoLinearLoRA(inp, out, RANK)
        branch = linear.lora
    elif style == "lora_A/lora_B":  # loralib: bare parameters, A rank×in, B out×rank
        linear.lora_A = nn.Parameter(0.1 * torch.randn(RANK, inp))
        linear.lora_B = nn.Parameter(torch.zeros(out, RANK))
        branch = lambda x: x @ linear.lora_A.T @ linear.lora_B.T  # noqa: E731
    elif style == "x@A@B":  # bare parameters the other way round: A in×rank, B rank×out
        linear.lora_A = nn.Parameter(0.1 * torch.randn(inp, RANK))
        linear.lora_B = nn.Parameter(torch.zeros(RANK, out))
        branch = lambda x: x @ linear.lora_A @ linear.lora_B  # noqa: E731
    else:  # lora_down / lora_up Linears, both with biases (folded into one output bias)
        linear.lora_down = nn.Linear(inp, RANK, bias=True)
        linear.lora_up = nn.Linear(RANK, out, bias=True)
        nn.init.zeros_(linear.lora_up.weight)
        branch = lambda x: linear.lora_up(linear.lora_down(x))  # noqa: E731
    original = linear.forward
    linear.forward = lambda x: original(x) + linear.lora_scale * branch(x)


def hand_made(model: nn.Module, style: str, scale: float, *, steps: int = 5) -> nn.Module:
    """Inject hand-written LoRA layers into ``model``'s targeted Linears and train them ``steps`` steps."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(7)
        return _inject_and_train(model, style, scale, steps)


def _inject_and_train(model: nn.Module, style: str, scale: float, steps: int) -> nn.Module:
    for param in model.parameters():
        param.requires_grad_(False)
    for name, module in list(model.named_modules()):
        if isinstance(module, nn.Linear) and name.rsplit(".", 1)[-1] in TARGETS + ("wq", "wv", "w2"):
            _attach(module, style)
            module.lora_scale = scale
    lora = [p for n, p in model.named_parameters() if "lora" in n]
    optimizer = torch.optim.Adam(lora, lr=1e-2)
    ids = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(1))
    model.train()
    for _ in range(steps):
        logits = model(ids) if not hasattr(model, "config") else model(input_ids=ids).logits
        loss = nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return model.eval()


def lora_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """MiniMind's save_lora: every LoRA tensor by its full name."""
    return {k: v.detach().clone().contiguous() for k, v in model.state_dict().items() if "lora" in k}


def save_both_ways(state: dict[str, torch.Tensor], folder, stem: str = "lora"):
    folder.mkdir(parents=True, exist_ok=True)
    torch.save(state, folder / f"{stem}.pt")
    save_file(state, str(folder / f"{stem}.safetensors"))
    return folder / f"{stem}.pt", folder / f"{stem}.safetensors"


def peft_output(folder) -> torch.Tensor:
    return model_output(PeftModel.from_pretrained(tiny_llama(), str(folder)).eval(), example_inputs(tiny_llama))


@pytest.mark.parametrize("style", STYLES)
def test_hand_made_lora_round_trips_through_peft(tmp_path, style):
    model = hand_made(tiny_llama(), style, scale=2.0)
    expected = model_output(model, example_inputs(tiny_llama))
    assert not torch.allclose(expected, model_output(tiny_llama(), example_inputs(tiny_llama)), atol=1e-3)
    pt, st = save_both_ways(lora_state(model), tmp_path)
    from_pt, from_st = load_adapter(pt, scale=2.0), load_adapter(st, scale=2.0)
    assert sorted(from_pt.modules) == sorted(from_st.modules)
    assert len(from_pt.modules) == len(TARGETS) * 2 and from_pt.ranks == [RANK]
    for name, m in from_pt.modules.items():
        torch.testing.assert_close(m.delta(), from_st.modules[name].delta(), rtol=0, atol=0)
    assert ("read transposed" in " ".join(from_pt.warnings)) == (style == "x@A@B")
    for source, method in ((pt, "cat"), (st, "svd")):
        save_adapter(combine([source], weights=[1.0], method=method, load_options={"scale": 2.0}), tmp_path / method)
        torch.testing.assert_close(peft_output(tmp_path / method), expected, **TOL)


def test_alpha_gives_scale_alpha_over_rank(tmp_path):
    model = hand_made(tiny_llama(), "lora.A/lora.B", scale=16 / RANK)
    _, st = save_both_ways(lora_state(model), tmp_path)
    adapter = load_adapter(st, alpha=16, base_model="tiny-llama")
    assert {m.scale for m in adapter.modules.values()} == {16 / RANK} and adapter.base_model == "tiny-llama"
    assert not any("scale" in w for w in adapter.warnings)
    save_adapter(adapter, tmp_path / "out")
    torch.testing.assert_close(peft_output(tmp_path / "out"), model_output(model, example_inputs(tiny_llama)), **TOL)


class MetaNames(nn.Module):
    """A hand-written model that names the Llama's layers as Meta's reference code does (layers.0.attention.wq).

    It shares the Linear modules of a transformers Llama and runs it, so LoRA layers injected through this view get
    Meta names while the base checkpoint has transformers names.
    """

    def __init__(self, llama: nn.Module) -> None:
        super().__init__()
        self.layers = nn.ModuleList(
            nn.ModuleDict(
                {
                    "attention": nn.ModuleDict({"wq": layer.self_attn.q_proj, "wv": layer.self_attn.v_proj}),
                    "feed_forward": nn.ModuleDict({"w2": layer.mlp.down_proj}),
                }
            )
            for layer in llama.model.layers
        )
        self._llama = [llama]  # not a submodule: its names must not show up

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self._llama[0](input_ids=ids).logits


MODULE_MAP = {
    r"^layers\.(\d+)\.": r"model.layers.\1.",
    r"\.attention\.w([qv])$": r".self_attn.\1_proj",
    r"\.feed_forward\.w2$": ".mlp.down_proj",
}


@pytest.fixture
def meta_named(tmp_path):
    """A Meta-named hand-made LoRA saved as .pt, its module map as YAML, and the model."""
    model = hand_made(MetaNames(tiny_llama()), "lora.A/lora.B", scale=0.5)
    state = lora_state(model)
    assert sorted(state)[0] == "layers.0.attention.wq.lora.A.weight"
    pt, _ = save_both_ways(state, tmp_path / "meta")
    (tmp_path / "map.yaml").write_text(yaml.safe_dump(MODULE_MAP))
    return pt, tmp_path / "map.yaml", model


def meta_output(model: MetaNames) -> torch.Tensor:
    with torch.no_grad():
        return model(example_inputs(tiny_llama)["input_ids"])


def test_module_map_renames_to_base_names(tmp_path, meta_named):
    pt, map_file, model = meta_named
    expected = meta_output(model)
    adapter = load_adapter(pt, scale=0.5, module_map=map_file)
    assert "model.layers.1.self_attn.v_proj" in adapter.modules and not adapter.warnings
    save_adapter(adapter, tmp_path / "out")
    torch.testing.assert_close(peft_output(tmp_path / "out"), expected, **TOL)
    assert load_adapter(pt, scale=0.5, module_map=MODULE_MAP).modules.keys() == adapter.modules.keys()


def test_cli_combine_with_a_peft_lora_and_module_map(tmp_path, meta_named):
    pt, map_file, model = meta_named
    peft_lora = make_peft_adapter(tiny_llama, tmp_path, "peft", target_modules=["q_proj", "k_proj"])
    args = ["combine", str(pt), str(peft_lora.path), "-w", "1,1", "-m", "cat", "-o", str(tmp_path / "out")]
    result = CliRunner().invoke(main, [*args, "--scale", "0.5", "--module-map", str(map_file)])
    assert result.exit_code == 0, result.output
    assert "scale, module_map apply to plain state dicts only" in result.output  # said of the PEFT folder
    # the oracle: the hand-made model with the PEFT adapter's own ΔW added to the (shared) base weights
    params = dict(model._llama[0].named_parameters())
    for name, module in peft_lora.peft_model.named_modules():
        if hasattr(module, "lora_A") and "default" in module.lora_A:
            params[f"{name.removeprefix('base_model.model.')}.weight"].data += module.get_delta_weight("default")
    torch.testing.assert_close(peft_output(tmp_path / "out"), meta_output(model), **TOL)


def test_recipe_fields(tmp_path, meta_named):
    pt, map_file, model = meta_named
    recipe = {
        "adapters": [{"source": f"meta/{pt.name}", "weight": 1.0}],
        "method": "cat",
        "scale": 0.5,
        "base_model": "tiny-llama",
        "module_map": map_file.name,  # relative to the recipe
    }
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    result = CliRunner().invoke(main, ["combine", "--recipe", str(tmp_path / "recipe.yaml"), "-o", str(tmp_path / "o")])
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "o" / "adapter_config.json").read_text())["base_model_name_or_path"] == "tiny-llama"
    torch.testing.assert_close(peft_output(tmp_path / "o"), meta_output(model), **TOL)


@pytest.fixture
def simple_file(tmp_path):
    gen = torch.Generator().manual_seed(0)
    state = {
        "layers.0.wq.lora.A.weight": torch.randn(2, 6, generator=gen),
        "layers.0.wq.lora.B.weight": torch.randn(5, 2, generator=gen),
    }
    return save_both_ways(state, tmp_path / "simple")[1], state


def test_without_scale_it_is_one_and_said_once(simple_file):
    path, state = simple_file
    adapter = load_adapter(path)
    (module,) = adapter.modules.values()
    assert module.scale == 1.0
    torch.testing.assert_close(module.delta(), state["layers.0.wq.lora.B.weight"] @ state["layers.0.wq.lora.A.weight"])
    assert sum("no scale" in w for w in adapter.warnings) == 1
    result = CliRunner().invoke(main, ["inspect", str(path)])
    assert result.exit_code == 0 and result.output.count("using scale 1") == 1, result.output


def test_cli_inspect_takes_the_options(simple_file, tmp_path):
    path, _ = simple_file
    result = CliRunner().invoke(main, ["inspect", "--json", str(path), "--alpha", "4", "--base-model", "org/base"])
    assert result.exit_code == 0, result.output
    (summary,) = json.loads(result.output)
    assert summary["scales"] == [2.0] and summary["base_model"] == "org/base" and summary["warnings"] == []


def test_wrapper_prefixes_and_other_tensors(tmp_path):
    """A whole model's state dict from a DDP-wrapped model: prefix removed, base weights dropped with a warning."""
    model = hand_made(tiny_llama(), "lora_A/lora_B", scale=1.0, steps=1)
    state = {f"module.{k}": v for k, v in model.state_dict().items()}
    torch.save(state, tmp_path / "full.pth")
    adapter = load_adapter(tmp_path / "full.pth")
    assert len(adapter.modules) == len(TARGETS) * 2
    assert any("'module.'" in w for w in adapter.warnings)
    assert any(w.startswith("dropped") and "not LoRA factors" in w for w in adapter.warnings)


def test_options_on_a_peft_folder_are_ignored_with_a_warning(tmp_path):
    made = make_peft_adapter(tiny_llama, tmp_path, "peft", target_modules=["q_proj"])
    plain = load_adapter(made.path)
    adapter = load_adapter(made.path / "adapter_model.safetensors", alpha=3.0, base_model="org/base")
    assert adapter.base_model == "org/base"  # the folder names none: filled in
    assert {m.scale for m in adapter.modules.values()} == {m.scale for m in plain.modules.values()}
    assert any("alpha apply to plain state dicts only" in w for w in adapter.warnings)


def _write(tmp_path, state, name="bad.safetensors"):
    save_file({k: v.clone() for k, v in state.items()}, str(tmp_path / name))
    return tmp_path / name


A, B = torch.ones(2, 6), torch.ones(5, 2)


@pytest.mark.parametrize(
    ("state", "options", "message"),
    [
        ({"x.weight": A}, {}, "no LoRA pairs found"),
        ({"x.lora.A.weight": A}, {}, "module x has a LoRA A factor but no B factor"),
        ({"x.lora_A": A, "x.lora_B": torch.ones(5, 3)}, {}, "disagree on the rank"),
        ({"x.lora_down.weight": A, "x.lora_up.weight": B, "x.alpha": torch.tensor(4.0)}, {}, "kohya"),
        ({"x.lora.A.weight": A, "x.lora.B.weight": B * float("inf")}, {}, "NaN/Inf"),
        ({"x.lora.A.weight": A, "x.lora.B.weight": B}, {"scale": 2.0, "alpha": 4.0}, "scale or alpha, not both"),
        ({"x.lora.A.weight": A, "x.lora.B.weight": B}, {"scale": float("nan")}, "finite"),
        ({"x.lora.A.weight": A, "x.lora.B.weight": B, "y.lora.A.weight": A, "y.lora.B.weight": B},
         {"module_map": {"^[xy]$": "z"}}, "renames both x and y to z"),
        ({"x.lora.A.weight": A, "x.lora.B.weight": B}, {"module_map": {"(": "z"}}, "not a valid regex"),
        ({"x.lora.A.weight": A, "x.lora.B.weight": B}, {"module_map": {"x": r"\3"}}, "bad replacement"),
        ({"x.lora.A.weight": A, "x.lora.B.weight": B}, {"module_map": ["x"]}, "non-empty mapping"),
    ],
    ids=["no-pairs", "unpaired", "rank", "kohya-alpha", "inf", "both", "nan-scale", "collide",
         "regex", "group", "map-type"],
)  # fmt: skip
def test_bad_inputs_are_refused_in_one_line(tmp_path, state, options, message):
    path = _write(tmp_path, state)
    with pytest.raises(AdapterFormatError, match=message) as info:
        load_adapter(path, **options)
    text = str(info.value)
    assert "\n" not in text and (str(path) in text or "module map" in text)


def test_unsafe_or_foreign_files_are_refused(tmp_path):
    torch.save({"x.lora_A": A, "meta": {"epoch": 3}}, tmp_path / "mixed.pt")
    with pytest.raises(AdapterFormatError, match="mixed.pt: expected a flat mapping"):
        load_adapter(tmp_path / "mixed.pt")
    torch.save(nn.Linear(2, 2), tmp_path / "module.pt")  # a pickled object: weights_only refuses it
    with pytest.raises(AdapterFormatError, match="module.pt: not a readable tensor file"):
        load_adapter(tmp_path / "module.pt")
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(AdapterFormatError, match="notes.txt: not a recognised adapter"):
        load_adapter(tmp_path / "notes.txt")


def test_module_map_file_errors(tmp_path, simple_file):
    path, _ = simple_file
    (tmp_path / "map.yaml").write_text("{unclosed")
    for value, message in ((tmp_path / "map.yaml", "map.yaml: not a readable"), (tmp_path / "no.yaml", "no such")):
        with pytest.raises(AdapterFormatError, match=message):
            load_adapter(path, module_map=value)


def test_per_source_options(simple_file, tmp_path):
    """``SOURCE::key=value`` gives one source its own load options, over those given for every source."""
    path, state = simple_file
    product = state["layers.0.wq.lora.B.weight"] @ state["layers.0.wq.lora.A.weight"]
    own = load_adapter(f"{path}::alpha=4,base_model=org/base")
    (module,) = own.modules.values()
    assert module.scale == 2.0 and own.base_model == "org/base" and own.warnings == [] and own.source == str(path)
    (module,) = load_adapter(f"{path}::scale=3", scale=0.5).modules.values()
    assert module.scale == 3.0
    for spec, message in (("rank=3", "KEY one of scale, alpha, base_model, module_map"), ("scale=x", "a number")):
        with pytest.raises(AdapterFormatError, match=message):
            load_adapter(f"{path}::{spec}")
    out = tmp_path / "mix"
    args = ["-q", "combine", f"{path}::scale=2", f"{path}::scale=0.5", "-m", "cat", "-w", "1,1", "-o", str(out)]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    (module,) = load_adapter(out).modules.values()
    torch.testing.assert_close(module.delta(), 2.5 * product)
    recipe = yaml.safe_load((out / "loramix_recipe.yaml").read_text())
    relative = os.path.relpath(path.resolve(), out.resolve())  # recipes travel with their output folder
    assert [a["source"] for a in recipe["adapters"]] == [f"{relative}::scale=2", f"{relative}::scale=0.5"]
    result = CliRunner().invoke(main, [*args[:-1], str(path.parent), "--force"])  # never over an input
    assert result.exit_code == 2 and path.is_file(), result.output
    result = CliRunner().invoke(main, ["-q", "analyze", f"{path}::scale=2", "--json", "-"])
    doubled = json.loads(result.output)
    result = CliRunner().invoke(main, ["-q", "analyze", str(path), "--scale", "2", "--json", "-"])
    assert result.exit_code == 0 and json.loads(result.output)["adapters"] == doubled["adapters"]
    result = CliRunner().invoke(main, ["-q", "analyze", str(path), "--json", "-"])
    assert json.loads(result.output)["adapters"] != doubled["adapters"]
