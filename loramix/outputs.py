"""The one output context every command writes through: the output folder checked before any long work (never one of
the inputs, never a folder loramix did not write), then assembled in a temporary folder beside it and renamed into
place at the end (`loramix.io.files.atomic_output`) with its card, recipe and reports — or, for a merge, handed to
`loramix.merging.merge_loaded` (`merge_into_base`'s core), which writes the checkpoint the same way. A failure leaves
no partial output and never touches an input.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path

import torch

from loramix.adapter import LoraAdapter
from loramix.io.files import atomic_output, check_output
from loramix.merge.checkpoint import MergeReport
from loramix.merging import merge_loaded, write_files
from loramix.plans import Settings
from loramix.recipe import repeatable
from loramix.render.card import RECIPE_FILE
from loramix.runtime import require_path, resolve_device
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
        dtype: str | None = None,
        device: str | torch.device = "auto",
        progress: bool = False,
    ) -> MergeReport:
        """Write ``target.merge_into`` with ``adapter`` merged (in ``dtype``; None: the base's), and ``files``."""
        return merge_loaded(
            adapter,
            target,
            self.folder,
            dtype=dtype,
            device=resolve_device(device),
            overwrite=self.overwrite,
            progress=progress,
            files=files,
        )


def recipe_file(plan: Settings, **used) -> dict[str, str]:
    """``plan``'s recipe as the file an output carries: portable (`loramix.recipe.repeatable`), ``used`` settled."""
    return {RECIPE_FILE: repeatable(plan, **used).to_yaml()}
