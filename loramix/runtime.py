"""Where and how work runs: device names, dtype names, byte sizes, and torch's CPU thread count.

Library calls take a device or dtype and leave process-wide state alone; only the CLI changes torch's thread count,
through `torch_threads`, for the length of one command.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator
from pathlib import Path

import torch
from tqdm.auto import tqdm

from loramix.errors import ArgumentError, DeviceError, SettingError

# A bar appears only for work still running after this many seconds: short runs print nothing.
PROGRESS_DELAY = 2.0

DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float16": torch.float16,
    "fp16": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
}
# The dtypes loramix writes, by the names transformers writes into config.json.
OUTPUT_DTYPE_NAMES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}


def parse_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    """A torch dtype for a name (``bf16``, ``float32``…) or a dtype loramix can write; None passes through."""
    if dtype is None:
        return None
    if isinstance(dtype, torch.dtype):
        if dtype not in OUTPUT_DTYPE_NAMES:
            raise SettingError(f"dtype {dtype} is not supported (float32, float16, bfloat16)")
        return dtype
    try:
        return DTYPES[dtype]
    except (KeyError, TypeError):
        raise SettingError(f"unknown dtype {dtype!r}; choose from {', '.join(DTYPES)}") from None


def resolve_device(device: str | torch.device) -> torch.device:
    """``cpu``, ``cuda``, ``cuda:N`` or ``auto`` (a GPU when there is one) as a torch device."""
    if isinstance(device, torch.device):
        device = str(device)
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError):
        raise DeviceError(f"unknown device {device!r} (use cpu, cuda or auto)") from None
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise DeviceError(f"device {device!r} asked for but no CUDA GPU is available (use cpu or auto)")
    if resolved.type not in ("cpu", "cuda"):
        raise DeviceError(f"device {device!r} is not supported (use cpu, cuda or auto)")
    return resolved


def progress_bar(*, enabled: bool, **options) -> tqdm:
    """The one progress bar style: off unless ``enabled``, drawn only once the work has run `PROGRESS_DELAY`
    seconds, and erased when done (the command's own output follows, with no bar or blank line left behind)."""
    return tqdm(disable=not enabled, delay=PROGRESS_DELAY, leave=False, dynamic_ncols=True, **options)


def require_path(value, what: str) -> Path:
    """``value`` (a str or Path) as a Path; `ArgumentError` naming ``what`` it should be for anything else."""
    if isinstance(value, (str, Path)) and str(value):
        return Path(value)
    raise ArgumentError(f"{what} must be a non-empty str or Path, got {type(value).__name__}")


_SIZE = re.compile(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?I?B)?\s*")
_UNITS = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12}
_UNITS |= {"KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_size(size: int | str) -> int:
    """Bytes in ``size``: an int, or "5GB" (decimal, as transformers counts), "500MB", "2GiB", "20KB"."""
    if isinstance(size, int) and not isinstance(size, bool) and size >= 0:
        return size
    match = _SIZE.fullmatch(str(size).upper())
    if not match:
        raise SettingError(f"shard size {size!r}: expected bytes or a number with KB, MB, GB (or KiB, MiB, GiB)")
    return int(float(match[1]) * _UNITS[match[2] or "B"])


@contextlib.contextmanager
def torch_threads(count: int | None) -> Iterator[None]:
    """Run the block with torch's intra-op CPU threads set to ``count`` (None: as it is), restored afterwards.

    For the CLI: loramix's work is many small products and decompositions (and, when merging, several worker
    threads at once), where extra OpenMP threads rarely pay and on a busy machine cost several times the work
    (ten Llama-7B-shaped adapters analysed on a 2-core CPU shared with other jobs: 7 s on one thread, 25 s on two).
    """
    previous = torch.get_num_threads()
    if count is not None:
        torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(previous)
