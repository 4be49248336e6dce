"""llama.cpp's LoRA adapter format: one ``.gguf`` file that ``llama-cli --lora`` / ``llama-server --lora`` load.

What llama.cpp reads (llama.cpp ``convert_lora_to_gguf.py``, ``src/llama-adapter.cpp``, ``src/llama-adapter.h``):
``general.type = "adapter"``, ``adapter.type = "lora"``, ``general.architecture`` equal to the base model's, one
float32 ``adapter.lora.alpha``, and per base tensor ``<gguf name>.weight.lora_a`` (numpy r×in) and ``….lora_b``
(out×r), the GGUF names coming from gguf's ``TensorNameMap`` for the architecture. Each module is scaled by
``alpha / its own rank`` (``llama_adapter_lora_weight::get_scale``). loramix writes the portable layout
(`loramix.adapter.portable_layout`: one rank R, one scale s) with alpha = s·R, so every module gets s.

The converter also applies the base architecture's own tensor transforms to the LoRA factors; for Llama that is the
q/k row permutation (``LlamaModel.permute`` in ``convert_hf_to_gguf.py``), which needs the head counts from the base's
config.json. Supported architectures: llama, qwen2, gemma, gpt2 (GPT-2's Conv1D modules are already in out×in
orientation in loramix). A GGUF LoRA has no place for lora_B biases, DoRA magnitudes, heads or embedding/conv LoRA:
those are refused. Writing only (there is no reader).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from loramix.adapter import LoraAdapter, check_rank_layout, portable_layout
from loramix.errors import MissingPackageError, OutputError, inside_backend
from loramix.io.gguf_base import llama_permute
from loramix.lazy import lazy
from loramix.sources import resolve

gguf = lazy("gguf")  # the optional extra loramix[gguf]: imported when a GGUF file is written

NAME = "gguf"
ARCHITECTURES = ("llama", "qwen2", "gemma", "gpt2")  # the base config's model_type


def base_config(base: str | Path | dict) -> dict:
    """The base model's config.json (a dict passes through; a folder or cached Hub id is read)."""
    if isinstance(base, dict):
        return base
    path = resolve(base, files=("config.json",), what="base model folder not found") / "config.json"
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise OutputError(f"{path}: cannot read the base model's config for GGUF ({exc})") from None


def _check(adapter: LoraAdapter) -> None:
    if adapter.extra:
        raise OutputError(f"GGUF LoRA files cannot hold heads or saved layers ({', '.join(sorted(adapter.extra)[:3])})")
    for name, m in adapter.modules.items():
        if m.bias is not None or m.magnitude is not None:
            raise OutputError(f"module {name}: GGUF LoRA files cannot hold lora_B biases or DoRA magnitudes")
        if m.layout not in ("out_in", "conv1d_fan_in_fan_out"):
            raise OutputError(f"module {name}: GGUF LoRA files hold linear LoRA only, not {m.layout}")


def gguf_targets(adapter: LoraAdapter, config: dict) -> dict[str, tuple[str, torch.Tensor, torch.Tensor]]:
    """``{module: (gguf weight name, A, B in llama.cpp's row order)}`` for ``adapter`` on a base with ``config``
    (``model_type`` the GGUF architecture, head counts for Llama's q/k permutation); scales left to the caller."""
    arch_name = config.get("model_type")
    if arch_name not in ARCHITECTURES:
        raise OutputError(f"GGUF output supports the architectures {', '.join(ARCHITECTURES)}, not {arch_name!r}")
    arch = next(a for a, n in gguf.MODEL_ARCH_NAMES.items() if n == arch_name)
    blocks = 1 + max((int(found) for n in adapter.modules for found in re.findall(r"\.(\d+)\.", n)), default=0)
    names = gguf.get_tensor_name_map(arch, blocks)
    heads = config.get("num_attention_heads") or config.get("n_head")
    kv_heads = config.get("num_key_value_heads") or heads
    out = {}
    for name, m in adapter.modules.items():
        target = names.get_name(name + ".weight", try_suffixes=(".weight",))
        if target is None:
            raise OutputError(f"module {name}: gguf's TensorNameMap has no {arch_name} tensor of that name")
        B = m.B
        if arch_name == "llama" and name.endswith(("q_proj", "k_proj")):
            B = llama_permute(B, heads if name.endswith("q_proj") else kv_heads)
        out[name] = target, m.A, B
    return out


def gguf_tensors(adapter: LoraAdapter, config: dict) -> dict[str, torch.Tensor]:
    """``{gguf name: tensor}`` (``….weight.lora_a``/``lora_b``) for ``adapter`` on a base with ``config``."""
    out = {}
    for target, A, B in gguf_targets(adapter, config).values():
        out[f"{target}.lora_a"], out[f"{target}.lora_b"] = A, B
    return out


def write(
    adapter: LoraAdapter,
    folder: Path,
    *,
    base: str | Path | dict | None = None,
    dtype: torch.dtype | None = None,
    rank_layout: str = "portable",
    file_name: str | None = None,
) -> Path:
    """Write ``adapter`` as a llama.cpp LoRA ``FOLDER/<file_name>`` (default: the folder's name + ``.gguf``).

    ``base`` is the base model (a folder, a cached Hub id, or its config.json as a dict; default: the adapter's
    base), whose config gives the architecture and head counts. Factors are written as float16 when the adapter (or
    ``dtype``) is float16, else float32. GGUF needs one rank, so ``rank_layout`` must be "portable".
    """
    try:
        gguf.GGUFWriter  # noqa: B018 (the optional dependency is there)
    except ModuleNotFoundError:
        raise MissingPackageError("GGUF output needs the gguf package: pip install 'loramix[gguf]'") from None
    check_rank_layout(rank_layout)
    if rank_layout != "portable":
        raise OutputError(
            "GGUF LoRA files hold one lora_alpha for all modules: write them with `rank_layout='portable'`"
        )
    if not adapter.modules:
        raise OutputError(f"{folder}: the adapter has no LoRA modules, so there is no GGUF adapter to write")
    _check(adapter)
    if base is None and adapter.base_model is None:
        raise OutputError("GGUF output needs the base model's config (architecture, head counts): pass base=FOLDER")
    config = base_config(base if base is not None else adapter.base_model)
    adapter = portable_layout(adapter)
    first = next(iter(adapter.modules.values()))
    numpy_dtype = "float16" if (dtype or adapter.dtype) == torch.float16 else "float32"
    file = folder / (file_name or folder.name + ".gguf")
    tensors = gguf_tensors(adapter, config)
    with inside_backend("gguf", f"writing {file.name}"):
        writer = gguf.GGUFWriter(str(file), config["model_type"])
        writer.add_type(gguf.GGUFType.ADAPTER)
        writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
        writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, first.scale * first.rank)
        for name, tensor in tensors.items():
            writer.add_tensor(name, tensor.float().numpy().astype(numpy_dtype))
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
    return file
