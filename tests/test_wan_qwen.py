"""Wan 2.x and Qwen-Image LoRAs in their namings (musubi-tuner/kohya ``lora_unet_…``, ComfyUI ``diffusion_model.…``,
diffusers ``transformer.…``) read onto diffusers' module names, combined across namings and written back.

Oracle: diffusers — ``WanPipeline``/``QwenImagePipeline.lora_state_dict`` (its musubi, ComfyUI and Qwen converters)
for each module's ΔW, ``load_lora_weights`` + ``fuse_lora`` on a tiny ``WanTransformer3DModel`` /
``QwenImageTransformer2DModel`` (hidden 16) for the files loramix writes. Tolerances: factor products against
diffusers' own, rtol 1e-5 / atol 1e-6 in float64; fused float32 weights atol 1e-5.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
from dit_helpers import assert_deltas, assert_fused
from safetensors import safe_open
from safetensors.torch import save_file

import loramix
from loramix.compat import check_source
from loramix.errors import AdapterFormatError

diffusers = pytest.importorskip("diffusers")
pytest.importorskip("peft")

H, R = 16, 2


@dataclass(frozen=True)
class Case:
    """A family's test: its pipeline, tiny model, original modules (out, in) and the diffusers modules they are."""

    name: str
    pipeline: str
    model: str
    config: dict
    original: dict  # original dotted name -> (out, in)
    diffusers: dict  # original dotted name -> diffusers name


WAN_ATTN = {"q": "to_q", "k": "to_k", "v": "to_v", "o": "to_out.0"}
WAN = Case(
    name="wan",
    pipeline="WanPipeline",
    model="WanTransformer3DModel",
    config=dict(
        patch_size=(1, 2, 2),
        num_attention_heads=2,
        attention_head_dim=8,
        in_channels=4,
        out_channels=4,
        text_dim=16,
        freq_dim=16,
        ffn_dim=32,
        num_layers=2,
        rope_max_seq_len=32,
    ),
    # musubi-tuner targets every attention and FFN linear of every block (diffusers' musubi converter expects them)
    original={
        **{f"blocks.{i}.{a}_attn.{o}": (H, H) for i in range(2) for a in ("self", "cross") for o in WAN_ATTN},
        **{f"blocks.{i}.ffn.0": (32, H) for i in range(2)},
        **{f"blocks.{i}.ffn.2": (H, 32) for i in range(2)},
    },
    diffusers={
        **{
            f"blocks.{i}.{a}_attn.{o}": f"blocks.{i}.attn{1 if a == 'self' else 2}.{d}"
            for i in range(2)
            for a in ("self", "cross")
            for o, d in WAN_ATTN.items()
        },  # noqa: E501
        **{f"blocks.{i}.ffn.0": f"blocks.{i}.ffn.net.0.proj" for i in range(2)},
        **{f"blocks.{i}.ffn.2": f"blocks.{i}.ffn.net.2" for i in range(2)},
    },
)
QWEN_MODULES = {
    "transformer_blocks.0.attn.to_q": (H, H),
    "transformer_blocks.0.attn.add_v_proj": (H, H),
    "transformer_blocks.0.attn.to_out.0": (H, H),
    "transformer_blocks.1.img_mod.1": (6 * H, H),
    "transformer_blocks.1.txt_mlp.net.0.proj": (4 * H, H),
    "transformer_blocks.1.img_mlp.net.2": (H, 4 * H),
}
QWEN = Case(
    name="qwen",
    pipeline="QwenImagePipeline",
    model="QwenImageTransformer2DModel",
    config=dict(
        patch_size=2,
        in_channels=16,
        out_channels=4,
        num_layers=2,
        attention_head_dim=8,
        num_attention_heads=2,
        joint_attention_dim=16,
        axes_dims_rope=(2, 2, 4),
    ),
    original=QWEN_MODULES,
    diffusers={name: name for name in QWEN_MODULES},
)


def write(case: Case, path, style: str, seed: int = 0, alpha: float = 1.0):
    """A LoRA of ``case``'s modules in ``style``: kohya (musubi's lora_unet_ names), comfyui or diffusers."""
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for name, (out, inp) in case.original.items():
        down, up = torch.randn(R, inp, generator=g) * 0.3, torch.randn(out, R, generator=g) * 0.3
        if style == "diffusers":
            key = f"transformer.{case.diffusers[name]}"
            sd |= {f"{key}.lora_A.weight": down, f"{key}.lora_B.weight": up}
            continue
        key = "lora_unet_" + name.replace(".", "_") if style == "kohya" else f"diffusion_model.{name}"
        sd |= {f"{key}.lora_down.weight": down, f"{key}.lora_up.weight": up, f"{key}.alpha": torch.tensor(alpha)}
    save_file(sd, str(path))
    return path


def oracle(case: Case, path) -> dict[str, torch.Tensor]:
    sd = getattr(diffusers, case.pipeline).lora_state_dict(str(path))
    return {
        k.removesuffix(".lora_A.weight"): sd[k.replace("lora_A", "lora_B")].double() @ A.double()
        for k, A in sd.items()
        if k.endswith(".lora_A.weight")
    }


@pytest.mark.parametrize("case", [WAN, QWEN], ids=lambda c: c.name)
@pytest.mark.parametrize("style", ["kohya", "comfyui", "diffusers"])
def test_every_naming_reads_the_delta_diffusers_gets(tmp_path, case, style):
    path = write(case, tmp_path / "lora.safetensors", style, alpha=float(R) / 2)
    adapter = loramix.load_adapter(path)
    assert adapter.provenance["architecture"].endswith(f"({case.model}, hidden {H})")
    assert_deltas(adapter, oracle(case, path))


def _fused(case: Case, source, base_state) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    model = getattr(diffusers, case.model)(**case.config).eval()
    model.load_state_dict(base_state)
    parts = dict(scheduler=None, vae=None, text_encoder=None, tokenizer=None, transformer=model)
    pipe = getattr(diffusers, case.pipeline)(**parts)
    pipe.load_lora_weights(str(source))
    pipe.fuse_lora()
    pipe.unload_lora_weights()
    return pipe.transformer.state_dict()


@pytest.mark.parametrize("case", [WAN, QWEN], ids=lambda c: c.name)
@pytest.mark.parametrize("fmt", [None, "kohya", "comfyui", "diffusers"])
def test_combined_across_namings_and_written_loads_in_diffusers(tmp_path, case, fmt):
    """A kohya (musubi) and a ComfyUI LoRA combine module by module into the float64 weighted sum; the default
    (a kohya file: in ComfyUI's names for Wan, musubi's for Qwen-Image), kohya, comfyui and diffusers outputs load
    in diffusers to that ΔW."""
    paths = [write(case, tmp_path / "k.safetensors", "kohya"), write(case, tmp_path / "c.safetensors", "comfyui", 1)]
    plan = loramix.Plan(adapters=[str(p) for p in paths], weights=[0.7, 0.3], method="cat", format=fmt)
    report = loramix.run(loramix.Plan(**{**plan.__dict__, "output": str(tmp_path / "out")}))
    expected: dict[str, torch.Tensor] = {}
    for path, w in zip(paths, [0.7, 0.3]):
        for name, delta in oracle(case, path).items():
            expected[name] = expected.get(name, 0) + w * delta
    assert_deltas(report.adapter, expected)
    (written,) = (tmp_path / "out").glob("*.safetensors")
    naming = fmt or ("comfyui" if case is WAN else "kohya")
    if naming != "diffusers":
        with safe_open(str(written), "pt") as f:
            prefix = "diffusion_model." if naming == "comfyui" else "lora_unet_"  # ComfyUI's or musubi-tuner's names
            assert all(k.startswith(prefix) for k in f.keys())
    torch.manual_seed(0)
    base = getattr(diffusers, case.model)(**case.config).state_dict()
    fused = _fused(case, written, base)
    assert_fused(fused, base, expected)


def test_unknown_wan_name_is_a_one_line_error(tmp_path):
    case = Case(**{**WAN.__dict__, "original": {**WAN.original, "blocks.0.self_attn.norm_q": (H, H)}})
    with pytest.raises(AdapterFormatError, match=r"1 module name\(s\) fit no Wan 2.x transformer module"):
        loramix.load_adapter(write(case, tmp_path / "bad.safetensors", "kohya"))


def test_check_a_partial_musubi_wan_file_says_diffusers_no(tmp_path):
    """diffusers' musubi converter pops every block's ten modules (a KeyError otherwise): check says no for a file
    without them, and its --format diffusers fix loads."""
    partial = {n: s for n, s in WAN.original.items() if n.startswith("blocks.0.self_attn")}
    path = write(Case(**{**WAN.__dict__, "original": partial}), tmp_path / "partial.safetensors", "kohya")
    verdicts = {v.consumer: v for v in check_source(path).verdicts}
    assert verdicts["diffusers"].status == "no" and "blocks.0.attn2.to_q" in verdicts["diffusers"].reason
    with pytest.raises(KeyError):
        diffusers.WanPipeline.lora_state_dict(str(path))
    assert {v.consumer: v.status for v in check_source(write(WAN, tmp_path / "k.safetensors", "kohya")).verdicts}[
        "diffusers"
    ] == "yes"
    loramix.run(loramix.Plan(adapters=[str(path)], method="cat", format="diffusers", output=str(tmp_path / "out")))
    assert len(oracle(WAN, tmp_path / "out" / "pytorch_lora_weights.safetensors")) == 4
    loramix.run(loramix.Plan(adapters=[str(path)], method="cat", output=str(tmp_path / "default")))  # ComfyUI names
    assert len(oracle(WAN, tmp_path / "default" / "default.safetensors")) == 4


@pytest.mark.parametrize("case", [WAN, QWEN], ids=lambda c: c.name)
def test_check_verdicts_by_naming(tmp_path, case):
    """ComfyUI maps lora_unet_ and diffusion_model. names of any model, diffusers' transformer. names of Flux and SD3
    only (comfy/lora.py); diffusers reads all three for Wan (complete musubi blocks) and Qwen-Image."""
    expected = {"kohya": ("yes", "yes"), "comfyui": ("yes", "yes"), "diffusers": ("yes", "no")}
    for style, (in_diffusers, in_comfyui) in expected.items():
        verdicts = {
            v.consumer: v.status for v in check_source(write(case, tmp_path / f"{style}.safetensors", style)).verdicts
        }
        assert (verdicts["diffusers"], verdicts["ComfyUI"]) == (in_diffusers, in_comfyui), style
