"""combine: cat / svd / linear against PEFT (add_weighted_adapter, from_pretrained) and float64 dense maths.

Tolerances: the inputs are float32 factors; loramix and the references sum the same products in different
orders (and loramix re-factorises in float64), so results agree to a few float32 ulps of the largest entries:
1e-5 relative Frobenius error is the issue's bound and leaves an order of magnitude of margin.
"""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner
from helpers import make_peft_adapter, tiny_gpt2, tiny_llama

import loramix
from loramix import save_adapter
from loramix.adapter import portable_rank
from loramix.cli import main
from loramix.errors import IncompatibleAdaptersError, MethodError, OutputError

REL = 1e-5
WEIGHTS = [0.6, -0.3, 0.45]  # one negative: subtraction must work too


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def peft_deltas(peft_model, adapter: str = "default") -> dict[str, torch.Tensor]:
    """ΔW of every module as PEFT computes it (get_delta_weight), keyed by the base model's module name."""
    out = {}
    for name, module in peft_model.named_modules():
        if hasattr(module, "lora_A") and (
            adapter in module.lora_A or adapter in getattr(module, "lora_embedding_A", {})
        ):
            out[name.removeprefix("base_model.model.")] = module.get_delta_weight(adapter).detach().double()
    return out


def weighted_sum(deltas: list[dict[str, torch.Tensor]], weights: list[float]) -> dict[str, torch.Tensor]:
    names = {n for d in deltas for n in d}
    return {n: sum(w * d[n] for d, w in zip(deltas, weights) if n in d) for n in names}


@pytest.fixture(scope="module")
def trio(tmp_path_factory):
    """Three PEFT adapters on one tiny Llama: different ranks, alphas, rsLoRA, patterns and target sets."""
    root = tmp_path_factory.mktemp("trio")
    return [
        make_peft_adapter(tiny_llama, root, "a", seed=1, r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
        make_peft_adapter(
            tiny_llama,
            root,
            "b",
            seed=2,
            r=8,
            lora_alpha=16,
            use_rslora=True,
            target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
        ),
        make_peft_adapter(
            tiny_llama,
            root,
            "c",
            seed=3,
            r=6,
            lora_alpha=12,
            target_modules=["v_proj", "o_proj", "up_proj"],
            rank_pattern={"up_proj": 2},
            alpha_pattern={"o_proj": 3},
        ),
    ]


@pytest.fixture(scope="module")
def expected(trio):
    return weighted_sum([peft_deltas(t.peft_model) for t in trio], WEIGHTS)


@pytest.mark.parametrize("method", ["cat", "svd"])
def test_exact_methods_equal_the_weighted_sum_through_peft(trio, expected, method, tmp_path):
    """Written, then read back by PeftModel.from_pretrained: every module's ΔW equals Σ wᵢ·ΔWᵢ."""
    merged = loramix.combine([t.path for t in trio], weights=WEIGHTS, method=method)
    save_adapter(merged, tmp_path / "out")
    loaded = peft_deltas(trio[0].load_with_peft(tmp_path / "out"))
    assert set(loaded) == set(expected)
    for name, delta in expected.items():
        assert rel(loaded[name], delta) < REL, name
    if method == "cat":  # rank Σ rᵢ over the adapters that hold the module; written zero-padded to one rank (by
        # design: the portable layout), or with rank_pattern in the exact layout
        config = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
        v_proj = "model.layers.0.self_attn.v_proj"
        assert merged.modules[v_proj].rank == 4 + 8 + 6
        assert config["r"] == config["lora_alpha"] == 32 and "rank_pattern" not in config
        save_adapter(merged, tmp_path / "exact", rank_layout="exact")
        config = json.loads((tmp_path / "exact" / "adapter_config.json").read_text())
        assert config["rank_pattern"].get(v_proj, config["r"]) == 18


def test_truncated_svd_is_the_dense_float64_eckart_young_optimum(trio, expected):
    merged = loramix.combine([t.path for t in trio], weights=WEIGHTS, method="svd", rank_rule=loramix.RankRule(rank=3))
    for name, total in expected.items():
        U, S, Vh = torch.linalg.svd(total, full_matrices=False)
        best = (U[:, :3] * S[:3]) @ Vh[:3]
        # the reference comes from float32 ΔWs: singular values below ~1e-6·σ₁ are its rounding noise
        assert merged.modules[name].rank == min(3, int((S > S[0] * 1e-6).sum()))
        assert rel(merged.modules[name].delta(), best) < REL, name


def test_energy_keeps_the_smallest_rank_holding_that_share(trio, expected):
    merged = loramix.combine(
        [t.path for t in trio],
        weights=WEIGHTS,
        method="svd",
        rank_rule=loramix.RankRule(energy=0.9),
        rank_layout="exact",
    )
    portable = loramix.combine(
        [t.path for t in trio], weights=WEIGHTS, method="svd", rank_rule=loramix.RankRule(energy=0.9)
    )
    chosen = {}
    for name, total in expected.items():
        share = torch.linalg.svdvals(total).square().cumsum(0) / total.square().sum()
        k = int((share < 0.9).sum()) + 1
        assert merged.modules[name].rank == k, name
        chosen[name] = k
    # the default portable layout keeps each module's best approximation at the one rank R the file will have
    rank = portable_rank(chosen.values())
    for name, total in expected.items():
        U, S, Vh = torch.linalg.svd(total, full_matrices=False)
        keep = min(rank, int((S > S[0] * 1e-6).sum()))
        assert portable.modules[name].rank == keep, name
        assert rel(portable.modules[name].delta(), (U[:, :keep] * S[:keep]) @ Vh[:keep]) < REL, name


@pytest.mark.parametrize("rule,value", [("sv_ratio", 4.0), ("sv_fro", 0.9), ("sv_cumulative", 0.8)])
def test_kohya_rules(trio, expected, rule, value):
    """The documented semantics, checked against the dense spectrum."""
    merged = loramix.combine(
        [t.path for t in trio],
        weights=WEIGHTS,
        method="svd",
        rank_rule=loramix.RankRule(rule=rule, rule_value=value),
        rank_layout="exact",
    )
    for name, total in expected.items():
        S = torch.linalg.svdvals(total)
        S = S[S > S[0] * 1e-6]  # float32 rounding noise of the reference is not rank
        if rule == "sv_ratio":
            k = int((S > S[0] / value).sum())
        elif rule == "sv_fro":
            k = int((S.square().cumsum(0) / S.square().sum() < value**2).sum()) + 1
        else:
            k = int((S.cumsum(0) / S.sum() < value).sum()) + 1
        assert merged.modules[name].rank == max(k, 1), name


def _peft_with_all(trio):
    model = trio[0].load_with_peft()
    for i, t in enumerate(trio[1:], start=1):
        model.load_adapter(str(t.path), adapter_name=f"x{i}")
    return model, ["default", "x1", "x2"]


@pytest.fixture(scope="module")
def plain_trio(tmp_path_factory):
    """Adapters PEFT's add_weighted_adapter handles correctly: no rsLoRA (PEFT copies adapters[0]'s flag)."""
    root = tmp_path_factory.mktemp("plain")
    return [
        make_peft_adapter(tiny_llama, root, "p", seed=4, r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
        make_peft_adapter(tiny_llama, root, "q", seed=5, r=8, lora_alpha=32, target_modules=["q_proj", "o_proj"]),
        make_peft_adapter(tiny_llama, root, "s", seed=6, r=4, lora_alpha=4, target_modules=["q_proj", "v_proj"]),
    ]


@pytest.mark.parametrize("method", ["cat", "svd"])
def test_equals_peft_add_weighted_adapter(plain_trio, method):
    model, names = _peft_with_all(plain_trio)
    kwargs = {"svd_rank": 16, "svd_full_matrices": False} if method == "svd" else {}
    model.add_weighted_adapter(names, WEIGHTS, "merged", combination_type=method, **kwargs)
    theirs = peft_deltas(model, "merged")
    ours = loramix.combine([t.path for t in plain_trio], weights=WEIGHTS, method=method)
    for name, delta in theirs.items():
        assert rel(ours.modules[name].delta(), delta) < REL, name


def test_linear_equals_peft_linear_and_is_inexact(tmp_path):
    adapters = [
        make_peft_adapter(tiny_llama, tmp_path, n, seed=s, r=4, lora_alpha=a, target_modules=["q_proj", "v_proj"])
        for n, s, a in (("l1", 7, 8), ("l2", 8, 16))
    ]
    model, _ = _peft_with_all(adapters + [adapters[0]])
    model.add_weighted_adapter(["default", "x1"], [0.7, -0.4], "mixed", combination_type="linear")
    theirs = peft_deltas(model, "mixed")
    ours = loramix.combine([a.path for a in adapters], weights=[0.7, -0.4], method="linear")
    exact = weighted_sum([peft_deltas(a.peft_model) for a in adapters], [0.7, -0.4])
    for name, delta in theirs.items():
        assert rel(ours.modules[name].delta(), delta) < REL, name
        assert rel(ours.modules[name].delta(), exact[name]) > 0.1, name  # the cross terms are not small


def test_linear_refuses_unequal_ranks(trio):
    with pytest.raises(IncompatibleAdaptersError, match="equal ranks"):
        loramix.combine([t.path for t in trio], weights=WEIGHTS, method="linear")


def test_rslora_scale_is_right_where_peft_is_wrong(trio):
    """PEFT's add_weighted_adapter copies use_rslora from the first adapter; loramix writes scale 1 explicitly."""
    merged = loramix.combine([trio[1].path], weights=[1.0], method="cat")
    reference = peft_deltas(trio[1].peft_model)
    for name, delta in reference.items():
        assert rel(merged.modules[name].delta(), delta) < REL
    model = trio[1].load_with_peft()
    model.add_weighted_adapter(["default"], [1.0], "m", combination_type="cat")
    wrong = peft_deltas(model, "m")
    name = next(iter(reference))
    assert rel(wrong[name], reference[name]) > 0.5  # scaled by √r instead of 1


def test_lora_bias_combines_exactly(tmp_path):
    adapters = [
        make_peft_adapter(tiny_gpt2, tmp_path, n, seed=s, r=4, lora_alpha=a, target_modules=["c_attn"], lora_bias=True)
        for n, s, a in (("b1", 9, 8), ("b2", 10, 4))
    ]
    merged = loramix.combine([a.path for a in adapters], weights=[0.5, 2.0], method="cat")
    save_adapter(merged, tmp_path / "out")
    loaded = adapters[0].load_with_peft(tmp_path / "out")
    for name, module in loaded.named_modules():
        if hasattr(module, "lora_B") and "default" in module.lora_B:
            expected = sum(
                w
                * dict(a.peft_model.named_modules())[name].lora_B["default"].bias
                * a.peft_model.peft_config["default"].lora_alpha
                / 4
                for a, w in zip(adapters, [0.5, 2.0])
            )
            got = module.lora_B["default"].bias * module.scaling["default"]
            assert rel(got.detach(), expected.detach()) < REL, name


def test_heads_carried_refused_averaged_or_dropped(tmp_path):
    from helpers import tiny_bert_seqcls

    heads = [
        make_peft_adapter(tiny_bert_seqcls, tmp_path, n, seed=s, target_modules=["query", "value"], task_type="SEQ_CLS")
        for n, s in (("h1", 11), ("h2", 12))
    ]
    plain = make_peft_adapter(tiny_bert_seqcls, tmp_path, "h0", seed=13, target_modules=["query"])
    carried = loramix.combine([heads[0].path, plain.path], weights=[1.0, 1.0], method="cat")
    first = loramix.load_adapter(heads[0].path)
    assert carried.extra.keys() == first.extra.keys()
    for name, item in first.extra.items():
        assert torch.equal(carried.extra[name].tensor, item.tensor)
    with pytest.raises(IncompatibleAdaptersError, match=r"leave them out .* or average them .*\(pass heads='drop'\)"):
        loramix.combine([h.path for h in heads], weights=[1.0, 1.0], method="cat")
    result = CliRunner().invoke(
        main, ["combine", *(str(h.path) for h in heads), "-m", "cat", "-o", str(tmp_path / "x")]
    )
    assert result.exit_code == 2 and "(pass --heads drop)" in result.output  # the advice is a flag that exists
    dropped = loramix.combine([h.path for h in heads], weights=[1.0, 1.0], method="cat", heads="drop")
    assert not dropped.extra and dropped.modules.keys() == first.modules.keys()
    averaged = loramix.combine([h.path for h in heads], weights=[3.0, 1.0], method="cat", heads="average")
    second = loramix.load_adapter(heads[1].path)
    for name in first.extra:
        mean = (3 * first.extra[name].tensor + second.extra[name].tensor) / 4
        assert torch.allclose(averaged.extra[name].tensor, mean, rtol=1e-6, atol=1e-7)


def test_dora_is_refused_with_a_pointer_to_merge_into(tmp_path):
    dora = make_peft_adapter(tiny_llama, tmp_path, "dora", target_modules=["q_proj"], use_dora=True)
    with pytest.raises(IncompatibleAdaptersError, match="merge_into"):
        loramix.combine([dora.path], weights=[1.0])


def test_base_model_checks(tmp_path):
    a = make_peft_adapter(
        tiny_llama, tmp_path, "x", seed=1, target_modules=["q_proj"], base_model_name_or_path="org/llama-a"
    )
    b = make_peft_adapter(
        tiny_llama, tmp_path, "y", seed=2, target_modules=["q_proj"], base_model_name_or_path="org/llama-b"
    )
    with pytest.raises(IncompatibleAdaptersError, match="different base models"):
        loramix.combine([a.path, b.path], weights=[1, 1])
    assert loramix.combine([a.path, b.path], weights=[1, 1], allow_different_bases=True).modules
    alias_a = loramix.load_adapter(a.path)
    alias_b = loramix.load_adapter(b.path)
    alias_a.base_model, alias_b.base_model = "distilbert-base-uncased", "distilbert/distilbert-base-uncased"
    assert loramix.combine([alias_a, alias_b], weights=[1, 1], method="cat").modules
    gpt = make_peft_adapter(tiny_gpt2, tmp_path, "g", target_modules=["c_attn"])
    odd = loramix.load_adapter(gpt.path)
    odd.modules = {"model.layers.0.self_attn.q_proj": next(iter(odd.modules.values()))}
    with pytest.raises(IncompatibleAdaptersError, match="model.layers.0.self_attn.q_proj"):
        loramix.combine([alias_a, odd], weights=[1, 1], allow_different_bases=True)


def test_option_and_truncation_errors(trio):
    paths = [t.path for t in trio]
    with pytest.raises(MethodError, match="does not truncate"):
        loramix.combine(paths, weights=WEIGHTS, method="cat", rank_rule=loramix.RankRule(rank=4))
    with pytest.raises(MethodError, match="weight"):
        loramix.combine(paths, weights=[1.0], method="cat")
    with pytest.raises(MethodError, match="unknown method"):
        loramix.combine(paths, weights=WEIGHTS, method="nope")
    with pytest.raises(MethodError, match="no option"):
        loramix.combine(paths, weights=WEIGHTS, method="svd", bogus=1)


# ----------------------------------------------------------------------------------------------- real adapters


def test_real_qwen_trio_svd_and_cat(real_adapters):
    paths = [real_adapters / n for n in ("qwen05__posttrain_v1", "qwen05__posttrain_v2", "qwen05__inference_engine")]
    adapters = [loramix.load_adapter(p) for p in paths]
    weights = [0.5, 0.3, 0.2]
    cat = loramix.combine(adapters, weights=weights, method="cat")
    svd = loramix.combine(adapters, weights=weights, method="svd", rank_rule=loramix.RankRule(rank=8))
    for name in ("model.layers.0.self_attn.q_proj", "model.layers.23.self_attn.v_proj"):
        total = sum(w * a.modules[name].delta(dtype=torch.float64) for a, w in zip(adapters, weights))
        assert rel(cat.modules[name].delta(), total) < REL
        U, S, Vh = torch.linalg.svd(total, full_matrices=False)
        assert rel(svd.modules[name].delta(), (U[:, :8] * S[:8]) @ Vh[:8]) < REL


def test_real_gpt2_group_against_peft(real_adapters, tmp_path):
    """Ranks 4 and 8 on GPT-2's Conv1D layers: PEFT's cat on a random GPT-2 of the true shape is the oracle."""
    import shutil

    from peft import PeftModel
    from transformers import GPT2Config, GPT2LMHeadModel

    names = ("gpt2__ironhack_r4_biaslora_clm", "gpt2__tigrinya_clm", "gpt2__pseudo2code_clm")
    config = GPT2Config.from_pretrained(real_adapters / "base_gpt2_config_only")
    config.n_layer = 12
    with torch.device("meta"):
        base = GPT2LMHeadModel(config)
    base = base.to_empty(device="cpu")  # base weights play no part in adapter arithmetic
    # PEFT refuses a second adapter beside one whose config says bias="lora_only" (this file saved no bias
    # tensors, so "none" describes it exactly): PEFT reads a copy with that one field changed.
    ironhack = shutil.copytree(real_adapters / names[0], tmp_path / names[0])
    config = json.loads((ironhack / "adapter_config.json").read_text())
    (ironhack / "adapter_config.json").write_text(json.dumps({**config, "bias": "none"}))
    model = PeftModel.from_pretrained(base, str(ironhack), adapter_name="n0")
    for i, n in enumerate(names[1:], start=1):
        model.load_adapter(str(real_adapters / n), adapter_name=f"n{i}")
    weights = [0.5, 0.25, 0.25]
    model.add_weighted_adapter(["n0", "n1", "n2"], weights, "merged", combination_type="cat")
    theirs = peft_deltas(model, "merged")
    ours = loramix.combine([real_adapters / n for n in names], weights=weights, method="cat")
    assert len(theirs) == 36
    for name, delta in theirs.items():
        assert ours.modules[name].rank == 4 + 8 + 8
        # PEFT lays ΔW on GPT-2's Conv1D weight (in×out): compare loramix's out×in product with its transpose
        m = ours.modules[name]
        assert rel(m.scale * m.B.double() @ m.A.double(), delta.T) < REL, name


# ----------------------------------------------------------------------------------------------- CLI and recipes


def test_cli_flags_and_recipe_build_the_same_plan(trio, tmp_path):
    runner = CliRunner()
    paths = [str(t.path) for t in trio]
    flags = runner.invoke(
        main, ["-q", "combine", *paths, "-w", "0.6,-0.3,0.45", "--rank", "5", "-o", str(tmp_path / "f")]
    )
    assert flags.exit_code == 0, flags.output
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        "adapters:\n"
        + "".join(f"  - {{source: {p}, weight: {w}}}\n" for p, w in zip(paths, WEIGHTS))
        + "method: svd\nrank: 5\noutput: "
        + str(tmp_path / "r")
        + "\n"
    )
    run = runner.invoke(main, ["-q", "combine", "--recipe", str(recipe)])
    assert run.exit_code == 0, run.output
    a, b = loramix.load_adapter(tmp_path / "f"), loramix.load_adapter(tmp_path / "r")
    for name, module in a.modules.items():
        assert torch.equal(module.delta(), b.modules[name].delta())


def test_an_asked_rank_below_the_portable_one_is_reported_as_padded(trio, tmp_path):
    """--rank 4 in the portable layout stores rank 8 (zero-padded): the wrote line, inspect and the card say both;
    --rank-layout exact stores 4. Oracle: the files themselves (PEFT's config r and the tensors' shapes)."""
    source = str(trio[1].path)
    padded = CliRunner().invoke(main, ["combine", source, "--rank", "4", "-o", str(tmp_path / "padded")])
    assert padded.exit_code == 0, padded.output
    said = "rank 4, stored as 8 for engines that need it (--rank-layout exact for 4)"
    assert said in padded.output
    config = json.loads((tmp_path / "padded" / "adapter_config.json").read_text())
    assert config["r"] == 8 and said in (tmp_path / "padded" / "README.md").read_text()
    shown = CliRunner().invoke(main, ["inspect", str(tmp_path / "padded")])
    assert "4, stored as 8 (zero-padded for engines that need one rank; --rank-layout exact for 4)" in shown.output
    exact = CliRunner().invoke(
        main, ["combine", source, "--rank", "4", "--rank-layout", "exact", "-o", str(tmp_path / "exact")]
    )
    assert exact.exit_code == 0 and "modules, rank 4, svd" in exact.output, exact.output
    assert json.loads((tmp_path / "exact" / "adapter_config.json").read_text())["r"] == 4
    shown = CliRunner().invoke(main, ["inspect", str(tmp_path / "exact")])
    assert "  ranks         4\n" in shown.output


def test_cli_errors_are_one_line_and_inputs_are_safe(trio, tmp_path):
    runner = CliRunner()
    target = trio[0].path
    before = (target / "adapter_model.safetensors").read_bytes()
    result = runner.invoke(main, ["combine", str(target), str(trio[1].path), "-o", str(target), "--force"])
    assert result.exit_code == 2
    assert result.output.strip().startswith("error:") and len(result.output.strip().splitlines()) == 1
    assert (target / "adapter_model.safetensors").read_bytes() == before
    missing = runner.invoke(main, ["combine", str(tmp_path / "nope"), "-o", str(tmp_path / "o")])
    assert missing.exit_code == 2 and "nope" in missing.output
    assert not (tmp_path / "o").exists()


def test_methods_lists_the_registry():
    result = CliRunner().invoke(main, ["methods"])
    assert result.exit_code == 0
    for name in loramix.methods.REGISTRY if hasattr(loramix, "methods") else ("cat", "svd", "linear"):
        assert name in result.output


def test_output_refuses_to_replace_an_input(trio):
    merged = loramix.combine([trio[0].path], weights=[1.0], method="cat")
    with pytest.raises(OutputError):
        save_adapter(merged, trio[0].path, overwrite=True)
