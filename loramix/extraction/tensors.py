"""What extraction reads: a model as name → tensor, one tensor at a time, and what each tensor is.

`TensorSource` is the whole interface the extraction loop uses (names in storage order, shape, dtype, read, where);
`CheckpointTensors` serves it from a transformers model folder or Hub id through the one streaming base reader
(`loramix.io.base`: safetensors byte ranges, or ``.bin`` through ``torch.load(weights_only=True)``, memory-mapped),
so only the tensor asked for is ever read. Another layout (a diffusers component folder) plugs in by serving the same
five things. `pair` checks that two models hold the same tensors with the same shapes; `target_layout` says which
tensors get a LoRA and how ΔW lies on them, from names and shapes alone (as PEFT's targets are nn.Linear, Conv1D,
nn.Embedding and nn.Conv2d).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch

from loramix.errors import CheckpointError
from loramix.io.base import CONV1D_MODEL_TYPES, CONV1D_NAMES, OUTPUT_HEADS, BaseCheckpoint, open_base, resolve_base

EMBEDDING_NAMES = ("wte", "wpe", "shared")  # embeddings whose name does not say "embed"


class TensorSource(Protocol):
    folder: Path
    config: dict

    def names(self) -> list[str]: ...

    def shape(self, name: str) -> tuple[int, ...]: ...

    def dtype(self, name: str) -> torch.dtype: ...

    def read(self, name: str) -> torch.Tensor: ...

    def where(self, name: str) -> str: ...


@dataclass
class CheckpointTensors:
    """A transformers model folder served tensor by tensor (nothing loaded but the headers)."""

    checkpoint: BaseCheckpoint

    @property
    def folder(self) -> Path:
        return self.checkpoint.folder

    @property
    def config(self) -> dict:
        return self.checkpoint.config

    def names(self) -> list[str]:
        return list(self.checkpoint.tensors)

    def shape(self, name: str) -> tuple[int, ...]:
        return self.checkpoint.tensors[name].shape

    def dtype(self, name: str) -> torch.dtype:
        return self.checkpoint.tensors[name].dtype

    def read(self, name: str) -> torch.Tensor:
        entry = self.checkpoint.tensors[name]
        return entry.rows(0, entry.shape[0] if entry.shape else 0)

    def where(self, name: str) -> str:
        entry = self.checkpoint.tensors[name]
        return str(entry.path or self.checkpoint.weight_files[0])


def open_model(source: str | Path) -> CheckpointTensors:
    """A model folder or Hub id (config, safetensors or legacy .bin shards) as a `TensorSource`."""
    return CheckpointTensors(open_base(resolve_base(source)))


def is_embedding(module: str) -> bool:
    last = module.rsplit(".", 1)[-1]
    return last not in OUTPUT_HEADS and ("embed" in last or last in EMBEDDING_NAMES)


def target_layout(name: str, shape: tuple[int, ...], model_type: str | None) -> str | None:
    """How ΔW of tensor ``name`` lies on it when it gets a LoRA (`loramix.adapter.LAYOUTS`); None for tensors that
    are carried whole when they change (norms, biases, 1-D and 3-D tensors)."""
    if not name.endswith(".weight"):
        return None
    module = name.removesuffix(".weight")
    if len(shape) == 4:
        return "conv2d"
    if len(shape) != 2:
        return None
    if is_embedding(module):
        return "embedding"
    if model_type in CONV1D_MODEL_TYPES and module.rsplit(".", 1)[-1] in CONV1D_NAMES:
        return "conv1d_fan_in_fan_out"
    return "linear"


def resized(name: str, base_shape: tuple[int, ...], tuned_shape: tuple[int, ...]) -> bool:
    """An embedding or output head whose vocabulary (first axis) changed and nothing else."""
    module = name.rsplit(".", 1)[0]
    vocabulary = is_embedding(module) or module.rsplit(".", 1)[-1] in OUTPUT_HEADS
    same_rest = len(base_shape) == len(tuned_shape) and base_shape[1:] == tuned_shape[1:]
    return vocabulary and same_rest and base_shape[0] != tuned_shape[0]


def pair(base: TensorSource, tuned: TensorSource) -> list[str]:
    """The tensor names both models hold, in the base's storage order; `CheckpointError` naming the file for a
    tensor one model lacks or a shape that differs (other than a resized vocabulary)."""
    base_names, tuned_names = base.names(), set(tuned.names())
    for name in base_names:
        if name not in tuned_names:
            raise CheckpointError(f"{tuned.folder}: no tensor {name} (the base has it in {base.where(name)})")
    known = set(base_names)
    for name in tuned.names():
        if name not in known:
            raise CheckpointError(f"{tuned.where(name)}: tensor {name} is not in the base {base.folder}")
    for name in base_names:
        shapes = base.shape(name), tuned.shape(name)
        if shapes[0] != shapes[1] and not resized(name, *shapes):
            raise CheckpointError(
                f"{tuned.where(name)}: tensor {name} has shape {tuple(shapes[1])}, the base's "
                f"({base.where(name)}) {tuple(shapes[0])}"
            )
    return base_names
