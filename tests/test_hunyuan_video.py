"""HunyuanVideo LoRAs in their namings (musubi-tuner ``lora_unet_double_blocks_0_img_attn_qkv``, diffusion-pipe's
``diffusion_model.double_blocks.0.img_attn_qkv`` / ``transformer.…`` with lora_A/lora_B, diffusers
``transformer.transformer_blocks.0.attn.to_q``) read onto diffusers' ``HunyuanVideoTransformer3DModel`` modules,
combined across namings, written and merged.

Oracles: diffusers' checkpoint converter (``convert_hunyuan_video_transformer_to_diffusers``) applied to each module's
float64 ΔW under its original name gives the ΔW of every diffusers module; diffusers' LoRA converter
(``HunyuanVideoPipeline.lora_state_dict``) agrees with it on every module but ``final_layer.adaLN_modulation.1``,
whose lora_A rows it swaps along with lora_B's (checked here: loramix follows the checkpoint converter);
``load_lora_weights`` + ``fuse_lora`` on a tiny model (hidden 16) for written files and merges. Both converters split
a single block's ``linear1`` at HunyuanVideo's hidden 3072, so that module is checked at that size on one block, by
random probes. Tolerances: float64 ΔW rtol 1e-5 / atol 1e-6 (float32 factors); fused float32 weights atol 1e-5.
"""

from __future__ import annotations

import json

import pytest
import torch
from dit_helpers import assert_deltas, assert_fused, fused, lora_deltas
from safetensors import safe_open
from safetensors.torch import save_file

import loramix
from loramix.compat import check_source
from loramix.errors import AdapterFormatError

diffusers = pytest.importorskip("diffusers")
pytest.importorskip("peft")
from diffusers.loaders.single_file_utils import convert_hunyuan_video_transformer_to_diffusers  # noqa: E402

H, R = 16, 2
CONFIG = dict(
    in_channels=4,
    out_channels=4,
    num_attention_heads=2,
    attention_head_dim=8,
    num_layers=2,
    num_single_layers=2,
    num_refiner_layers=1,
    patch_size=1,
    patch_size_t=1,
    text_embed_dim=16,
    pooled_projection_dim=8,
    rope_axes_dim=(2, 2, 4),
)
# original modules of the tiny model (out, in), single-block linear1 aside (the converters split it at 3072 only)
ORIGINAL = {
    "double_blocks.0.img_attn_qkv": (3 * H, H),
    "double_blocks.0.img_attn_proj": (H, H),
    "double_blocks.0.img_mod.linear": (6 * H, H),
    "double_blocks.0.img_mlp.fc1": (4 * H, H),
    "double_blocks.1.txt_attn_qkv": (3 * H, H),
    "double_blocks.1.txt_mlp.fc2": (H, 4 * H),
    "double_blocks.1.txt_mod.linear": (6 * H, H),
    "single_blocks.0.linear2": (H, 5 * H),
    "single_blocks.1.modulation.linear": (3 * H, H),
    "txt_in.individual_token_refiner.blocks.0.mlp.fc1": (4 * H, H),
    "txt_in.individual_token_refiner.blocks.0.adaLN_modulation.1": (2 * H, H),
    "txt_in.input_embedder": (H, 16),
    "time_in.mlp.0": (H, 256),
}
# modules diffusers' LoRA converter reads wrong: the final modulation (shift/scale swapped: it swaps lora_A's rows
# too) and the text refiner's qkv (it splits lora_A's rows in three too, so loading fails)
FINAL = {"final_layer.adaLN_modulation.1": (2 * H, H)}
REFINER_QKV = {"txt_in.individual_token_refiner.blocks.0.self_attn_qkv": (3 * H, H)}


def factors(seed: int, modules=ORIGINAL) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return {
        n: (torch.randn(R, i, generator=g) * 0.3, torch.randn(o, R, generator=g) * 0.3) for n, (o, i) in modules.items()
    }


def write(path, style: str, seed: int = 0, modules=ORIGINAL, alpha: float = 1.0):
    """``musubi`` (lora_unet_, lora_down/lora_up/alpha), ``pipe`` (diffusion-pipe: diffusion_model., lora_A/lora_B,
    alpha folded into both factors as musubi-tuner's convert_lora.py does), ``pipe-transformer`` (the same under
    transformer.)."""
    sd = {}
    for name, (down, up) in factors(seed, modules).items():
        if style == "musubi":
            key = "lora_unet_" + name.replace(".", "_")
            sd |= {f"{key}.lora_down.weight": down, f"{key}.lora_up.weight": up, f"{key}.alpha": torch.tensor(alpha)}
        else:
            key = ("diffusion_model." if style == "pipe" else "transformer.") + name
            root = (alpha / R) ** 0.5
            sd |= {f"{key}.lora_A.weight": down * root, f"{key}.lora_B.weight": up * root}
    save_file(sd, str(path))
    return path


def oracle(sets, weights, alpha: float = 1.0) -> dict[str, torch.Tensor]:
    """ΔW per diffusers module of Σ w·(α/r)·B·A over original-named LoRAs, by diffusers' checkpoint converter."""
    delta: dict[str, torch.Tensor] = {}
    for fs, w in zip(sets, weights):
        for name, (down, up) in fs.items():
            delta[f"{name}.weight"] = delta.get(f"{name}.weight", 0) + w * alpha / R * (up.double() @ down.double())
    out = convert_hunyuan_video_transformer_to_diffusers(delta)
    return {"transformer." + k.removesuffix(".weight"): v for k, v in out.items()}


def lora_oracle(path) -> dict[str, torch.Tensor]:
    return lora_deltas(diffusers.HunyuanVideoPipeline, path)


@pytest.mark.parametrize("style", ["musubi", "pipe", "pipe-transformer"])
def test_every_naming_reads_the_delta_of_diffusers_converter(tmp_path, style):
    modules = ORIGINAL | FINAL | REFINER_QKV
    path = write(tmp_path / "lora.safetensors", style, modules=modules, alpha=float(R))
    adapter = loramix.load_adapter(path)
    assert adapter.provenance["architecture"] == f"HunyuanVideo (HunyuanVideoTransformer3DModel, hidden {H})"
    expected = oracle([factors(0, modules)], [1.0], alpha=float(R))
    assert_deltas(adapter, expected)
    if style != "musubi":  # diffusers' LoRA converter agrees, but for the final modulation, whose A rows it swaps
        with pytest.raises(ValueError):  # and the refiner's qkv, whose A it splits
            lora_oracle(path)
        path = write(tmp_path / "lora.safetensors", style, modules=ORIGINAL | FINAL, alpha=float(R))
        theirs = lora_oracle(path)
        assert set(theirs) == {n for n in expected if ".refiner_blocks.0.attn.to_" not in n}
        for name, delta in theirs.items():
            if name == "transformer.norm_out.linear":
                assert not torch.allclose(delta, expected[name])
            else:
                torch.testing.assert_close(delta, expected[name], rtol=1e-5, atol=1e-6)


def test_diffusers_names_read_as_they_are(tmp_path):
    """diffusers' own names (the text refiner's marks them HunyuanVideo's) read the ΔW lora_state_dict gives."""
    g = torch.Generator().manual_seed(3)
    sd = {}
    for name, (out, inp) in {
        "transformer_blocks.0.attn.to_q": (H, H),
        "single_transformer_blocks.1.proj_mlp": (4 * H, H),
        "context_embedder.token_refiner.refiner_blocks.0.attn.to_k": (H, H),
    }.items():
        sd |= {f"transformer.{name}.lora_A.weight": torch.randn(R, inp, generator=g)}
        sd |= {f"transformer.{name}.lora_B.weight": torch.randn(out, R, generator=g)}
    save_file(sd, str(tmp_path / "d.safetensors"))
    adapter = loramix.load_adapter(tmp_path / "d.safetensors")
    assert adapter.provenance["family"] == "hunyuan-video"
    assert_deltas(adapter, lora_oracle(tmp_path / "d.safetensors"))


def test_single_block_linear1_at_hunyuan_sizes():
    """linear1 (q, k, v, MLP rows) at hidden 3072 in musubi-tuner's names: each diffusers part equals the checkpoint
    converter's split of ΔW (random probes, float64), and the default output's file reads the same in diffusers."""
    hidden, g = 3072, torch.Generator().manual_seed(4)
    down, up = torch.randn(R, hidden, generator=g) * 0.3, torch.randn(7 * hidden, R, generator=g) * 0.3
    probe = torch.randn(hidden, 3, generator=g, dtype=torch.float64)
    key, qkv = "lora_unet_single_blocks_0_linear1", "lora_unet_double_blocks_0_img_attn_qkv"
    from loramix.formats.diffusion import identify
    from loramix.formats.diffusion.comfyui import _scaled
    from loramix.formats.kohya import state_dict as kohya_state_dict

    modules = {key: loramix.LoraModule(A=down, B=up, scale=1.0)}  # with an img_attn_qkv, which diffusers' converter
    modules[qkv] = loramix.LoraModule(A=down, B=up[: 3 * hidden], scale=1.0)  # needs to see to convert anything,
    mod = loramix.LoraModule(A=down, B=up[: 6 * hidden], scale=1.0)  # and img_mod.linear, HunyuanVideo's name only
    modules["lora_unet_double_blocks_0_img_mod_linear"] = mod
    adapter = identify(loramix.LoraAdapter(modules=modules), "<test>")
    rows = torch.split(torch.arange(7 * hidden), [hidden, hidden, hidden, 4 * hidden])
    names = ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp")
    written = diffusers.HunyuanVideoPipeline.lora_state_dict(_scaled(kohya_state_dict(adapter, naming="comfyui"), None))
    for part, idx in zip(names, rows):
        name = f"transformer.single_transformer_blocks.0.{part}"
        m = adapter.modules[name]
        ours = m.scale * (m.B.double() @ (m.A.double() @ probe))
        torch.testing.assert_close(ours, up[idx].double() @ (down.double() @ probe), rtol=1e-5, atol=1e-6)
        A, B = (written[f"{name}.lora_{s}.weight"].double() for s in "AB")
        torch.testing.assert_close(B @ (A @ probe), ours, rtol=1e-5, atol=1e-6)


def _pipeline(state=None):
    torch.manual_seed(0)
    model = diffusers.HunyuanVideoTransformer3DModel(**CONFIG).eval()
    if state is not None:
        model.load_state_dict(state)
    parts = dict(text_encoder=None, tokenizer=None, vae=None, scheduler=None, text_encoder_2=None, tokenizer_2=None)
    return diffusers.HunyuanVideoPipeline(**parts, transformer=model)


def _fused(source, state) -> dict[str, torch.Tensor]:
    return fused(_pipeline(state), source)


@pytest.mark.parametrize("fmt", [None, "kohya", "comfyui", "diffusers"])
def test_combined_across_namings_and_written(tmp_path, fmt):
    """musubi-tuner + diffusion-pipe names combine into the float64 weighted sum per diffusers module; the default
    output (diffusion-pipe's file, which ComfyUI and diffusers load) and the diffusers output fuse in diffusers to that
    ΔW; the kohya (musubi-tuner) output reads back to it."""
    paths = [write(tmp_path / "m.safetensors", "musubi"), write(tmp_path / "p.safetensors", "pipe", 1)]
    plan = loramix.Plan(adapters=[str(p) for p in paths], weights=[0.7, 0.3], method="cat", format=fmt)
    report = loramix.run(loramix.Plan(**{**plan.__dict__, "output": str(tmp_path / "out")}))
    expected = oracle([factors(0), factors(1)], [0.7, 0.3])
    assert_deltas(report.adapter, expected)
    (written,) = (tmp_path / "out").glob("*.safetensors")
    assert_deltas(loramix.load_adapter(written), expected)
    with safe_open(str(written), "pt") as f:
        keys = list(f.keys())
    prefix = {None: "diffusion_model.", "comfyui": "diffusion_model.", "kohya": "lora_unet_"}.get(fmt, "transformer.")
    assert all(k.startswith(prefix) for k in keys)
    if fmt == "kohya":
        return
    assert not any(k.endswith(".alpha") for k in keys)
    base = _pipeline().transformer.state_dict()
    fused = _fused(written, base)
    assert_fused(fused, base, expected)


def test_merge_into_pipeline_equals_fuse_lora(tmp_path):
    """A musubi-tuner LoRA (final modulation included) merged into a pipeline folder's transformer equals diffusers'
    fuse_lora of loramix's diffusers output of it, and the base plus the checkpoint converter's ΔW."""
    lora = write(tmp_path / "m.safetensors", "musubi", modules=ORIGINAL | FINAL | REFINER_QKV)
    pipe = _pipeline()
    folder = tmp_path / "hunyuan"
    pipe.transformer.save_pretrained(folder / "transformer")
    index = {"_class_name": "HunyuanVideoPipeline", "transformer": ["diffusers", "HunyuanVideoTransformer3DModel"]}
    (folder / "model_index.json").write_text(json.dumps(index))
    loramix.merge_into_base(loramix.load_adapter(lora), folder, tmp_path / "merged", dtype=torch.float32)
    merged = diffusers.HunyuanVideoTransformer3DModel.from_pretrained(tmp_path / "merged" / "transformer").state_dict()
    loramix.run(loramix.Plan(adapters=[str(lora)], method="cat", format="diffusers", output=str(tmp_path / "d")))
    base = pipe.transformer.state_dict()
    fused = _fused(tmp_path / "d" / "pytorch_lora_weights.safetensors", base)
    expected = oracle([factors(0, ORIGINAL | FINAL | REFINER_QKV)], [1.0])
    for key, value in fused.items():
        torch.testing.assert_close(merged[key], value, rtol=1e-5, atol=1e-5)
        name = "transformer." + key.removesuffix(".weight")
        if name in expected:
            torch.testing.assert_close(value, (base[key].double() + expected[name]).float(), rtol=1e-5, atol=1e-5)


def test_unknown_hunyuan_names_are_one_line_errors(tmp_path):
    modules = {**ORIGINAL, "double_blocks.0.img_attn_q_norm": (H, H), "single_blocks.0.linear9": (H, H)}
    with pytest.raises(AdapterFormatError, match=r"2 module name\(s\) fit no HunyuanVideo transformer module") as e:
        loramix.load_adapter(write(tmp_path / "bad.safetensors", "musubi", modules=modules))
    assert "lora_unet_double_blocks_0_img_attn_q_norm" in str(e.value) and "\n" not in str(e.value)


def test_check_verdicts_by_naming(tmp_path):
    """diffusers reads diffusion-pipe's and its own names (not musubi-tuner's: loading one fails), and gets the final
    modulation wrong; ComfyUI reads diffusion-pipe's names but the embedders its model renames, musubi-tuner's for
    the attention and linear1/linear2 only, and no diffusers names (comfy/lora.py)."""

    def verdicts(path):
        return {v.consumer: v.status for v in check_source(path).verdicts if v.consumer in ("diffusers", "ComfyUI")}

    attention = {k: v for k, v in ORIGINAL.items() if "attn" in k or "linear2" in k}  # Flux.1's sd-scripts names too:
    attention["txt_in.individual_token_refiner.blocks.0.self_attn_proj"] = (H, H)  # a HunyuanVideo module tells
    assert verdicts(write(tmp_path / "a.safetensors", "musubi", modules=attention)) == {
        "diffusers": "no",
        "ComfyUI": "yes",
    }
    musubi = write(tmp_path / "m.safetensors", "musubi")
    assert verdicts(musubi) == {"diffusers": "no", "ComfyUI": "wrong"}
    with pytest.raises(RuntimeError):  # what "no" means: diffusers' converter fails on the file (chunks an alpha)
        _fused(musubi, _pipeline().transformer.state_dict())
    blocks = {k: v for k, v in ORIGINAL.items() if not k.startswith(("time_in", "txt_in.input"))}
    assert verdicts(write(tmp_path / "p.safetensors", "pipe", modules=blocks)) == {"diffusers": "yes", "ComfyUI": "yes"}
    assert verdicts(write(tmp_path / "e.safetensors", "pipe")) == {"diffusers": "yes", "ComfyUI": "wrong"}
    final = write(tmp_path / "f.safetensors", "pipe", modules=blocks | FINAL)
    assert verdicts(final) == {"diffusers": "wrong", "ComfyUI": "yes"}
    refiner = write(tmp_path / "r.safetensors", "pipe", modules=blocks | REFINER_QKV)
    assert verdicts(refiner) == {"diffusers": "no", "ComfyUI": "yes"}
    loramix.run(loramix.Plan(adapters=[str(musubi)], method="cat", format="diffusers", output=str(tmp_path / "d")))
    assert verdicts(tmp_path / "d" / "pytorch_lora_weights.safetensors") == {"diffusers": "yes", "ComfyUI": "no"}


def test_merge_into_an_original_single_file(tmp_path):
    """A musubi-tuner LoRA merged into a single file in the original names (Kijai's/ComfyUI's HunyuanVideo files:
    fused ``img_attn_qkv``, ``final_layer.adaLN_modulation.1`` in shift-scale order): the merged file, renamed by
    diffusers' checkpoint converter, equals the converted base plus the converter's ΔW; untouched tensors as stored."""
    modules = ORIGINAL | FINAL | REFINER_QKV
    g = torch.Generator().manual_seed(8)
    base = {f"{n}.weight": torch.randn(o, i, generator=g) for n, (o, i) in modules.items()}
    base["double_blocks.0.img_attn_q_norm.weight"] = torch.randn(8, generator=g)  # no LoRA touches it
    (tmp_path / "hv").mkdir()
    save_file(base, str(tmp_path / "hv" / "hunyuan_video_720.safetensors"))
    lora = write(tmp_path / "m.safetensors", "musubi", modules=modules)
    loramix.merge_into_base(loramix.load_adapter(lora), tmp_path / "hv", tmp_path / "merged", dtype=torch.float32)
    merged = convert_hunyuan_video_transformer_to_diffusers(
        {k: v.double() for k, v in safe_open_all(tmp_path / "merged" / "hunyuan_video_720.safetensors").items()}
    )
    expected = convert_hunyuan_video_transformer_to_diffusers({k: v.double() for k, v in base.items()})
    for name, delta in oracle([factors(0, modules)], [1.0]).items():
        expected[name.removeprefix("transformer.") + ".weight"] += delta
    assert merged.keys() == expected.keys()
    for key, value in expected.items():
        torch.testing.assert_close(merged[key], value, rtol=1e-5, atol=1e-5)


def safe_open_all(path) -> dict[str, torch.Tensor]:
    with safe_open(str(path), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}
