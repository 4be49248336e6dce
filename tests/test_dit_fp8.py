"""Merging into ComfyUI's scaled FP8 single files of Flux.1 (``flux1-dev-fp8``-style: ``model.diffusion_model.…``
keys, float8_e4m3fn weights, a per-tensor float32 ``<m>.scale_weight`` and a ``scaled_fp8`` marker tensor, as
ComfyUI's comfy/ops.py ``scaled_fp8_op`` reads them: W = codes · scale_weight).

Oracle: float64 references — dequant(W) + ΔW per BFL weight (ΔW from diffusers' reading of the LoRA, laid out in
BFL's fused rows by tests/test_flux.py's ``_bfl``), and its re-quantization: per tensor s = max|W + ΔW| / 448 (rtol
1e-5), codes within half a float8 step of (W + ΔW)/s (float32 rounding of the merge may move a tie). Dense output:
float32 weights equal to dequant(W) + ΔW (atol 1e-5). A plain-cast FP8 file (no scales, no config: its values are W)
is merged as a dense float8_e4m3fn base, within half a float8 step of the float64 reference.
"""

from __future__ import annotations

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import loramix
from loramix.errors import CheckpointError

pytest.importorskip("diffusers")
test_flux = pytest.importorskip("test_flux")

FP8, MAX = torch.float8_e4m3fn, 448.0
MARKER = "model.diffusion_model.scaled_fp8"


def _scaled_fp8(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A BFL state dict quantized as ComfyUI's scaled FP8: each 2-D weight per tensor, 1-D tensors as they are."""
    out = {MARKER: torch.empty(0, dtype=FP8)}
    for key, w in state.items():
        if w.ndim != 2:
            out[key] = w
            continue
        scale = w.abs().amax().float() / MAX
        out[key] = (w.float() / scale).clamp(-MAX, MAX).to(FP8)
        out[key.removesuffix(".weight") + ".scale_weight"] = scale.reshape(())
    return out


def _dequant(sd: dict[str, torch.Tensor], key: str) -> torch.Tensor:
    return sd[key].double() * sd[key.removesuffix(".weight") + ".scale_weight"].double()


def _setup(tmp_path):
    base = test_flux._tiny_pipeline().transformer.state_dict()
    stored = _scaled_fp8(test_flux._bfl(base))
    (tmp_path / "flux1").mkdir()
    save_file(stored, str(tmp_path / "flux1" / "flux1-dev-fp8.safetensors"))
    lora = test_flux.kohya_file(tmp_path / "k.safetensors", modules={**test_flux.KOHYA, **test_flux.TOP}, alpha=2.0)
    deltas = test_flux.oracle_deltas(lora)
    zeros = {k: torch.zeros_like(v, dtype=torch.float64) for k, v in base.items()}
    for name, delta in deltas.items():
        zeros[name.removeprefix("transformer.") + ".weight"] = delta
    bfl_delta = {k: v for k, v in test_flux._bfl(zeros).items() if v.abs().sum() > 0}
    return stored, lora, bfl_delta


def _read(path) -> dict[str, torch.Tensor]:
    with safe_open(str(path), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def test_merge_keeps_scaled_fp8_and_requantizes_per_tensor(tmp_path):
    stored, lora, bfl_delta = _setup(tmp_path)
    loramix.merge_into_base(loramix.load_adapter(lora), tmp_path / "flux1", tmp_path / "merged")
    merged = _read(tmp_path / "merged" / "flux1-dev-fp8.safetensors")
    assert merged.keys() == stored.keys() and merged[MARKER].dtype == FP8
    for key, delta in bfl_delta.items():
        reference = _dequant(stored, key) + delta
        scale = merged[key.removesuffix(".weight") + ".scale_weight"].double()
        assert merged[key].dtype == FP8
        torch.testing.assert_close(scale, reference.abs().amax() / MAX, rtol=1e-5, atol=0)
        codes = (reference / scale).float()
        step = torch.ldexp(torch.ones_like(codes), torch.frexp(codes.abs().clamp(min=2**-6))[1] - 4)
        assert bool(((merged[key].double() - codes.double()).abs() <= step.double() / 2 + 1e-6).all()), key
    untouched = [k for k in stored if k not in bfl_delta and not k.endswith(".scale_weight")]
    assert untouched and all(
        torch.equal(
            merged[k].view(torch.uint8) if merged[k].dtype == FP8 else merged[k],
            stored[k].view(torch.uint8) if stored[k].dtype == FP8 else stored[k],
        )
        for k in untouched
    )


def test_merge_written_dense(tmp_path):
    stored, lora, bfl_delta = _setup(tmp_path)
    loramix.merge_into_base(loramix.load_adapter(lora), tmp_path / "flux1", tmp_path / "dense", dtype=torch.float32)
    dense = _read(tmp_path / "dense" / "flux1-dev-fp8.safetensors")
    assert MARKER not in dense and not any(k.endswith(".scale_weight") for k in dense)
    for key in (k for k in stored if k.endswith(".weight") and stored[k].dtype == FP8):
        expected = _dequant(stored, key) + bfl_delta.get(key, 0)
        torch.testing.assert_close(dense[key].double(), expected, rtol=1e-5, atol=1e-5)


def test_plain_cast_fp8_merges_as_its_stored_values(tmp_path):
    """Kijai's/Comfy-Org's flux1-dev-fp8 layout (every 2-D weight cast to float8_e4m3fn, no scales, no config): W is
    the stored value, a merged weight W + ΔW rounded once to float8_e4m3fn (nearest: within half a step of the
    float64 reference), untouched tensors byte for byte; dense on request."""
    base = test_flux._tiny_pipeline().transformer.state_dict()
    bfl = test_flux._bfl(base)
    (tmp_path / "plain").mkdir()
    plain = {k: v.to(FP8) if v.ndim == 2 else v for k, v in bfl.items()}
    save_file(plain, str(tmp_path / "plain" / "flux1-dev-fp8.safetensors"))
    _, lora, bfl_delta = _setup(tmp_path)
    adapter = loramix.load_adapter(lora)
    loramix.merge_into_base(adapter, tmp_path / "plain", tmp_path / "out")
    merged = _read(tmp_path / "out" / "flux1-dev-fp8.safetensors")
    assert merged.keys() == plain.keys()
    for key, value in plain.items():
        if key not in bfl_delta:
            assert (
                torch.equal(merged[key].view(torch.uint8), value.view(torch.uint8))
                if value.dtype == FP8
                else (torch.equal(merged[key], value))
            )
            continue
        reference = value.double() + bfl_delta[key]
        step = torch.ldexp(torch.ones_like(reference), torch.frexp(reference.abs().clamp(min=2**-6))[1] - 4)
        assert merged[key].dtype == FP8
        assert bool(((merged[key].double() - reference).abs() <= step / 2 + 1e-9).all()), key
    loramix.merge_into_base(adapter, tmp_path / "plain", tmp_path / "dense", dtype=torch.float32)
    dense = _read(tmp_path / "dense" / "flux1-dev-fp8.safetensors")
    for key, delta in bfl_delta.items():
        torch.testing.assert_close(dense[key].double(), plain[key].double() + delta, rtol=1e-5, atol=1e-5)


def test_fp8_without_scales_beside_a_config_is_refused(tmp_path):
    base = test_flux._tiny_pipeline().transformer.state_dict()
    (tmp_path / "plain").mkdir()
    plain = {k: v.to(FP8) if v.ndim == 2 else v for k, v in test_flux._bfl(base).items()}
    save_file(plain, str(tmp_path / "plain" / "model.safetensors"))
    (tmp_path / "plain" / "config.json").write_text('{"_class_name": "FluxTransformer2DModel"}')
    lora = test_flux.kohya_file(tmp_path / "k.safetensors")
    with pytest.raises(CheckpointError, match="no quantization_config") as err:
        loramix.merge_into_base(loramix.load_adapter(lora), tmp_path / "plain", tmp_path / "out")
    assert "\n" not in str(err.value)
