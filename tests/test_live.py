"""Live models in and out (`loramix.formats.live`, `loramix.merge.loaded_model`), with PEFT itself as the oracle.

Tolerances: an adapter read from a live model equals the one read from the folder PEFT saved, tensor for tensor.
A combination injected into a PeftModel gives the logits of the same combination written to files and loaded with
``PeftModel.from_pretrained`` to float32 rounding (rtol 1.3e-6, atol 1e-5: the two routes run the same float32 maths
on the same factors). `merge_into_model` on a float32 model equals PEFT's float32 merge_and_unload to float32
rounding, and on a bf16 model PEFT's float32 merge of the same bf16 weights rounded to bf16, within 1 bf16 ulp (see
tests/test_checkpoint.py for why 1 ulp). `unmerge` is not exactly reversible (W + ΔW − ΔW rounds): in float32 it
equals PEFT's own merge_adapter/unmerge_adapter bit for bit, and lies within 1 float32 ulp of the original weight
(2 for DoRA: a division and a subtraction) at max(|W|, |W+ΔW|); in bf16 within one bf16 ulp there.
"""

from __future__ import annotations

import json

import pytest
import torch
from helpers import (
    assert_bf16_close,
    bf16_ulp,
    example_inputs,
    make_peft_adapter,
    model_output,
    seeded,
    tiny_bert_seqcls,
    tiny_gpt2,
    tiny_llama,
    tiny_qwen2,
)
from peft import LoraConfig, PeftModel, get_peft_model, get_peft_model_state_dict

import loramix
from loramix.errors import AdapterFormatError, CheckpointError, LoramixError, MethodError

F32 = dict(rtol=1.3e-6, atol=1e-5)


def two_adapter_model() -> PeftModel:
    """A PeftModel holding adapters "first" and "second" (different targets and ranks), PEFT-initialised at random."""

    def build():
        config = LoraConfig(target_modules=["q_proj", "v_proj"], r=4, lora_alpha=8, init_lora_weights=False)
        model = get_peft_model(tiny_llama(), config, adapter_name="first")
        model.add_adapter(
            "second", LoraConfig(target_modules=["q_proj", "o_proj"], r=2, lora_alpha=6, init_lora_weights=False)
        )
        return model

    return seeded(3, build)


def assert_same_adapter(ours: loramix.LoraAdapter, reference: loramix.LoraAdapter) -> None:
    assert set(ours.modules) == set(reference.modules) and set(ours.extra) == set(reference.extra)
    for name, m in reference.modules.items():
        o = ours.modules[name]
        assert (o.scale, o.layout) == (m.scale, m.layout), name
        for a, b in ((o.A, m.A), (o.B, m.B), (o.magnitude, m.magnitude), (o.bias, m.bias)):
            assert (a is None and b is None) or torch.equal(a, b), name
    for name, e in reference.extra.items():
        assert torch.equal(ours.extra[name].tensor, e.tensor) and ours.extra[name].kind == e.kind


@pytest.mark.parametrize("method, options", [("cat", {}), ("svd", {"rank_rule": loramix.RankRule(rank=4)})])
def test_peft_model_round_trip_equals_files(method, options, tmp_path):
    model = two_adapter_model()
    combined = loramix.combine([(model, "first"), (model, "second")], weights=[0.7, -0.4], method=method, **options)
    assert combined.provenance["sources"] == ["PeftModel(LlamaForCausalLM):first", "PeftModel(LlamaForCausalLM):second"]
    assert loramix.inject_adapter(model, combined, adapter_name="mix") is model
    model.set_adapter("mix")
    inputs = example_inputs(tiny_llama)
    ours = model_output(model, inputs)

    model.save_pretrained(str(tmp_path / "saved"), selected_adapters=["first", "second"])  # a subfolder each
    from_files = loramix.combine(
        [tmp_path / "saved" / "first", tmp_path / "saved" / "second"], weights=[0.7, -0.4], method=method, **options
    )
    loramix.save_adapter(from_files, tmp_path / "mix")
    reference = model_output(PeftModel.from_pretrained(tiny_llama(), str(tmp_path / "mix")).eval(), inputs)
    torch.testing.assert_close(ours, reference, **F32)
    base = model_output(tiny_llama(), inputs)
    assert float((reference - base).abs().max()) > 0.05 * float(reference.abs().max())  # the mix changes the logits
    model.set_adapter("first")
    assert not torch.allclose(model_output(model, inputs), ours)  # "first" is still there, unchanged
    loramix.save_adapter(combined, tmp_path / "live-mix")  # the card names the live sources
    assert "`PeftModel(LlamaForCausalLM):second`" in (tmp_path / "live-mix" / "README.md").read_text()


def test_injected_then_saved_by_peft_is_read_right_by_every_engine(tmp_path, caplog):
    """inject_adapter + PEFT's own save_pretrained: the folder holds one rank and one scale (no rank_pattern /
    alpha_pattern), which `check` finds every engine reads right, and PEFT reloads it to the injected model's logits;
    rank_layout="exact" injects per-module ranks and warns that engines misread them once saved."""
    from loramix.compat import check_source

    model = two_adapter_model()
    combined = loramix.combine([(model, "first"), (model, "second")], weights=[0.7, -0.4], method="cat")
    assert combined.ranks == [2, 4, 6]  # per-module ranks: the exact layout needs rank_pattern
    loramix.inject_adapter(model, combined, adapter_name="mix")
    model.set_adapter("mix")
    inputs = example_inputs(tiny_llama)
    ours = model_output(model, inputs)
    model.save_pretrained(str(tmp_path / "saved"), selected_adapters=["mix"])
    config = json.loads((tmp_path / "saved" / "mix" / "adapter_config.json").read_text())
    assert config["r"] == 8 and not config.get("rank_pattern") and not config.get("alpha_pattern")
    verdicts = {v.consumer: v.status for v in check_source(str(tmp_path / "saved" / "mix")).verdicts}
    assert all(verdicts[c] == "yes" for c in ("PEFT", "vLLM", "SGLang", "LoRAX/TGI", "llama.cpp")), verdicts
    reloaded = PeftModel.from_pretrained(tiny_llama(), str(tmp_path / "saved" / "mix")).eval()
    torch.testing.assert_close(model_output(reloaded, inputs), ours, **F32)
    loramix.inject_adapter(model, combined, adapter_name="exact", rank_layout="exact")
    assert "misread" in caplog.text


def test_live_sources_equal_their_files(tmp_path):
    dora = make_peft_adapter(tiny_llama, tmp_path, "dora", target_modules=["q_proj", "v_proj"], use_dora=True)
    live = loramix.load_adapter(dora.peft_model)
    assert live.name == live.source == "PeftModel(LlamaForCausalLM):default"
    assert_same_adapter(live, loramix.load_adapter(dora.path))
    head = make_peft_adapter(tiny_bert_seqcls, tmp_path, "head", target_modules=["query"], task_type="SEQ_CLS")
    assert_same_adapter(loramix.load_adapter((head.peft_model, "default")), loramix.load_adapter(head.path))
    state = get_peft_model_state_dict(head.peft_model)
    from_state = loramix.load_adapter((state, head.peft_model.peft_config["default"]))
    assert from_state.name == "state dict (LoraConfig)"
    assert_same_adapter(from_state, loramix.load_adapter(head.path))
    config = {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "task_type": "SEQ_CLS", "target_modules": ["query"]}
    assert_same_adapter(loramix.load_adapter((state, config)), loramix.load_adapter(head.path))


def activate(model: torch.nn.Module, name: str) -> None:
    """``model.set_adapter(name)`` for a transformers model; transformers refuses PEFT older than it wants there
    (though its load_adapter works), so then the layers are switched as its set_adapter would switch them."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    try:
        model.set_adapter(name)
    except ValueError as exc:
        assert "version of PEFT" in str(exc)
        for module in model.modules():
            if isinstance(module, BaseTunerLayer):
                module.set_adapter(name)


def test_transformers_model_with_loaded_adapters(tmp_path):
    """transformers' PEFT integration: adapters loaded with model.load_adapter, a combination added back to it."""
    one = make_peft_adapter(tiny_llama, tmp_path, "one", seed=1, target_modules=["q_proj", "v_proj"])
    two = make_peft_adapter(tiny_llama, tmp_path, "two", seed=2, target_modules=["v_proj", "down_proj"], r=2)
    model = tiny_llama()
    model.load_adapter(str(one.path), adapter_name="one")
    model.load_adapter(str(two.path), adapter_name="two")
    read = loramix.load_adapter((model, "two"))
    assert read.name == "LlamaForCausalLM:two"
    assert_same_adapter(read, loramix.load_adapter(two.path))
    with pytest.raises(AdapterFormatError, match=r"holds 2 adapters \('one', 'two'\).*\(model, \"name\"\)"):
        loramix.load_adapter(model)

    combined = loramix.combine([(model, "one"), (model, "two")], weights=[1.0, 0.5], method="cat")
    assert loramix.inject_adapter(model, combined, adapter_name="mix") is model
    activate(model, "mix")
    inputs = example_inputs(tiny_llama)
    loramix.save_adapter(loramix.combine([one.path, two.path], weights=[1.0, 0.5], method="cat"), tmp_path / "mix")
    reference = model_output(PeftModel.from_pretrained(tiny_llama(), str(tmp_path / "mix")).eval(), inputs)
    torch.testing.assert_close(model_output(model, inputs), reference, **F32)


def test_to_peft_state_dict_and_lora_config_save_like_peft(tmp_path):
    made = make_peft_adapter(tiny_gpt2, tmp_path, "gpt2", target_modules=["c_attn"], fan_in_fan_out=True)
    adapter = loramix.load_adapter(made.path)
    config = loramix.lora_config(adapter)
    assert isinstance(config, LoraConfig) and config.fan_in_fan_out and config.r == 4
    state = loramix.to_peft_state_dict(adapter)
    model = get_peft_model(tiny_gpt2(), config)
    from peft import set_peft_model_state_dict

    assert not set_peft_model_state_dict(model, state).unexpected_keys
    inputs = example_inputs(tiny_gpt2)
    torch.testing.assert_close(model_output(model.eval(), inputs), model_output(made.peft_model, inputs), **F32)


MERGE_CASES = {
    "llama": (tiny_llama, dict(target_modules=["q_proj", "v_proj", "down_proj", "lm_head"])),
    "qwen2_lora_bias": (tiny_qwen2, dict(target_modules=["q_proj", "k_proj"], lora_bias=True)),
    "gpt2_conv1d": (tiny_gpt2, dict(target_modules=["c_attn", "c_proj", "c_fc"], fan_in_fan_out=True)),
    "llama_dora": (tiny_llama, dict(target_modules=["q_proj", "o_proj"], use_dora=True)),
    "gpt2_dora": (tiny_gpt2, dict(target_modules=["c_attn"], fan_in_fan_out=True, use_dora=True)),
}


def float32_ulp(x: torch.Tensor) -> torch.Tensor:
    return torch.finfo(torch.float32).eps * x.abs().clamp_min(torch.finfo(torch.float32).tiny)


@pytest.mark.parametrize("case", list(MERGE_CASES))
def test_merge_into_and_unmerge_match_peft(case, tmp_path):
    factory, lora = MERGE_CASES[case]
    made = make_peft_adapter(factory, tmp_path, case, **lora)
    adapter = loramix.load_adapter(made.path)
    dora = adapter.has_dora

    # float32: PEFT's merge_and_unload, and PEFT's own merge_adapter/unmerge_adapter for the way back
    model = factory()
    original = {k: v.clone() for k, v in model.state_dict().items()}
    report = loramix.merge_into_model(model, adapter)
    merged = PeftModel.from_pretrained(factory(), str(made.path)).eval().merge_and_unload().state_dict()
    ours = model.state_dict()
    for name, tensor in merged.items():
        torch.testing.assert_close(ours[name], tensor, rtol=1.3e-6, atol=1e-6, msg=name)
    assert set(report.survival) == set(adapter.modules) and all(
        v.kept == 1.0 and v.error == 0.0 for v in report.survival.values()
    )
    assert set(report.dora_norms) == (set(adapter.modules) if dora else set())
    loramix.unmerge(model, adapter, merged=report)
    peft_model = PeftModel.from_pretrained(factory(), str(made.path)).eval()
    peft_model.merge_adapter()
    peft_model.unmerge_adapter()
    peft_back = peft_model.get_base_model().state_dict()
    back = model.state_dict()
    for name, tensor in original.items():
        if name in report.replaced:  # a saved base layer (lm_head): the original comes back as it was
            assert torch.equal(back[name], tensor), name
            continue
        peft_name = name if name in peft_back else name.replace(".weight", ".base_layer.weight")
        peft_name = peft_name if peft_name in peft_back else peft_name.replace(".bias", ".base_layer.bias")
        assert torch.equal(back[name], peft_back[peft_name]), name
        bound = (2 if dora else 1) * float32_ulp(torch.maximum(tensor.abs(), merged[name].abs()))
        assert bool(((back[name] - tensor).abs() <= bound).all()), name

    # bf16: PEFT's float32 merge of the same bf16 weights, rounded once
    model = factory().to(torch.bfloat16)
    original = {k: v.clone() for k, v in model.state_dict().items()}
    report = loramix.merge_into_model(model, adapter)
    reference = PeftModel.from_pretrained(factory().to(torch.bfloat16).float(), str(made.path))
    reference = reference.eval().merge_and_unload().state_dict()
    for name, tensor in reference.items():
        assert_bf16_close(model.state_dict()[name], tensor, name)
    assert all(0.9 < v.kept < 1.1 and v.cosine > 0.99 for v in report.survival.values())
    back = loramix.unmerge(model, adapter, merged=report)
    assert set(back.survival) == set(adapter.modules)
    for name, tensor in original.items():
        bound = bf16_ulp(torch.maximum(tensor.float().abs(), reference[name].float().abs()))
        assert bool(((model.state_dict()[name].float() - tensor.float()).abs() <= bound).all()), name


def test_merge_into_a_peft_model_and_head_replacement(tmp_path):
    """Merging into a PeftModel updates its base layers; heads (modules_to_save) are replaced and given back."""
    head = make_peft_adapter(tiny_bert_seqcls, tmp_path, "head", target_modules=["query"], task_type="SEQ_CLS")
    model = tiny_bert_seqcls()
    before = model.classifier.weight.clone()
    report = loramix.merge_into_model(model, head.path)
    reference = PeftModel.from_pretrained(tiny_bert_seqcls(), str(head.path)).eval().merge_and_unload().state_dict()
    torch.testing.assert_close(model.classifier.weight, reference["classifier.weight"], rtol=0, atol=0)
    with pytest.raises(MethodError, match="classifier.*merged="):
        loramix.unmerge(model, head.path)
    loramix.unmerge(model, head.path, merged=report)
    assert torch.equal(model.classifier.weight, before)

    lora = make_peft_adapter(tiny_llama, tmp_path, "lora", target_modules=["q_proj"])
    peft_model = PeftModel.from_pretrained(tiny_llama(), str(lora.path)).eval()
    loramix.merge_into_model(peft_model, lora.path)
    with peft_model.disable_adapter():
        merged = model_output(peft_model, example_inputs(tiny_llama))
    expected = model_output(lora.load_with_peft().merge_and_unload(), example_inputs(tiny_llama))
    torch.testing.assert_close(merged, expected, **F32)


def test_wrong_objects_say_what_is_accepted(tmp_path):
    made = make_peft_adapter(tiny_llama, tmp_path, "a", target_modules=["q_proj"])
    adapter = loramix.load_adapter(made.path)
    accepted = r"PeftModel or transformers model holding adapters"
    for wrong in (3, tiny_llama(), (3, "x"), b"path"):
        with pytest.raises(AdapterFormatError, match=accepted):
            loramix.load_adapter(wrong)
    with pytest.raises(AdapterFormatError, match="LoraConfig"):
        loramix.load_adapter((get_peft_model_state_dict(made.peft_model), 3))
    with pytest.raises(AdapterFormatError, match="second item must be an adapter name, got a PeftModel"):
        loramix.load_adapter((made.peft_model, made.peft_model))
    with pytest.raises(AdapterFormatError, match="has no adapter 'x'; it holds 'default'"):
        loramix.load_adapter((made.peft_model, "x"))
    with pytest.raises(MethodError, match="not a single one"):
        loramix.combine((made.peft_model, "default"))
    with pytest.raises(MethodError, match="not a int"):
        loramix.combine(3)
    with pytest.raises(MethodError, match="takes a loaded torch model.*merge_into_base"):
        loramix.merge_into_model(str(tmp_path), adapter)
    with pytest.raises(CheckpointError, match="folder or Hub id, not a LlamaForCausalLM.*merge_into"):
        loramix.merge_into_base(adapter, tiny_llama(), tmp_path / "out")
    with pytest.raises(AdapterFormatError, match=accepted):
        loramix.save_adapter(3, tmp_path / "out")
    loramix.save_adapter(made.peft_model, tmp_path / "saved", rank_layout="exact")  # a live source saves as it is
    assert_same_adapter(loramix.load_adapter(tmp_path / "saved"), adapter)
    with pytest.raises(MethodError, match="takes a LoraAdapter"):
        loramix.to_peft_state_dict(made.peft_model)
    with pytest.raises(MethodError, match="PeftModel or a transformers model"):
        loramix.inject_adapter(torch.nn.Linear(2, 2), adapter, adapter_name="x")
    with pytest.raises(MethodError, match="already has an adapter 'default'"):
        loramix.inject_adapter(made.peft_model, adapter, adapter_name="default")
    with pytest.raises(CheckpointError, match="no matching module"):
        loramix.merge_into_model(tiny_gpt2(), adapter)
    gpt = tiny_gpt2()
    before = {k: v.clone() for k, v in gpt.state_dict().items()}
    odd = adapter.with_modules({"transformer.h.0.attn.c_attn": next(iter(adapter.modules.values()))})
    with pytest.raises(LoramixError, match="does not fit"):
        loramix.merge_into_model(gpt, odd)
    assert all(torch.equal(v, before[k]) for k, v in gpt.state_dict().items())  # nothing changed
