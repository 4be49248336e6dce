"""Build the bundled examples in loramix/examples/ (a tiny random-weight Llama and three PEFT adapters on it).

Run from the repository root: ``python tests/make_examples.py``. Deterministic: tests/test_examples.py rebuilds
them into a temporary folder and checks that the bundled files are identical.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

BASE_ID = "loramix-examples/tiny-llama"
ADAPTERS = {
    "summarize": dict(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"]),
    "translate": dict(r=4, lora_alpha=8, use_rslora=True, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]),
    "formal": dict(
        r=8,
        lora_alpha=16,
        target_modules=["q_proj", "v_proj", "o_proj"],
        rank_pattern={"o_proj": 4},
        alpha_pattern={"o_proj": 4},
    ),
}


def base_model() -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=256,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        tie_word_embeddings=True,
    )
    return LlamaForCausalLM(config)


def build(root: Path) -> None:
    base_model().to(torch.bfloat16).save_pretrained(root / "tiny-llama", max_shard_size="100KB")
    for seed, (name, options) in enumerate(ADAPTERS.items(), start=1):
        torch.manual_seed(seed)
        model = get_peft_model(base_model(), LoraConfig(init_lora_weights=False, task_type="CAUSAL_LM", **options))
        model.peft_config["default"].base_model_name_or_path = BASE_ID
        model.save_pretrained(root / name)
        (root / name / "README.md").unlink()  # PEFT's boilerplate card says nothing about these examples


if __name__ == "__main__":
    build(Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).parents[1] / "loramix" / "examples")
