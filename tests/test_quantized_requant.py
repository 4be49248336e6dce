"""Merging into MXFP4 (gpt-oss) and GPTQ/AWQ int4 bases written in their own format: each weight an adapter
changes re-quantized with fresh scales from W + ΔW, everything else byte for byte, config.json as it was.

Oracles, all from outside loramix:

- W: transformers' ``convert_moe_packed_tensors`` (MXFP4) and the float64 unpacking in test_quantized_base, written
  from the formats' descriptions (GPTQ/AWQ); ΔW: PEFT's ``get_delta_weight``.
- the re-quantization: float64 references written here from the formats' quantizers. MXFP4 (`mxfp4_reference`) as
  the ``downcast_to_mxfp_torch`` transformers 5.25 runs: its ``integrations/mxfp4.py`` loads
  ``get_kernel("kernels-community/gpt-oss-triton-kernels", version=1)`` (huggingface/kernels-community
  ``gpt-oss-triton-kernels``: build.toml ``version = 1``, its README "triton commit
  7d0efaa7231661299284a603512fce4fa255e62c"), whose ``numerics_details/mxfp.py`` rounds E2M1 ties away from zero;
  triton main's later ``mxfp.py`` rounds them to even, which transformers 5.25 does not load. GPTQ as its
  ``Quantizer.find_params`` (range widened to hold 0, symmetric or not), AWQ as AutoAWQ's
  ``pseudo_quantize_tensor``, both then rounding against the scale as stored (their packers).
- tolerances: MXFP4 codes and scales equal the reference's, every one (the reference quantizes W + ΔW summed in
  float32 as loramix sums it, ΔW PEFT's; a dyadic adapter, whose W + ΔW is exact, lands values exactly on ties and
  on a/6 = 2^k). GPTQ/AWQ: codes, scales and zeros equal the reference's, every one, the reference quantizing
  W + ΔW summed in float32 as the merge sums it (a float64 sum moved about 0.1% of codes across a rounding
  boundary); the written checkpoint dequantized (by the oracle) is the float64 W + ΔW within one step of the grid.
"""

from __future__ import annotations

import copy
import json
from types import SimpleNamespace

import pytest
import torch
from helpers import make_peft_adapter
from safetensors.torch import load_file
from test_quantized_base import (
    AWQ_ORDER,
    LINEARS,
    _raw,
    tiny,
    tiny_gpt_oss,
    write_int4_base,
    write_mxfp4_base,
)

from loramix import merge_into_base
from loramix.errors import CheckpointError

mxfp4 = pytest.importorskip("transformers.integrations.mxfp4")
from transformers import AutoModelForCausalLM  # noqa: E402

EXPERT_PARAMS = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]
E2M1_GRID = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0], dtype=torch.float64)


def peft_deltas(peft_model) -> dict[str, torch.Tensor]:
    """PEFT's own ΔW of every adapted weight or expert parameter, by base parameter name (float32)."""
    out = {}
    for name, module in peft_model.base_model.model.named_modules():
        if hasattr(module, "get_delta_weight") and "default" in getattr(module, "lora_A", {}):
            owner = name.replace(".base_layer", "")
            with torch.no_grad():
                out[f"{owner}.{getattr(module, 'parameter_name', 'weight')}"] = module.get_delta_weight(
                    "default"
                ).float()
    return out


# ----------------------------------------------------------------------------------------------- MXFP4


def mxfp4_scaled(W: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(exponent e, W / 2^e) of an expert parameter [E, in, out] per 32-input block [E, out, G, 32], float64, as
    kernels-community/gpt-oss-triton-kernels v1 ``numerics_details/mxfp.py`` ``downcast_to_mxfp_torch`` chooses the
    scale (``DequantScaleRoundingMode.ROUND_UP``, its default and transformers' call): a/6 with a = max |W| of the
    block, divided in float32 as there, rounded up to a power of two by adding 0x7FFFFF to its bits and keeping the
    exponent field, so 2^⌈log2(a/6)⌉, never below 2^-126 (a subnormal a/6 becomes the smallest normal); a block whose
    a/6 is 0 gets e = -127 (E8M0 code 0) and all its values multiplied by 0. Infinities and NaNs are not modelled:
    a merge that makes one is refused."""
    experts, inputs, out = W.shape
    x = W.double().transpose(1, 2).reshape(experts, out, inputs // 32, 32)
    ratio = (x.abs().amax(-1).float() / 6).double()  # float32, as the kernel divides
    exponent = torch.where(ratio > 0, torch.ceil(torch.log2(ratio)).clamp(min=-126), -127.0)
    return exponent, x * torch.where(ratio > 0, torch.exp2(-exponent), 0.0)[..., None]


def mxfp4_reference(W: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(blocks, scales) of an expert parameter [E, in, out] in float64, as the kernel above (`mxfp4_scaled`): each
    scaled value to the nearest E2M1 value, ties away from zero (its ``((exponent << 2 | mantissa >> 21) + 1) >> 1``,
    saturating at 6), the sign bit kept (code 8 for −0 and a negative value rounding to 0); E8M0 code e + 127; two
    codes a byte, the lower input in the low nibble: the layout gpt-oss stores, [E, out, in/32, 16]."""
    exponent, v = mxfp4_scaled(W)
    experts, out, groups, _ = v.shape
    distance = (v.abs()[..., None] - E2M1_GRID).abs()
    nearest = 7 - distance.flip(-1).argmin(-1)  # the largest of equally near values: ties away from zero
    codes = (nearest | (torch.signbit(v).long() << 3)).reshape(experts, out, groups, 16, 2)
    blocks = (codes[..., 0] | (codes[..., 1] << 4)).to(torch.uint8)
    return blocks, (exponent + 127).to(torch.uint8)


def nibbles(blocks: torch.Tensor) -> torch.Tensor:
    return torch.stack((blocks & 0xF, blocks >> 4), dim=-1)


@pytest.fixture(scope="module")
def oss(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("mxfp4-requant")
    adapter = make_peft_adapter(
        tiny_gpt_oss, tmp, "adapter", target_modules=["q_proj"], target_parameters=EXPERT_PARAMS
    )
    base = write_mxfp4_base(tmp / "base", tiny_gpt_oss())
    return SimpleNamespace(
        tmp=tmp,
        adapter=adapter.path,
        peft=adapter.peft_model,
        deltas=peft_deltas(adapter.peft_model),
        base=base,
        tensors=load_file(base / "model.safetensors"),
    )


def test_mxfp4_experts_requantized_as_the_format_rounds(oss):
    out = oss.tmp / "same"
    report = merge_into_base(oss.adapter, oss.base, out)
    assert report.written_as.startswith("MXFP4") and "re-quantized" in report.written_as
    written = load_file(out / "model.safetensors")
    assert set(written) == set(oss.tensors)
    assert json.loads((out / "config.json").read_text()) == json.loads((oss.base / "config.json").read_text())
    experts = [k for k in oss.deltas if k.endswith(("gate_up_proj", "down_proj"))]
    assert len(experts) == 4
    for key in experts:
        W = mxfp4.convert_moe_packed_tensors(
            oss.tensors[key + "_blocks"], oss.tensors[key + "_scales"], dtype=torch.float32
        )
        intended = W + oss.deltas[key]  # the float32 sum loramix forms, with PEFT's ΔW
        blocks, scales = mxfp4_reference(intended)
        ours_b, ours_s = written[key + "_blocks"], written[key + "_scales"]
        assert ours_b.dtype == torch.uint8 and ours_s.dtype == torch.uint8
        assert torch.equal(ours_s, scales) and torch.equal(ours_b, blocks), key
        # transformers' dequantization of what was written is W + ΔW within one grid step
        stored = mxfp4.convert_moe_packed_tensors(ours_b, ours_s, dtype=torch.float32).double()
        step = torch.exp2(ours_s.double() - 127).repeat_interleave(32, -1).transpose(1, 2) * 2
        assert bool(((stored - W.double() - oss.deltas[key].double()).abs() <= step).all()), key
    raw_in, raw_out = _raw(oss.base / "model.safetensors"), _raw(out / "model.safetensors")
    changed = {k + s for k in experts for s in ("_blocks", "_scales")} | {k for k in oss.deltas if "q_proj" in k}
    assert all(raw_out[k] == raw_in[k] for k in raw_in if k not in changed)
    assert {k for k in raw_in if raw_out[k] != raw_in[k]} <= changed
    per_expert = {
        f"model.layers.{i}.mlp.experts.{e}.{p}" for i in (0, 1) for e in range(4) for p in ("gate_up_proj", "down_proj")
    }
    assert set(report.below_step) == per_expert  # the dense q_proj is no quantized weight
    assert all(0 <= v <= 1 for v in report.below_step.values())
    card = (out / "README.md").read_text()
    assert "stored as MXFP4" in card


def test_mxfp4_ties_requantized_as_the_kernel_rounds_them(oss):
    """An expert LoRA with dyadic factors (multiples of 2^-5 and 2^-6, scaling 2): W + ΔW is exact in float32, and
    many of its values fall exactly halfway between two E2M1 codes: every code and scale the reference's, so each
    tie rounded away from zero as the kernel transformers 5.25 loads does (half to even would differ on each tie
    rounded onto an odd code)."""
    gen, peft = torch.Generator().manual_seed(5), copy.deepcopy(oss.peft)
    with torch.no_grad():
        for name, p in peft.named_parameters():
            if "lora_" in name:
                unit = 2.0**-5 if "lora_A" in name else 2.0**-6
                p.copy_(torch.randint(-2, 3, p.shape, generator=gen).float() * unit)
    peft.save_pretrained(str(oss.tmp / "dyadic"))
    out = oss.tmp / "ties"
    merge_into_base(oss.tmp / "dyadic", oss.base, out)
    written = load_file(out / "model.safetensors")
    midpoints = (E2M1_GRID[1:] + E2M1_GRID[:-1]) / 2
    ties = away = odd = 0
    for key, delta in peft_deltas(peft).items():
        if not key.endswith(("gate_up_proj", "down_proj")):
            continue
        W = mxfp4.convert_moe_packed_tensors(
            oss.tensors[key + "_blocks"], oss.tensors[key + "_scales"], dtype=torch.float32
        )
        assert torch.equal((W + delta).double(), W.double() + delta.double()), key  # exact: no float32 rounding
        blocks, scales = mxfp4_reference(W + delta)
        assert torch.equal(written[key + "_scales"], scales) and torch.equal(written[key + "_blocks"], blocks), key
        _, v = mxfp4_scaled(W + delta)
        tied = (v.abs()[..., None] == midpoints).any(-1)
        ties += int(tied.sum())
        magnitude = (nibbles(blocks).flatten(-2) & 7).long()
        away += int((E2M1_GRID[magnitude][tied] > v.abs()[tied]).sum())
        odd += int((magnitude[tied] % 2).sum())  # away onto an odd code: half to even would go down
    assert ties >= 1000 and away == ties and odd >= 1000, (ties, away, odd)


def test_mxfp4_merge_overflowing_to_inf_is_refused(oss):
    """Finite factors whose ΔW overflows float32: the kernel's rounding would give E8M0 255 (NaN) scales and
    meaningless codes; the merge refuses in one line and writes nothing."""
    peft = copy.deepcopy(oss.peft)
    with torch.no_grad():
        for name, p in peft.named_parameters():
            if "lora_B" in name and "experts" in name:
                p.mul_(1e38)
    peft.save_pretrained(str(oss.tmp / "huge"))
    with pytest.raises(CheckpointError, match=r"experts\.down_proj_blocks gives NaN/Inf values"):
        merge_into_base(oss.tmp / "huge", oss.base, oss.tmp / "inf")
    assert not (oss.tmp / "inf").exists()


def test_mxfp4_written_checkpoint_loads_in_transformers(oss):
    """transformers loads the re-quantized gpt-oss on CPU (dequantizing the experts to bf16): its experts are
    transformers' own dequantization of the written blocks and scales."""
    out = oss.tmp / "load"
    merge_into_base(oss.adapter, oss.base, out)
    written = load_file(out / "model.safetensors")
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    key = "model.layers.1.mlp.experts.gate_up_proj"
    theirs = mxfp4.convert_moe_packed_tensors(written[key + "_blocks"], written[key + "_scales"], dtype=torch.bfloat16)
    assert torch.equal(model.model.layers[1].mlp.experts.gate_up_proj.detach().to(torch.bfloat16), theirs)
    assert torch.isfinite(model(torch.arange(8)[None]).logits).all()


def test_mxfp4_quantize_matches_the_reference_on_edge_values():
    """Ties (0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5 in scale units), negative zeros, an all-zero block and a block
    whose a/6 is already a power of two: codes and scales bit for bit the float64 reference's."""
    from loramix.io.schemes import MXFP4

    ties = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 6.0, -0.25, -0.0, 0.1, -5.0, 2.9, 3.1, 0.74, 0.76])
    W = torch.zeros(2, 64, 3)
    W[0, :32, 0] = torch.cat([ties, ties * 0.5])  # a = 6 · 2^0: the scale 1
    W[1, :, 1] = torch.randn(64, generator=torch.Generator().manual_seed(0)) * 1e-3
    W[0, 32:, 2] = -ties.repeat(2) * 2.0**-20
    blocks, scales = MXFP4().quantize(W)
    theirs = mxfp4_reference(W)
    assert torch.equal(blocks, theirs[0]) and torch.equal(scales, theirs[1])
    assert int(scales[0, 0, 0]) == 127 and int(scales[0, 1, 0]) == 0  # a / 6 = 1; the all-zero block


def test_mxfp4_quantize_matches_the_reference_at_boundaries_and_the_extremes():
    """The float32 neighbours of every tie at scales 2^-126 … 2^120, a/6 just above a power of two, blocks whose a/6
    is subnormal (the kernel's scale stays 2^-126, E8M0 code 1) or rounds to 0 in float32 (code 0, every value
    0 with its sign), and every finite bfloat16 value, shuffled into blocks: codes and scales bit for bit the float64
    reference's."""
    from loramix.io.schemes import MXFP4

    mids = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 6.0])
    near = torch.cat([torch.nextafter(mids, torch.zeros(8)), torch.nextafter(mids, torch.full((8,), 9.0))])
    block = torch.cat([near, -near])  # 32 values, a = 6⁺: a/6 just above 1
    W = torch.stack([block * 2.0**e for e in range(-126, 121, 5)], -1)[None]  # [1, 32, 50]
    tiny = torch.zeros(1, 32, 4)
    tiny[0, :2, 0] = torch.tensor([1e-39, -4e-40])  # a/6 subnormal
    tiny[0, :2, 1] = torch.tensor([3 * 2.0**-149, -(2.0**-149)])  # a/6 = 2^-150: half to even in float32, 0
    tiny[0, :2, 2] = torch.tensor([3 * 2.0**-148, 2.0**-149])  # a/6 = 2^-149, the least subnormal
    tiny[0, :2, 3] = torch.tensor([6 * 2.0**-126, -(2.0**-127)])  # a/6 = 2^-126 exactly
    every = torch.arange(2**16, dtype=torch.int32).to(torch.int16).view(torch.bfloat16).float()
    every = every[torch.isfinite(every)]
    every = every[torch.randperm(len(every), generator=torch.Generator().manual_seed(0))]
    every = every[: len(every) // 32 * 32].reshape(1, 32, -1)
    for weight in (W, tiny, every):
        blocks, scales = MXFP4().quantize(weight)
        theirs = mxfp4_reference(weight)
        assert torch.equal(scales, theirs[1]) and torch.equal(blocks, theirs[0])
    assert MXFP4().quantize(tiny)[1].flatten().tolist() == [1, 0, 1, 1]


# ----------------------------------------------------------------------------------------------- GPTQ / AWQ


def unpack(words: torch.Tensor, order: list[int]) -> torch.Tensor:
    """[n, m] int32 → [n, 8m] 4-bit ints, column 8j + order[i] from nibble i of word j."""
    values = torch.empty(words.shape[0], words.shape[1] * 8, dtype=torch.int64)
    for i, column in enumerate(order):
        values[:, column::8] = (words.long() >> (4 * i)) & 0xF
    return values


def unpack_rows(words: torch.Tensor) -> torch.Tensor:
    """GPTQ qweight [in/8, out] → [in, out], input 8r + j from nibble j of row r."""
    return unpack(words.T.contiguous(), list(range(8))).T


def int4_parts(parts: dict[str, torch.Tensor], method: str, offset: int):
    """(q [in, out], zeros [G, out], scales) of a module's stored tensors, unpacked as the formats describe."""
    if method == "gptq":
        return unpack_rows(parts["qweight"]), unpack(parts["qzeros"], list(range(8))) + offset, parts["scales"]
    return unpack(parts["qweight"], AWQ_ORDER), unpack(parts["qzeros"], AWQ_ORDER), parts["scales"]


def int4_reference(W: torch.Tensor, method: str, sym: bool, g_idx: torch.Tensor, offset: int, dtype: torch.dtype):
    """(q [in, out], zeros [G, out], scales [G, out]) of W (out × in, float64), group by group (see the module
    docstring); a GPTQ v1 zero, stored less one, at least 1."""
    out, inputs = W.shape
    groups = int(g_idx.max()) + 1
    q = torch.empty(inputs, out, dtype=torch.int64)
    zeros, scales = torch.empty(groups, out, dtype=torch.int64), torch.empty(groups, out, dtype=dtype)
    for g in range(groups):
        cols = W[:, g_idx == g].double()
        low, high = cols.min(1).values, cols.max(1).values
        if method == "gptq":
            low, high = low.clamp(max=0), high.clamp(min=0)
            if sym:
                high = torch.maximum(low.abs(), high)
                low = torch.where(low < 0, -high, low)
            empty = (low == 0) & (high == 0)
            low, high = torch.where(empty, -1.0, low), torch.where(empty, 1.0, high)
            scale = (high - low) / 15
            zero = torch.full_like(scale, 8.0) if sym else torch.round(-low / scale)
        else:
            scale = (high - low).clamp(min=1e-5) / 15
            zero = (-torch.round(low / scale)).clamp(0, 15)
        zero = zero.clamp(offset, 15)
        stored = scale.to(dtype)
        q[g_idx == g] = (torch.round(cols / stored.double()[:, None]) + zero[:, None]).clamp(0, 15).long().T
        zeros[g], scales[g] = zero.long(), stored
    return q, zeros, scales


INT4_CASES = {
    "gptq-v1-act-order": ("gptq", True, {"quant_method": "gptq", "bits": 4, "group_size": 32, "sym": False}),
    "gptq-v2-sym": (
        "gptq",
        False,
        {"quant_method": "gptq", "bits": 4, "group_size": 32, "sym": True, "checkpoint_format": "gptq_v2"},
    ),
    "awq": ("awq", False, {"quant_method": "awq", "bits": 4, "group_size": 32, "zero_point": True, "version": "gemm"}),
}


@pytest.fixture(scope="module")
def llama_adapter(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("int4-requant")
    adapter = make_peft_adapter(tiny, tmp, "adapter", target_modules=["q_proj", "v_proj", "down_proj"])
    deltas = {k.removeprefix("base_model.model."): v for k, v in peft_deltas(adapter.peft_model).items()}
    return SimpleNamespace(tmp=tmp, adapter=adapter.path, deltas=deltas)


@pytest.mark.parametrize("case", list(INT4_CASES))
def test_int4_same_format_is_the_quantizers_rounding(llama_adapter, case):
    method, act_order, qc = INT4_CASES[case]
    made = llama_adapter
    base, dense = write_int4_base(made.tmp / f"{case}-base", tiny(), method, act_order, qc)
    tensors = load_file(base / "model.safetensors")
    out = made.tmp / f"{case}-out"
    report = merge_into_base(made.adapter, base, out)
    assert (
        report.written_as == f"{method.upper()} int4 (groups of 32), the merged weights re-quantized with fresh scales"
    )
    written = load_file(out / "model.safetensors")
    assert set(written) == set(tensors)
    assert json.loads((out / "config.json").read_text()) == json.loads((base / "config.json").read_text())
    offset = 0 if method == "awq" or qc.get("checkpoint_format") == "gptq_v2" else 1
    for key, delta in made.deltas.items():
        module = key.removesuffix(".weight")
        parts = {p: written[f"{module}.{p}"] for p in ("qweight", "qzeros", "scales")}
        g_idx = tensors[f"{module}.g_idx"].long() if method == "gptq" else torch.arange(dense[key].shape[1]) // 32
        if method == "gptq":
            assert torch.equal(written[f"{module}.g_idx"], tensors[f"{module}.g_idx"]), key  # kept
        intended = dense[key] + delta.double()
        summed = (dense[key].float() + delta.float()).double()  # W + ΔW in float32, as the merge forms it
        q_ref, z_ref, s_ref = int4_reference(summed, method, qc.get("sym", False), g_idx, offset, torch.float16)
        q, z, s = int4_parts(parts, method, offset)
        assert s.dtype == torch.float16 and torch.equal(s, s_ref), key
        assert torch.equal(z, z_ref) and torch.equal(q, q_ref), key
        stored = ((q - z[g_idx]).double() * s.double()[g_idx]).T
        assert bool(((stored - intended).abs() <= s.double()[g_idx].T * 1.001).all()), key  # within one step
    raw_in, raw_out = _raw(base / "model.safetensors"), _raw(out / "model.safetensors")
    changed = {f"{k.removesuffix('.weight')}.{p}" for k in made.deltas for p in ("qweight", "qzeros", "scales")}
    assert all(raw_out[k] == raw_in[k] for k in raw_in if k not in changed)
    assert set(report.below_step) == {k.removesuffix(".weight") for k in made.deltas}
    assert all(0 <= v <= 1 for v in report.below_step.values())
    assert any(k.rsplit(".", 2)[-2] in LINEARS for k in made.deltas)


# ----------------------------------------------------------------------------------------------- refusals

GATE_UP = "model.layers.0.mlp.experts.gate_up_proj"
UP = "model.layers.0.mlp.up_proj"


def _mxfp4_nan_scale(tensors, qc):
    tensors[GATE_UP + "_scales"] = tensors[GATE_UP + "_scales"].clone().fill_(255)


def _mxfp4_no_scales(tensors, qc):
    del tensors[GATE_UP + "_scales"]


def _mxfp4_block_of_16(tensors, qc):
    tensors[GATE_UP + "_blocks"] = tensors[GATE_UP + "_blocks"][..., :8].contiguous()


def _int4_nan_scales(tensors, qc):
    tensors[UP + ".scales"] = tensors[UP + ".scales"].clone().fill_(float("nan"))


def _int4_wrong_group(tensors, qc):
    qc["group_size"] = 16


def _int4_no_zeros(tensors, qc):
    del tensors[UP + ".qzeros"]


def _unknown_method(tensors, qc):
    qc["quant_method"] = "hqq"


REFUSALS = [
    ("mxfp4", _mxfp4_nan_scale, f"tensor {GATE_UP}_scales: NaN scales (E8M0 255) (MXFP4)"),
    ("mxfp4", _mxfp4_no_scales, f"tensor {GATE_UP}_scales: missing, expected uint8 [4, 128, 2]"),
    ("mxfp4", _mxfp4_block_of_16, f"tensor {GATE_UP}_blocks: uint8 [4, 128, 2, 8], expected uint8 [E, out, G, 16]"),
    ("awq", _int4_nan_scales, f"tensor {UP}.scales: NaN or infinite scales (AWQ int4 (groups of 32))"),
    (
        "gptq-v1-act-order",
        _int4_wrong_group,
        "down_proj.qzeros: int32 [3, 8], expected [6, 8] (GPTQ int4 (groups of 16)",
    ),
    ("gptq-v2-sym", _int4_no_zeros, f"tensor {UP}.qzeros: missing, expected [2, 12]"),
    ("awq", _unknown_method, "a hqq quantized base (quantization_config quant_method)"),
]


@pytest.mark.parametrize("kind, edit, says", REFUSALS, ids=[r[1].__name__ for r in REFUSALS])
def test_damaged_or_unknown_mxfp4_and_int4_bases_are_one_line_and_write_nothing(oss, llama_adapter, kind, edit, says):
    from click.testing import CliRunner
    from safetensors.torch import save_file

    from loramix.cli import main

    folder = llama_adapter.tmp / f"damaged-{edit.__name__}"
    if kind == "mxfp4":
        base, adapter = write_mxfp4_base(folder, tiny_gpt_oss()), oss.adapter
    else:
        method, act_order, qc = INT4_CASES[kind]
        base, adapter = write_int4_base(folder, tiny(), method, act_order, dict(qc))[0], llama_adapter.adapter
    tensors = load_file(base / "model.safetensors")
    config = json.loads((base / "config.json").read_text())
    edit(tensors, config["quantization_config"])
    save_file(tensors, str(base / "model.safetensors"))
    (base / "config.json").write_text(json.dumps(config))
    out = folder.parent / f"out-{edit.__name__}"
    result = CliRunner().invoke(main, ["combine", str(adapter), "--merge-into", str(base), "-o", str(out)])
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and says in lines[0], result.output
    assert not out.exists()


@pytest.mark.parametrize("method", ["gptq", "awq"])
def test_int4_ragged_groups_match_the_reference(method):
    """An input width the group size does not divide (40 inputs in groups of 32: 32 and 8 channels): each group's
    range over its own channels, as the float64 reference computes it."""
    from loramix.io.schemes import Int4

    W = torch.randn(16, 40, generator=torch.Generator().manual_seed(1)) * 0.05
    g_idx = torch.arange(40) // 32
    scheme = Int4(method, 32, zero_offset=1 if method == "gptq" else 0)
    stored = (None, torch.empty(2, 16, dtype=torch.float16), None, *((g_idx.int(),) if method == "gptq" else ()))
    parts = scheme.quantize_parts(W, stored)
    q, z, s = int4_parts(dict(zip(("qweight", "scales", "qzeros"), parts)), method, scheme.zero_offset)
    q_ref, z_ref, s_ref = int4_reference(W.double(), method, False, g_idx, scheme.zero_offset, torch.float16)
    assert torch.equal(s, s_ref) and torch.equal(z, z_ref)
    assert (q == q_ref).double().mean() >= 0.99 and bool(((q - q_ref).abs() <= 1).all())
