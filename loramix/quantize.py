"""QLoRA's 4-bit round trip, through bitsandbytes itself: the settings (`Quantization`, read from a
``quantization_config`` in transformers' `BitsAndBytesConfig` field names, flags overriding), the round trip
W → dequantize_4bit(quantize_4bit(W)) that a QLoRA adapter was trained on, which base tensors a 4-bit model
quantizes, and the local quantization step that says how much of ΔW lies below the 4-bit grid.

A QLoRA model (transformers + bitsandbytes) quantizes every Linear (and GPT-2's Conv1D, transposed to out×in first)
except the output head and ``llm_int8_skip_modules``; embeddings and norms stay in the load dtype. Blocks of
``blocksize`` entries run over the flattened out×in weight; with double quantization the block scales are quantized
again around their mean over the whole tensor, so a round trip always takes a whole tensor. The round trip runs in
the base tensor's stored dtype (what ``from_pretrained(dtype="auto")`` loads): bitsandbytes quantizes the weight in
its load dtype and dequantizes back to it; ``bnb_4bit_compute_dtype`` (the matmul's dtype, a lossless cast from the
dequantized bf16 weight) and ``bnb_4bit_quant_storage`` (how the packed 4-bit codes are stored) change no value.

bitsandbytes is the optional extra ``loramix[qlora]``; it is imported here only, when a round trip is asked for.

The same idea for an adapter trained on a dense base loaded in block FP8 (transformers' ``FineGrainedFP8Config``,
``quant_type="fp8"``): each nn.Linear weight (not GPT-2's Conv1D, which that integration leaves alone; not the
embeddings or the output head; not a weight the block does not tile, which ``Fp8Quantize`` passes through) goes
through ``Fp8Quantize``'s rounding in ``blocksize``×``blocksize`` blocks (default 128, transformers' default
``weight_block_size``) and back (`loramix.io.schemes.FP8`), in its own dtype.

And for a dense gpt-oss loaded in MXFP4 (transformers' ``Mxfp4Config``, ``quant_type="mxfp4"``): only the experts'
``mlp.experts.gate_up_proj`` and ``mlp.experts.down_proj`` ([experts, in, out]; ``Mxfp4Quantize`` converts nothing
else) go through MXFP4 in 32-entry blocks along the input and back (`loramix.io.schemes.MXFP4`, the rounding
gpt-oss's checkpoints were made with), cast to bfloat16 first as ``Mxfp4Quantize`` does; a base without them, or
whose inputs the block does not tile, is refused. (transformers 5.25's ``Mxfp4Quantize`` passes the parameter
transposed, [experts, out, in], to ``downcast_to_mxfp_torch`` with ``axis=1``, which blocks along the output; the
input is the axis its ``Mxfp4Deserialize``, its dequantizer and gpt-oss's checkpoints block, and the one kept here.)
"""

from __future__ import annotations

import importlib
import logging
from dataclasses import dataclass

import torch

from loramix.architecture import EMBEDDINGS, is_conv1d, is_output_head
from loramix.errors import CheckpointError, MissingPackageError, inside_backend
from loramix.io.quantized import share_below
from loramix.io.schemes import FP8, MXFP4
from loramix.settings import QUANTIZED_AS, ROUND_TRIPS

log = logging.getLogger(__name__)

QUANT_TYPES = tuple(q for q in QUANTIZED_AS if q != "none")
MXFP4_PARAMS = ("mlp.experts.gate_up_proj", "mlp.experts.down_proj")  # what transformers' Mxfp4Quantize converts
MXFP4_BLOCK = 32
BLOCKSIZES = {"fp8": 128, "mxfp4": MXFP4_BLOCK}  # transformers' defaults (MXFP4's is the format's); bitsandbytes: 64


@dataclass(frozen=True)
class Quantization:
    """How the base was quantized while the adapter trained (bitsandbytes 4-bit), and which tensors to round-trip:
    ``round_trip="all"`` every weight the 4-bit model quantized (the model that was trained), ``"targeted"`` only
    the weights the adapter changes. ``skip``: module names left unquantized (``llm_int8_skip_modules``)."""

    quant_type: str = "nf4"
    double_quant: bool = False
    blocksize: int = 64
    round_trip: str = "all"
    skip: tuple[str, ...] = ()

    def describe(self) -> str:
        if self.fp8:
            return f"block FP8, {self.blocksize}×{self.blocksize} blocks (transformers' FineGrainedFP8)"
        if self.mxfp4:
            return "MXFP4, 32-entry blocks with E8M0 scales (transformers' Mxfp4Config, gpt-oss experts)"
        double = "double-quantized scales" if self.double_quant else "float scales"
        return f"{self.quant_type.upper()}, block {self.blocksize}, {double}"

    @property
    def fp8(self) -> bool:
        return self.quant_type == "fp8"

    @property
    def mxfp4(self) -> bool:
        return self.quant_type == "mxfp4"

    @property
    def bitsandbytes(self) -> bool:
        return not (self.fp8 or self.mxfp4)

    def scheme(self) -> FP8 | MXFP4:
        return MXFP4() if self.mxfp4 else FP8((self.blocksize, self.blocksize))


def quantization_settings(
    configs: list[tuple[str, dict]],
    *,
    quantized_as: str | None = None,
    double_quant: bool | None = None,
    blocksize: int | None = None,
    round_trip: str = "all",
) -> Quantization | None:
    """The 4-bit settings of a faithful merge: the first ``quantization_config`` that loads in 4 bit among
    ``configs`` ((where, config.json contents) pairs: base, then adapter), each field overridden by the argument
    when given. ``quantized_as="none"`` asks for a plain merge whatever the configs say; None with no 4-bit config
    also gives None (plain)."""
    if quantized_as == "none":
        return None
    found, origin = {}, None
    for where, config in configs:
        qc = config.get("quantization_config")
        if isinstance(qc, dict) and qc.get("load_in_4bit"):
            found, origin = qc, where
            break
    if quantized_as is None and not found:
        return None
    if quantized_as is None:
        log.warning(
            "%s has a 4-bit quantization_config: the base is taken as 4-bit (pass `quantized_as='none'` not to)",
            origin,
        )
    settings = Quantization(
        quant_type=quantized_as or str(found.get("bnb_4bit_quant_type", "fp4")).lower(),  # transformers' default
        double_quant=bool(found.get("bnb_4bit_use_double_quant", False)) if double_quant is None else double_quant,
        blocksize=blocksize or BLOCKSIZES.get(str(quantized_as), 64),
        round_trip=round_trip,
        skip=tuple(found.get("llm_int8_skip_modules") or ()),
    )
    if settings.quant_type not in QUANT_TYPES:
        raise CheckpointError(f"quantization type {settings.quant_type!r} is not one of {', '.join(QUANT_TYPES)}")
    if settings.round_trip not in ROUND_TRIPS:
        raise CheckpointError(f"round_trip must be one of {', '.join(ROUND_TRIPS)}, got {settings.round_trip!r}")
    if settings.mxfp4 and settings.blocksize != MXFP4_BLOCK:
        raise CheckpointError(f"MXFP4's blocks are {MXFP4_BLOCK} entries (the format's own), not {settings.blocksize}")
    if settings.bitsandbytes and settings.blocksize not in (32, 64, 128, 256, 512, 1024, 2048, 4096):
        raise CheckpointError(f"blocksize {settings.blocksize} is not one bitsandbytes uses (a power of two, 32–4096)")
    return settings


def require_dense_base(base, settings: Quantization | None) -> None:
    """Refuse a round trip onto a base (a `loramix.io.base.BaseCheckpoint`) already stored quantized: its weights
    are on their grid as stored, and its own dequantization is what merges and measures read."""
    if settings is not None and base.quantized is not None:
        raise CheckpointError(f"{base.folder}: a {base.quantized.describe()} base; quantized_as is for dense bases")


def _functional():
    try:
        return importlib.import_module("bitsandbytes.functional")
    except ImportError:
        raise MissingPackageError("4-bit quantization needs bitsandbytes: pip install 'loramix[qlora]'") from None


def is_quantized(key: str, shape: tuple[int, ...], settings: Quantization) -> bool:
    """Whether a 4-bit model (transformers + bitsandbytes) quantizes base tensor ``key``: a 2-D ``*.weight`` of a
    Linear/Conv1D, not an embedding or output head, not in ``settings.skip``."""
    if len(shape) != 2 or not key.endswith(".weight"):
        return False
    module = key.removesuffix(".weight")
    last = module.rsplit(".", 1)[-1]
    if last in EMBEDDINGS or is_output_head(module):  # no Linear: transformers' bitsandbytes never quantizes them
        return False
    return not any(s == module or s == last or module.endswith("." + s) for s in settings.skip)


def tensors_to_round_trip(
    shapes: dict[str, tuple[int, ...]], targeted: set[str], settings: Quantization, model_type: str | None
) -> dict[str, bool]:
    """The base tensors (key → stored in×out, i.e. Conv1D) to round-trip: of ``shapes`` (the floating-point base
    tensors no adapter tensor replaces), those a 4-bit model quantizes — all of them, or with
    ``round_trip="targeted"`` only those in ``targeted`` (the ones the adapter changes)."""
    if settings.mxfp4:
        experts = mxfp4_experts(shapes, model_type)
        return {key: False for key in experts if settings.round_trip == "all" or key in targeted}
    chosen = {}
    for key, shape in shapes.items():
        conv1d = is_conv1d(model_type, key.removesuffix(".weight"))
        if settings.fp8 and (conv1d or any(n % settings.blocksize for n in shape)):
            continue  # transformers' FP8 replaces nn.Linear only, and passes through shapes the block does not tile
        if is_quantized(key, shape, settings) and (settings.round_trip == "all" or key in targeted):
            chosen[key] = conv1d
    return chosen


def mxfp4_experts(shapes: dict[str, tuple[int, ...]], model_type: str | None) -> list[str]:
    """The keys of ``shapes`` transformers' MXFP4 quantizes: a gpt-oss model's expert parameters (`MXFP4_PARAMS`,
    [experts, in, out]); a base with none, or an input count the 32-entry block does not tile, is refused."""
    found = [k for k, shape in shapes.items() if len(shape) == 3 and k.endswith(MXFP4_PARAMS)]
    if model_type != "gpt_oss" or not found:
        raise CheckpointError(
            f"quantized_as mxfp4: transformers' MXFP4 quantizes only gpt-oss expert parameters (…{MXFP4_PARAMS[0]}, "
            f"…{MXFP4_PARAMS[1]}); this base (model_type {model_type!r}) has none to round-trip"
        )
    for key in found:
        if shapes[key][1] % MXFP4_BLOCK:
            raise CheckpointError(
                f"quantized_as mxfp4: {key} {tuple(shapes[key])} has {shapes[key][1]} inputs, not a multiple of "
                f"MXFP4's {MXFP4_BLOCK}-entry block"
            )
    return found


def _quantized(weight: torch.Tensor, settings: Quantization) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes, scales) of transformers' on-the-fly FP8 (``Fp8Quantize``: W in float32) or MXFP4 (``Mxfp4Quantize``:
    W cast to bfloat16 first) quantization of ``weight``."""
    if settings.mxfp4:
        return MXFP4().quantize(weight.detach().to(torch.bfloat16).float())
    return FP8((settings.blocksize, settings.blocksize)).quantize(weight.detach().float(), torch.float32)


def round_trip(weight: torch.Tensor, settings: Quantization, *, transposed: bool = False) -> torch.Tensor:
    """dequantize_4bit(quantize_4bit(W)) by bitsandbytes, in W's own dtype and on its device; ``transposed`` for a
    Conv1D weight stored in×out (quantized as out×in, as transformers does). FP8 and MXFP4: codes · scales of
    transformers' rounding of W (`_quantized`), cast back to W's dtype."""
    if not settings.bitsandbytes:
        return settings.scheme().dequantize(*_quantized(weight, settings)).to(weight.dtype)
    F = _functional()
    math_view = weight.T.contiguous() if transposed else weight.contiguous()
    with inside_backend("bitsandbytes", f"round-tripping a {tuple(math_view.shape)} weight through 4-bit"):
        packed, state = F.quantize_4bit(
            math_view,
            blocksize=settings.blocksize,
            compress_statistics=settings.double_quant,
            quant_type=settings.quant_type,
        )
        restored = F.dequantize_4bit(packed, state)
    return restored.T.contiguous() if transposed else restored


def quantization_step(weight: torch.Tensor, settings: Quantization) -> torch.Tensor:
    """The local 4-bit quantization step of every entry of ``weight`` (out×in), in float64: with a = max |W| over
    the entry's block (``blocksize`` consecutive entries of the flattened weight; bitsandbytes' scale before any
    double quantization) and c⁻ ≤ W/a ≤ c⁺ the neighbouring values of the NF4/FP4 code book,
    step = a·(c⁺ − c⁻). An all-zero block has step 0. FP8: the float8_e4m3fn grid's spacing at each code times its
    block's scale (`loramix.io.schemes.FP8.step`); MXFP4 (``weight`` [experts, in, out]): the E2M1 grid's spacing
    times the block's power of two (`loramix.io.schemes.MXFP4.step`)."""
    if not settings.bitsandbytes:
        return settings.scheme().step(*_quantized(weight.cpu(), settings)).double()
    with inside_backend("bitsandbytes", f"reading its {settings.quant_type} code book"):
        codes = torch.unique(_functional().get_4bit_type(settings.quant_type, device="cpu").double())
    flat = weight.detach().to("cpu", torch.float64).reshape(-1)
    pad = (-flat.numel()) % settings.blocksize
    blocks = torch.nn.functional.pad(flat, (0, pad)).reshape(-1, settings.blocksize)
    absmax = blocks.abs().amax(dim=1, keepdim=True)
    normed = (blocks / torch.where(absmax > 0, absmax, 1.0)).clamp(codes[0], codes[-1])
    upper = torch.searchsorted(codes, normed, right=True).clamp(1, len(codes) - 1)
    step = (codes[upper] - codes[upper - 1]) * absmax
    return step.reshape(-1)[: flat.numel()].reshape(weight.shape)


def below_step_share(delta: torch.Tensor, weight: torch.Tensor, settings: Quantization) -> float:
    """The share of ΔW's energy below half the 4-bit grid around W (`loramix.io.quantized.share_below` with
    `quantization_step`). NaN for ΔW = 0."""
    return share_below(delta, quantization_step(weight, settings))
