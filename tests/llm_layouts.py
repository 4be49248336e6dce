"""Tiny models of today's LLM layouts (random weights, from transformers configs): a Qwen3-MoE (fused 3-D experts)
and a Qwen2-VL (text layers renamed in memory), and PEFT adapters on them, shared by the expert and naming tests.
Sizes are all different (H 16, expert I 6, E 4) so that a transposed or swapped block cannot pass by its shape."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import (
    GptOssConfig,
    GptOssForCausalLM,
    MixtralConfig,
    MixtralForCausalLM,
    Qwen2VLConfig,
    Qwen2VLForConditionalGeneration,
    Qwen3MoeConfig,
    Qwen3MoeForCausalLM,
)

EXPERTS = 4
EXPERT_PARAMS = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]
INPUT_IDS = torch.tensor([[1, 5, 9, 13, 17, 21, 3, 7]])


def tiny_qwen3_moe(seed: int = 0, dtype: torch.dtype = torch.float32) -> Qwen3MoeForCausalLM:
    torch.manual_seed(seed)
    config = Qwen3MoeConfig(
        vocab_size=64,
        hidden_size=16,
        intermediate_size=24,
        moe_intermediate_size=6,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=8,
        num_experts=EXPERTS,
        num_experts_per_tok=2,
        decoder_sparse_step=1,
        mlp_only_layers=[],
        experts_implementation="eager",  # grouped_mm has no float64
    )
    return Qwen3MoeForCausalLM(config).to(dtype).eval()


_SMALL = {"vocab_size": 64, "hidden_size": 16, "intermediate_size": 6, "num_hidden_layers": 2, "head_dim": 8}
_ATTENTION = {
    "num_attention_heads": 2,
    "num_key_value_heads": 1,
    "num_local_experts": EXPERTS,
    "num_experts_per_tok": 2,
}


def tiny_mixtral(seed: int = 0, dtype: torch.dtype = torch.float32) -> MixtralForCausalLM:
    """Fused experts in memory; stored as block_sparse_moe.experts.{e}.w1/w3/w2."""
    torch.manual_seed(seed)
    config = MixtralConfig(**_SMALL, **_ATTENTION, experts_implementation="eager")
    return MixtralForCausalLM(config).to(dtype).eval()


def tiny_gpt_oss(seed: int = 0, dtype: torch.dtype = torch.float32) -> GptOssForCausalLM:
    """Experts transposed in memory, (E, in, out), and stored fused as they are."""
    torch.manual_seed(seed)
    config = GptOssConfig(**_SMALL, **_ATTENTION, layer_types=["full_attention"] * 2, experts_implementation="eager")
    return GptOssForCausalLM(config).to(dtype).eval()


MOE = {"qwen3_moe": tiny_qwen3_moe, "mixtral": tiny_mixtral, "gpt_oss": tiny_gpt_oss}


def expert_adapter(folder: Path, seed: int, *, r: int = 4, alpha: float = 8, kind: str = "qwen3_moe", **config) -> Path:
    """A PEFT adapter on a tiny MoE model (``kind``: a key of `MOE`) made as PEFT documents it for MoE models
    (random, non-zero B)."""
    model = MOE[kind]()
    settings = {"target_modules": ["q_proj", "v_proj"], "target_parameters": EXPERT_PARAMS} | config
    torch.manual_seed(seed)
    peft_model = get_peft_model(model, LoraConfig(r=r, lora_alpha=alpha, init_lora_weights=False, **settings))
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name or "modules_to_save" in name:  # heads (a router) trained too
                p.normal_(0, 0.3)
    peft_model.save_pretrained(folder)
    return folder


def peft_logits(folder: Path, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """PEFT's logits with the adapter in ``folder`` on the tiny base (in ``dtype``)."""
    model = PeftModel.from_pretrained(tiny_qwen3_moe(dtype=dtype), folder).eval()
    with torch.no_grad():
        return model(input_ids=INPUT_IDS).logits


def peft_deltas(folder: Path, kind: str = "qwen3_moe") -> dict[str, torch.Tensor]:
    """Every ΔW PEFT itself computes for the adapter in ``folder``, by base parameter name, in float64
    (``get_delta_weight``: the fused expert parameters in their in-memory layout)."""
    model = PeftModel.from_pretrained(MOE[kind](dtype=torch.float64), folder)
    out = {}
    for name, module in model.base_model.model.named_modules():
        if not hasattr(module, "get_delta_weight") or "default" not in getattr(module, "lora_A", {}):
            continue
        owner = name.replace(".base_layer", "")
        param = getattr(module, "parameter_name", "weight")
        with torch.no_grad():
            out[f"{owner}.{param}"] = module.get_delta_weight("default").double()
    return out


def reference_logits(deltas: dict[str, torch.Tensor]) -> torch.Tensor:
    """The float64 tiny base with ``deltas`` (base parameter name → ΔW) added to its weights."""
    model = tiny_qwen3_moe(dtype=torch.float64)
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, delta in deltas.items():
            params[name] += delta
        return model(input_ids=INPUT_IDS).logits


def tiny_qwen2_vl(seed: int = 0) -> Qwen2VLForConditionalGeneration:
    """Text layers ``model.language_model.layers.N`` in memory, ``model.layers.N`` in its saved checkpoint."""
    torch.manual_seed(seed)
    text = {
        "vocab_size": 64,
        "hidden_size": 16,
        "intermediate_size": 24,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "num_key_value_heads": 1,
        "rope_scaling": {"type": "mrope", "mrope_section": [1, 1, 2]},
        "bos_token_id": 0,
        "eos_token_id": 1,
    }
    vision = {"depth": 1, "embed_dim": 16, "hidden_size": 16, "num_heads": 2, "patch_size": 2, "spatial_merge_size": 1}
    config = Qwen2VLConfig(text_config=text, vision_config=vision, bos_token_id=0, eos_token_id=1)
    return Qwen2VLForConditionalGeneration(config).eval()


def vl_adapter(folder: Path, seed: int, *, old_names: bool = False) -> Path:
    """A PEFT adapter on the tiny Qwen2-VL's text attention, under today's names or (``old_names``) the checkpoint's
    names, as adapters trained with transformers 4 carry them."""
    torch.manual_seed(seed)
    model = get_peft_model(
        tiny_qwen2_vl(), LoraConfig(r=4, lora_alpha=8, target_modules=r".*language_model.*\.(q_proj|v_proj)")
    )
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.3)
    model.save_pretrained(folder)
    if old_names:
        from safetensors.torch import load_file, save_file

        weights = folder / "adapter_model.safetensors"
        tensors = load_file(weights)
        save_file({k.replace("model.language_model.", "model."): v for k, v in tensors.items()}, weights)
        config = json.loads((folder / "adapter_config.json").read_text())
        config["target_modules"] = ["q_proj", "v_proj"]  # as transformers 4's PEFT wrote it
        (folder / "adapter_config.json").write_text(json.dumps(config))
    return folder


def old_mixtral_adapter(folder: Path, seed: int, r: int = 2) -> Path:
    """A Mixtral adapter as PEFT wrote it with transformers 4: a LoRA on each expert's own w1/w3/w2 Linear
    (``block_sparse_moe.experts.{e}.w1``), which PEFT 0.21 converts to target_parameters when it loads it."""
    from safetensors.torch import save_file

    generator = torch.Generator().manual_seed(seed)
    hidden, inner = _SMALL["hidden_size"], _SMALL["intermediate_size"]
    tensors = {}
    for layer in range(_SMALL["num_hidden_layers"]):
        for e in range(EXPERTS):
            for w, (out, inp) in {"w1": (inner, hidden), "w3": (inner, hidden), "w2": (hidden, inner)}.items():
                key = f"base_model.model.model.layers.{layer}.block_sparse_moe.experts.{e}.{w}"
                tensors[f"{key}.lora_A.weight"] = torch.randn(r, inp, generator=generator) * 0.3
                tensors[f"{key}.lora_B.weight"] = torch.randn(out, r, generator=generator) * 0.3
    folder.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(folder / "adapter_model.safetensors"))
    config = {"peft_type": "LORA", "r": r, "lora_alpha": 4, "target_modules": ["w1", "w2", "w3"]}
    (folder / "adapter_config.json").write_text(json.dumps(config))
    return folder
