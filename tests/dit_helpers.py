"""Shared oracles of the diffusion-transformer family tests (Flux, SD3, HunyuanVideo, Wan, Qwen-Image, DiT PEFT
folders): the ΔW diffusers' LoRA loader reads from a file, the weights its ``load_lora_weights`` + ``fuse_lora``
give, and the float64 comparisons of an adapter's ΔW and of merged weights per module."""

from __future__ import annotations

import torch


def lora_deltas(pipeline_class, source) -> dict[str, torch.Tensor]:
    """ΔW per module (float64, keyed ``transformer.<path>``) as ``pipeline_class.lora_state_dict`` reads ``source``."""
    sd = pipeline_class.lora_state_dict(str(source))
    return {
        k.removesuffix(".lora_A.weight"): sd[k.replace("lora_A", "lora_B")].double() @ A.double()
        for k, A in sd.items()
        if k.endswith(".lora_A.weight")
    }


def fused(pipe, source) -> dict[str, torch.Tensor]:
    """The transformer's weights of ``pipe`` after diffusers' load_lora_weights + fuse_lora of ``source``."""
    pipe.load_lora_weights(str(source))
    pipe.fuse_lora()
    pipe.unload_lora_weights()
    return {k: v.clone() for k, v in pipe.transformer.state_dict().items()}


def assert_deltas(adapter, expected: dict[str, torch.Tensor], weight: float = 1.0) -> None:
    """``adapter`` has exactly ``expected``'s modules, each with ``weight`` times that float64 ΔW (rtol 1e-5,
    atol 1e-6)."""
    assert sorted(adapter.modules) == sorted(expected)
    for name, delta in expected.items():
        torch.testing.assert_close(
            adapter.modules[name].delta(dtype=torch.float64), weight * delta, rtol=1e-5, atol=1e-6
        )


def assert_fused(weights: dict[str, torch.Tensor], base: dict[str, torch.Tensor], expected) -> None:
    """Each module of ``expected`` (keyed ``transformer.<path>``) holds base + its float64 ΔW in ``weights``, the
    transformer's state dict after a merge (rtol 1e-5, atol 1e-5: float32 weights)."""
    for name, delta in expected.items():
        key = name.removeprefix("transformer.") + ".weight"
        torch.testing.assert_close(weights[key], (base[key].double() + delta).float(), rtol=1e-5, atol=1e-5)
