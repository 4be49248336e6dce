"""Safe tensor loading (never executing code from a file), output checks and atomic outputs: folders and single
text files are written beside their target and renamed into place, so a failure leaves nothing behind."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
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


def tensor_keys(path: Path) -> list[str]:
    """The tensor names in a .safetensors file (its header only) or a torch pickle (memory-mapped: no tensor data is
    read for zip-format files); [] for an unreadable file, which the reader that owns it reports."""
    try:
        if path.suffix == ".safetensors":
            with safe_open(str(path), "pt") as f:
                return list(f.keys())
        try:
            state = torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError:  # legacy (non-zip) pickles cannot be memory-mapped
            state = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception:  # noqa: BLE001 — the unpickler raises anything at all on a crafted or damaged file
        return []
    return [k for k in state if isinstance(k, str)] if isinstance(state, dict) else []


def check_finite(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    """Refuse NaN/Inf, naming the file and the first offending tensor."""
    for name, tensor in tensors.items():
        if not tensor.is_floating_point():
            continue
        finite = torch.isfinite(tensor if tensor.element_size() > 1 else tensor.float())  # float8 has no isfinite
        if not finite.all():
            bad = int((~finite).sum())
            raise AdapterFormatError(
                f"{path}: tensor {name} has {bad} NaN/Inf value(s) of {tensor.numel()} and is refused",
                option="allow_nonfinite",
            )


# Files that mark a folder as an adapter or checkpoint output, which overwrite may replace.
_OUTPUT_MARKERS = ("adapter_config.json", "config.json", "model.safetensors", "model.safetensors.index.json")


def refuse_inputs(target: str | Path, protect: Iterable[str | Path]) -> Path:
    """The resolved ``target``; `OutputError` when writing it would touch a ``protect`` path (an input): the same
    path, one inside the other."""
    target = Path(target).resolve()
    for item in protect:
        if not item or not Path(item).exists():
            continue
        source = Path(item).resolve()
        if target == source or target in source.parents:
            raise OutputError(f"{target}: output would replace the input {item}")
        if source in target.parents:
            raise OutputError(f"{target}: output would be written inside the input {item}")
    return target


def check_output(target: str | Path, *, overwrite: bool = False, protect: Iterable[str | Path] = ()) -> Path:
    """Refuse an output that would replace any ``protect`` path (the inputs), or an existing non-empty folder unless
    ``overwrite`` and it holds an adapter or model (never an unrelated folder). Returns the resolved target.
    Callers check before long work, and `atomic_output` checks again."""
    target = refuse_inputs(target, protect)
    if target.exists() and not target.is_dir():
        raise OutputError(f"{target}: exists and is not a folder")
    if target.exists() and any(target.iterdir()):
        if not overwrite:
            raise OutputError(f"{target}: folder exists and is not empty", option="overwrite")
        markers = (*_OUTPUT_MARKERS, f"{target.name}.safetensors")  # the last: a kohya file loramix wrote
        if not any((target / marker).is_file() for marker in markers):
            raise OutputError(
                f"{target}: holds no adapter or model files, so it is not an earlier output; not replacing it "
                "even with overwrite"
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


def write_text_atomic(target: str | Path, text: str, *, protect: Iterable[str | Path] = ()) -> Path:
    """Write ``text`` to the file ``target`` through a temporary file renamed into place; never over a ``protect``
    path (the inputs) or a folder."""
    target = refuse_inputs(target, protect)
    if target.is_dir():
        raise OutputError(f"{target}: is a folder, not a file")
    target.parent.mkdir(parents=True, exist_ok=True)
    handle, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    try:
        with os.fdopen(handle, "w") as f:
            f.write(text)
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target
