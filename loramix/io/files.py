"""Safe tensor loading (never executing code from a file), output checks and atomic outputs: folders and single
text files are written beside their target and renamed into place, so a failure leaves nothing behind.

An output is born as ``.NAME.xxxxxxxx.tmp`` beside its target (with the permissions any new file gets under the
umask), checked for NaN/Inf, and renamed into place; a rename never replaces a folder that appeared meanwhile (POSIX
``rename`` refuses a non-empty target folder), so of two concurrent runs the second fails. Overwriting sets the
earlier output aside as ``.NAME.xxxxxxxx.old`` until the new one is in place. A run holds an advisory lock
(``flock``) on each of these while it lives; the next run for the same target finds the ones nobody holds (a run
killed in between), puts a set-aside output back where there is none, removes the rest, and says so in one warning.
Only a folder loramix wrote (`is_loramix_output`) is ever replaced.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import re
import shutil
import warnings
from collections.abc import Iterable, Iterator
from pathlib import Path

import torch
import yaml
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file

from loramix.errors import AdapterFormatError, OutputError, shown
from loramix.io.disk.rawcopy import fcntl
from loramix.io.disk.rawcopy import fresh as _fresh
from loramix.io.disk.rawcopy import lock as _lock

log = logging.getLogger(__name__)


def read_tensors(path: Path) -> dict[str, torch.Tensor]:
    """Load a .safetensors file, or a legacy pickle only through ``torch.load(weights_only=True)``; refuses tensor
    names that cannot be printed on one line (control characters, lone surrogates) or that read as a path (``../``)."""
    try:
        state = load_file(str(path)) if path.suffix == ".safetensors" else load_pickle(path)
    except (SafetensorError, OSError, RuntimeError, ValueError, EOFError, KeyError, TypeError) as exc:
        detail = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise AdapterFormatError(f"{path}: not a readable tensor file ({shown(detail)})") from None
    except Exception as exc:  # the unpickler raises anything at all on a crafted or damaged file
        raise AdapterFormatError(f"{path}: not a readable tensor file ({type(exc).__name__})") from None
    if not isinstance(state, dict) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()
    ):
        raise AdapterFormatError(f"{path}: expected a flat mapping of names to tensors")
    odd = next((k for k in state if shown(k) != k or ".." in k.split("/")), None)
    if odd is not None:
        raise AdapterFormatError(f"{path}: tensor name {shown(odd)} holds control characters, lone surrogates or ../")
    return state


def load_pickle(path: Path, *, mmap: bool = False, warn: bool = True):
    """``torch.load(weights_only=True)`` on the CPU (memory-mapped when ``mmap`` and the file allows it); torch's
    warnings about the file become loramix warnings (one line each, hidden by ``-q``), or are dropped without
    ``warn``."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            state = torch.load(str(path), map_location="cpu", weights_only=True, mmap=mmap)
        except RuntimeError:
            if not mmap:
                raise
            state = torch.load(str(path), map_location="cpu", weights_only=True)  # legacy pickles cannot be mapped
    for message in dict.fromkeys(str(w.message).splitlines()[0] for w in caught if str(w.message)) if warn else ():
        log.warning(f"{path}: {shown(message)}")
    return state


def tensor_keys(path: Path) -> list[str]:
    """The tensor names in a .safetensors file (its header only) or a torch pickle (memory-mapped: no tensor data is
    read for zip-format files); [] for an unreadable file, which the reader that owns it reports."""
    try:
        if path.suffix == ".safetensors":
            with safe_open(str(path), "pt") as f:
                return list(f.keys())
        state = load_pickle(path, mmap=True, warn=False)
    except Exception:  # noqa: BLE001 — the unpickler raises anything at all on a crafted or damaged file
        return []
    return [k for k in state if isinstance(k, str)] if isinstance(state, dict) else []


def check_finite(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    """Refuse NaN/Inf, naming the file and the first offending tensor."""
    for name, tensor in tensors.items():
        if bad := nonfinite_count(tensor):
            raise AdapterFormatError(
                f"{path}: tensor {name} has {bad} NaN/Inf value(s) of {tensor.numel()} and is refused",
                option="allow_nonfinite",
            )


def nonfinite_count(tensor: torch.Tensor) -> int:
    """How many NaN/Inf values ``tensor`` holds (0 for integer tensors). A sum first: NaN/Inf propagate, so only a
    sum that is not finite (NaN/Inf, or finite values overflowing) pays the count."""
    if not tensor.is_floating_point():
        return 0
    values = tensor if tensor.element_size() > 1 else tensor.float()  # float8: no sum, no isfinite
    if torch.isfinite(values.sum(dtype=torch.float32 if values.element_size() < 4 else None)):
        return 0
    return int((~torch.isfinite(values)).sum())


def check_output_finite(folder: Path, target: Path) -> None:
    """Refuse an output whose safetensors files (in ``folder``, to be renamed to ``target``) hold NaN/Inf."""
    for file in sorted(folder.glob("*.safetensors")):
        with safe_open(str(file), "pt") as f:
            for name in f.keys():
                tensor = f.get_tensor(name)
                if bad := nonfinite_count(tensor):
                    raise OutputError(
                        f"{target / file.name}: tensor {name} would hold {bad} NaN/Inf value(s) of {tensor.numel()} "
                        "(the weights or the inputs overflow its dtype); nothing was written"
                    )


# What marks a folder as one loramix wrote, which overwrite may replace: its recipe, search record or a model card
# tagged ``loramix``, or for an output with none of those (``save_adapter(..., card=False)``) a small marker file.
MARKER_FILE = ".loramix"
_OLDER_MARKERS = ("loramix_recipe.yaml", "search.json")
_MARKER_TEXT = "This folder was written by loramix; loramix may replace it when told to overwrite it.\n"
_CARD_FILE = "README.md"
_CARD_HEAD_BYTES = 65536


def is_loramix_output(folder: Path) -> bool:
    """Whether ``folder`` carries loramix's mark: its marker file, recipe, search record, or a card tagged loramix."""
    if any((folder / name).is_file() for name in (MARKER_FILE, *_OLDER_MARKERS)):
        return True
    try:
        with open(folder / _CARD_FILE, encoding="utf-8", errors="replace") as f:
            head = f.read(_CARD_HEAD_BYTES)
    except OSError:
        return False
    front = re.match(r"---\n(.*?)\n---\n", head, re.S)
    if front is None:
        return False
    try:
        meta = yaml.safe_load(front[1])
    except (yaml.YAMLError, RecursionError):
        return False
    tags = meta.get("tags") if isinstance(meta, dict) else None
    return isinstance(tags, list) and "loramix" in tags


@contextlib.contextmanager
def _os_errors(target: Path) -> Iterator[None]:
    """An OS refusal (a path too long, under a file, in /proc, without permission) as one `OutputError`."""
    try:
        yield
    except OSError as exc:
        if exc.errno is None:
            raise
        raise OutputError(f"{target}: cannot be written ({exc.strerror})") from None


def refuse_inputs(target: str | Path, protect: Iterable[str | Path]) -> Path:
    """The resolved ``target``; `OutputError` when writing it would touch a ``protect`` path (an input): the same
    path, one inside the other; or when ``target`` is a symbolic link (it would be written somewhere else)."""
    with _os_errors(Path(target)):
        if Path(target).is_symlink():
            raise OutputError(f"{target}: is a symbolic link; name the folder itself")
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


def _check_target(target: Path, overwrite: bool) -> None:
    """Refuse a file, or a non-empty folder unless ``overwrite`` and loramix wrote it."""
    if target.exists() and not target.is_dir():
        raise OutputError(f"{target}: exists and is not a folder")
    if target.exists() and any(target.iterdir()):
        if not overwrite:
            raise OutputError(f"{target}: folder exists and is not empty", option="overwrite")
        if not is_loramix_output(target):
            raise OutputError(
                f"{target}: was not written by loramix (no {MARKER_FILE}, {' or '.join(_OLDER_MARKERS)}, or "
                f"{_CARD_FILE} tagged loramix), so it is not an earlier output; not replacing it even with `overwrite`"
            )


def check_output(target: str | Path, *, overwrite: bool = False, protect: Iterable[str | Path] = ()) -> Path:
    """Refuse an output that would replace any ``protect`` path (the inputs), or an existing non-empty folder unless
    ``overwrite`` and loramix wrote it (never another folder). First restores or removes what an interrupted earlier
    run for the same target left beside it (`recover`). Returns the resolved target. Callers check before long
    work, and `atomic_output` checks again."""
    target = refuse_inputs(target, protect)
    with _os_errors(target):
        recover(target)
        _check_target(target, overwrite)
    return target


# ------------------------------------------------------------------------------------- temporary names and locks
def _leftover_pattern(target: Path) -> re.Pattern:
    return re.compile(rf"\.{re.escape(target.name)}\.[a-z0-9_]{{8}}\.(tmp|old)")


def recover(target: Path) -> None:
    """Put back an earlier output that an interrupted overwrite set aside (when ``target`` is absent) and remove the
    temporary folders and files that killed runs left beside ``target``; one warning says what was done. Leftovers
    a live run still holds are left alone."""
    if fcntl is None or not target.parent.is_dir():
        return
    pattern = _leftover_pattern(target)
    found = sorted((p for p in target.parent.iterdir() if pattern.fullmatch(p.name)), key=lambda p: p.suffix)
    restored, removed = None, 0
    for path in found:  # .old before .tmp
        try:
            fd = os.open(path, os.O_RDONLY)
        except OSError:
            continue  # removed meanwhile by another run
        try:
            if not _lock(fd):
                continue
            if path.suffix == ".old" and not target.exists():
                os.rename(path, target)
                restored = path.name
            else:
                if path.is_dir():
                    shutil.rmtree(path, ignore_errors=True)
                else:
                    path.unlink(missing_ok=True)
                removed += 1
        finally:
            os.close(fd)
    if restored or removed:
        done = [f"restored the earlier output from {restored}"] if restored else []
        done += [f"removed {removed} leftover temporary item(s)"] if removed else []
        log.warning(f"{target}: an earlier run was interrupted; {' and '.join(done)}")


@contextlib.contextmanager
def atomic_output(
    target: str | Path,
    *,
    overwrite: bool = False,
    protect: Iterable[str | Path] = (),
    finite: bool = True,
    made: Path | None = None,
) -> Iterator[Path]:
    """Yield a temporary folder beside ``target``; rename it into place only if the block succeeds.

    Checks ``target`` with `check_output` first, and again at the end: a folder that appeared meanwhile (another run)
    is never replaced unless ``overwrite`` allows it. With ``finite`` the safetensors files written are checked for
    NaN/Inf first (callers that check every value as they write pass False). A folder that carries no other mark of
    loramix (a card, recipe or search record) gets its marker file.
    On failure the temporary folder is removed and ``target`` is untouched. ``made``: a locked temporary folder made
    beside ``target`` already (`loramix.io.disk.rawcopy.fresh`: the early copy's staging folder), used as this one;
    its maker removes it unless it was put in place.
    """
    target = check_output(target, overwrite=overwrite, protect=protect)
    with contextlib.ExitStack() as stack:
        tmp = made
        if tmp is None:
            with _os_errors(target):
                target.parent.mkdir(parents=True, exist_ok=True)
                tmp = stack.enter_context(_fresh(target, folder=True))
        yield tmp  # on any failure or interrupt, leaving the stack removes tmp (see `_fresh`)
        if finite:
            check_output_finite(tmp, target)
        if not is_loramix_output(tmp):  # no card, recipe or search record says who wrote it
            (tmp / MARKER_FILE).write_text(_MARKER_TEXT)
        _umask_modes(tmp)
        _place(tmp, target, overwrite)


def _umask_modes(folder: Path) -> None:
    """Give what writers put in ``folder`` the modes any new file gets (safetensors writes its files 0600); the
    umask is read off ``folder`` itself, made with mode 0777 (reading it with os.umask would change it)."""
    folder_mode = folder.stat().st_mode & 0o777
    for path in folder.rglob("*"):
        path.chmod(folder_mode if path.is_dir() else folder_mode & 0o666)


def _place(tmp: Path, target: Path, overwrite: bool) -> None:
    """Rename ``tmp`` to ``target``; an earlier output there (allowed by ``overwrite``) is set aside, locked, until
    the new one is in place, and put back if that fails."""
    _check_target(target, overwrite)
    if not (target.is_dir() and any(target.iterdir())):
        try:
            os.replace(tmp, target)  # refuses a folder that is not empty: one that appeared since the check
        except OSError as exc:
            if exc.errno in (errno.ENOTEMPTY, errno.EEXIST, errno.ENOTDIR, errno.EISDIR):
                raise OutputError(
                    f"{target}: appeared while this run was writing it (another run?); not replaced"
                ) from None
            raise
        return
    old = tmp.with_suffix(".old")
    fd = os.open(target, os.O_RDONLY)
    try:
        _lock(fd)  # the earlier output, while set aside, is this run's: the next run must not restore it meanwhile
        os.replace(target, old)
        try:
            os.replace(tmp, target)
        except (OSError, KeyboardInterrupt):
            if tmp.exists():  # not in place: the earlier output goes back
                os.replace(old, target)
                raise
        try:
            shutil.rmtree(old, ignore_errors=True)
        except KeyboardInterrupt:  # the new output is complete and in place: finish removing the earlier one
            shutil.rmtree(old, ignore_errors=True)
            log.warning("%s: written; an interrupt while the earlier output was being removed was ignored", target)
    finally:
        os.close(fd)


def check_file(target: str | Path, overwrite: bool) -> None:
    """Refuse a folder as a file output, and an existing file unless ``overwrite``."""
    target = Path(target)
    with _os_errors(target):
        if target.is_dir():
            raise OutputError(f"{target}: is a folder, not a file")
        if target.exists() and not overwrite:
            raise OutputError(f"{target}: file exists", option="overwrite")


def write_text_atomic(
    target: str | Path, text: str, *, protect: Iterable[str | Path] = (), overwrite: bool = False
) -> Path:
    """Write ``text`` to the file ``target`` through a temporary file renamed into place; never over a ``protect``
    path (the inputs) or a folder, and over an existing file only with ``overwrite``."""
    target = refuse_inputs(target, protect)
    with _os_errors(target):
        recover(target)
        check_file(target, overwrite)
        target.parent.mkdir(parents=True, exist_ok=True)
        with _fresh(target, folder=False) as tmp:
            try:
                tmp.write_text(text)
                os.replace(tmp, target)
            finally:
                tmp.unlink(missing_ok=True)
    return target
