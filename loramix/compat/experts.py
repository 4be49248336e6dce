"""What the serving engines do with a mixture-of-experts adapter (PEFT ``target_parameters`` pairs on fused
expert tensors, ``…experts.base_layer.lora_A`` of rank r·E): none of them applies it as trained today, so the way
to serve one is to merge it (``--merge-into``). Each verdict cites where that was read."""

from __future__ import annotations

from loramix.compat.facts import FIX_MERGE, Verdict

# vLLM: vllm/lora/peft_helper.py (PEFTHelper) does not read target_parameters; vllm-project/vllm PR #41384 (closed):
# it "silently drops every PEFT-trained adapter that uses target_parameters against fused 3D MoE expert tensors
# ... the model behaves like base"; PR #52194 (closed): on other models set_lora raises a shape mismatch.
# SGLang: sgl-project/sglang PR #25528 (closed): PEFT's ParamWrapper keys (…experts.base_layer.lora_*) are names
# its loader does not recognise, "so adapters trained this way silently fail to apply on the expert path".
# LoRAX/TGI: lorax_server/adapters/lora.py builds layers for the module types it knows (q_proj … down_proj); an
# "experts" / "base_layer" pair is no such type and is skipped.
# llama.cpp: convert_lora_to_gguf.py, get_base_tensor_name makes …experts.base_layer.lora_A.weight into
# …experts.base_layer.weight, which no model tensor is (convert_hf_to_gguf.py, map_tensor_name: "Can not map tensor").
ENGINES = {
    "vLLM": ("wrong", "drops the expert pairs (serves the base experts) or fails on their shape"),
    "SGLang": ("wrong", "does not recognise the expert pairs' names: experts left as the base"),
    "LoRAX/TGI": ("wrong", "skips the expert pairs (module type experts is not one it knows)"),
    "llama.cpp": ("no", "the converter cannot map the expert pairs to model tensors"),
}


def expert_verdicts(src: str) -> dict[str, Verdict]:
    """The engines' verdicts on an adapter with expert pairs, by consumer (they replace the ordinary rules)."""
    fix = FIX_MERGE.format(src=src)
    return {name: Verdict(name, status, reason, fix) for name, (status, reason) in ENGINES.items()}
