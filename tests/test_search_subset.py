"""Module-subset search (`search_subset`, `loramix search --subset`): on a planted task whose examples are the greedy
outputs of the merge with one adapter's module (or layer) left out, every mask is scored by an oracle outside
loramix — transformers' own ``outputs.loss`` on the base with PEFT's ``get_delta_weight`` of each kept module added
to its weight — and the search must find that mask; the loss a search reports for any method equals transformers'
loss of the adapter it writes, loaded by PEFT. Tolerance 1e-4 on mean cross-entropies (float32 forward passes, as
in test_search)."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from click.testing import CliRunner
from helpers import make_peft_adapter
from peft import PeftModel
from test_search import Setup, _peft_loss, char_tokenizer, llama

import loramix
from loramix.cli import main
from loramix.errors import MethodError, SearchError
from loramix.linalg import RankRule
from loramix.schedule import parse
from loramix.weight_search import search_subset
from loramix.weight_search.objective import as_examples, build_batch
from loramix.weight_search.subset import Groups

HARMFUL = "model.layers.0.self_attn.o_proj"
GOOD = ["model.layers.0.self_attn.v_proj", "model.layers.1.self_attn.v_proj"]
MIXED = ["model.layers.0.self_attn.q_proj", HARMFUL, "model.layers.1.self_attn.v_proj"]


class Planted(Setup):
    """A tiny random Llama with a character tokenizer (test_search's), a PEFT adapter on GOOD and one on MIXED
    (lora_alpha 32 at rank 4: updates that matter), and examples: the greedy outputs of their exact sum with MIXED's
    HARMFUL module left out."""

    def __init__(self, root: Path) -> None:
        self.factory, self.seq2seq = llama, False
        self.tokenizer = char_tokenizer(seq2seq=False)
        self.base = root / "base"
        llama().save_pretrained(self.base)
        self.tokenizer.save_pretrained(self.base)
        self.adapters = [
            make_peft_adapter(llama, root, name, seed=seed, r=4, lora_alpha=32, target_modules=targets).path
            for name, seed, targets in (("good", 1, GOOD), ("mixed", 2, MIXED))
        ]
        self.examples = self.planted_examples(self.delta_peft([1.0, {HARMFUL: 0.0, "default": 1.0}], root / "teacher"))


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    return Planted(tmp_path_factory.mktemp("subset"))


def oracle_losses(setup: Setup, groups: list[tuple[int, list[str]]]) -> dict[tuple, float]:
    """transformers' loss of base + Σ kept ΔWᵢ (PEFT's get_delta_weight) for every drop mask over ``groups``
    ((adapter, module names) each)."""
    deltas = []
    for path in setup.adapters:
        peft = PeftModel.from_pretrained(setup.factory(), str(path))
        layers = {n.removeprefix("base_model.model."): m for n, m in peft.named_modules() if hasattr(m, "lora_A")}
        deltas.append({n: m.get_delta_weight("default").detach() for n, m in layers.items()})
    model = setup.factory().eval()
    named = dict(model.named_modules())
    original = {n: named[n].weight.detach().clone() for d in deltas for n in d}
    batch = build_batch(as_examples(setup.examples), setup.tokenizer, encoder_decoder=False)
    losses = {}
    for mask in itertools.product([False, True], repeat=len(groups)):
        with torch.no_grad():
            for n, w in original.items():
                named[n].weight.copy_(w)
            for drop, (i, names) in zip(mask, groups):
                if not drop:
                    for n in names:
                        named[n].weight.add_(deltas[i][n])
            losses[mask] = float(model(**batch).loss)
    return losses


@pytest.fixture(scope="module")
def by_module(planted):
    """The module groups (adapter by adapter, in each adapter's order) and the oracle's loss of every mask."""
    groups = [(i, [n]) for i, path in enumerate(planted.adapters) for n in loramix.load_adapter(path).modules]
    return groups, oracle_losses(planted, groups)


@pytest.mark.parametrize(("optimizer", "steps"), [("cobyla", 12), ("cma", 8), ("adam", 15)])
def test_the_search_drops_the_one_harmful_module(planted, by_module, optimizer, steps):
    groups, oracle = by_module
    keep_all = oracle[(False,) * len(groups)]
    planted_mask = tuple(i == 1 and names == [HARMFUL] for i, names in groups)
    assert min(oracle, key=oracle.get) == planted_mask  # the construction: dropping exactly that one is optimal
    assert keep_all - oracle[planted_mask] > 0.3  # and it matters
    result = search_subset(
        planted.base,
        planted.adapters,
        planted.examples,
        weights=[1.0, 1.0],
        optimizer=optimizer,
        steps=steps,
        seed=0,
        device="cpu",
    )
    assert result.settings["dropped"] == [[], [HARMFUL]]
    assert result.loss == pytest.approx(oracle[planted_mask], abs=1e-4)
    assert result.settings["loss_keeping_all"] == pytest.approx(keep_all, abs=1e-4)
    assert result.weights == [1.0, {HARMFUL: 0.0, "default": 1.0}]


def test_layer_granularity_drops_a_layer_of_one_adapter(planted, tmp_path):
    """Layers group an adapter's modules: 4 groups; the optimum among them is checked against the oracle."""
    names = [GOOD, MIXED]
    groups = [(i, [n for n in names[i] if f"layers.{j}." in n]) for i in range(2) for j in range(2)]
    oracle = oracle_losses(planted, groups)
    best = min(oracle, key=oracle.get)
    result = search_subset(
        planted.base, planted.adapters, planted.examples, weights=[1.0, 1.0], granularity="layer", steps=8
    )
    expected = [[f"layer {j}" for j in range(2) if best[2 * i + j]] for i in range(2)]
    assert result.settings["dropped"] == expected
    assert result.loss == pytest.approx(oracle[best], abs=1e-4)


@pytest.mark.parametrize(("method", "options"), [("ties", {"density": 0.5}), ("regmean", {}), ("lot", {})])
def test_any_method_reports_the_loss_of_the_merge_it_writes(planted, tmp_path, method, options):
    result = search_subset(
        planted.base,
        planted.adapters,
        planted.examples,
        method=method,
        options=options,
        rank_rule=RankRule(rank=6),
        steps=9,
        device="cpu",
    )
    assert result.adapter.provenance["method"] == method
    assert result.loss <= result.settings["loss_keeping_all"]
    loramix.save_adapter(result.adapter, tmp_path / "written")
    written = PeftModel.from_pretrained(planted.factory(), str(tmp_path / "written")).eval()
    assert _peft_loss(planted, written, planted.examples) == pytest.approx(result.loss, abs=1e-4)


def test_the_entropy_objective_scores_the_written_merge(planted, tmp_path):
    """AdaMerging's unlabeled objective in a subset search (CMA-ES): the loss reported is the mean entropy (float64,
    from PEFT's logits of the adapter written) of the next-token distribution at the output positions (1e-4)."""
    result = search_subset(
        planted.base, planted.adapters, planted.examples, optimizer="cma", objective="entropy", steps=2, device="cpu"
    )
    assert result.settings["objective"] == "entropy"
    loramix.save_adapter(result.adapter, tmp_path / "written")
    model = PeftModel.from_pretrained(planted.factory(), str(tmp_path / "written")).eval()
    batch = build_batch(as_examples(planted.examples), planted.tokenizer, encoder_decoder=False)
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.double()
    scored = batch["labels"][:, 1:] != -100
    expected = torch.distributions.Categorical(logits=logits[:, :-1]).entropy()[scored].mean()
    assert result.loss == pytest.approx(float(expected), rel=1e-4)


def test_a_dropped_name_inside_another_leaves_that_one_alone():
    """Filters match substrings: a module named like a dropped one plus more keeps its weight."""

    class Fake:
        def __init__(self, names):
            self.modules = dict.fromkeys(names)

    adapters = [Fake(["m.layers.1.fc1", "m.layers.1.fc10", "m.layers.1.fc1x.q"]), Fake(["m.layers.1.fc1"])]
    groups = Groups.of(adapters, "module")
    mask = np.array([True, False, False, False])
    forms = groups.weights(mask, [0.7, 0.2])
    values = {n: parse(forms[0]).at(n, 2) for n in groups.names}
    assert values == {"m.layers.1.fc1": 0.0, "m.layers.1.fc10": 0.7, "m.layers.1.fc1x.q": 0.7}
    assert forms[1] == 0.2


@pytest.mark.parametrize("merge", [["-m", "cat"], ["-m", "ties", "--option", "density=0.5", "--rank", "4"]])
def test_the_cli_writes_a_recipe_that_repeats_the_merge(planted, tmp_path, merge):
    jsonl = tmp_path / "examples.jsonl"
    jsonl.write_text("".join(json.dumps(e) + "\n" for e in planted.examples))
    out = tmp_path / "out"
    args = ["search", *map(str, planted.adapters), "--base", str(planted.base), "--examples", str(jsonl)]
    args += ["--subset", "module", *merge, "-w", "1,1", "--steps", "12", "--device", "cpu", "-o", str(out)]
    done = CliRunner().invoke(main, args)
    assert done.exit_code == 0, done.output
    assert f"{merge[1]} merge" in done.output and "keeping all" in done.output
    recipe = yaml.safe_load((out / "loramix_recipe.yaml").read_text())
    assert recipe["method"] == merge[1]
    if merge[1] == "cat":
        assert f"dropped {HARMFUL} of" in done.output
        assert recipe["adapters"][1]["weight"] == {HARMFUL: 0.0, "default": 1.0}
    else:
        assert recipe["rank"] == 4 and recipe["options"]["density"] == 0.5
    again = CliRunner().invoke(
        main, ["combine", "--recipe", str(out / "loramix_recipe.yaml"), "-o", str(tmp_path / "r")]
    )
    assert again.exit_code == 0, again.output
    first, second = loramix.load_adapter(out), loramix.load_adapter(tmp_path / "r")
    for name, module in first.modules.items():
        torch.testing.assert_close(second.modules[name].delta(), module.delta(), rtol=0, atol=0)


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--subset", "module", "--l1", "0.1"], "--l1 does not apply with --subset"),
        (["--subset", "module", "--composition", "delta"], "--composition does not apply with --subset"),
        (["-m", "ties"], "-m/--method applies only with --subset"),
        (["--rank", "4"], "--rank applies only with --subset"),
    ],
)
def test_flags_that_do_not_apply_are_refused(planted, tmp_path, flags, message):
    args = ["search", *map(str, planted.adapters), "--base", str(planted.base), "--examples", "x.jsonl"]
    done = CliRunner().invoke(main, [*args, *flags, "-o", str(tmp_path / "o")])
    assert done.exit_code == 2 and message in done.output, done.output


def test_library_refusals_are_one_line(planted):
    with pytest.raises(SearchError, match="granularity") as info:
        search_subset(planted.base, planted.adapters, planted.examples, granularity="row")
    assert "\n" not in str(info.value)
    with pytest.raises(SearchError, match="one number per adapter"):
        search_subset(planted.base, planted.adapters, planted.examples, weights=[[0, 1], 1.0])
    with pytest.raises(MethodError, match="does not truncate"):  # the method's own refusal, before any loading
        search_subset("no-such-base", planted.adapters, planted.examples, method="cat", rank_rule=RankRule(rank=4))


def test_help_describes_the_subset_mode():
    text = CliRunner().invoke(main, ["search", "--help"]).output
    assert "--subset [module|layer]" in text and "LwPTV" in text
