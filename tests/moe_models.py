"""Tiny mixture-of-experts models (random weights, from transformers configs) and PEFT expert adapters on them,
shared by the expert tests. Sizes are all different (H 16, expert I 6, E 4) so that a transposed or swapped block
cannot pass by its shape."""

from __future__ import annotations

from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

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


def expert_adapter(folder: Path, seed: int, *, r: int = 4, alpha: float = 8, **config) -> Path:
    """A PEFT adapter on the tiny Qwen3-MoE made as PEFT documents it for MoE models (random, non-zero B)."""
    model = tiny_qwen3_moe()
    settings = {"target_modules": ["q_proj", "v_proj"], "target_parameters": EXPERT_PARAMS} | config
    torch.manual_seed(seed)
    peft_model = get_peft_model(model, LoraConfig(r=r, lora_alpha=alpha, init_lora_weights=False, **settings))
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.3)
    peft_model.save_pretrained(folder)
    return folder


def peft_logits(folder: Path, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """PEFT's logits with the adapter in ``folder`` on the tiny base (in ``dtype``)."""
    model = PeftModel.from_pretrained(tiny_qwen3_moe(dtype=dtype), folder).eval()
    with torch.no_grad():
        return model(input_ids=INPUT_IDS).logits


def peft_deltas(folder: Path) -> dict[str, torch.Tensor]:
    """Every ΔW PEFT itself computes for the adapter in ``folder``, by base parameter name, in float64
    (``get_delta_weight``: the fused expert parameters in their in-memory layout)."""
    model = PeftModel.from_pretrained(tiny_qwen3_moe(dtype=torch.float64), folder)
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
