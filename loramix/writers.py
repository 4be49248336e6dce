"""Output formats as a registry: each writer declares its own traits once — one file named after the output folder
or a fixed layout, the file's suffix, whether it lays ranks out (takes ``rank_layout``), whether it reads the base's
config, whether it writes only diffusion LoRAs or also holds expert adapters — and where its ``write`` lives. The
CLI's ``--format`` choices, a recipe's check and `loramix.formats.write_adapter` all read this table, so a new
format is one module: a function decorated with `writer` (or a `register`ed `Writer`). Torch-free: a writer's module
is imported only when it writes.

A writer is ``write(adapter, folder, *, dtype=None, **options) -> Path``: it writes into the existing ``folder``
and returns its main file; ``options`` are the ones its traits ask for (``file_name``, ``rank_layout``, ``base``).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from loramix.errors import OutputFormatError


@dataclass(frozen=True)
class Writer:
    """An output format: its name, one-line description, traits, and its write function (or "module:function")."""

    name: str
    description: str
    write: Callable | str
    single_file: bool = False  # one file named after the output folder (else the writer's own file names)
    suffix: str = ""  # that file's suffix
    laid_out: bool = False  # written in one rank layout: takes ``rank_layout`` ("portable" or "exact")
    takes_base: bool = False  # reads the base's config (GGUF: the architecture and head counts)
    diffusion_only: bool = False  # writes diffusion LoRAs only (names diffusers or ComfyUI load)
    experts: bool = False  # holds mixture-of-experts adapters

    def function(self) -> Callable:
        if callable(self.write):
            return self.write
        module, _, name = self.write.partition(":")
        return getattr(importlib.import_module(module), name)

    def options(self, output: str | Path, rank_layout: str = "portable", base: str | None = None) -> dict:
        """The options this writer takes for an output folder: the file name, the rank layout, the base."""
        options: dict = {}
        if self.laid_out:
            options["rank_layout"] = rank_layout
        if self.single_file:
            options["file_name"] = Path(output).resolve().name + self.suffix
        if self.takes_base and base is not None:
            options["base"] = base
        return options


WRITERS: dict[str, Writer] = {}


def register(writer: Writer) -> Writer:
    """Add ``writer`` to the table (a name taken already is an error: formats are never silently replaced)."""
    if writer.name in WRITERS:
        raise OutputFormatError(f"an output format named {writer.name!r} is registered already")
    WRITERS[writer.name] = writer
    return writer


def writer(name: str, description: str, **traits) -> Callable[[Callable], Callable]:
    """Register the decorated ``write`` function as output format ``name`` with its traits (see `Writer`)."""

    def decorate(write: Callable) -> Callable:
        register(Writer(name, description, write, **traits))
        return write

    return decorate


def names(*, diffusion: bool = True) -> tuple[str, ...]:
    """The registered formats (``diffusion=False``: those that write any model's LoRA, not only a diffusion one)."""
    return tuple(n for n, w in WRITERS.items() if diffusion or not w.diffusion_only)


def get(name: str) -> Writer:
    """The writer of format ``name``; an `OutputFormatError` naming the formats there are."""
    try:
        return WRITERS[name]
    except KeyError:
        raise OutputFormatError(f"unknown output format {name!r}; choose from {', '.join(WRITERS)}") from None


register(Writer("peft", "a PEFT folder", "loramix.formats.peft:write", laid_out=True, experts=True))
register(Writer("kohya", "a kohya/A1111 .safetensors", "loramix.formats.kohya:write", True, ".safetensors"))
register(
    Writer(
        "comfyui",
        "a diffusion LoRA in ComfyUI's diffusion_model. names",
        "loramix.formats.diffusion.comfyui:write",
        True,
        ".safetensors",
        diffusion_only=True,
    )
)
register(
    Writer(
        "diffusers",
        "a diffusers pytorch_lora_weights.safetensors",
        "loramix.formats.diffusion.writer:write",
        diffusion_only=True,
    )
)
register(
    Writer(
        "gguf", "a llama.cpp LoRA .gguf", "loramix.formats.gguf:write", True, ".gguf", laid_out=True, takes_base=True
    )
)


def check_model_format(name: str) -> None:
    """Refuse a format that cannot hold a model's LoRA (unknown, or one that writes diffusion LoRAs only)."""
    if name not in names(diffusion=False):
        raise OutputFormatError(f"unknown output format {name!r}; choose from {', '.join(names(diffusion=False))}")
