"""One module identity across the names transformers maps between: a Qwen2-VL's text layers are
``model.language_model.layers.N`` in memory (adapters trained today) and ``model.layers.N`` in its checkpoint (and
in adapters trained with transformers 4); Mixtral's experts are fused in memory and stored (and were adapted) one by
one. Oracle: PEFT 0.21 (forward, get_delta_weight, merge_and_unload + save_pretrained)."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from llm_layouts import expert_adapter, old_mixtral_adapter, peft_deltas, tiny_mixtral, tiny_qwen2_vl, vl_adapter
from peft import PeftModel
from safetensors.torch import load_file

from loramix import combine, merge_into_base, save_adapter
from loramix.errors import IncompatibleAdaptersError

INPUT_IDS = torch.tensor([[2, 3, 4, 5, 6]])


@pytest.fixture(scope="module")
def vl(tmp_path_factory):
    root = tmp_path_factory.mktemp("vl")
    tiny_qwen2_vl().save_pretrained(root / "base")
    tiny_qwen2_vl().save_pretrained(root / "base")
    PeftModel.from_pretrained(tiny_qwen2_vl(), vl_adapter(root / "new", 1)).merge_and_unload().save_pretrained(
        root / "peft"
    )
    vl_adapter(root / "old", 1, old_names=True)
    return root


def _logits(adapter) -> torch.Tensor:
    with torch.no_grad():
        return PeftModel.from_pretrained(tiny_qwen2_vl(), adapter)(input_ids=INPUT_IDS).logits


@pytest.mark.parametrize("naming", ["new", "old"])
def test_merge_into_under_either_naming_equals_peft(vl, tmp_path, naming):
    """Today's names (model.language_model.…) and the checkpoint's (model.…) both land on the stored tensors:
    equal to PEFT's merged save_pretrained of today's adapter, tensor for tensor (float32; 1e-6)."""
    merge_into_base(vl / naming, vl / "base", tmp_path / "out", dtype="float32")
    ours, theirs = load_file(tmp_path / "out" / "model.safetensors"), load_file(vl / "peft" / "model.safetensors")
    assert ours.keys() == theirs.keys()
    for key in ours:
        torch.testing.assert_close(ours[key], theirs[key], rtol=0, atol=1e-6, msg=key)


def test_old_and_new_names_combine_as_one_module(vl, tmp_path):
    """0.5·A + 0.5·A under its two namings is A: 4 modules in today's naming, PEFT's logits those of A (1e-5)."""
    combined = combine(
        [vl / "new", vl / "old"], weights=[0.5, 0.5], method="cat", load_options={"base_model": str(vl / "base")}
    )
    assert len(combined.modules) == 4 and all(n.startswith("model.language_model.") for n in combined.modules)
    save_adapter(combined, tmp_path / "out")
    torch.testing.assert_close(_logits(tmp_path / "out"), _logits(vl / "new"), rtol=0, atol=1e-5)
    assert "Module names: transformers' in-memory naming" in (tmp_path / "out" / "README.md").read_text()


def test_two_namings_without_the_base_config_are_refused(vl, tmp_path):
    with pytest.raises(IncompatibleAdaptersError, match="two namings of one module"):
        combine([vl / "new", vl / "old"], weights=[0.5, 0.5], method="cat")
    run = subprocess.run(
        [sys.executable, "-m", "loramix", "combine", str(vl / "new"), str(vl / "old"), "-o", str(tmp_path / "x")],
        capture_output=True,
        text=True,
    )
    assert run.returncode == 2 and run.stderr.count("\n") == 1 and "two namings" in run.stderr


def test_per_expert_modules_combine_with_fused_experts(tmp_path):
    """A transformers-4 Mixtral adapter (a LoRA on each expert's w1/w3/w2) and a target_parameters one are the same
    modules: the old one's w1 and w3 become row blocks of its experts' gate_up_proj (joined along the rank). The
    sum's ΔW of every parameter, as PEFT computes it, equals PEFT's for the two adapters (PEFT converts the old
    one itself) added in float64 (1e-12)."""
    tiny_mixtral().save_pretrained(tmp_path / "base")
    old = old_mixtral_adapter(tmp_path / "old", 5)
    new = expert_adapter(tmp_path / "new", 1, kind="mixtral")
    combined = combine(
        [old, new], weights=[1.0, 1.0], method="cat", load_options={"base_model": str(tmp_path / "base")}
    )
    assert not any(".block_sparse_moe." in name for name in combined.modules)
    save_adapter(combined, tmp_path / "out")
    ours, *theirs = (peft_deltas(folder, "mixtral") for folder in (tmp_path / "out", old, new))
    assert ours.keys() == theirs[1].keys()
    for key in ours:
        torch.testing.assert_close(ours[key], sum(d[key] for d in theirs if key in d), rtol=0, atol=1e-12)


def test_per_expert_and_fused_without_the_base_config_are_refused(tmp_path):
    old = old_mixtral_adapter(tmp_path / "old", 5)
    new = expert_adapter(tmp_path / "new", 1, kind="mixtral")
    with pytest.raises(IncompatibleAdaptersError, match="adapts fused expert parameters and old per-expert modules"):
        combine([new, old], method="cat")


def test_check_says_peft_ignores_old_names_and_the_fix_renames(vl, tmp_path):
    """With transformers 5, PEFT loads a Qwen2-VL adapter named model.layers.N as a no-op (its logits are the base's:
    the oracle); check says so when the base's config is at hand, and its fix writes today's names (PEFT's logits
    then those of the adapter trained under them; 1e-5)."""
    import json

    from loramix.compat import check_source

    old = tmp_path / "old"
    vl_adapter(old, 1, old_names=True)
    config = json.loads((old / "adapter_config.json").read_text())
    (old / "adapter_config.json").write_text(json.dumps({**config, "base_model_name_or_path": str(vl / "base")}))
    with torch.no_grad():
        base = tiny_qwen2_vl()(input_ids=INPUT_IDS).logits
    assert torch.equal(_logits(old), base)
    verdicts = {v.consumer: v for v in check_source(old).verdicts}
    assert verdicts["PEFT"].status == "wrong" and "loads the adapter as a no-op" in verdicts["PEFT"].reason
    save_adapter(combine([old], method="cat", load_options={"base_model": str(vl / "base")}), tmp_path / "fixed")
    torch.testing.assert_close(_logits(tmp_path / "fixed"), _logits(vl / "new"), rtol=0, atol=1e-5)
    assert check_source(tmp_path / "fixed").verdicts[0].status == "yes"
