"""File plumbing shared by every reader and writer: safe tensor loading and atomic output folders."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from loramix.errors import AdapterFormatError, OutputError


def read_tensors(path: Path) -> dict[str, torch.Tensor]:
    """Load a .safetensors file, or a legacy pickle only through ``torch.load(weights_only=True)``."""
    try:
        if path.suffix == ".safetensors":
            return load_file(str(path))
        state = torch.load(str(path), map_location="cpu", weights_only=True)
    except (SafetensorError, OSError, RuntimeError, ValueError, EOFError, KeyError, TypeError) as exc:
        detail = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise AdapterFormatError(f"{path}: not a readable tensor file ({detail})") from None
    except Exception as exc:  # the unpickler raises anything at all on a crafted or damaged file
        raise AdapterFormatError(f"{path}: not a readable tensor file ({type(exc).__name__})") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise AdapterFormatError(f"{path}: expected a flat mapping of names to tensors")
    return state


def check_finite(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    """Refuse NaN/Inf, naming the file and the first offending tensor."""
    for name, tensor in tensors.items():
        if not tensor.is_floating_point():
            continue
        finite = torch.isfinite(tensor if tensor.element_size() > 1 else tensor.float())  # float8 has no isfinite
        if not finite.all():
            bad = int((~finite).sum())
            raise AdapterFormatError(
                f"{path}: tensor {name} has {bad} NaN/Inf value(s) of {tensor.numel()} "
                "(pass allow_nonfinite / --allow-nonfinite to load it anyway)"
            )


def _would_replace(target: Path, item: Path) -> bool:
    return target == item or target in item.parents


# Files that mark a folder as an adapter or checkpoint output, which overwrite may replace.
_OUTPUT_MARKERS = ("adapter_config.json", "config.json", "model.safetensors", "model.safetensors.index.json")


def check_output(target: str | Path, *, overwrite: bool = False, protect: Iterable[str | Path] = ()) -> Path:
    """Refuse an output that would replace any ``protect`` path (the inputs), or an existing non-empty folder unless
    ``overwrite`` and it holds an adapter or model (never an unrelated folder). Returns the resolved target.
    Callers check before long work, and `atomic_output` checks again."""
    target = Path(target).resolve()
    for item in protect:
        if Path(item).exists() and _would_replace(target, Path(item).resolve()):
            raise OutputError(f"{target}: output would replace the input {item}")
    if target.exists() and not target.is_dir():
        raise OutputError(f"{target}: exists and is not a folder")
    if target.exists() and any(target.iterdir()):
        if not overwrite:
            raise OutputError(f"{target}: folder exists and is not empty (use --force / overwrite=True to replace it)")
        markers = (*_OUTPUT_MARKERS, f"{target.name}.safetensors")  # the last: a kohya file loramix wrote
        if not any((target / marker).is_file() for marker in markers):
            raise OutputError(
                f"{target}: holds no adapter or model files, so it is not an earlier output; not replacing it "
                "even with --force"
            )
    return target


@contextlib.contextmanager
def atomic_output(target: str | Path, *, overwrite: bool = False, protect: Iterable[str | Path] = ()) -> Iterator[Path]:
    """Yield a temporary folder beside ``target``; rename it into place only if the block succeeds.

    Checks ``target`` with `check_output` first. On failure the temporary folder is removed and ``target`` is
    untouched.
    """
    target = check_output(target, overwrite=overwrite, protect=protect)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    old = tmp.with_name(tmp.name.removesuffix(".tmp") + ".old")
    try:
        yield tmp
        if target.exists():
            os.replace(target, old)  # set aside, not deleted, until the new output is in place
        try:
            os.replace(tmp, target)
        except OSError:
            if old.exists():
                os.replace(old, target)
            raise
    finally:
        for leftover in (tmp, old):
            if leftover.exists():
                shutil.rmtree(leftover, ignore_errors=True)
