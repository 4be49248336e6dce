"""The one reader of base checkpoints, and the one rule for which base tensor an adapter module updates.

A base is a model folder (config.json and safetensors shards, or legacy ``pytorch_model*.bin`` read only through
``torch.load(weights_only=True)``). Nothing is loaded but the headers: each `BaseTensor` knows where its bytes are
and reads row ranges on demand, so callers stream a checkpoint of any size one tensor (or chunk) at a time.

Names: adapter module names are the task model's module paths (``transformer.h.0.attn.c_attn``); a checkpoint may
store the same weight with a prefix more or less (``h.0.attn.c_attn.weight`` in a bare GPT2Model). `NameMatcher`
tries the exact key, then base keys ending in the adapter's name, then the adapter's name without leading parts,
then (for a kohya/LyCORIS name flattened with underscores) the base key whose flattened path ends the name; more
than one candidate is an error. An output head that the base ties to its input embedding and does not store
is found as that embedding (`BaseCheckpoint.weight_key`). Both `loramix.analysis` and `loramix.merge.checkpoint` ask
here.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from loramix.adapter import LoraAdapter
from loramix.architecture import tied_embedding
from loramix.errors import CheckpointError, SourceError, shown
from loramix.io.disk.rawcopy import read_safetensors_header
from loramix.io.files import load_pickle
from loramix.io.gguf_base import gguf_base_file, open_gguf
from loramix.io.gguf_model import transformers_view
from loramix.io.quantized import DequantizedTensor, QuantizedBase, recognise
from loramix.io.tensorfile import SAFE_DTYPES
from loramix.sources import resolve

SAFE_INDEX = "model.safetensors.index.json"
SAFE_SINGLE = "model.safetensors"
BIN_INDEX = "pytorch_model.bin.index.json"
BIN_SINGLE = "pytorch_model.bin"
# diffusers' names for a model's weights (a pipeline's unet/, vae/, transformer/ folders)
DIFFUSERS_WEIGHTS = "diffusion_pytorch_model"
WEIGHT_LAYOUTS = (  # (index, single file, reader) in order of preference
    (SAFE_INDEX, SAFE_SINGLE, "safetensors"),
    (f"{DIFFUSERS_WEIGHTS}.safetensors.index.json", f"{DIFFUSERS_WEIGHTS}.safetensors", "safetensors"),
    (BIN_INDEX, BIN_SINGLE, "bin"),
    (f"{DIFFUSERS_WEIGHTS}.bin.index.json", f"{DIFFUSERS_WEIGHTS}.bin", "bin"),
)
BASE_FILES = ("*.json", "*.safetensors", "*.txt", "*.model", "*.tiktoken", "tokenizer*", "*.jinja")


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

    def rows(self, start: int, stop: int, buffer: torch.Tensor | None = None) -> torch.Tensor:
        """Rows [start, stop) along the first dimension (the whole tensor for 0-D), in the stored dtype; read into
        ``buffer`` (bytes, e.g. pinned memory for a GPU) when it is large enough."""
        if self.tensor is not None:
            return self.tensor if not self.shape else self.tensor[start:stop]
        shape = (stop - start, *self.shape[1:]) if self.shape else ()
        count = math.prod(shape) * self.dtype.itemsize
        if not count:
            return torch.empty(shape, dtype=self.dtype)
        fits = buffer is not None and buffer.numel() >= count
        buffer = buffer[:count] if fits else torch.empty(count, dtype=torch.uint8)  # not zeroed: read into it
        with open(self.path, "rb", buffering=0) as f:
            self.read_into(start, memoryview(buffer.numpy()), f.fileno())
        return buffer.view(self.dtype).reshape(shape)

    def read_into(self, start: int, memory: memoryview, fd: int) -> None:
        """Fill ``memory`` with the tensor's bytes from row ``start`` on, read from ``fd`` (its open file)."""
        at = self.offset + start * (math.prod(self.shape[1:]) * self.dtype.itemsize if self.shape else 0)
        while memory:  # one read returns at most ~2 GB
            if not (got := os.preadv(fd, [memory], at)):
                raise CheckpointError(f"{self.path}: truncated file (tensor {self.name})")
            memory, at = memory[got:], at + got


@dataclass
class BaseCheckpoint:
    """A base model folder: its config and its tensors in file order (nothing loaded but the headers)."""

    folder: Path
    config: dict
    tensors: dict[str, BaseTensor]
    weight_files: list[Path]
    index: str | None = None  # the index file's name, when the weights are sharded
    quantized: QuantizedBase | None = None  # the recognised quantized layout (`loramix.io.quantized`), if any

    @property
    def model_type(self) -> str | None:
        return self.config.get("model_type")

    def weight_key(self, module: str) -> tuple[str | None, str | None]:
        """(the key of ``module``'s weight, the input embedding it is tied to): the key is the stored tensor the
        module updates (None when the base has none); the second item is set when that is an embedding standing in
        for an unstored tied output head. Raises `CheckpointError` when several tensors fit."""
        key = self.find(f"{module}.weight")
        if key is not None:
            return key, None
        tied = tied_embedding(self.config, self.tensors, module)
        return tied, tied

    @functools.cached_property
    def matcher(self) -> NameMatcher:
        return NameMatcher(self.weight_names())

    def find(self, name: str) -> str | None:
        """The stored key of the base tensor ``name`` names (`NameMatcher.find` over the dense model's names; a
        quantized weight's codes key for its dense name, GPTQ's ``qweight`` for ``weight``)."""
        key = self.matcher.find(name)
        return self.quantized.stored(key) if key is not None and self.quantized else key

    def weight_names(self) -> list[str]:
        """The base's tensors as a dense model holds them: a quantized base's scale tensors left out, its codes
        under the dense weight's name."""
        if self.quantized is None:
            return list(self.tensors)
        parts, names = self.quantized.parts_of_weights(), self.quantized.dense_names
        return [names.get(name, name) for name in self.tensors if name not in parts]

    def dense(self, key: str) -> BaseTensor | DequantizedTensor:
        """Tensor ``key`` (a name of `weight_names`) as W: a quantized weight read dequantized (float32), any other
        as stored."""
        stored = self.quantized.stored(key) if self.quantized else key
        if self.quantized is None or stored not in self.quantized.scales:
            return self.tensors[key]
        codes, scale = self.tensors[stored], self.tensors[self.quantized.scales[stored]]
        extra = tuple(self.tensors[k] for k in self.quantized.extras.get(stored, ()))
        return DequantizedTensor(key, codes, scale, self.quantized.scheme.for_shape(codes.shape), extra)


def _is_count(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _safetensors_entries(path: Path) -> list[BaseTensor]:
    """The file's tensors in data order, validated as safetensors does: known dtypes, shapes of counts, offsets
    that tile the data exactly (sorted, contiguous from 0, no overlap, ending at the end of the file), and each
    tensor's byte length equal to its dtype's size times its element count."""
    header, start = read_safetensors_header(path)
    metadata = header.pop("__metadata__", None)
    if metadata is not None and not (isinstance(metadata, dict) and all(isinstance(v, str) for v in metadata.values())):
        raise CheckpointError(f"{path}: __metadata__ must map names to strings")
    found = []
    for name, info in header.items():
        try:
            dtype = SAFE_DTYPES[info["dtype"]]
            shape, offsets = info["shape"], info["data_offsets"]
            if not (isinstance(shape, list) and all(_is_count(d) for d in shape)):
                raise ValueError
            if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_count(x) for x in offsets)):
                raise ValueError
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(f"{path}: tensor {shown(name)}: unsupported or malformed header entry") from None
        entry = BaseTensor(name, dtype, tuple(shape), path, start + offsets[0])
        if offsets[1] - offsets[0] != entry.nbytes:
            raise CheckpointError(
                f"{path}: tensor {shown(name)}: data offsets {offsets[0]}..{offsets[1]} do not fit its dtype and shape"
            )
        found.append((offsets[0], offsets[1], entry))
    found.sort(key=lambda item: (item[0], item[1]))
    end = 0
    for begin, stop, entry in found:
        if begin != end:
            what = "overlaps the tensor before it" if begin < end else "leaves a gap before it"
            raise CheckpointError(f"{path}: tensor {shown(entry.name)}: data offsets {begin}..{stop} {what}")
        end = stop
    if start + end != path.stat().st_size:
        raise CheckpointError(
            f"{path}: the tensors' data ends at byte {start + end}, the file at {path.stat().st_size}"
        )
    return [entry for _, _, entry in found]


def _bin_entries(path: Path) -> list[BaseTensor]:
    try:
        state = load_pickle(path, mmap=True)
    except Exception as exc:  # the unpickler raises anything at all on a crafted or damaged file
        raise CheckpointError(f"{path}: not a readable weights file ({type(exc).__name__})") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{path}: expected a flat mapping of names to tensors")
    return [BaseTensor(k, v.dtype, tuple(v.shape), tensor=v) for k, v in state.items()]


def _index_files(folder: Path, index_name: str) -> list[Path]:
    """The shard files an index names: plain names of files inside ``folder`` (never ``..``, absolute or odd)."""
    path = folder / index_name
    try:
        index = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{path}: not a readable index ({exc})") from None
    except RecursionError:
        raise CheckpointError(f"{path}: not a readable index (nested too deeply)") from None
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise CheckpointError(f"{path}: weight_map must map tensor names to shard file names")
    files = sorted(set(weight_map.values()))
    for name in files:
        odd = name.startswith("/") or "\\" in name or shown(name) != name
        if odd or any(part in ("", ".", "..") for part in name.split("/")):
            raise CheckpointError(f"{path}: shard name {shown(name)} is not a file inside {folder}")
    missing = [f for f in files if not (folder / f).is_file()]
    if missing:
        raise CheckpointError(f"{path}: names shard(s) that are not there: {', '.join(map(shown, missing))}")
    return [folder / f for f in files]


def open_base(folder: str | Path) -> BaseCheckpoint:
    """Read ``folder``'s config.json (``{}`` when there is none) and the headers of its weight files (safetensors
    preferred, else .bin); a GGUF base file (or a folder holding one, `loramix.io.gguf_base.gguf_base_file`) is read
    as the transformers model it holds (`loramix.io.gguf_model`), its ``folder`` the file itself."""
    folder = Path(folder)
    gguf_file = gguf_base_file(folder)
    if gguf_file is not None:  # a llama.cpp model file, read as the transformers model it holds
        config, tensors = transformers_view(open_gguf(gguf_file))
        return BaseCheckpoint(gguf_file, config, tensors, [gguf_file])
    config_path = folder / "config.json"
    try:
        config = json.loads(config_path.read_text()) if config_path.is_file() else {}
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{config_path}: not valid JSON ({exc})") from None
    except RecursionError:
        raise CheckpointError(f"{config_path}: not valid JSON (nested too deeply)") from None
    if not isinstance(config, dict):
        raise CheckpointError(f"{config_path}: expected a JSON object")
    files, reader, index_name = [], None, None
    for index, single, kind in WEIGHT_LAYOUTS:
        if (folder / index).is_file() or (folder / single).is_file():
            sharded = (folder / index).is_file()
            files = _index_files(folder, index) if sharded else [folder / single]
            reader = _safetensors_entries if kind == "safetensors" else _bin_entries
            index_name = index if sharded else None
            break
    else:
        if not config and sorted(folder.glob("*.safetensors")):  # bare weight files, no model config
            files, reader = sorted(folder.glob("*.safetensors")), _safetensors_entries
        else:
            raise CheckpointError(f"{folder}: no {SAFE_SINGLE}, {SAFE_INDEX}, {BIN_SINGLE} or {BIN_INDEX}")
    tensors: dict[str, BaseTensor] = {}
    for path in files:
        for entry in reader(path):
            if entry.name in tensors:
                raise CheckpointError(f"{folder}: tensor {shown(entry.name)} is stored twice ({path.name})")
            tensors[entry.name] = entry
    return BaseCheckpoint(folder, config, tensors, files, index_name, recognise(config, tensors, folder))


def require_base(base) -> str:
    """``base`` (a folder or Hub id, str or Path) as a str; one-line `CheckpointError` for anything else."""
    if not isinstance(base, (str, Path)):
        raise CheckpointError(
            f"a base model is a folder or Hub id, not a {type(base).__name__} (for a loaded model: merge_into_model)"
        )
    return str(base)


def resolve_base(base: str | Path) -> Path:
    """A local folder for ``base``: a path as is, or a Hub id (config, tokenizer and safetensors files only); a
    local GGUF base file as it is."""
    require_base(base)
    if Path(base).expanduser().is_file() and gguf_base_file(base) is not None:
        return Path(base).expanduser()
    folder = resolve(base, files=BASE_FILES, what="base model folder not found")
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
        module, dot, param = name.rpartition(".")
        if not candidates and "." not in module:  # a kohya/LyCORIS name: the module path flattened (or a module)
            found = self.find_flat(module or name)
            wanted = f"{found}{dot}{param}" if module else found
            candidates = [wanted] if found and wanted in self.keys else []
        if len(candidates) > 1:
            raise CheckpointError(f"adapter tensor {name} matches several base tensors: {', '.join(candidates[:4])}")
        return candidates[0] if candidates else None

    @functools.cached_property
    def _flat(self) -> tuple[dict[str, list[str]], dict[str, list[str]]]:
        """Module paths (a key without its ``.weight``; a matcher over module names holds them as they are) by their
        flat name (dots read as underscores), and by every tail of that name that starts after an underscore."""
        exact: dict[str, list[str]] = {}
        tails: dict[str, list[str]] = {}
        for key in sorted(self.keys):
            module = key.removesuffix(".weight")
            flat = module.replace(".", "_")
            exact.setdefault(flat, []).append(module)
            for i, char in enumerate(flat):
                if char == "_":
                    tails.setdefault(flat[i + 1 :], []).append(module)
        return exact, tails

    def find_flat(self, flat: str) -> str | None:
        """The base module whose dotted path, read with underscores for dots, is ``flat`` (a kohya name without its
        ``lora_`` prefix), one side allowed a leading prefix the other lacks (``te_text_model_…`` finds
        ``text_model.…``); None when none fits. A flat name loses where the dots were (``down_blocks_0`` holds
        underscores of its own), so a name that several modules flatten to is an error, never a guess."""
        exact, tails = self._flat
        candidates = exact.get(flat) or tails.get(flat, [])
        if not candidates:  # the adapter's name has a prefix more: the longest remaining name is the one meant
            rests = (flat[i + 1 :] for i, char in enumerate(flat) if char == "_")
            candidates = next((exact[rest] for rest in rests if rest in exact), [])
        if len(candidates) > 1:
            raise CheckpointError(
                f"kohya module {flat} fits several base modules ({', '.join(candidates[:4])}): the underscores "
                "cannot say which is meant"
            )
        return candidates[0] if candidates else None


def is_kohya_name(module: str) -> bool:
    """A kohya module name (``lora_te_text_model_encoder_layers_0_self_attn_q_proj``): flat, behind ``lora_``."""
    return module.startswith("lora_") and "." not in module


def with_base_names(adapter: LoraAdapter, base: BaseCheckpoint, *, prefix: str = "lora_") -> LoraAdapter:
    """``adapter`` with its kohya-named modules renamed to ``base``'s dotted module paths (`NameMatcher.find_flat`
    on the name without ``prefix``), so they merge like any other; dotted names are kept. Raises `CheckpointError`
    naming the module when a kohya name fits no base module, several, or one another module fits too."""
    renamed: dict[str, str] = {}
    modules = {}
    for name, module in adapter.modules.items():
        target = name
        if is_kohya_name(name):
            target = base.matcher.find_flat(name.removeprefix(prefix))
            if target is None:
                raise CheckpointError(f"kohya module {name} matches no module of base {base.folder}")
        if target in renamed:
            raise CheckpointError(f"adapter modules {renamed[target]} and {name} both name base module {target}")
        renamed[target] = name
        modules[target] = module
    return dataclasses.replace(adapter, modules=modules)
