"""What extraction reads: a model as name → tensor, one tensor at a time, and what each tensor is.

`TensorSource` is the whole interface the extraction loop uses (names in storage order, shape, dtype, read, where,
and `stored`: where a tensor's bytes lie in its file, when it is read as stored, for reads straight to a GPU);
`CheckpointTensors` serves it from a transformers model folder or Hub id through the one streaming base reader
(`loramix.io.base`: safetensors byte ranges, or ``.bin`` through ``torch.load(weights_only=True)``, memory-mapped),
so only the tensor asked for is ever read. Another layout (a diffusers component folder) plugs in by serving the same
five things: `PipelineTensors` serves the LoRA-bearing components of a diffusers pipeline folder as one model whose
names carry the component (``unet.down_blocks.0.resnets.0.conv1.weight``), and `open_pair` picks the reader for two
folders. `pair` checks that two models hold the same tensors with the same shapes; `target_layout` says which
tensors get a LoRA and how ΔW lies on them, from names and shapes alone (as PEFT's targets are nn.Linear, Conv1D,
nn.Embedding and nn.Conv2d).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch

from loramix.architecture import is_conv1d, is_embedding, is_output_head
from loramix.errors import CheckpointError
from loramix.io.base import BaseCheckpoint, BaseTensor, open_base, resolve_base
from loramix.io.diffusers import KOHYA_COMPONENTS, is_pipeline, open_pipeline

PIPELINE = "diffusers-pipeline"  # the model_type of `PipelineTensors`: its LoRA file holds linear and conv LoRA only
LORA_COMPONENTS = tuple(dict.fromkeys(KOHYA_COMPONENTS.values()))  # the components a pipeline LoRA file can name


class TensorSource(Protocol):
    folder: Path
    config: dict

    def names(self) -> list[str]: ...

    def shape(self, name: str) -> tuple[int, ...]: ...

    def dtype(self, name: str) -> torch.dtype: ...

    def read(self, name: str) -> torch.Tensor: ...

    def where(self, name: str) -> str: ...

    def stored(self, name: str) -> BaseTensor | None: ...


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
        return self.checkpoint.weight_names()  # a quantized base's scales are part of its weights

    def shape(self, name: str) -> tuple[int, ...]:
        return self.checkpoint.dense(name).shape

    def dtype(self, name: str) -> torch.dtype:
        return self.checkpoint.dense(name).dtype

    def read(self, name: str) -> torch.Tensor:
        entry = self.checkpoint.dense(name)  # a quantized weight dequantized
        return entry.rows(0, entry.shape[0] if entry.shape else 0)

    def where(self, name: str) -> str:
        entry = self.checkpoint.tensors[name]
        return str(entry.path or self.checkpoint.weight_files[0])

    def stored(self, name: str) -> BaseTensor | None:
        """The byte range of tensor ``name`` in its safetensors file; None when it is not read as stored (a quantized
        weight dequantized, a legacy ``.bin`` tensor)."""
        entry = self.checkpoint.dense(name)
        return entry if isinstance(entry, BaseTensor) and entry.path is not None else None


def open_model(source: str | Path) -> CheckpointTensors:
    """A model folder or Hub id (config, safetensors or legacy .bin shards) as a `TensorSource`."""
    return CheckpointTensors(open_base(resolve_base(source)))


@dataclass
class PipelineTensors:
    """The components of a diffusers pipeline folder that a LoRA file can name (`LORA_COMPONENTS`) as one model:
    each tensor named ``<component>.<name in the component>``, read through that component's `CheckpointTensors`."""

    folder: Path
    parts: dict[str, CheckpointTensors]

    @property
    def config(self) -> dict:
        return {"model_type": PIPELINE}

    def _split(self, name: str) -> tuple[CheckpointTensors, str]:
        component, _, rest = name.partition(".")
        return self.parts[component], rest

    def names(self) -> list[str]:
        return [f"{c}.{n}" for c, part in self.parts.items() for n in part.names()]

    def shape(self, name: str) -> tuple[int, ...]:
        part, rest = self._split(name)
        return part.shape(rest)

    def dtype(self, name: str) -> torch.dtype:
        part, rest = self._split(name)
        return part.dtype(rest)

    def read(self, name: str) -> torch.Tensor:
        part, rest = self._split(name)
        return part.read(rest)

    def where(self, name: str) -> str:
        part, rest = self._split(name)
        return part.where(rest)

    def stored(self, name: str) -> BaseTensor | None:
        part, rest = self._split(name)
        return part.stored(rest)


def open_pipeline_tensors(folder: str | Path) -> PipelineTensors:
    pipeline = open_pipeline(folder)
    parts = {c: CheckpointTensors(pipeline.components[c]) for c in LORA_COMPONENTS if c in pipeline.components}
    if not parts:
        raise CheckpointError(f"{folder}: a diffusers pipeline with none of {', '.join(LORA_COMPONENTS)}")
    return PipelineTensors(Path(folder), parts)


def open_pair(base: str | Path, finetuned: str | Path) -> tuple[TensorSource, TensorSource]:
    """The readers of two models: two transformers models (`open_model`) or two diffusers pipeline folders
    (`PipelineTensors`, which must hold the same LoRA-bearing components); `CheckpointError` naming the folder
    otherwise."""
    pipelines = [is_pipeline(Path(base)), is_pipeline(Path(finetuned))]
    if not any(pipelines):
        return open_model(base), open_model(finetuned)
    if not all(pipelines):
        one, other = (base, finetuned) if pipelines[0] else (finetuned, base)
        raise CheckpointError(f"{other}: not a diffusers pipeline folder (no model_index.json), but {one} is one")
    base_tensors, tuned_tensors = open_pipeline_tensors(base), open_pipeline_tensors(finetuned)
    if set(base_tensors.parts) != set(tuned_tensors.parts):
        raise CheckpointError(
            f"{finetuned}: its components ({', '.join(sorted(tuned_tensors.parts))}) differ from the base {base}'s "
            f"({', '.join(sorted(base_tensors.parts))})"
        )
    return base_tensors, tuned_tensors


def target_layout(name: str, shape: tuple[int, ...], model_type: str | None) -> str | None:
    """How ΔW of tensor ``name`` lies on it when it gets a LoRA (`loramix.adapter.LAYOUTS`); None for tensors that
    are carried whole when they change (norms, biases, 1-D and 3-D tensors; a pipeline's embeddings)."""
    if not name.endswith(".weight"):
        return None
    module = name.removesuffix(".weight")
    if len(shape) == 4:
        return "conv2d"
    if len(shape) != 2:
        return None
    if is_embedding(module):
        return None if model_type == PIPELINE else "embedding"
    if is_conv1d(model_type, module):
        return "conv1d_fan_in_fan_out"
    return "out_in"


def resized(name: str, base_shape: tuple[int, ...], tuned_shape: tuple[int, ...]) -> bool:
    """An embedding or output head whose vocabulary (first axis) changed and nothing else."""
    module = name.rsplit(".", 1)[0]
    vocabulary = is_embedding(module) or is_output_head(module)
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
