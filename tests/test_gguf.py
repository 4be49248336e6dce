"""--format gguf: a llama.cpp LoRA adapter, read back with gguf's own GGUFReader.

The oracle: PEFT's get_delta_weight of every module, against llama.cpp's rule for a GGUF LoRA
(src/llama-adapter.h, llama_adapter_lora_weight::get_scale: ΔW = alpha / rank · B · A, with rank the tensor pair's
own rank) and gguf's TensorNameMap for the names. For Llama the q/k rows are permuted as convert_hf_to_gguf.py's
LlamaModel.permute does (rebuilt here from its definition). Tolerance: float32 factors, relative 1e-6 on ΔW.
"""

from __future__ import annotations

import pytest
import torch
from helpers import make_peft_adapter, tiny_gemma, tiny_gpt2, tiny_llama, tiny_qwen2

from loramix import load_adapter, save_adapter
from loramix.errors import OutputError

gguf = pytest.importorskip("gguf")

CASES = {
    "llama": (tiny_llama, dict(target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "down_proj"])),
    "qwen2": (tiny_qwen2, dict(target_modules=["q_proj", "k_proj", "v_proj", "up_proj"])),
    "gemma": (tiny_gemma, dict(target_modules=["q_proj", "k_proj", "gate_proj"])),
    "gpt2": (tiny_gpt2, dict(target_modules=["c_attn", "c_proj", "c_fc"], fan_in_fan_out=True)),
}


def _permute(rows: torch.Tensor, heads: int) -> torch.Tensor:
    return rows.reshape(heads, 2, rows.shape[0] // heads // 2, *rows.shape[1:]).swapaxes(1, 2).reshape(rows.shape)


@pytest.mark.parametrize("case", sorted(CASES))
def test_gguf_round_trip_matches_peft(case, tmp_path):
    factory, options = CASES[case]
    # mixed ranks and alphas: the GGUF gets one rank and one alpha, each module still its own ΔW
    made = make_peft_adapter(
        factory,
        tmp_path,
        case,
        r=4,
        lora_alpha=8,
        rank_pattern={"v_proj": 2, "c_fc": 6},
        alpha_pattern={"k_proj": 3},
        **options,
    )
    config = made.base().config.to_dict()
    out = save_adapter(load_adapter(made.path), tmp_path / "out", format="gguf", base=config, card=False)
    reader = gguf.GGUFReader(str(out / "out.gguf"))
    fields = {f.name: f for f in reader.fields.values()}
    assert bytes(fields["general.type"].parts[-1]).decode() == "adapter"
    assert bytes(fields["adapter.type"].parts[-1]).decode() == "lora"
    assert bytes(fields["general.architecture"].parts[-1]).decode() == config["model_type"]
    alpha = float(fields["adapter.lora.alpha"].parts[-1][0])
    tensors = {t.name: torch.from_numpy(t.data.copy()).double() for t in reader.tensors}
    arch = next(a for a, n in gguf.MODEL_ARCH_NAMES.items() if n == config["model_type"])
    names = gguf.get_tensor_name_map(arch, config.get("num_hidden_layers") or config["n_layer"])
    deltas = {
        n.removeprefix("base_model.model."): m.get_delta_weight("default").detach().double()
        for n, m in made.peft_model.named_modules()
        if hasattr(m, "lora_A") and "default" in m.lora_A
    }
    assert len(tensors) == 2 * len(deltas)
    ranks = set()
    for name, delta in deltas.items():
        target = names.get_name(name + ".weight", try_suffixes=(".weight",))
        A, B = tensors[f"{target}.lora_a"], tensors[f"{target}.lora_b"]
        ranks.add(A.shape[0])
        expected = delta.T if case == "gpt2" else delta  # Conv1D stores in×out; GGUF tensors are out×in
        if case == "llama" and name.endswith(("q_proj", "k_proj")):
            heads = config["num_attention_heads"] if name.endswith("q_proj") else config["num_key_value_heads"]
            expected = _permute(expected, heads)
        got = alpha / A.shape[0] * B @ A  # llama_adapter_lora_weight::get_scale
        assert float((got - expected).norm() / expected.norm()) < 1e-6, name
    assert ranks == {8}  # one rank: the largest (6) rounded up to 8


def test_gguf_refuses_what_it_cannot_hold(tmp_path):
    made = make_peft_adapter(tiny_llama, tmp_path, "bias", target_modules=["q_proj"], lora_bias=True)
    config = made.base().config.to_dict()
    with pytest.raises(OutputError, match="lora_B biases or DoRA"):
        save_adapter(load_adapter(made.path), tmp_path / "out", format="gguf", base=config)
    dora = make_peft_adapter(tiny_llama, tmp_path, "dora", target_modules=["q_proj"], use_dora=True)
    with pytest.raises(OutputError, match="DoRA"):
        save_adapter(load_adapter(dora.path), tmp_path / "out2", format="gguf", base=config)
    with pytest.raises(OutputError, match="architectures"):
        plain = make_peft_adapter(tiny_llama, tmp_path, "plain", target_modules=["q_proj"])
        save_adapter(load_adapter(plain.path), tmp_path / "out3", format="gguf", base={"model_type": "bert"})
    assert not (tmp_path / "out").exists() and not (tmp_path / "out2").exists()


def test_a_failure_inside_gguf_is_one_error_naming_its_version(tmp_path, monkeypatch):
    """An exception from the gguf package's own writer becomes one BackendError naming gguf and its version (the CLI
    prints it as one line), and no output folder is left behind."""
    from importlib.metadata import version

    from loramix.errors import BackendError

    made = make_peft_adapter(tiny_llama, tmp_path, "adapter", target_modules=["q_proj"])
    config = made.base().config.to_dict()

    def broken(self):
        raise struct_error("required argument is not an integer")

    struct_error = type("error", (Exception,), {})
    monkeypatch.setattr(gguf.GGUFWriter, "write_tensors_to_file", broken)
    with pytest.raises(BackendError, match=rf"^gguf {version('gguf')} failed while writing out\.gguf: error: required"):
        save_adapter(load_adapter(made.path), tmp_path / "out", format="gguf", base=config, card=False)
    assert not (tmp_path / "out").exists()
