"""A mixture-of-experts checkpoint read as the model holds it: its per-expert tensors (``mlp.experts.{e}.gate_proj``,
``up_proj``, ``down_proj``) assembled into the fused 3-D parameters transformers 5 builds
(``mlp.experts.gate_up_proj`` (E, 2I, H)), through the blocks transformers' own conversion mapping says each
stored tensor holds (`loramix.io.conversion_mapping`). Extraction then gives each expert its own LoRA on the fused
parameter, which PEFT loads as ``target_parameters``."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from loramix.extraction.tensors import TensorSource
from loramix.io.base import BaseTensor
from loramix.io.conversion_mapping import DiskBlock, ModelNames, model_names

_PER_EXPERT = re.compile(r"\.experts\.\d+\.")


@dataclass
class FusedTensors:
    """``source`` under the model's in-memory names for its fused expert parameters (other tensors as stored)."""

    source: TensorSource
    model: ModelNames
    blocks: dict[str, list[tuple[str, DiskBlock]]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        stored = set(self.source.names())
        for param in sorted(self.model.fused):
            found = self.model.blocks(param)
            if found and all(name in stored for name, _ in found):
                self.blocks[param] = found
        held = {name for found in self.blocks.values() for name, _ in found}
        self._names = [n for n in self.source.names() if n not in held] + list(self.blocks)

    @property
    def folder(self) -> Path:
        return self.source.folder

    @property
    def config(self) -> dict:
        return self.source.config

    def names(self) -> list[str]:
        return self._names

    def shape(self, name: str) -> tuple[int, ...]:
        return self.model.shape(name) if name in self.blocks else self.source.shape(name)

    def dtype(self, name: str) -> torch.dtype:
        return self.source.dtype(self.blocks[name][0][0] if name in self.blocks else name)

    def read(self, name: str) -> torch.Tensor:
        if name not in self.blocks:
            return self.source.read(name)
        out = torch.empty(self.model.shape(name), dtype=self.dtype(name))
        for stored, block in self.blocks[name]:
            tensor = self.source.read(stored)
            out[block.expert, slice(*block.rows), slice(*block.cols)] = tensor.T if block.transposed else tensor
        return out

    def where(self, name: str) -> str:
        return self.source.where(self.blocks[name][0][0] if name in self.blocks else name)

    def stored(self, name: str) -> BaseTensor | None:
        return None if name in self.blocks else self.source.stored(name)  # a fused parameter is assembled

    def is_transposed(self, name: str) -> bool:
        return self.model.is_transposed(name)


def fused_view(base: TensorSource, tuned: TensorSource) -> tuple[TensorSource, TensorSource]:
    """Both models as `FusedTensors` when the base stores experts one by one and transformers fuses them; else as
    they are."""
    if not any(_PER_EXPERT.search(n) for n in base.names()) or not base.config.get("architectures"):
        return base, tuned
    model = model_names(base.folder)
    if model is None or not model.fused:
        return base, tuned
    return FusedTensors(base, model), FusedTensors(tuned, model)
