"""The maths of the quantized formats loramix reads and writes: dequantize (codes and scales → float32 W),
quantize again with the format's own rounding, and the local quantization step; one frozen dataclass per format,
recognised and checked by `loramix.io.quantized` (which documents each layout).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = float(torch.finfo(FP8_DTYPE).max)  # 448


@dataclass(frozen=True)
class FP8:
    """FP8 weights: float8_e4m3fn codes, one float scale per ``block`` (rows × columns; for ``granularity``
    "channel" a row, for "tensor" the whole weight: `for_shape` makes the block concrete), W = codes · scale.
    ``divide``: codes = W / scale (compressed-tensors), else codes = W · (1/scale) (transformers' block FP8)."""

    block: tuple[int, int]
    scale_fmt: str = "float"  # "ue8m0": every scale a power of two
    suffix: str = "_scale_inv"  # the scale tensor's name: the weight's name plus this (`scale_key`)
    granularity: str = "block"  # "block", "channel" or "tensor"
    divide: bool = False

    def scale_key(self, name: str) -> str:
        """The scale tensor's key of weight ``name``: the name plus the suffix, or for a suffix that starts with a
        dot (ComfyUI's ``.scale_weight``) the module's path plus it."""
        return name.removesuffix(".weight") + self.suffix if self.suffix.startswith(".") else name + self.suffix

    def describe(self) -> str:
        fmt = ", power-of-two scales" if self.scale_fmt == "ue8m0" else ""
        blocks = f"{self.block[0]}×{self.block[1]} blocks" if self.granularity == "block" else ""
        if self.suffix == ".scale_weight":
            return "ComfyUI scaled FP8 (float8_e4m3fn, per-tensor scale_weight)"
        if not self.divide:
            return f"block FP8 (float8_e4m3fn, {blocks}{fmt})"
        return f"compressed-tensors FP8 (float8_e4m3fn, {blocks or 'per-' + self.granularity} weight_scale)"

    def for_shape(self, shape: tuple[int, ...]) -> FP8:
        """This scheme with the block of a ``shape`` weight (per-channel: one row; per-tensor: all of it)."""
        if self.granularity == "block":
            return self
        return replace(self, block=(1 if self.granularity == "channel" else shape[0], shape[1]))

    def grid(self, shape: tuple[int, ...]) -> tuple[int, int]:
        return math.ceil(shape[0] / self.block[0]), math.ceil(shape[1] / self.block[1])

    def scaled(self, values: torch.Tensor, factors: torch.Tensor, first: int = 0, divide: bool = False) -> torch.Tensor:
        """``values`` (rows × cols, from row ``first``) times each entry's block factor (``factors``: the grid rows
        from ``first``'s block on), one float32 product per entry, as transformers' ops compute it."""
        b0, b1 = self.block
        (rows, cols), (r, c), skip = values.shape, factors.shape, first % b0
        pads = (0, c * b1 - cols, skip, r * b0 - rows - skip)
        padded = torch.nn.functional.pad(values, pads) if any(pads) else values
        blocks, factors = padded.reshape(r, b0, c, b1), factors[:, None, :, None]
        out = (blocks / factors if divide else blocks * factors).reshape(r * b0, c * b1)
        return out[skip : skip + rows, :cols].contiguous() if any(pads) else out

    def dequantize(self, codes: torch.Tensor, scale: torch.Tensor, first: int = 0) -> torch.Tensor:
        """W (float32) of rows ``first`` … of ``codes`` whose blocks' scales are ``scale``."""
        return self.scaled(codes.float(), scale.float(), first)

    def quantize(self, weight: torch.Tensor, scale_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """(codes, weight_scale_inv) of a float32 weight, with transformers' rounding (see the module docstring)."""
        rows, cols = weight.shape
        r, c = self.grid(weight.shape)
        pads = (0, c * self.block[1] - cols, 0, r * self.block[0] - rows)
        padded = torch.nn.functional.pad(weight, pads) if any(pads) else weight  # a view where the blocks tile W
        amax = padded.reshape(r, self.block[0], c, self.block[1]).abs().amax(dim=(1, 3))
        if self.divide:  # compressed-tensors: scale = max(a/448, eps), stored, and W divided by the stored scale
            stored = (amax / FP8_MAX).clamp(min=torch.finfo(torch.float32).eps).to(scale_dtype)
            codes = self.scaled(weight, stored.float(), divide=True).clamp_(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
            return codes, stored
        scales = torch.where(amax > 0, FP8_MAX / torch.where(amax > 0, amax, 1.0), 1.0)
        inverse = 1.0 / scales
        if self.scale_fmt == "ue8m0":
            inverse = torch.exp2(torch.ceil(torch.log2(inverse.clamp(min=torch.finfo(torch.float32).tiny))))
            scales = 1.0 / inverse
        codes = self.scaled(weight, scales).clamp_(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
        return codes, inverse.to(scale_dtype)

    def dequantize_parts(self, codes: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        return self.dequantize(codes, scale)

    def quantize_parts(self, weight: torch.Tensor, parts: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        """(codes, scales) of ``weight`` with fresh scales, stored in the dtype of the old ones (``parts``)."""
        return self.quantize(weight, parts[1].dtype)

    def step(self, codes: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        """The local quantization step of each entry (float32, exact: a power of two times the scale): the
        float8_e4m3fn grid's spacing at the code, 2^(max(E, 1) − 10) for the code's exponent field E (bias 7, three
        mantissa bits; subnormals share E = 1's spacing), times its block's scale."""
        exponent = ((codes.view(torch.uint8) >> 3) & 0xF).clamp_(min=1).int()
        spacing = ((exponent + (127 - 10)) << 23).view(torch.float32)  # 2^(E − 10) as float32 bits
        return self.scaled(spacing, scale.float())

    def dense_shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        return shape

    def scale_rows(self, start: int, stop: int) -> tuple[int, int]:
        """The scale rows that rows [start, stop) of the weight use."""
        return (start // self.block[0], -(-stop // self.block[0])) if stop > start else (0, 0)


E2M1 = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)


@dataclass(frozen=True)
class MXFP4:
    """gpt-oss's MXFP4 experts: ``<p>_blocks`` [E, out, G, 16] uint8 (two E2M1 codes a byte, low nibble first;
    a block is 32 codes along the input) and ``<p>_scales`` [E, out, G] uint8 (E8M0: 2^(s − 127)). Read as the dense
    expert parameter ``<p>`` [E, in, out] (transformers' GptOssExperts layout), W = code · 2^(s − 127)."""

    suffix: str = "_scales"
    block: tuple[int, int] = (1, 1)  # whole experts per scale row
    granularity: str = "mxfp4"

    def describe(self) -> str:
        return "MXFP4 (E2M1 codes, 32-entry blocks with E8M0 scales, gpt-oss experts)"

    def for_shape(self, shape: tuple[int, ...]) -> MXFP4:
        return self

    def grid(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        return tuple(shape[:-1])

    def dense_shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        experts, out, groups, width = shape
        return experts, groups * width * 2, out

    def scale_rows(self, start: int, stop: int) -> tuple[int, int]:
        return start, stop

    def dequantize(self, codes: torch.Tensor, scale: torch.Tensor, first: int = 0) -> torch.Tensor:
        """W (float32, [experts, in, out]) of packed ``codes`` and their E8M0 ``scale``."""
        return self._per_code(E2M1, codes, scale)

    @staticmethod
    def _per_code(table: tuple[float, ...], codes: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        """``table``'s value of each packed code times its block's 2^(s − 127), in the dense layout."""
        table = torch.tensor(table, dtype=torch.float32, device=codes.device)
        values = torch.stack((table[(codes & 0x0F).int()], table[(codes >> 4).int()]), dim=-1)
        values = torch.ldexp(values.flatten(-2), (scale.int() - 127)[..., None])
        return values.flatten(-2).transpose(1, 2).contiguous()

    def dequantize_parts(self, codes: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        return self.dequantize(codes, scale)

    def quantize(self, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(blocks, scales) of a float32 expert parameter [experts, in, out] in gpt-oss's stored layout (blocks of 32
        along the input), bit for bit what ``downcast_to_mxfp_torch`` (default ``ROUND_UP``) gives on W as [experts,
        out, in] with axis −1, in the version transformers 5.25 loads (``get_kernel("kernels-community/gpt-oss-triton-
        kernels", version=1)``, triton_kernels at triton commit 7d0efaa7): per 32 inputs a = max |W|, the scale a / 6
        (float32) rounded up to a power of two 2^(s − 127) by its bits, never below 2^-126 (s = 0 where a / 6 is 0),
        each W / 2^(s − 127) to the nearest E2M1 value, ties away from zero (later triton_kernels round them to
        even), a sign kept on zero, at most 6. A NaN or infinity gives what the kernel gives (scale 0 or 255,
        meaningless codes); a merge refuses the result."""
        experts, inputs, out = weight.shape
        x = weight.transpose(1, 2).contiguous().reshape(experts, out, inputs // 32, 32)
        scale_bits = ((x.abs().amax(dim=-1) / 6).view(torch.int32) + 0x7FFFFF) & 0x7F800000
        power = scale_bits.view(torch.float32)
        q = x * torch.where(power == 0, 0.0, 1.0 / torch.where(power == 0, 1.0, power))[..., None]
        midpoints = torch.tensor(E2M1[1:8], device=x.device).add(torch.tensor(E2M1[:7], device=x.device)).div(2)
        codes = torch.bucketize(q.abs(), midpoints, right=True).to(torch.uint8) | torch.signbit(q).to(torch.uint8) << 3
        pairs = codes.reshape(experts, out, inputs // 32, 16, 2)
        return pairs[..., 0] | (pairs[..., 1] << 4), (scale_bits >> 23).to(torch.uint8)

    def quantize_parts(self, weight: torch.Tensor, parts: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        return self.quantize(weight)

    def step(self, codes: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        """The local quantization step of each entry in the dense layout [experts, in, out]: the E2M1 grid's
        spacing at the code (0.5 below 2, 1 below 4, 2 above) times its block's 2^(s − 127)."""
        return self._per_code((0.5,) * 4 + (1.0,) * 2 + (2.0,) * 2 + (0.5,) * 4 + (1.0,) * 2 + (2.0,) * 2, codes, scale)


AWQ_COLUMNS = (0, 4, 1, 5, 2, 6, 3, 7)  # AutoAWQ's GEMM packing: output column 8j + k sits in nibble AWQ_COLUMNS[k]


@dataclass(frozen=True)
class Int4:
    """GPTQ and AWQ (GEMM) 4-bit weights: eight 4-bit codes per int32 (nibble i at bits 4i), zero points packed the
    same way, one float scale and zero per group of ``group_size`` input channels; W = (q − z) · s.

    GPTQ: ``qweight`` [in/8, out] packed along the input, ``qzeros`` [G, out/8], ``scales`` [G, out], ``g_idx``
    [in] (each input channel's group; act-order models permute it), zeros stored less one (``zero_offset`` 1) in
    the original ("gptq", v1) checkpoint format. AWQ: ``qweight`` [in, out/8] packed along the output in AutoAWQ's
    column order, ``qzeros`` [G, out/8], ``scales`` [G, out], input channel i in group i // group_size."""

    method: str  # "gptq" or "awq"
    group_size: int  # input channels per group (the whole input for -1)
    zero_offset: int = 0
    sym: bool = False  # GPTQ's symmetric quantizer (zero 8), re-quantizing as the base was
    suffix: str = ".scales"
    block: tuple[int, int] = (1, 1)
    granularity: str = "group"
    whole: bool = True  # packed along the input (GPTQ) or the output (AWQ): dequantized whole, then sliced

    def describe(self) -> str:
        return f"{self.method.upper()} int4 (groups of {self.group_size})"

    def for_shape(self, shape: tuple[int, ...]) -> Int4:
        return self

    def dense_shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        """(out, in) of a ``qweight`` of ``shape``."""
        return (shape[1], shape[0] * 8) if self.method == "gptq" else (shape[1] * 8, shape[0])

    def groups(self, inputs: int) -> int:
        return 1 if self.group_size == -1 else math.ceil(inputs / self.group_size)

    def grid(self, shape: tuple[int, ...]) -> tuple[int, int]:
        """(groups, out) of a ``qweight`` of ``shape``: the shape of its scales and unpacked zeros."""
        out, inputs = self.dense_shape(shape)
        return self.groups(inputs), out

    def group_of(self, inputs: int, g_idx: torch.Tensor | None, device: torch.device) -> torch.Tensor:
        """Each input channel's group: ``g_idx`` where stored (GPTQ act-order permutes it), else i // group_size."""
        if g_idx is not None:
            return g_idx.long()
        return torch.arange(inputs, device=device) // (inputs if self.group_size == -1 else self.group_size)

    def dequantize_parts(self, qweight, scales, qzeros, g_idx=None) -> torch.Tensor:
        """W (float32, out × in) of a module's packed parts."""
        out, inputs = self.dense_shape(tuple(qweight.shape))
        q = _nibbles(qweight)  # GPTQ [in/8, out, 8]; AWQ [in, out/8, 8]
        q = q.permute(0, 2, 1).reshape(inputs, out) if self.method == "gptq" else _awq_columns(q).reshape(inputs, out)
        zeros = _nibbles(qzeros)
        zeros = (zeros if self.method == "gptq" else _awq_columns(zeros)).reshape(len(qzeros), out) + self.zero_offset
        g_idx = self.group_of(inputs, g_idx, qweight.device)
        return ((q - zeros[g_idx]).float() * scales.float()[g_idx]).T.contiguous()

    def quantize_parts(self, weight: torch.Tensor, parts: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        """(qweight, scales, qzeros[, g_idx]) of a float32 ``weight`` (out × in) with fresh scales and zeros per
        group (``parts``: the stored ones, for the scales' dtype and GPTQ's g_idx, kept), round to nearest as the
        formats' own quantizers do. GPTQ (its ``Quantizer.find_params``): the group's range widened to hold 0,
        scale = (max − min) / 15, zero = round(−min / scale) (asymmetric) or 8 (``sym``; the range made symmetric);
        an all-zero group gets the range ±1. AWQ (AutoAWQ's ``pseudo_quantize_tensor``): scale = max(max − min,
        1e-5) / 15, zero = clamp(−round(min / scale), 0, 15). Then, as their packers do, the scale is stored in the
        dtype of the base's scales and q = clamp(round(W / stored scale) + zero, 0, 15) (half to even); a GPTQ v1
        zero, stored less one, is at least 1."""
        out, inputs = weight.shape
        g_idx = self.group_of(inputs, parts[3] if len(parts) > 3 else None, weight.device)
        groups = self.groups(inputs)
        columns = weight.T
        low, high = _group_range(columns, g_idx, groups)
        if self.method == "gptq":
            low, high = low.clamp(max=0), high.clamp(min=0)
            if self.sym:
                high = torch.maximum(low.abs(), high)
                low = torch.where(low < 0, -high, low)
            empty = (low == 0) & (high == 0)
            low, high = torch.where(empty, -1.0, low), torch.where(empty, 1.0, high)
            scale = (high - low) / 15
            zeros = torch.full_like(scale, 8.0) if self.sym else torch.round(-low / scale)
        else:
            scale = (high - low).clamp(min=1e-5) / 15
            zeros = (-torch.round(low / scale)).clamp(0, 15)
        zeros = zeros.clamp(self.zero_offset, 15)
        stored = scale.to(parts[1].dtype)
        q = torch.round(columns / stored.float()[g_idx]) + zeros[g_idx]
        q = q.clamp_(0, 15).int()  # [in, out]
        z = zeros.int() - self.zero_offset
        if self.method == "gptq":
            qweight, qzeros = _pack(q.T.reshape(out, inputs // 8, 8)).T.contiguous(), _pack(z.reshape(groups, -1, 8))
        else:
            qweight, qzeros = _pack(_awq_order(q)), _pack(_awq_order(z))
        return qweight, stored, qzeros, *parts[3:]

    def step(self, qweight: torch.Tensor, scales: torch.Tensor, qzeros=None, g_idx=None) -> torch.Tensor:
        """The local quantization step of each entry (out × in): its group's scale (the grid is uniform)."""
        inputs = self.dense_shape(tuple(qweight.shape))[1]
        return scales.float()[self.group_of(inputs, g_idx, qweight.device)].T.contiguous()


def _nibbles(packed: torch.Tensor) -> torch.Tensor:
    """[..., n] int32 → [..., n, 8] of its 4-bit fields, nibble i from bits 4i."""
    shifts = torch.arange(0, 32, 4, device=packed.device, dtype=torch.int32)
    return (packed[..., None] >> shifts) & 0xF


def _awq_columns(nibbles: torch.Tensor) -> torch.Tensor:
    return nibbles[..., list(AWQ_COLUMNS)]


def _group_range(columns: torch.Tensor, g_idx: torch.Tensor, groups: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(min, max) over each group's input channels (rows of ``columns``, [in, out]): the channels sorted by group;
    equal groups (GPTQ act-order permutes whole groups) reduced as one view, others by scatter."""
    counts = torch.bincount(g_idx, minlength=groups)
    if bool((counts == counts[0]).all()):
        grouped = columns[torch.argsort(g_idx, stable=True)].reshape(groups, -1, columns.shape[1])
        return grouped.amin(dim=1), grouped.amax(dim=1)
    index, shape = g_idx[:, None].expand_as(columns), (groups, columns.shape[1])
    low = torch.full(shape, math.inf, device=columns.device).scatter_reduce(0, index, columns, "amin")
    return low, torch.full(shape, -math.inf, device=columns.device).scatter_reduce(0, index, columns, "amax")


def _awq_order(values: torch.Tensor) -> torch.Tensor:
    """[n, 8m] 4-bit ints → [n, m, 8], word j's nibble AWQ_COLUMNS[k] holding column 8j + k."""
    grouped = values.reshape(values.shape[0], -1, 8)
    return torch.empty_like(grouped).index_copy_(-1, torch.tensor(AWQ_COLUMNS, device=values.device), grouped)


def _pack(nibbles: torch.Tensor) -> torch.Tensor:
    """[..., 8] 4-bit ints → [...] int32, field i at bits 4i (the bit pattern of an unsigned word)."""
    shifts = torch.arange(0, 32, 4, device=nibbles.device, dtype=torch.int64)
    words = (nibbles.long() << shifts).sum(dim=-1)
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


Scheme = FP8 | MXFP4 | Int4
