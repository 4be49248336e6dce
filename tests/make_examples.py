"""Build the bundled examples in loramix/examples/: a tiny random-weight Llama with a character tokenizer, three PEFT
LoRA adapters and a DoRA one (for ``loramix convert``) on it, a few-shot JSONL for ``loramix search``, a hand-made
(MiniMind-style) LoRA state dict with the module map that renames its modules to the tiny Llama's, and a "fully
fine-tuned" copy for ``loramix extract``.

Run from the repository root: ``python tests/make_examples.py``. Deterministic: tests/test_project.py rebuilds
them into a temporary folder and checks that the bundled files hold the same tensors, configs and texts.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from helpers import random_model
from peft import LoraConfig, get_peft_model

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
    "dora": dict(r=4, lora_alpha=8, use_dora=True, target_modules=["q_proj", "v_proj", "down_proj"]),
}

# The tokenizer: one token per printable ASCII character, after four special tokens whose ids are the ones the
# model's config names (bos 1, eos 2); 99 ids of the model's 256. Anything else is <unk>.
SPECIAL_TOKENS = ("<pad>", "<s>", "</s>", "<unk>")
CHARACTERS = tuple(chr(c) for c in range(32, 127))
TOKENIZER_CONFIG = {
    "tokenizer_class": "PreTrainedTokenizerFast",
    "pad_token": "<pad>",
    "bos_token": "<s>",
    "eos_token": "</s>",
    "unk_token": "<unk>",
    "model_max_length": 128,
    "clean_up_tokenization_spaces": False,
}

# Few-shot examples for `loramix search` (informal → formal; the adapters are random, so any task would do).
FEW_SHOT = [
    ("hey, what's up?", "Good afternoon. How are you?"),
    ("thx a lot", "Thank you very much."),
    ("can't make it today", "I am unable to attend today."),
    ("gimme a sec", "Please allow me a moment."),
    ("see ya", "Goodbye."),
    ("no worries", "That is quite all right."),
]

# A hand-made LoRA in MiniMind's (llama2.c's) naming: `layers.N.attention.wq.lora.A.weight` and so on, rank 4 on the
# query, value and down projections, and the module map that renames those modules to the tiny Llama's.
MINIMIND_RANK = 4
MINIMIND_MODULES = {"attention.wq": (64, 64), "attention.wv": (64, 32), "feed_forward.w2": (128, 64)}  # (in, out)
MODULE_MAP = """\
'^layers\\.(\\d+)\\.': 'model.layers.\\1.'
'\\.attention\\.w([qv])$': '.self_attn.\\1_proj'
'\\.feed_forward\\.w2$': '.mlp.down_proj'
"""


def base_model() -> torch.nn.Module:
    torch.manual_seed(0)  # the global RNG: the adapters' own draws follow the base's, as when they were made
    sizes = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4)
    return random_model(
        "llama",
        seed=None,
        vocab_size=256,
        num_key_value_heads=2,
        max_position_embeddings=128,
        tie_word_embeddings=True,
        **sizes,
    )


def write_tokenizer(folder: Path) -> None:
    """A character-level `tokenizers` WordLevel tokenizer (BOS in front, as Llama's) as tokenizer.json, with a
    tokenizer_config.json that `transformers.AutoTokenizer.from_pretrained(folder)` loads offline."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors

    vocab = {token: i for i, token in enumerate((*SPECIAL_TOKENS, *CHARACTERS))}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tokenizer.decoder = decoders.Fuse()
    tokenizer.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", vocab["<s>"])])
    tokenizer.add_special_tokens(list(SPECIAL_TOKENS))
    tokenizer.save(str(folder / "tokenizer.json"), pretty=True)
    (folder / "tokenizer_config.json").write_text(json.dumps(TOKENIZER_CONFIG, indent=2) + "\n")


def write_few_shot(folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    lines = (json.dumps({"input": i, "output": o}) for i, o in FEW_SHOT)
    (folder / "formal.jsonl").write_text("".join(line + "\n" for line in lines))


def write_minimind(folder: Path) -> None:
    """``minimind_lora.pth`` (torch.save of MiniMind-style LoRA layers' state dict) and ``module_map.yaml``."""
    folder.mkdir(parents=True, exist_ok=True)
    generator = torch.Generator().manual_seed(4)
    state = {}
    for layer in range(2):
        for module, (inp, out) in MINIMIND_MODULES.items():
            prefix = f"layers.{layer}.{module}.lora"
            state[f"{prefix}.A.weight"] = torch.randn(MINIMIND_RANK, inp, generator=generator) / inp**0.5
            state[f"{prefix}.B.weight"] = 0.1 * torch.randn(out, MINIMIND_RANK, generator=generator)
    torch.save(state, folder / "minimind_lora.pth")
    (folder / "module_map.yaml").write_text(MODULE_MAP)


def write_tuned(folder: Path) -> None:
    """The tiny Llama "fully fine-tuned", for ``loramix extract``: a rank-4 update on every attention and MLP
    projection (about a fifth of the weight's norm) with a little full-rank noise, and a retrained final norm; bf16."""
    model = base_model()
    generator = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("proj.weight"):
                out, inp = param.shape
                low = torch.randn(out, 4, generator=generator) @ torch.randn(4, inp, generator=generator)
                param += 0.002 * low + 0.0004 * torch.randn(out, inp, generator=generator)
        model.model.norm.weight *= 1.2
    model.to(torch.bfloat16).save_pretrained(folder, max_shard_size="100KB")


def build(root: Path) -> None:
    base_model().to(torch.bfloat16).save_pretrained(root / "tiny-llama", max_shard_size="100KB")
    write_tokenizer(root / "tiny-llama")
    for seed, (name, options) in enumerate(ADAPTERS.items(), start=1):
        torch.manual_seed(seed)
        model = get_peft_model(base_model(), LoraConfig(init_lora_weights=False, task_type="CAUSAL_LM", **options))
        model.peft_config["default"].base_model_name_or_path = BASE_ID
        with torch.no_grad():  # DoRA magnitudes start at ‖W + sBA‖ (the update is then sBA): moved, as by training
            for key, param in model.named_parameters():
                if "lora_magnitude_vector" in key:
                    param.mul_(1 + 0.1 * torch.randn(param.shape))
        model.save_pretrained(root / name)
        (root / name / "README.md").unlink()  # PEFT's boilerplate card says nothing about these examples
    write_few_shot(root / "few-shot")
    write_minimind(root / "minimind")
    write_tuned(root / "tiny-llama-tuned")


if __name__ == "__main__":
    build(Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).parents[1] / "loramix" / "examples")
