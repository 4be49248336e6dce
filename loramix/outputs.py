"""The one output context every command writes through: the output folder checked before any long work (never one of
the inputs, never a folder loramix did not write), then assembled in a temporary folder beside it and renamed into
place at the end (`loramix.io.files.atomic_output`) with its card, recipe and reports — or, for a merge, handed to
`loramix.merging.merge_into_base`, which writes the checkpoint the same way. A failure leaves no partial output and
never touches an input.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path

import torch

from loramix.adapter import LoraAdapter
from loramix.io.files import atomic_output, check_output
from loramix.merge.checkpoint import MergeReport
from loramix.merging import merge_into_base, write_files
from loramix.plans import Settings
from loramix.recipe import repeatable
from loramix.render.card import RECIPE_FILE
from loramix.runtime import parse_dtype, require_path
from loramix.settings import MergeTarget


class Output:
    """An output folder being written: checked once here, written once by `write` (or `merge`)."""

    def __init__(
        self, folder: str | Path, *, overwrite: bool = False, protect: Iterable[str | Path] = (), name: str = "output"
    ) -> None:
        require_path(folder, f"{name} (the output folder)")
        self.folder = Path(folder)
        self.overwrite = overwrite
        self.protect = [str(p) for p in protect if p]
        check_output(self.folder, overwrite=overwrite, protect=self.protect)

    @classmethod
    def of(cls, plan: Settings, *, overwrite: bool = False) -> Output:
        """The output of ``plan``, protecting every input it names."""
        return cls(plan.output or "", overwrite=overwrite, protect=plan.inputs())

    def write(self, files: dict[str, str], fill: Callable[[Path], object] | None = None) -> Path:
        """Write the folder atomically: ``fill(folder)`` (the adapter's files), then ``files`` (name → text)."""
        with atomic_output(self.folder, overwrite=self.overwrite, protect=self.protect) as tmp:
            if fill is not None:
                fill(tmp)
            write_files(tmp, files)
        return self.folder

    def merge(
        self,
        adapter: LoraAdapter,
        target: MergeTarget,
        files: dict[str, str],
        *,
        device: str | torch.device = "auto",
        progress: bool = False,
    ) -> MergeReport:
        """Write ``target.base`` with ``adapter`` merged, and ``files`` beside it."""
        return merge_into_base(
            adapter,
            target.base,
            self.folder,
            dtype=parse_dtype(target.dtype),
            shard_size=target.shard_size,
            device=device,
            workers=target.workers,
            overwrite=self.overwrite,
            progress=progress,
            files=files,
            quantized_as=target.quantized_as,
            double_quant=target.double_quant,
            blocksize=target.blocksize,
            round_trip=target.round_trip,
            merged_format=target.merged_format,
        )


def recipe_file(plan: Settings, **used) -> dict[str, str]:
    """``plan``'s recipe as the file an output carries: portable (`loramix.recipe.repeatable`), ``used`` settled."""
    return {RECIPE_FILE: repeatable(plan, **used).to_yaml()}
