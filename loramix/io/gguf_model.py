"""A GGUF base file read as the transformers model it holds: what `loramix.io.base.open_base` serves for a ``.gguf``
base, so that extract, analyze --base, convert --base and a merge written as safetensors read it as they read any
other base (the same merge written as GGUF again is `loramix.merge.gguf`).

transformers' own GGUF support gives both maps: the config (``load_gguf_checkpoint(..., return_tensors=False)``,
the GGUF metadata as config.json fields; ``architectures`` the causal-LM class transformers loads it as) and each
GGUF tensor's transformers name (``get_gguf_hf_weights_map`` over a meta-device instance of that class: gguf's
``TensorNameMap`` run over the model's own names). Each tensor is read by gguf's dequantize (`GgufBase.dequantized`),
a row range at a time (a GGUF row is whole quantization blocks), in transformers' row order: the q/k rows that
convert_hf_to_gguf.py permuted for Llama (``LlamaModel.permute``) are read back through the inverse permutation.
Every type gguf can dequantize reads (k-quants and i-quants included); a tensor of a type it cannot is one line
naming the tensor and type. Architectures: llama and qwen2, whose tensors convert_hf_to_gguf.py stores as the
transformers model holds them apart from Llama's q/k rows; any other is refused, as is a GGUF tensor transformers
has no name for (llama.cpp's computed ``rope_freqs`` table, no parameter of the model, is left out).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from loramix.errors import CheckpointError, inside_backend
from loramix.io.gguf_base import GgufBase, llama_permute, stored_shape

READABLE = ("llama", "qwen2")  # GGUF architectures read as transformers models (see the module docstring)
COMPUTED = ("rope_freqs.weight",)  # llama.cpp's tables made from the config, not weights of the model
FLOAT_TYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}  # read back exactly as stored


@dataclass
class GgufTensor:
    """One tensor of a GGUF base under its transformers name and shape (a `loramix.io.base.BaseTensor` stand-in:
    ``rows`` dequantizes): float GGUF types in their own dtype, quantized ones as float32."""

    name: str
    stored: str  # its GGUF name
    base: GgufBase
    shape: tuple[int, ...]
    dtype: torch.dtype
    order: torch.Tensor | None = None  # the GGUF row of each transformers row (Llama's q/k), None: the same rows
    path: None = None
    offset: int = 0
    tensor: None = None

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize

    def rows(self, start: int, stop: int) -> torch.Tensor:
        """Rows [start, stop) in transformers' order, dequantized by gguf (a 1-D tensor: read whole, then cut)."""
        if len(self.shape) < 2:
            whole = self.base.dequantized(self.stored).reshape(self.shape)
            return (whole if self.order is None else whole[self.order])[start:stop].to(self.dtype)
        picked = slice(start, stop) if self.order is None else self.order[start:stop].numpy()
        values = self.base.dequantized(self.stored, picked)
        return values.reshape(stop - start, *self.shape[1:]).to(self.dtype)


def transformers_view(base: GgufBase) -> tuple[dict, dict[str, GgufTensor]]:
    """(the config.json of the transformers model ``base`` holds, its tensors by transformers name in the file's
    order), or `CheckpointError` in one line (see the module docstring)."""
    if base.architecture not in READABLE:
        raise CheckpointError(
            f"{base.path}: GGUF architecture {base.architecture}; loramix reads {', '.join(READABLE)} GGUF bases "
            "as transformers models (whose tensor transforms it knows)"
        )
    config, model = _config_and_model(base)
    names = _names(base, model, config)
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    tensors: dict[str, GgufTensor] = {}
    for stored, found in base.tensors.items():
        if stored in COMPUTED:
            continue
        name = names.get(stored)
        if name is None:
            model_class = config["architectures"][0]
            raise CheckpointError(f"{base.path}: tensor {stored} has no name in transformers' {model_class}")
        shape = stored_shape(base, stored)
        if shape != shapes[name]:
            raise CheckpointError(
                f"{base.path}: tensor {stored} is {list(shape)}, {name} of the config's model is {list(shapes[name])}"
            )
        kind = found.tensor_type.name
        base.dequantized(stored, slice(0, 1))  # a type gguf cannot read is refused now, before the long part
        order = _row_order(base, stored, shape[0])
        tensors[name] = GgufTensor(name, stored, base, shape, FLOAT_TYPES.get(kind, torch.float32), order)
    return config, tensors


def _config_and_model(base: GgufBase) -> tuple[dict, torch.nn.Module]:
    """transformers' config of ``base`` (as a config.json dict naming its class) and that class on the meta device."""
    import transformers
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    with inside_backend("transformers", f"reading the config of {base.path.name}"):
        try:
            fields = dict(load_gguf_checkpoint(str(base.path), return_tensors=False)["config"])
            config = transformers.AutoConfig.for_model(fields.pop("model_type"), **fields)
        except (ValueError, KeyError) as exc:
            raise CheckpointError(f"{base.path}: transformers cannot read its GGUF metadata ({exc})") from None
        model_class = MODEL_FOR_CAUSAL_LM_MAPPING[type(config)]
        config.architectures = [model_class.__name__]
        with torch.device("meta"):
            model = model_class._from_config(config)
    return config.to_dict(), model


def _names(base: GgufBase, model: torch.nn.Module, config: dict) -> dict[str, str]:
    """``{GGUF name: transformers name}`` by transformers' ``get_gguf_hf_weights_map``."""
    from transformers.modeling_gguf_pytorch_utils import TENSOR_PROCESSORS, TensorProcessor, get_gguf_hf_weights_map

    processor = TENSOR_PROCESSORS.get(base.architecture, TensorProcessor)(config=config)
    with inside_backend("transformers", f"naming the tensors of {base.path.name}"):
        return get_gguf_hf_weights_map(model, processor)


def _row_order(base: GgufBase, stored: str, rows: int) -> torch.Tensor | None:
    """The GGUF row holding each transformers row of ``stored``: Llama's q/k rows through the inverse of
    convert_hf_to_gguf.py's permutation (q by the attention heads, k by the key/value heads), else None."""
    kind = stored.split(".")[2] if stored.startswith("blk.") else None
    if base.architecture != "llama" or kind not in ("attn_q", "attn_k"):
        return None
    heads = base.config["num_attention_heads" if kind == "attn_q" else "num_key_value_heads"]
    return torch.argsort(llama_permute(torch.arange(rows), heads))
