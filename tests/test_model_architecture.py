"""The layer facts of `loramix.architecture` against transformers itself: which modules are Conv1D, which are the
input embedding and the output head, and when the head is tied to the embedding."""

from __future__ import annotations

import pytest
from transformers import BertConfig, BertForMaskedLM, GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM
from transformers.pytorch_utils import Conv1D

from loramix import architecture


def _name_of(model, module) -> str:
    return next(n for n, m in model.named_modules() if m is module)


def test_conv1d_rules_match_transformers_gpt2():
    model = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=8, n_head=2, vocab_size=16, n_positions=8))
    for name, module in model.named_modules():
        if not name or list(module.children()):
            continue
        conv1d = isinstance(module, Conv1D)
        assert architecture.is_conv1d("gpt2", name) == conv1d, name
        assert bool(architecture.GPT2_CONV1D.search(name)) == conv1d, name
        assert not architecture.is_conv1d("llama", name)


@pytest.mark.parametrize(
    "model",
    [
        GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=8, n_head=2, vocab_size=16, n_positions=8)),
        BertForMaskedLM(BertConfig(num_hidden_layers=1, hidden_size=8, num_attention_heads=2, intermediate_size=8)),
        LlamaForCausalLM(
            LlamaConfig(num_hidden_layers=1, hidden_size=8, num_attention_heads=2, intermediate_size=8, vocab_size=16)
        ),
    ],
    ids=["gpt2", "bert", "llama"],
)
def test_heads_embeddings_and_ties_match_transformers(model):
    head = _name_of(model, model.get_output_embeddings())
    embedding = _name_of(model, model.get_input_embeddings())
    assert architecture.is_output_head(head) and not architecture.is_embedding(head)
    assert architecture.is_embedding(embedding) and not architecture.is_output_head(embedding)
    keys = [k for k in model.state_dict() if not k.startswith(head + ".")]  # a tied head is not stored
    config = model.config.to_dict()
    tied = architecture.tied_embedding(config, keys, head)
    assert tied == (f"{embedding}.weight" if model.config.tie_word_embeddings else None)
    assert architecture.ties_output_head(config, keys, f"{embedding}.weight") == model.config.tie_word_embeddings
