"""Facts about model layers that readers, writers, merges and checks share, in one place: which layers are
transformers' ``Conv1D`` (weight stored in×out), which are embeddings and output heads, how an output head is tied
to the input embedding, and the order transformers' expert modules register their fused parameters in.

Only facts live here (names, and the rules that read a name); readers and writers apply them. Everything is plain
strings, so any layer of the package can import it without torch.
"""

from __future__ import annotations

import re
from collections.abc import Collection, Mapping

# Model types whose attention/MLP layers are transformers' Conv1D (weight stored in×out), and those layers' names.
CONV1D_MODEL_TYPES = frozenset({"gpt2", "openai-gpt", "imagegpt", "decision_transformer"})
CONV1D_NAMES = frozenset({"c_attn", "c_proj", "c_fc", "q_attn"})
# GPT-2's Conv1D modules as their names alone show them (no base, so no model type, at hand).
GPT2_CONV1D = re.compile(r"(^|\.)h\.\d+\.(attn\.c_attn|attn\.c_proj|mlp\.c_fc|mlp\.c_proj)$")

# Output heads (transformers' output embeddings), matched as the module path or its dotted suffix.
OUTPUT_HEADS = ("lm_head", "embed_out", "cls.predictions.decoder", "vocab_projector", "output")
# Input (token) embeddings: the layers an output head is tied to.
INPUT_EMBEDDINGS = ("embed_tokens", "wte", "word_embeddings", "shared", "embed_in")
# Every embedding layer by its last name: the input embeddings and the position embeddings.
EMBEDDINGS = (*INPUT_EMBEDDINGS, "wpe", "position_embeddings", "embed_positions")
TIE_KEY = "tie_word_embeddings"  # the config.json flag that ties the output head to the input embedding

# The order transformers' expert modules register their fused parameters in (checked against PEFT in the tests).
EXPERT_PARAM_ORDER = ("gate_up_proj", "gate_up_proj_bias", "gate_proj", "up_proj", "down_proj", "down_proj_bias")


def is_conv1d(model_type: str | None, module: str) -> bool:
    """Whether ``module`` (a dotted module path) of a ``model_type`` model is a transformers Conv1D, its weight
    stored in×out."""
    return model_type in CONV1D_MODEL_TYPES and module.rsplit(".", 1)[-1] in CONV1D_NAMES


def _ends_with(name: str, suffixes: tuple[str, ...]) -> bool:
    return any(name == s or name.endswith("." + s) for s in suffixes)


def is_output_head(module: str) -> bool:
    return _ends_with(module, OUTPUT_HEADS)


def is_embedding(module: str) -> bool:
    """An embedding layer (input or position): a last name in `EMBEDDINGS` or one that says "embed", not a head."""
    last = module.rsplit(".", 1)[-1]
    return not is_output_head(module) and ("embed" in last or last in EMBEDDINGS)


def is_input_embedding_key(key: str) -> bool:
    """Whether the tensor ``key`` is an input embedding's weight."""
    return _ends_with(key, tuple(f"{e}.weight" for e in INPUT_EMBEDDINGS))


def tied_embedding(config: Mapping, keys: Collection[str], module: str) -> str | None:
    """The input embedding key (of the stored ``keys``) that output head ``module`` is tied to; None when
    ``module`` is no head, the config unties them, or no single input embedding is stored."""
    if not is_output_head(module) or config.get(TIE_KEY) is False:
        return None
    found = [k for k in keys if is_input_embedding_key(k)]
    return found[0] if len(found) == 1 else None


def ties_output_head(config: Mapping, keys: Collection[str], key: str) -> bool:
    """Whether ``key`` is an input embedding that the (unstored) output head is tied to."""
    if config.get(TIE_KEY) is not True or not is_input_embedding_key(key):
        return False
    return not any(k.endswith(f"{h}.weight") for k in keys for h in OUTPUT_HEADS)
