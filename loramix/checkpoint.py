"""Merge an adapter into a base checkpoint and write a merged, sharded safetensors checkpoint.

The base is streamed one tensor at a time and never loaded whole: safetensors headers are parsed here, each tensor
is read from its byte range (row chunks for large 2-D tensors), ΔW = s·B·A is added in float32 on the chosen device,
the result is cast once to the output dtype and written. Output shards are planned in advance from the input
headers, so each file's header is written first and every tensor then goes to its planned place (a few threads at
once); tensors that change neither value nor dtype are copied byte for byte, neighbours together, in the kernel
where the OS allows (copy_file_range). Peak memory is about one chunk per thread plus the adapter, whatever the
model's size.

Names: adapter module names are the task model's module paths (``transformer.h.0.attn.c_attn``); a checkpoint may
store the same weight with a prefix more or less (``h.0.attn.c_attn.weight`` in a bare GPT2Model). Matching tries
the exact key, then base keys ending in the adapter's name, then the adapter's name without leading parts; more
than one candidate is an error. How ΔW lies on a weight (Linear out×in or GPT-2 Conv1D in×out) is settled by the
base, as PEFT does: the base tensor's shape, and for square weights the model type and module name.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import re
import shutil
import struct
import sys
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import torch
from tqdm.auto import tqdm

from loramix.adapter import LoraAdapter, LoraModule
from loramix.errors import LoramixError
from loramix.io import atomic_output

log = logging.getLogger(__name__)

SAFE_INDEX = "model.safetensors.index.json"
SAFE_SINGLE = "model.safetensors"
BIN_INDEX = "pytorch_model.bin.index.json"
BIN_SINGLE = "pytorch_model.bin"
BASE_FILES = ("*.json", "*.safetensors", "*.txt", "*.model", "*.tiktoken", "tokenizer*", "*.jinja")
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".gguf", ".onnx")
CHUNK_ELEMENTS = 1 << 20  # rows are processed in chunks of about this many elements (4 MB in float32)
LOW_SURVIVAL = 0.5
COPY_PIECE = 1 << 28  # unchanged tensors are copied (in the kernel) in pieces of at most this many bytes
WORKERS = 4

SAFE_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}
DTYPE_NAMES = {v: k for k, v in SAFE_DTYPES.items()}
CONFIG_DTYPES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}

# Model types whose attention/MLP layers are transformers' Conv1D (weight stored in×out), and those layers' names.
CONV1D_MODEL_TYPES = {"gpt2", "openai-gpt", "imagegpt", "decision_transformer"}
CONV1D_NAMES = {"c_attn", "c_proj", "c_fc", "q_attn"}
# Output heads that transformers ties to the input embedding (and then does not store), and embedding keys.
OUTPUT_HEADS = ("lm_head", "embed_out", "cls.predictions.decoder", "vocab_projector", "output")
INPUT_EMBEDDINGS = ("embed_tokens.weight", "wte.weight", "word_embeddings.weight", "shared.weight", "embed_in.weight")


class CheckpointError(LoramixError):
    """A base checkpoint is unreadable, or the adapter does not fit it (names, shapes, layers)."""


# ----------------------------------------------------------------------------------------------- reading the base


@dataclass
class BaseTensor:
    """One tensor of the base: where its bytes are (a safetensors file and absolute offset) or the tensor itself."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    path: Path | None = None
    offset: int = 0
    tensor: torch.Tensor | None = None

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize

    def rows(self, start: int, stop: int) -> torch.Tensor:
        """Rows [start, stop) along the first dimension (the whole tensor for 0-D), in the stored dtype."""
        if self.tensor is not None:
            return self.tensor if not self.shape else self.tensor[start:stop]
        shape = (stop - start, *self.shape[1:]) if self.shape else ()
        count = math.prod(shape) * self.dtype.itemsize
        row_bytes = math.prod(self.shape[1:]) * self.dtype.itemsize if self.shape else 0
        buffer = bytearray(count)
        if count:
            with open(self.path, "rb", buffering=0) as f:
                f.seek(self.offset + start * row_bytes)
                if f.readinto(buffer) != count:
                    raise CheckpointError(f"{self.path}: truncated file (tensor {self.name})")
            return torch.frombuffer(buffer, dtype=self.dtype).reshape(shape)
        return torch.empty(shape, dtype=self.dtype)


@dataclass
class BaseCheckpoint:
    """A base model folder: its config and its tensors in file order (nothing loaded but the headers)."""

    folder: Path
    config: dict
    tensors: dict[str, BaseTensor]
    weight_files: list[Path]

    @property
    def model_type(self) -> str | None:
        return self.config.get("model_type")


def read_safetensors_header(path: Path) -> tuple[dict, int]:
    """The JSON header of a safetensors file and the absolute offset where its data starts."""
    try:
        with open(path, "rb") as f:
            (length,) = struct.unpack("<Q", f.read(8))
            if length > 100_000_000:
                raise ValueError(f"header length {length} is implausible")
            header = json.loads(f.read(length))
    except (OSError, struct.error, ValueError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{path}: not a readable safetensors file ({exc})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: safetensors header is not a JSON object")
    return header, 8 + length


def _safetensors_entries(path: Path) -> list[BaseTensor]:
    header, start = read_safetensors_header(path)
    size = path.stat().st_size
    found = []
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype = SAFE_DTYPES[info["dtype"]]
            shape = tuple(int(d) for d in info["shape"])
            begin, end = (int(x) for x in info["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(f"{path}: tensor {name}: unsupported or malformed header entry {info}") from None
        entry = BaseTensor(name, dtype, shape, path, start + begin)
        if end - begin != entry.nbytes or start + end > size:
            raise CheckpointError(f"{path}: tensor {name}: data offsets {begin}..{end} do not fit its shape or file")
        found.append(entry)
    return sorted(found, key=lambda t: t.offset)


def _bin_entries(path: Path) -> list[BaseTensor]:
    try:
        try:
            state = torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError:  # legacy (non-zip) pickles cannot be memory-mapped
            state = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:  # the unpickler raises anything at all on a crafted or damaged file
        raise CheckpointError(f"{path}: not a readable weights file ({type(exc).__name__})") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{path}: expected a flat mapping of names to tensors")
    return [BaseTensor(k, v.dtype, tuple(v.shape), tensor=v) for k, v in state.items()]


def _index_files(folder: Path, index_name: str) -> list[Path]:
    path = folder / index_name
    try:
        weight_map = json.loads(path.read_text())["weight_map"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(f"{path}: not a readable index ({exc})") from None
    files = sorted(set(weight_map.values()))
    missing = [f for f in files if not (folder / f).is_file()]
    if missing:
        raise CheckpointError(f"{path}: names shard(s) that are not there: {', '.join(missing)}")
    return [folder / f for f in files]


def open_base(folder: str | Path) -> BaseCheckpoint:
    """Read ``folder``'s config.json and the headers of its weight files (safetensors preferred, else .bin)."""
    folder = Path(folder)
    try:
        config = json.loads((folder / "config.json").read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{folder}: no config.json (not a model folder)") from None
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{folder / 'config.json'}: not valid JSON ({exc})") from None
    if (folder / SAFE_INDEX).is_file():
        files, reader = _index_files(folder, SAFE_INDEX), _safetensors_entries
    elif (folder / SAFE_SINGLE).is_file():
        files, reader = [folder / SAFE_SINGLE], _safetensors_entries
    elif (folder / BIN_INDEX).is_file():
        files, reader = _index_files(folder, BIN_INDEX), _bin_entries
    elif (folder / BIN_SINGLE).is_file():
        files, reader = [folder / BIN_SINGLE], _bin_entries
    else:
        raise CheckpointError(f"{folder}: no {SAFE_SINGLE}, {SAFE_INDEX}, {BIN_SINGLE} or {BIN_INDEX}")
    tensors: dict[str, BaseTensor] = {}
    for path in files:
        for entry in reader(path):
            if entry.name in tensors:
                raise CheckpointError(f"{folder}: tensor {entry.name} is stored twice ({path.name})")
            tensors[entry.name] = entry
    if not isinstance(config, dict):
        raise CheckpointError(f"{folder / 'config.json'}: expected a JSON object")
    return BaseCheckpoint(folder, config, tensors, files)


def resolve_base(base: str | Path) -> Path:
    """A local folder for ``base``: a path as is, or a Hub id (config, tokenizer and safetensors files only)."""
    from loramix.errors import SourceError
    from loramix.sources import resolve

    folder = resolve(base, files=BASE_FILES)
    if not folder.is_dir():
        raise CheckpointError(f"{base}: not a folder")
    has_weights = any((folder / n).is_file() for n in (SAFE_SINGLE, SAFE_INDEX, BIN_SINGLE, BIN_INDEX))
    if not has_weights and not Path(base).expanduser().exists():
        try:  # a Hub repository without safetensors: fetch the legacy pickles (loaded with weights_only=True)
            folder = resolve(base, files=(*BASE_FILES, "pytorch_model*.bin", "pytorch_model.bin.index.json"))
        except SourceError:
            pass
    return folder


# ----------------------------------------------------------------------------------------------- matching names


class NameMatcher:
    """Finds the base key for an adapter parameter name, allowing one side to carry a prefix the other lacks."""

    def __init__(self, keys: list[str]) -> None:
        self.keys = set(keys)
        self.by_suffix: dict[str, list[str]] = {}
        for key in keys:
            parts = key.split(".")
            for i in range(1, len(parts)):
                self.by_suffix.setdefault(".".join(parts[i:]), []).append(key)

    def find(self, name: str) -> str | None:
        """The one base key for ``name``; None when there is none; CheckpointError when several fit."""
        if name in self.keys:
            return name
        candidates = self.by_suffix.get(name, [])
        if not candidates:
            parts = name.split(".")
            candidates = [".".join(parts[i:]) for i in range(1, len(parts) - 1) if ".".join(parts[i:]) in self.keys]
            candidates = candidates[:1]  # the longest remaining name is the one meant
        if len(candidates) > 1:
            raise CheckpointError(f"adapter tensor {name} matches several base tensors: {', '.join(candidates[:4])}")
        return candidates[0] if candidates else None


def _tied_embedding(base: BaseCheckpoint, module_name: str) -> str | None:
    """The input embedding key an absent output head is tied to (None when ``module_name`` is not such a head)."""
    if not any(module_name == h or module_name.endswith("." + h) for h in OUTPUT_HEADS):
        return None
    if base.config.get("tie_word_embeddings") is False:
        return None
    found = [k for k in base.tensors if any(k == e or k.endswith("." + e) for e in INPUT_EMBEDDINGS)]
    return found[0] if len(found) == 1 else None


def _ties_output_head(base: BaseCheckpoint, key: str) -> bool:
    """Whether ``key`` is an input embedding that the base's (unstored) output head is tied to."""
    if base.config.get("tie_word_embeddings") is not True:
        return False
    if not any(key == e or key.endswith("." + e) for e in INPUT_EMBEDDINGS):
        return False
    return not any(k.endswith(f"{h}.weight") for k in base.tensors for h in OUTPUT_HEADS)


def decide_layout(module: LoraModule, name: str, key: str, shape: tuple[int, ...], model_type: str | None) -> str:
    """How ΔW lies on base tensor ``key``: settled by the base (shape, then model type and name), as PEFT does."""
    out, inp = module.out_features, module.in_features
    if module.layout in ("embedding", "conv2d"):
        if tuple(shape) != module.base_shape:
            raise CheckpointError(
                f"adapter module {name} ({module.layout}, ΔW {module.base_shape}) does not fit base tensor {key} "
                f"of shape {tuple(shape)}"
            )
        return module.layout
    fits = [lay for lay, s in (("linear", (out, inp)), ("conv1d_fan_in_fan_out", (inp, out))) if tuple(shape) == s]
    if not fits:
        raise CheckpointError(
            f"adapter module {name} (out {out} × in {inp}) does not fit base tensor {key} of shape {tuple(shape)}"
        )
    if len(fits) == 1:
        return fits[0]
    conv1d = model_type in CONV1D_MODEL_TYPES and name.rsplit(".", 1)[-1] in CONV1D_NAMES
    return "conv1d_fan_in_fan_out" if conv1d else "linear"


# ----------------------------------------------------------------------------------------------- the plan


@dataclass
class Update:
    """One adapter module applied to one base tensor, with the layout the base settled."""

    name: str
    module: LoraModule
    layout: str


@dataclass
class Job:
    """One output tensor: where it comes from, what is added to it, and its output dtype."""

    name: str
    source: BaseTensor
    dtype: torch.dtype
    updates: list[Update] = field(default_factory=list)
    bias: list[tuple[str, torch.Tensor]] = field(default_factory=list)
    replaced: str | None = None  # the kind of extra tensor that replaced the base tensor

    @property
    def shape(self) -> tuple[int, ...]:
        return self.source.shape

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize

    @property
    def raw_copy(self) -> bool:
        return not self.updates and not self.bias and self.source.path is not None and self.dtype == self.source.dtype


@dataclass
class MergeReport:
    """What ``merge_into_base`` wrote: the folder, shard files, and per module the share of ΔW that survived."""

    path: Path
    shards: list[str]
    total_size: int
    tensors: int
    dtype: torch.dtype
    survival: dict[str, float] = field(default_factory=dict)
    replaced: list[str] = field(default_factory=list)
    added: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def _out_dtype(source: BaseTensor, dtype: torch.dtype) -> torch.dtype:
    return dtype if source.dtype.is_floating_point else source.dtype


def _memory_tensor(name: str, tensor: torch.Tensor) -> BaseTensor:
    return BaseTensor(name, tensor.dtype, tuple(tensor.shape), tensor=tensor.detach().cpu().contiguous())


def plan_merge(adapter: LoraAdapter, base: BaseCheckpoint, dtype: torch.dtype, notes: list[str]) -> list[Job]:
    """One job per output tensor, in the base's order; raises on any name or shape the base does not have."""
    jobs = {name: Job(name, t, _out_dtype(t, dtype)) for name, t in base.tensors.items()}
    matcher = NameMatcher(list(base.tensors))
    where = f"base {base.folder}"
    _plan_extras(adapter, base, matcher, jobs, dtype, notes)
    flipped: list[str] = []
    for name, module in adapter.modules.items():
        key = matcher.find(f"{name}.weight")
        if key is None:
            key = _tied_embedding(base, name)
            if key is None:
                raise CheckpointError(f"adapter module {name} has no matching tensor {name}.weight in {where}")
            notes.append(
                f"{name}.weight is not stored in the base: {name} is tied to {key} (tie_word_embeddings), so its ΔW "
                f"is merged into {key} and the input embeddings change with it (as PEFT's merge_and_unload does)"
            )
        elif _ties_output_head(base, key):
            notes.append(
                f"{key} is the input embedding and the base ties its output head to it (tie_word_embeddings, no head "
                f"stored): merging {name} changes the output head as well (as PEFT's merge_and_unload does)"
            )
        job = jobs[key]
        if not job.source.dtype.is_floating_point:
            raise CheckpointError(f"adapter module {name}: base tensor {key} is {job.source.dtype}, not floating point")
        layout = decide_layout(module, name, key, job.shape, base.model_type)
        if layout != module.layout:
            flipped.append(name)
        job.updates.append(Update(name, module, layout))
        if len(job.updates) > 1 and any(u.module.magnitude is not None for u in job.updates):
            others = ", ".join(u.name for u in job.updates)
            raise CheckpointError(f"adapter modules {others} all apply to base tensor {key}, and one is DoRA")
        bias = module.bias_delta()
        if bias is not None:
            bias_key = key.removesuffix("weight") + "bias"
            if bias_key not in jobs:
                raise CheckpointError(f"adapter module {name} has a lora_B bias but {where} has no {bias_key}")
            if jobs[bias_key].shape != (module.out_features,):
                raise CheckpointError(
                    f"adapter module {name}: lora_B bias has {module.out_features} values, base {bias_key} has "
                    f"shape {jobs[bias_key].shape}"
                )
            jobs[bias_key].bias.append((name, bias))
    if flipped:
        notes.append(
            f"the adapter's fan_in_fan_out disagreed with the base for {len(flipped)} module(s) ({flipped[0]}, ...): "
            "the base's layout was used, as PEFT does"
        )
    return list(jobs.values())


def _plan_extras(
    adapter: LoraAdapter,
    base: BaseCheckpoint,
    matcher: NameMatcher,
    jobs: dict[str, Job],
    dtype: torch.dtype,
    notes: list[str],
) -> None:
    """Heads (modules_to_save) and saved base layers replace the base tensor of the same name, or are added."""
    for name, extra in adapter.extra.items():
        key = matcher.find(name)
        tensor = extra.tensor
        if key is None and extra.kind == "base_layer":
            key = _tied_embedding(base, name.rpartition(".")[0])  # PEFT saves a tied head's weight under its name
            if key is None:
                raise CheckpointError(f"adapter tensor {name} (a saved base layer) has no match in base {base.folder}")
            if jobs[key].replaced == "base_layer" and not torch.equal(jobs[key].source.tensor, tensor):
                raise CheckpointError(f"adapter tensors {name} and {key} are tied in the base but saved different")
        if key is None:
            if _tied_embedding(base, name.rpartition(".")[0]) is not None:
                raise CheckpointError(
                    f"adapter tensor {name} would replace an output head that the base ties to its input embedding "
                    "and does not store; set tie_word_embeddings=false in the base to keep both"
                )
            source = _memory_tensor(name, tensor)
            jobs[name] = Job(name, source, _out_dtype(source, dtype), replaced="added")
            notes.append(f"{name} ({extra.kind}) is not in the base: added to the merged checkpoint")
            continue
        job = jobs[key]
        if tuple(tensor.shape) != job.shape:
            if extra.kind != "base_layer":
                raise CheckpointError(
                    f"adapter tensor {name} has shape {tuple(tensor.shape)} but base tensor {key} has {job.shape}"
                )
            notes.append(f"{name}: the adapter's saved base layer {tuple(tensor.shape)} replaces {key} {job.shape}")
        job.source = _memory_tensor(key, tensor)
        job.replaced = extra.kind


# ----------------------------------------------------------------------------------------------- computing


def delta_rows(module: LoraModule, layout: str, start: int, stop: int, device: torch.device) -> torch.Tensor:
    """Rows [start, stop) of ΔW in the base tensor's stored layout, float32 on ``device``."""
    A = module.A.to(device=device, dtype=torch.float32)
    B = module.B.to(device=device, dtype=torch.float32)
    if layout == "linear":
        return (B[start:stop] @ A) * module.scale
    if layout in ("conv1d_fan_in_fan_out", "embedding"):
        return (A[:, start:stop].T @ B.T) * module.scale
    return (B @ A).mul_(module.scale).reshape(module.base_shape)  # conv2d: one chunk


def _chunks(job: Job) -> Iterator[tuple[int, int]]:
    if len(job.shape) != 2 or any(u.layout == "conv2d" or u.module.magnitude is not None for u in job.updates):
        yield 0, job.shape[0] if job.shape else 0
        return
    rows, width = job.shape
    step = max(1, CHUNK_ELEMENTS // max(width, 1))
    for start in range(0, rows, step):
        yield start, min(rows, start + step)


def _dora(W: torch.Tensor, update: Update, device: torch.device) -> torch.Tensor:
    """PEFT's DoRA merge: m · (W + ΔW) / ‖W + ΔW‖, the norm per output row (taken in out×in orientation)."""
    m = update.module
    merged = W + delta_rows(m, update.layout, 0, W.shape[0], device)
    math_view = merged.T if update.layout in ("conv1d_fan_in_fan_out", "embedding") else merged.reshape(len(merged), -1)
    norm = torch.linalg.vector_norm(math_view, dim=1)
    factor = m.magnitude.to(device=device, dtype=torch.float32) / norm
    if update.layout in ("conv1d_fan_in_fan_out", "embedding"):
        return merged * factor[None, :]
    return merged * factor.reshape(-1, *([1] * (merged.dim() - 1)))


@dataclass
class _Survival:
    kept: float = 0.0
    total: float = 0.0


def _add_delta(merged: torch.Tensor, update: Update, start: int, stop: int, device: torch.device) -> None:
    """``merged += ΔW[start:stop]`` in place (one fused multiply-add for Linear/Conv1D/embedding rows)."""
    m = update.module
    if update.layout == "conv2d" or merged.dim() != 2:
        merged += delta_rows(m, update.layout, start, stop, device)
        return
    A = m.A.to(device=device, dtype=torch.float32)
    B = m.B.to(device=device, dtype=torch.float32)
    if update.layout == "linear":
        merged.addmm_(B[start:stop], A, alpha=m.scale)
    else:
        merged.addmm_(A[:, start:stop].T, B.T, alpha=m.scale)


def _merged_chunk(job: Job, start: int, stop: int, device: torch.device, stats: _Survival) -> torch.Tensor:
    """The output values of rows [start, stop): W + ΔW (or DoRA) in float32, cast once to the output dtype."""
    chunk = job.source.rows(start, stop)
    if not job.updates and not job.bias:
        return chunk.to(job.dtype)
    W = chunk.to(device=device, dtype=torch.float32)
    merged = W.clone()
    for update in job.updates:
        if update.module.magnitude is not None:
            merged = _dora(merged, update, device)
        else:
            _add_delta(merged, update, start, stop, device)
    for _, bias in job.bias:
        merged += bias.to(device=device, dtype=torch.float32)
    out = merged.to(job.dtype, copy=True)  # a copy even for float32 output: merged is reused below
    total = float(torch.linalg.vector_norm(merged.sub_(W))) ** 2
    if not math.isfinite(total):  # NaN/Inf anywhere in W + ΔW shows up here, without a pass of its own
        raise CheckpointError(f"merging into {job.name} gives NaN/Inf values (the adapter or the base is broken)")
    del merged
    rounded = out.float() if out.dtype != torch.float32 else out.clone()
    base = W if chunk.dtype == job.dtype else W.to(job.dtype).float()  # round(W) is W when W is in the out dtype
    stats.total += total
    stats.kept += float(torch.linalg.vector_norm(rounded.sub_(base))) ** 2
    return out.cpu()


# ----------------------------------------------------------------------------------------------- writing


def parse_size(size: int | str) -> int:
    """Bytes in ``size``: an int, or "5GB" (decimal, as transformers counts), "500MB", "2GiB", "20KB"."""
    if isinstance(size, int):
        return size
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?I?B)?\s*", str(size).upper())
    if not match:
        raise LoramixError(f"shard size {size!r}: expected bytes or a number with KB, MB, GB (or KiB, MiB, GiB)")
    units = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12}
    units |= {"KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}
    return int(float(match[1]) * units[match[2] or "B"])


def plan_shards(jobs: list[Job], shard_size: int) -> list[list[Job]]:
    """Split tensors into shards in order, as transformers does (a new shard when the next tensor would overflow)."""
    shards: list[list[Job]] = [[]]
    size = 0
    for job in jobs:
        if shard_size and shards[-1] and size + job.nbytes > shard_size:
            shards.append([])
            size = 0
        shards[-1].append(job)
        size += job.nbytes
    # within a file, larger items first keeps every tensor aligned to its element size (as safetensors does)
    return [sorted(shard, key=lambda j: -j.dtype.itemsize) for shard in shards if shard]


def safetensors_header(jobs: list[Job], metadata: dict[str, str]) -> bytes:
    """The 8-byte length and JSON header for ``jobs`` stored in order, padded so the data starts 8-aligned."""
    header: dict = {"__metadata__": metadata}
    offset = 0
    for job in jobs:
        header[job.name] = {
            "dtype": DTYPE_NAMES[job.dtype],
            "shape": list(job.shape),
            "data_offsets": [offset, offset + job.nbytes],
        }
        offset += job.nbytes
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text


def _pwrite_all(fd: int, data: memoryview, at: int) -> None:
    while data:
        done = os.pwrite(fd, data, at)
        data, at = data[done:], at + done


def _copy_range(src: Path, offset: int, count: int, fd: int, at: int) -> None:
    """Copy ``count`` bytes at ``offset`` of ``src`` to position ``at`` of ``fd``: in the kernel where possible."""
    with open(src, "rb", buffering=0) as f:
        src_fd = f.fileno()
        try:
            while count:
                done = os.copy_file_range(src_fd, fd, count, offset, at)
                if done == 0:
                    raise CheckpointError(f"{src}: truncated file")
                offset, at, count = offset + done, at + done, count - done
            return
        except (AttributeError, OSError):  # no copy_file_range here (or across these file systems): copy by hand
            pass
        buffer = bytearray(min(count, 1 << 24))
        while count:
            got = os.preadv(src_fd, [memoryview(buffer)[: min(count, len(buffer))]], offset)
            if got == 0:
                raise CheckpointError(f"{src}: truncated file")
            _pwrite_all(fd, memoryview(buffer)[:got], at)
            offset, at, count = offset + got, at + got, count - got


@dataclass
class _Task:
    """Work that writes to a known place of an output file: a computed tensor (``job``), or ``count`` bytes copied
    from ``src`` at ``offset`` (one or several unchanged tensors lying end to end in both files)."""

    fd: int
    at: int
    job: Job | None = None
    src: Path | None = None
    offset: int = 0
    count: int = 0


def _tasks(fd: int, at: int, jobs: list[Job]) -> list[_Task]:
    """Tasks for ``jobs`` stored from ``at`` on; neighbouring unchanged tensors become one copy (in pieces)."""
    tasks: list[_Task] = []
    for job in jobs:
        last = tasks[-1] if tasks else None
        if not job.raw_copy:
            tasks.append(_Task(fd, at, job))
        elif last and last.src == job.source.path and last.offset + last.count == job.source.offset:
            last.count += job.nbytes
        else:
            tasks.append(_Task(fd, at, src=job.source.path, offset=job.source.offset, count=job.nbytes))
        at += job.nbytes
    pieces = []
    for task in tasks:
        if task.job is not None:
            pieces.append(task)
            continue
        for start in range(0, task.count, COPY_PIECE):
            count = min(COPY_PIECE, task.count - start)
            pieces.append(_Task(fd, task.at + start, src=task.src, offset=task.offset + start, count=count))
    return pieces


def _run(task: _Task, device: torch.device, stats: dict[str, _Survival], bar) -> None:
    job = task.job
    if job is None:
        _copy_range(task.src, task.offset, task.count, task.fd, task.at)
        bar.update(task.count)
        return
    at = task.at
    for start, stop in _chunks(job):
        out = _merged_chunk(job, start, stop, device, stats[job.name]).contiguous()
        if out.numel():
            data = memoryview(out.reshape(-1).view(torch.uint8).numpy())
            _pwrite_all(task.fd, data, at)
            at += len(data)
            bar.update(len(data))


def write_shards(
    folder: Path, names: list[str], shards: list[list[Job]], device: torch.device, bar, workers: int
) -> dict[str, _Survival]:
    """Write every shard: headers first (planned in advance), then every tensor at its planned place."""
    stats = {job.name: _Survival() for shard in shards for job in shard if not job.raw_copy}
    with contextlib.ExitStack() as files:
        tasks: list[_Task] = []
        for name, shard in zip(names, shards):
            fd = files.enter_context(open(folder / name, "wb", buffering=0)).fileno()
            header = safetensors_header(shard, {"format": "pt"})
            _pwrite_all(fd, memoryview(header), 0)
            tasks += _tasks(fd, len(header), shard)
            os.ftruncate(fd, len(header) + sum(job.nbytes for job in shard))
        # one thread copies (a second kernel copy at once gains nothing), the others compute meanwhile
        copies = [t for t in tasks if t.job is None]
        computed = [t for t in tasks if t.job is not None]
        with ThreadPoolExecutor(1) as copier, ThreadPoolExecutor(max(1, workers - 1)) as pool:
            futures = [copier.submit(_run, t, device, stats, bar) for t in copies]
            futures += [pool.submit(_run, t, device, stats, bar) for t in computed]
            try:
                for future in futures:
                    future.result()
            except BaseException:
                for future in futures:
                    future.cancel()
                raise
    return stats


# ----------------------------------------------------------------------------------------------- the API


def _config_dtype_keys(config: dict) -> list[str]:
    keys = [k for k in ("dtype", "torch_dtype") if k in config]
    if keys:
        return keys
    try:
        major = int(version("transformers").split(".")[0])
    except (PackageNotFoundError, ValueError):
        major = 5
    return ["dtype"] if major >= 5 else ["torch_dtype"]


def _copy_other_files(base: BaseCheckpoint, target: Path) -> None:
    weight_names = {p.name for p in base.weight_files} | {SAFE_INDEX, BIN_INDEX, "config.json"}
    for item in sorted(base.folder.iterdir()):
        if item.name.startswith(".") or not item.is_file() or item.name in weight_names:
            continue
        if item.name.endswith(WEIGHT_SUFFIXES) or item.name.endswith(".index.json"):
            log.debug("not copying %s (weights)", item)
            continue
        shutil.copyfile(item, target / item.name)


def _resolve_dtype(dtype: torch.dtype | str) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        if dtype not in CONFIG_DTYPES:
            raise LoramixError(f"output dtype {dtype} is not supported (float32, float16, bfloat16)")
        return dtype
    from loramix.recipe import parse_dtype

    return parse_dtype(dtype)


def merge_into_base(
    adapter: LoraAdapter | str | Path,
    base: str | Path,
    out: str | Path,
    *,
    dtype: torch.dtype | str = torch.bfloat16,
    shard_size: int | str = "5GB",
    device: str | torch.device = "cpu",
    overwrite: bool = False,
    progress: bool = True,
    extra_files: dict[str, str] | None = None,
) -> MergeReport:
    """Merge ``adapter`` into the ``base`` checkpoint (a folder or Hub id) and write a merged checkpoint to ``out``.

    The output is sharded safetensors (``model-0000i-of-0000N.safetensors`` plus ``model.safetensors.index.json``;
    a single ``model.safetensors`` when everything fits one shard, as transformers does), with config.json's dtype
    updated and every other non-weight file (tokenizer, generation config) copied. Heads (modules_to_save) replace
    the base tensors, lora_B biases are added to the base biases, DoRA is merged exactly as PEFT does. The folder is
    written atomically and no input is touched. Tensors are written by a few threads at once; on CPU, torch's
    thread pool is held at one thread meanwhile (restored afterwards). Returns a `MergeReport` with, per module, the
    share of ΔW that survives the rounding: ‖round(W+ΔW) − round(W)‖ / ‖ΔW‖ (for a base already in the output dtype
    round(W) = W; for a float32 base, comparing with round(W) keeps the base's own rounding out of the measure).
    ``extra_files`` (name → text: the model card, the recipe) are written last into the same atomic folder; without
    them a README.md model card says what is known.
    """
    from loramix.combine import resolve_device
    from loramix.formats import load_adapter

    adapter = load_adapter(adapter)
    dtype = _resolve_dtype(dtype)
    device = resolve_device(str(device))
    if sys.byteorder != "little":
        raise LoramixError("merging into a checkpoint needs a little-endian machine (safetensors byte order)")
    folder = resolve_base(base)
    checkpoint = open_base(folder)
    notes: list[str] = []
    jobs = plan_merge(adapter, checkpoint, dtype, notes)
    shards = plan_shards(jobs, parse_size(shard_size))
    names = (
        [SAFE_SINGLE]
        if len(shards) == 1
        else [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    )
    for note in notes:
        log.warning("%s: %s", adapter.name, note)
    protect = [folder, adapter.source, *adapter.provenance.get("sources", [])]
    total = sum(j.nbytes for j in jobs)
    if extra_files is None:
        from loramix.hub import CARD_FILE, model_card

        extra_files = {CARD_FILE: model_card(adapter, merged_into=str(base), analysis=False)}
    files = extra_files
    with atomic_output(out, overwrite=overwrite, protect=protect) as tmp:
        with tqdm(total=total, unit="B", unit_scale=True, desc="merge", disable=not progress) as bar:
            with _one_thread_per_worker(device):
                stats = write_shards(tmp, names, shards, device, bar, workers=min(WORKERS, os.cpu_count() or 1))
        if len(shards) > 1:
            weight_map = {job.name: name for name, shard in zip(names, shards) for job in shard}
            index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
            (tmp / SAFE_INDEX).write_text(json.dumps(index, indent=2) + "\n")
        config = dict(checkpoint.config)
        for key in _config_dtype_keys(config):
            config[key] = CONFIG_DTYPES[dtype]
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        _copy_other_files(checkpoint, tmp)
        for name, text in files.items():
            (tmp / name).write_text(text)
    report = MergeReport(
        path=Path(out),
        shards=names,
        total_size=total,
        tensors=len(jobs),
        dtype=dtype,
        survival=_survival_by_module(jobs, stats),
        replaced=[j.name for j in jobs if j.replaced and j.replaced != "added"],
        added=[j.name for j in jobs if j.replaced == "added"],
        notes=notes,
    )
    _warn_low_survival(report, adapter.name)
    return report


@contextlib.contextmanager
def _one_thread_per_worker(device: torch.device) -> Iterator[None]:
    """On CPU, torch's own thread pool is set to one thread while the workers run (restored after).

    The workers already run in parallel; element-wise work on small chunks gains nothing from more threads, and
    oversubscribed OpenMP teams slow every operation down badly on a busy machine (seen: 10× on 2 cores).
    """
    if device.type != "cpu":
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _survival_by_module(jobs: list[Job], stats: dict[str, _Survival]) -> dict[str, float]:
    survival = {}
    for job in jobs:
        s = stats.get(job.name)
        for update in job.updates:
            survival[update.name] = math.sqrt(s.kept / s.total) if s and s.total > 0 else float("nan")
    return dict(sorted(survival.items()))


def _warn_low_survival(report: MergeReport, label: str) -> None:
    low = sorted((v, k) for k, v in report.survival.items() if v < LOW_SURVIVAL)
    if low:
        worst = ", ".join(f"{k} ({v:.2f})" for v, k in low[:3])
        log.warning(
            "%s: %d of %d module(s) lose most of their ΔW to %s rounding (‖round(W+ΔW)−W‖/‖ΔW‖ < %.1f): %s%s",
            label,
            len(low),
            len(report.survival),
            CONFIG_DTYPES[report.dtype],
            LOW_SURVIVAL,
            worst,
            ", ..." if len(low) > 3 else "",
        )
