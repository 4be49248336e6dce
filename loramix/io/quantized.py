"""Quantized base checkpoints: recognise the layout or refuse it, and the maths of the formats loramix supports.

A base whose ``config.json`` has a ``quantization_config``, or whose tensors look quantized (float8 dtypes, scale,
zero-point, packed-code or block tensors), is positively recognised here from the config, the tensor names, dtypes
and shapes together — or refused in one line naming the tensor and the format. Nothing downstream ever reads codes
as weights. Supported:

- **block FP8** (``quant_method: fp8`` with ``weight_block_size``, as DeepSeek-V3/R1 and the Qwen3-FP8 releases
  store it, transformers' fine-grained FP8): ``<m>.weight`` in float8_e4m3fn and ``<m>.weight_scale_inv`` (float32
  or bfloat16), one per b₀×b₁ block (``ceil(rows/b₀) × ceil(cols/b₁)``); W = codes · scale. Re-quantized as
  transformers' ``Fp8Quantize`` does: per block a = max |W|, scale s = 448 / a (1 for an all-zero block; with
  ``scale_fmt: ue8m0`` 1/s rounded up to a power of two), codes = clamp(W·s, ±448) cast to float8_e4m3fn (round to
  nearest even), ``weight_scale_inv`` = 1/s.
- **compressed-tensors FP8** (``quant_method: compressed-tensors``, ``format: float-quantized``, llm-compressor's
  FP8 and FP8_DYNAMIC schemes): ``<m>.weight`` in float8_e4m3fn and ``<m>.weight_scale`` per tensor ([1] or []),
  output channel ([rows, 1]) or block; W = codes · scale. Re-quantized as compressed-tensors' ``calculate_qparams``
  and ``quantize`` do: s = max(a / 448, float32 eps) per tensor, channel or block, stored in the scale's dtype,
  codes = clamp(W / s, ±448) cast to float8_e4m3fn. Static activation scales (``input_scale``) are kept as they are.
- **ComfyUI scaled FP8** (no config: a ``scaled_fp8`` marker tensor, ``flux1-dev-fp8``-style single files that
  ComfyUI's scripts quantized): ``<m>.weight`` in float8_e4m3fn and ``<m>.scale_weight`` per tensor, W = codes ·
  scale_weight; re-quantized per tensor as compressed-tensors does (s = max |W| / 448).
- **plain-cast FP8** (no config: float8_e4m3fn tensors and no scale tensor of any kind, as Kijai's and Comfy-Org's
  ``flux1-dev-fp8.safetensors`` are cast from bfloat16, which ComfyUI loads as W = the stored values): not a
  quantized layout but a dense base of that dtype; a merged weight is W + ΔW rounded once to float8_e4m3fn (nearest,
  saturating at ±448), every other tensor copied. A float8_e5m2 file, or float8 tensors in a folder with a
  config.json but no ``quantization_config``, are refused.
- **MXFP4** (``quant_method: mxfp4``, gpt-oss's experts): ``<p>_blocks`` and ``<p>_scales`` read as the dense
  expert parameter ``<p>``, as transformers' ``convert_moe_packed_tensors`` does; re-quantized as triton_kernels'
  ``downcast_to_mxfp_torch`` rounds (`loramix.io.schemes.MXFP4.quantize`).
- **GPTQ / AWQ int4** (``quant_method: gptq`` or ``awq``, 4 bits, GEMM packing; `loramix.io.schemes.Int4`):
  ``<m>.qweight``, ``qzeros``, ``scales`` (and GPTQ's ``g_idx``) read as ``<m>.weight`` = (q − z)·s; re-quantized
  round-to-nearest with fresh scales and zeros per group, as GPTQ's and AutoAWQ's own quantizers compute them
  (GPTQ's Hessian-guided rounding needs calibration data loramix does not have), ``g_idx`` kept.

A base with a 4-bit bitsandbytes ``quantization_config`` but dense tensors is the QLoRA case of `loramix.quantize`
(not quantized here); one holding bitsandbytes' packed tensors is refused like any other unsupported layout.
"""

from __future__ import annotations

import functools
import math
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import torch

from loramix.errors import CheckpointError, shown
from loramix.io.schemes import FP8, FP8_DTYPE, MXFP4, Int4, Scheme

SCALE_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# Tensor name endings only quantized checkpoints have (GPTQ/AWQ, compressed-tensors, FP8, MXFP4, bitsandbytes).
QUANT_ENDINGS = (
    ".weight_scale_inv",
    ".weight_scale",
    ".weight_zero_point",
    ".weight_packed",
    ".weight_global_scale",
    ".input_scale",
    ".qweight",
    ".qzeros",
    ".g_idx",
    "_blocks",
    "_scales",
    ".absmax",
    ".quant_map",
    ".SCB",
    ".nested_absmax",
)
FLOAT8 = {torch.float8_e4m3fn, torch.float8_e5m2}
COMFY_MARKER = "scaled_fp8"  # ComfyUI's marker tensor of a scaled FP8 file (`_comfy_scaled_fp8`)
SUPPORTED = "FP8 (block FP8, compressed-tensors float-quantized, ComfyUI scaled FP8), gpt-oss MXFP4 and GPTQ/AWQ int4"


class Stored(Protocol):
    """What the reader knows of a stored tensor (`loramix.io.base.BaseTensor`)."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]

    def rows(self, start: int, stop: int) -> torch.Tensor: ...


@dataclass(frozen=True)
class QuantizedBase:
    """A recognised quantized base: its scheme and, per quantized weight key, the key of its scale tensor (and,
    where the dense model names the weight otherwise, that name: MXFP4's ``<p>_blocks`` is ``<p>``)."""

    scheme: Scheme
    scales: dict[str, str]
    activation_scales: tuple[str, ...] = ()  # static input scales: kept with the format, dropped when dense
    dense_names: dict[str, str] = field(default_factory=dict)
    extras: dict[str, tuple[str, ...]] = field(default_factory=dict)  # more parts of a weight (GPTQ qzeros, g_idx)

    def parts_of_weights(self) -> set[str]:
        """Every stored key that is part of a quantized weight but not its codes (scales, zeros, group indices)."""
        return {*self.scales.values(), *(k for keys in self.extras.values() for k in keys)}

    def describe(self) -> str:
        return self.scheme.describe()

    def stored(self, name: str) -> str:
        """The stored (codes) key of a dense weight name (itself for any other)."""
        return next((k for k, v in self.dense_names.items() if v == name), name)


@dataclass
class DequantizedTensor:
    """A quantized weight read as float32 W (a `loramix.io.base.BaseTensor` stand-in: ``rows`` dequantizes)."""

    name: str
    codes: Stored
    scale: Stored
    scheme: Scheme
    extra: tuple[Stored, ...] = ()
    dtype: torch.dtype = torch.float32
    path: None = None
    offset: int = 0
    tensor: None = None

    @property
    def shape(self) -> tuple[int, ...]:
        return self.scheme.dense_shape(self.codes.shape)

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize

    def rows(self, start: int, stop: int) -> torch.Tensor:
        if getattr(self.scheme, "whole", False):  # packed across rows: the whole weight, once
            return self._whole[start:stop]
        grid = self.scheme.grid(self.codes.shape)
        scale = self.scale.rows(*self.scheme.scale_rows(start, stop)) if self.scale.shape else self.scale.rows(0, 0)
        return self.scheme.dequantize(self.codes.rows(start, stop), scale.reshape(-1, *grid[1:]), start)

    @functools.cached_property
    def _whole(self) -> torch.Tensor:
        return self.scheme.dequantize_parts(*self.parts())

    def parts(self) -> tuple[torch.Tensor, ...]:
        """(codes, scales, *the other parts: GPTQ/AWQ's qzeros and g_idx), the scales on their grid (a per-tensor
        scale stored as [] or [1] read as [1, 1])."""
        scale = self.scale.rows(0, self.scale.shape[0] if self.scale.shape else 0)
        rest = tuple(t.rows(0, t.shape[0]) for t in self.extra)
        return self.codes.rows(0, self.codes.shape[0]), scale.reshape(self.scheme.grid(self.codes.shape)), *rest


def _name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _looks_quantized(name: str, tensor: Stored) -> bool:
    return tensor.dtype in FLOAT8 or name.endswith(QUANT_ENDINGS)


def _refuse(where: Path, name: str, what: str) -> CheckpointError:
    return CheckpointError(
        f"{where}: tensor {shown(name)}: {what}; loramix merges into dense bases and {SUPPORTED} (dequantize the "
        "base first)"
    )


def recognise(config: dict, tensors: dict[str, Stored], where: Path) -> QuantizedBase | None:
    """The quantized layout of a base (None for a dense one), or `CheckpointError` naming the tensor and format for
    a layout loramix does not support or a damaged one (missing, misshapen or non-finite scales)."""
    qc = config.get("quantization_config")
    suspects = [name for name, t in tensors.items() if _looks_quantized(name, t)]
    first = suspects[0] if suspects else next(iter(tensors), "?")
    if qc is None:
        if any(n == COMFY_MARKER or n.endswith("." + COMFY_MARKER) for n in tensors):
            return _comfy_scaled_fp8(tensors, where)
        if suspects and not config and all(_plain_fp8(n, tensors[n]) for n in suspects):
            return None  # a plain-cast float8_e4m3fn single file: W = the stored values (a dense base of that dtype)
        if suspects:
            t = tensors[first]
            raise _refuse(
                where, first, f"a quantized tensor ({_name(t.dtype)}) but config.json has no quantization_config"
            )
        return None
    if not isinstance(qc, dict):
        raise CheckpointError(f"{where}: quantization_config must be a JSON object")
    method = str(qc.get("quant_method", "")).lower()
    if method == "bitsandbytes" or qc.get("load_in_4bit") or qc.get("load_in_8bit"):
        if suspects or any(t.dtype == torch.uint8 for t in tensors.values()):
            raise _refuse(where, first, "bitsandbytes' packed 4/8-bit tensors")
        return None  # a dense base with QLoRA's config: loramix.quantize's round trip
    if method == "fp8":
        return _block_fp8(qc, tensors, where)
    if method == "compressed-tensors":
        return _compressed_tensors(qc, tensors, where, first)
    if method == "mxfp4":
        return _mxfp4(tensors, where)
    if method in ("gptq", "awq"):
        return _int4(method, qc, tensors, where, first)
    raise _refuse(where, first, f"a {method or 'unnamed'} quantized base (quantization_config quant_method)")


def _plain_fp8(name: str, tensor: Stored) -> bool:
    """A float8_e4m3fn tensor stored as the value itself (no scale tensor anywhere: see `recognise`)."""
    return tensor.dtype == FP8_DTYPE and not name.endswith(QUANT_ENDINGS) and "scale" not in name.rpartition(".")[2]


def _comfy_scaled_fp8(tensors: dict[str, Stored], where: Path) -> QuantizedBase:
    """ComfyUI's scaled FP8 single files (``flux1-dev-fp8``-style releases quantized by ComfyUI's scripts): a
    ``scaled_fp8`` marker tensor (ComfyUI's ``model_detection``: ``<prefix>scaled_fp8``), each float8_e4m3fn
    ``<m>.weight`` with a float ``<m>.scale_weight`` per tensor, W = codes · scale_weight (comfy/ops.py
    ``scaled_fp8_op``), and optional ``<m>.scale_input`` activation scales (kept as they are). Re-quantized per
    tensor: s = max(|W|)/448, codes = W / s, as compressed-tensors' per-tensor FP8 (the same maths)."""
    markers = [n for n in tensors if n == COMFY_MARKER or n.endswith("." + COMFY_MARKER)]
    kind = {tensors[n].dtype for n in markers}
    if kind != {FP8_DTYPE}:
        raise _refuse(where, markers[0], f"a scaled_fp8 marker of {', '.join(map(_name, kind))} (e4m3fn supported)")
    scheme = FP8((1, 1), suffix=".scale_weight", granularity="tensor", divide=True)
    view = {n: t for n, t in tensors.items() if n not in markers}
    layout = _fp8_layout(scheme, view, where, static=True, activation=".scale_input")
    return QuantizedBase(scheme, layout.scales, (*layout.activation_scales, *markers))


def _block_fp8(qc: dict, tensors: dict[str, Stored], where: Path) -> QuantizedBase:
    block = qc.get("weight_block_size")
    first = next((n for n, t in tensors.items() if t.dtype in FLOAT8), next(iter(tensors), "?"))
    if not _pair(block):
        raise _refuse(where, first, f"fp8 quantization_config with weight_block_size {block!r} (per-tensor FP8)")
    if str(qc.get("activation_scheme", "dynamic")).lower() != "dynamic":
        raise _refuse(where, first, "fp8 with static activation scales (activation_scheme static)")
    scale_fmt = str(qc.get("scale_fmt", "float"))
    if scale_fmt not in ("float", "ue8m0"):
        raise _refuse(where, first, f"fp8 scale_fmt {scale_fmt!r}")
    return _fp8_layout(FP8((block[0], block[1]), scale_fmt), tensors, where, static=False)


def _pair(block) -> bool:
    ok = isinstance(block, list) and len(block) == 2
    return ok and all(isinstance(b, int) and not isinstance(b, bool) and b > 0 for b in block)


def _compressed_tensors(qc: dict, tensors: dict[str, Stored], where: Path, first: str) -> QuantizedBase:
    """compressed-tensors ``float-quantized`` FP8 (llm-compressor's FP8 and FP8_DYNAMIC schemes): one weights
    setting across config_groups, symmetric 8-bit float, per tensor, channel or block; input activations dynamic
    (nothing stored) or static (``input_scale``, kept as it is)."""
    fmt, groups = qc.get("format"), qc.get("config_groups")
    if fmt != "float-quantized" or qc.get("quantization_status", "compressed") != "compressed":
        raise _refuse(where, first, f"compressed-tensors format {fmt!r} ({qc.get('quantization_status')})")
    if not isinstance(groups, dict) or not groups or not all(isinstance(g, dict) for g in groups.values()):
        raise _refuse(where, first, "compressed-tensors without config_groups")
    weights = [g.get("weights") for g in groups.values()]
    w = weights[0] if all(x == weights[0] for x in weights) and isinstance(weights[0], dict) else {}
    strategy, block = w.get("strategy"), w.get("block_structure")
    fp8 = w.get("type") == "float" and w.get("num_bits") == 8 and w.get("symmetric", True) and not w.get("dynamic")
    if not fp8 or strategy not in ("tensor", "channel", "block") or (strategy == "block" and not _pair(block)):
        raise _refuse(where, first, f"compressed-tensors weights {weights[0]!r} (not one static FP8 setting)")
    acts = [g.get("input_activations") for g in groups.values()]
    if any(a is not None and not (isinstance(a, dict) and a.get("type") == "float") for a in acts):
        raise _refuse(where, first, f"compressed-tensors input activations {acts[0]!r}")
    static = any(a is not None and not a.get("dynamic") for a in acts)
    shape = (block[0], block[1]) if strategy == "block" else (1, 1)
    scheme = FP8(shape, suffix="_scale", granularity=strategy, divide=True)
    return _fp8_layout(scheme, tensors, where, static=static)


def _fp8_layout(
    scheme: FP8, tensors: dict[str, Stored], where: Path, *, static: bool, activation: str = ".input_scale"
) -> QuantizedBase:
    """Every float8 weight with its checked scale; static activation scales (``activation``, compressed-tensors'
    ``input_scale``) where the config says so; anything else quantized-looking refused."""
    scales: dict[str, str] = {}
    for name, t in tensors.items():
        if t.dtype == FP8_DTYPE:
            scales[name] = _fp8_scale(name, t, tensors, scheme.for_shape(t.shape), where)
    activations = tuple(n for n in tensors if static and n.endswith(activation))
    known = set(scales.values()) | set(activations)
    for name, t in tensors.items():
        if name not in scales and name not in known and _looks_quantized(name, t):
            raise _refuse(where, name, f"{_name(t.dtype)} {list(t.shape)} has no place in a {scheme.describe()} base")
    return QuantizedBase(scheme, scales, activations)


def _mxfp4(tensors: dict[str, Stored], where: Path) -> QuantizedBase:
    """gpt-oss MXFP4: every ``*_blocks`` uint8 [E, out, G, 16] with its ``*_scales`` uint8 [E, out, G]."""
    scheme, scales = MXFP4(), {}
    for name, t in tensors.items():
        if name.endswith("_blocks"):
            key = name.removesuffix("_blocks") + "_scales"
            scale = tensors.get(key)
            if t.dtype != torch.uint8 or len(t.shape) != 4 or t.shape[-1] != 16:
                raise _refuse(where, name, f"{_name(t.dtype)} {list(t.shape)}, expected uint8 [E, out, G, 16] (MXFP4)")
            if scale is None or scale.dtype != torch.uint8 or tuple(scale.shape) != tuple(t.shape[:-1]):
                found = "missing" if scale is None else f"{_name(scale.dtype)} {list(scale.shape)}"
                raise _refuse(where, key, f"{found}, expected uint8 {list(t.shape[:-1])} (MXFP4 scales of {name})")
            if bool((scale.rows(0, scale.shape[0]) == 255).any()):
                raise _refuse(where, key, "NaN scales (E8M0 255) (MXFP4)")
            scales[name] = key
    known = set(scales.values())
    for name, t in tensors.items():
        if name not in scales and name not in known and _looks_quantized(name, t):
            raise _refuse(where, name, f"{_name(t.dtype)} {list(t.shape)} has no place in an {scheme.describe()} base")
    return QuantizedBase(scheme, scales, dense_names={k: k.removesuffix("_blocks") for k in scales})


def _int4(method: str, qc: dict, tensors: dict[str, Stored], where: Path, first: str) -> QuantizedBase:
    """GPTQ or AWQ (GEMM) 4-bit: each ``<m>.qweight`` int32 with its ``qzeros``, ``scales`` (and GPTQ's optional
    ``g_idx``), shapes checked against the config's group size."""
    bits, group = qc.get("bits", qc.get("w_bit")), qc.get("group_size", qc.get("q_group_size"))
    fmt = str(qc.get("checkpoint_format", "gptq") if method == "gptq" else qc.get("version", "gemm")).lower()
    ok = bits == 4 and isinstance(group, int) and (group == -1 or group > 0) and fmt in ("gptq", "gptq_v2", "gemm")
    if not ok or (method == "awq" and qc.get("zero_point") is False):
        raise _refuse(
            where, first, f"{method} with bits {bits}, group_size {group}, format {fmt} (loramix reads 4-bit)"
        )
    sym = method == "gptq" and qc.get("sym", True) is not False  # GPTQConfig's default
    scheme = Int4(method, group, zero_offset=1 if fmt == "gptq" else 0, sym=sym)
    scales, extras = {}, {}
    for name, t in tensors.items():
        if name.endswith(".qweight"):
            scales[name], extras[name] = _int4_parts(name, t, tensors, scheme, where)
    known = {*scales, *scales.values(), *(k for keys in extras.values() for k in keys)}
    for name, t in tensors.items():
        if name not in known and _looks_quantized(name, t):
            raise _refuse(where, name, f"{_name(t.dtype)} {list(t.shape)} has no place in a {scheme.describe()} base")
    names = {k: k.removesuffix(".qweight") + ".weight" for k in scales}
    return QuantizedBase(scheme, scales, dense_names=names, extras=extras)


def _int4_parts(name: str, t: Stored, tensors: dict[str, Stored], scheme: Int4, where: Path):
    module = name.removesuffix(".qweight")
    if t.dtype != torch.int32 or len(t.shape) != 2:
        raise _refuse(
            where, name, f"{_name(t.dtype)} {list(t.shape)}, expected a 2-D int32 qweight ({scheme.describe()})"
        )
    out, inputs = scheme.dense_shape(t.shape)
    groups = scheme.groups(inputs)
    expected = {".qzeros": ((groups, out // 8), (torch.int32,)), ".scales": ((groups, out), SCALE_DTYPES)}
    if scheme.method == "gptq" and f"{module}.g_idx" in tensors:
        expected[".g_idx"] = ((inputs,), (torch.int32, torch.int64))
    for suffix, (shape, dtypes) in expected.items():
        part = tensors.get(module + suffix)
        if part is None or part.dtype not in dtypes or tuple(part.shape) != shape:
            found = "missing" if part is None else f"{_name(part.dtype)} {list(part.shape)}"
            raise _refuse(where, module + suffix, f"{found}, expected {list(shape)} ({scheme.describe()} of {name})")
    values = tensors[module + ".scales"].rows(0, groups)
    if not bool(torch.isfinite(values).all()):
        raise _refuse(where, module + ".scales", f"NaN or infinite scales ({scheme.describe()})")
    if ".g_idx" in expected:
        g_idx = tensors[module + ".g_idx"].rows(0, inputs)
        if bool((g_idx < 0).any() or (g_idx >= groups).any()):
            raise _refuse(where, module + ".g_idx", f"group indices outside 0..{groups - 1} ({scheme.describe()})")
    return module + ".scales", tuple(module + s for s in (".qzeros", ".g_idx") if s in expected)


def _fp8_scale(name: str, t: Stored, tensors: dict[str, Stored], scheme: FP8, where: Path) -> str:
    """The scale key of FP8 weight ``name``, checked: present, float, its grid's shape (a per-tensor scale may be
    stored as [] or [1], a per-channel one as [rows]), finite and positive."""
    key = scheme.scale_key(name)
    scale = tensors.get(key)
    what = scheme.describe()
    if len(t.shape) != 2 or not name.endswith(".weight"):
        raise _refuse(where, name, f"float8_e4m3fn {list(t.shape)}, not a 2-D .weight of {what}")
    if scale is None:
        raise _refuse(where, name, f"float8_e4m3fn weight without its scale tensor {key} ({what})")
    grid = scheme.grid(t.shape)
    shapes = {grid, (grid[0],)} | ({(), (1,)} if scheme.granularity == "tensor" else set())
    if scale.dtype not in SCALE_DTYPES or tuple(scale.shape) not in shapes:
        raise _refuse(
            where,
            key,
            f"{_name(scale.dtype)} {list(scale.shape)}, expected a float {list(grid)} for {what} of {list(t.shape)}",
        )
    values = scale.rows(0, grid[0] if scale.shape else 0)
    if not bool(torch.isfinite(values).all()) or not bool((values > 0).all()):
        raise _refuse(where, key, f"scales that are NaN, infinite or not positive ({what})")
    return key


def share_below(delta: torch.Tensor, step: torch.Tensor) -> float:
    """The share of ΔW's energy (Σ ΔW², float64) in entries with |ΔW| < step/2: the part of the update smaller than
    the quantization grid around W (it only moves W within its cell). NaN for ΔW = 0."""
    d = delta.detach()
    total = float(torch.linalg.vector_norm(d, dtype=torch.float64)) ** 2
    if total == 0:
        return float("nan")
    below = torch.where(d.abs() < step.to(d.device) / 2, d, 0)
    return float(torch.linalg.vector_norm(below, dtype=torch.float64)) ** 2 / total


@dataclass
class Requantized:
    """A merged weight's parts, made once and handed to the output tensors that hold them (codes, scales, zeros),
    whichever is written first; thread-safe (the writer's threads ask for both)."""

    compute: Callable[[str], dict[int, torch.Tensor]]
    done: dict[str, dict[int, torch.Tensor]] = field(default_factory=dict)
    locks: dict[str, threading.Lock] = field(default_factory=dict)
    guard: threading.Lock = field(default_factory=threading.Lock)

    def take(self, weight: str, part: int) -> torch.Tensor:
        """Output tensor ``part`` of merged weight ``weight`` (computed on first request, then forgotten)."""
        with self.guard:
            lock = self.locks.setdefault(weight, threading.Lock())
        with lock:
            if weight not in self.done:
                self.done[weight] = self.compute(weight)
            parts = self.done[weight]
            tensor = parts.pop(part)
            if not parts:
                del self.done[weight]
        return tensor
