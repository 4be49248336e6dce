"""SD3/SD3.5 LoRAs in their namings (kohya/sd-scripts ``lora_unet_joint_blocks_…``, ComfyUI/original
``diffusion_model.joint_blocks.…``, diffusers ``transformer.transformer_blocks.…``) read onto diffusers'
``SD3Transformer2DModel`` modules, combined across namings, written, and merged.

diffusers has no converter of SD3's original names, so the oracle for them is diffusers' own checkpoint converter
(``convert_sd3_transformer_checkpoint_to_diffusers``, which maps an original MMDiT checkpoint onto the diffusers
model): a checkpoint holding each LoRA module's float64 ΔW under its original name, converted, gives the ΔW of every
diffusers module. Written files are checked with ``load_lora_weights`` + ``fuse_lora`` on a tiny model (hidden 16,
two joint blocks, the first with SD3.5 Medium's second attention), and merges into an original single-file checkpoint
by converting the merged file with the same converter. Tolerances: float64 ΔW rtol 1e-5 / atol 1e-6 (float32
factors); fused float32 weights atol 1e-5.
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
from diffusers.loaders.single_file_utils import convert_sd3_transformer_checkpoint_to_diffusers  # noqa: E402

H, R, LAYERS = 16, 2, 2
CONFIG = dict(
    sample_size=8,
    patch_size=2,
    in_channels=4,
    num_layers=LAYERS,
    attention_head_dim=8,
    num_attention_heads=2,
    joint_attention_dim=16,
    caption_projection_dim=H,
    pooled_projection_dim=12,
    out_channels=4,
    pos_embed_max_size=8,
    dual_attention_layers=(0,),
)
# the tiny model's original (MMDiT) linear modules, (out, in); the last block's context stream has only its qkv and
# its AdaLayerNormContinuous modulation (2·hidden rows)
ORIGINAL = {
    "joint_blocks.0.x_block.attn.qkv": (3 * H, H),
    "joint_blocks.0.x_block.attn.proj": (H, H),
    "joint_blocks.0.x_block.attn2.qkv": (3 * H, H),
    "joint_blocks.0.x_block.attn2.proj": (H, H),
    "joint_blocks.0.x_block.mlp.fc1": (4 * H, H),
    "joint_blocks.0.x_block.mlp.fc2": (H, 4 * H),
    "joint_blocks.0.x_block.adaLN_modulation.1": (9 * H, H),
    "joint_blocks.0.context_block.attn.qkv": (3 * H, H),
    "joint_blocks.0.context_block.attn.proj": (H, H),
    "joint_blocks.0.context_block.mlp.fc1": (4 * H, H),
    "joint_blocks.0.context_block.mlp.fc2": (H, 4 * H),
    "joint_blocks.0.context_block.adaLN_modulation.1": (6 * H, H),
    "joint_blocks.1.x_block.attn.qkv": (3 * H, H),
    "joint_blocks.1.x_block.attn.proj": (H, H),
    "joint_blocks.1.x_block.mlp.fc1": (4 * H, H),
    "joint_blocks.1.x_block.mlp.fc2": (H, 4 * H),
    "joint_blocks.1.x_block.adaLN_modulation.1": (6 * H, H),
    "joint_blocks.1.context_block.attn.qkv": (3 * H, H),
    "joint_blocks.1.context_block.adaLN_modulation.1": (2 * H, H),
    "context_embedder": (H, 16),
    "t_embedder.mlp.0": (H, 256),
    "t_embedder.mlp.2": (H, H),
    "y_embedder.mlp.0": (H, 12),
    "y_embedder.mlp.2": (H, H),
    "final_layer.linear": (16, H),
    "final_layer.adaLN_modulation.1": (2 * H, H),
}
BIASED = {"x_embedder.proj": (H, 4, 2, 2)}  # the patch embedding, a conv: the checkpoint's other weights


def factors(seed: int, modules=ORIGINAL) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return {
        n: (torch.randn(R, i, generator=g) * 0.3, torch.randn(o, R, generator=g) * 0.3) for n, (o, i) in modules.items()
    }


def original_file(path, style: str, seed: int = 0, alpha: float = 1.0, modules=ORIGINAL):
    """A LoRA of the original modules in sd-scripts' (``kohya``) or ComfyUI's (``comfyui``) names."""
    sd = {}
    for name, (down, up) in factors(seed, modules).items():
        key = "lora_unet_" + name.replace(".", "_") if style == "kohya" else f"diffusion_model.{name}"
        sd |= {f"{key}.lora_down.weight": down, f"{key}.lora_up.weight": up, f"{key}.alpha": torch.tensor(alpha)}
    save_file(sd, str(path))
    return path


def _original_checkpoint(weights: dict[str, torch.Tensor], g: torch.Generator | None = None) -> dict:
    """A complete original (MMDiT) checkpoint of the tiny model: ``weights`` for the LoRA modules (zeros where absent
    and ``g`` is None, random otherwise), biases and the rest zero or random alike."""

    def fill(shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64) if g is not None else torch.zeros(shape)

    out = {}
    for name, (o, i) in ORIGINAL.items():
        out[f"{name}.weight"] = weights.get(name, fill((o, i))).double()
        out[f"{name}.bias"] = fill((o,)).double()
    out["x_embedder.proj.weight"] = weights.get("x_embedder.proj", fill(BIASED["x_embedder.proj"])).double()
    out["x_embedder.proj.bias"] = fill((H,)).double()
    out["pos_embed"] = fill((1, 64, H)).double()
    return out


def oracle(factor_sets, weights) -> dict[str, torch.Tensor]:
    """The ΔW per diffusers module of Σ w·(α/r)·B·A over original-named LoRAs, through diffusers' checkpoint
    converter; modules no LoRA touches are left out."""
    delta: dict[str, torch.Tensor] = {}
    for factors, w, scale in zip(factor_sets, weights, (1 / R,) * len(weights)):
        for name, (down, up) in factors.items():
            delta[name] = delta.get(name, 0) + w * scale * (up.double() @ down.double())
    converted = convert_sd3_transformer_checkpoint_to_diffusers(_original_checkpoint(delta))
    return {
        "transformer." + k.removesuffix(".weight"): v
        for k, v in converted.items()
        if k.endswith(".weight") and v.ndim == 2 and v.abs().sum() > 0
    }


@pytest.mark.parametrize("style", ["kohya", "comfyui"])
def test_original_names_read_the_delta_of_diffusers_converter(tmp_path, style):
    adapter = loramix.load_adapter(original_file(tmp_path / "lora.safetensors", style))
    assert adapter.provenance["architecture"] == f"SD3/SD3.5 (SD3Transformer2DModel, hidden {H})"
    assert_deltas(adapter, oracle([factors(0)], [1.0]))


def _pipeline(state=None):
    torch.manual_seed(0)
    model = diffusers.SD3Transformer2DModel(**CONFIG).eval()
    if state is not None:
        model.load_state_dict(state)
    parts = dict(scheduler=None, vae=None, text_encoder=None, tokenizer=None, text_encoder_2=None, tokenizer_2=None)
    return diffusers.StableDiffusion3Pipeline(**parts, text_encoder_3=None, tokenizer_3=None, transformer=model)


def _fused(source, state) -> dict[str, torch.Tensor]:
    return fused(_pipeline(state), source)


@pytest.mark.parametrize("fmt", [None, "kohya", "comfyui", "diffusers"])
def test_combined_across_namings_and_written(tmp_path, fmt):
    """sd-scripts + ComfyUI names combine into the float64 weighted sum per diffusers module; the default output (a
    diffusers file: diffusers reads no other SD3 naming, ComfyUI reads it) loads in diffusers to that ΔW, and the kohya
    and comfyui outputs read back to it."""
    paths = [
        original_file(tmp_path / "k.safetensors", "kohya"),
        original_file(tmp_path / "c.safetensors", "comfyui", 1),
    ]
    plan = loramix.Plan(adapters=[str(p) for p in paths], weights=[0.7, 0.3], method="cat", format=fmt)
    report = loramix.run(loramix.Plan(**{**plan.__dict__, "output": str(tmp_path / "out")}))
    expected = oracle([factors(0), factors(1)], [0.7, 0.3])
    assert_deltas(report.adapter, expected)
    (written,) = (tmp_path / "out").glob("*.safetensors")
    assert_deltas(loramix.load_adapter(written), expected)
    if fmt not in (None, "diffusers"):
        with safe_open(str(written), "pt") as f:
            prefix = "diffusion_model.joint_blocks." if fmt == "comfyui" else "lora_unet_joint_blocks_"
            assert any(k.startswith(prefix) for k in f.keys())
        return
    assert written.name == "pytorch_lora_weights.safetensors"
    base = _pipeline().transformer.state_dict()
    fused = _fused(written, base)
    assert_fused(fused, base, expected)


def test_diffusers_names_combine_with_original_names(tmp_path):
    """A diffusers/PEFT-named SD3 LoRA (to_q, to_k, to_v split) and a kohya one (fused qkv): one module each, the
    weighted sum; the diffusers file's own ΔW is what diffusers' lora_state_dict reads."""
    split = factors(2, {k: v for k, v in ORIGINAL.items() if "qkv" not in k and not k.startswith(("t_", "y_"))})
    sd = {}
    converted = oracle([split], [R])  # alpha = rank: the bare factors
    g = torch.Generator().manual_seed(4)
    for name, delta in converted.items():  # a rank-R LoRA per diffusers module with this ΔW
        u, s, vh = torch.linalg.svd(delta)
        sd[f"{name}.lora_A.weight"] = (vh[:R] * s[:R, None]).float().contiguous()
        sd[f"{name}.lora_B.weight"] = u[:, :R].float().contiguous()
    extra = "transformer.transformer_blocks.0.attn2.to_k"
    sd |= {
        f"{extra}.lora_A.weight": torch.randn(R, H, generator=g),
        f"{extra}.lora_B.weight": torch.randn(H, R, generator=g),
    }
    save_file(sd, str(tmp_path / "d.safetensors"))
    d_delta = lora_deltas(diffusers.StableDiffusion3Pipeline, tmp_path / "d.safetensors")
    d = loramix.load_adapter(tmp_path / "d.safetensors")
    assert d.provenance["family"] == "sd3"
    assert_deltas(d, d_delta)
    k = original_file(tmp_path / "k.safetensors", "kohya")
    merged = loramix.combine([k, tmp_path / "d.safetensors"], weights=[0.5, 0.5], method="cat")
    expected = {n: 0.5 * v for n, v in oracle([factors(0)], [1.0]).items()}
    for name, delta in d_delta.items():
        expected[name] = expected.get(name, 0) + 0.5 * delta
    assert_deltas(merged, expected)


def test_merge_into_pipeline_and_single_file_equal_fuse_lora(tmp_path):
    """A kohya SD3 LoRA merged into a pipeline folder's transformer equals diffusers' fuse_lora of the same LoRA in
    diffusers' names; merged into an original single file (``model.diffusion_model.joint_blocks…``, fused qkv), the
    file converted by diffusers' converter equals the same fused model."""
    lora = original_file(tmp_path / "k.safetensors", "kohya", alpha=float(R))
    g = torch.Generator().manual_seed(9)
    single = {f"model.diffusion_model.{k}": v.float() for k, v in _original_checkpoint({}, g).items()}
    base = {
        k: v.float()
        for k, v in convert_sd3_transformer_checkpoint_to_diffusers(
            {k.removeprefix("model.diffusion_model."): v.double() for k, v in single.items()}
        ).items()
    }
    (tmp_path / "diffusers").mkdir()
    loramix.run(
        loramix.Plan(adapters=[str(lora)], method="cat", format="diffusers", output=str(tmp_path / "diffusers/out"))
    )
    fused = _fused(tmp_path / "diffusers/out/pytorch_lora_weights.safetensors", base)
    pipe = _pipeline(base)
    folder = tmp_path / "sd3"
    pipe.transformer.save_pretrained(folder / "transformer")
    index = {"_class_name": "StableDiffusion3Pipeline", "transformer": ["diffusers", "SD3Transformer2DModel"]}
    (folder / "model_index.json").write_text(json.dumps(index))
    adapter = loramix.load_adapter(lora)
    loramix.merge_into_base(adapter, folder, tmp_path / "merged", dtype=torch.float32)
    merged = diffusers.SD3Transformer2DModel.from_pretrained(tmp_path / "merged" / "transformer").state_dict()
    for key, value in fused.items():
        torch.testing.assert_close(merged[key], value, rtol=1e-5, atol=1e-5)
    (tmp_path / "single").mkdir()
    save_file(single, str(tmp_path / "single" / "sd3.5_medium.safetensors"))
    loramix.merge_into_base(adapter, tmp_path / "single", tmp_path / "merged_single", dtype=torch.float32)
    with safe_open(str(tmp_path / "merged_single" / "sd3.5_medium.safetensors"), "pt") as f:
        out = {k.removeprefix("model.diffusion_model."): f.get_tensor(k).double() for k in f.keys()}
    for key, value in convert_sd3_transformer_checkpoint_to_diffusers(out).items():
        torch.testing.assert_close(value.float(), fused[key], rtol=1e-5, atol=1e-5)


def test_unknown_sd3_names_are_one_line_errors(tmp_path):
    modules = {**ORIGINAL, "joint_blocks.0.x_block.attn.ln_q": (H, H), "joint_blocks.1.x_block.mlp.fc9": (H, H)}
    with pytest.raises(AdapterFormatError, match=r"2 module name\(s\) fit no SD3/SD3.5 transformer module") as err:
        loramix.load_adapter(original_file(tmp_path / "bad.safetensors", "kohya", modules=modules))
    assert "lora_unet_joint_blocks_0_x_block_attn_ln_q" in str(err.value) and "\n" not in str(err.value)


def test_check_verdicts_by_naming(tmp_path):
    """diffusers' SD3 loader converts no naming but its own (loading a kohya file changes nothing); ComfyUI maps
    sd-scripts', its own and diffusers' SD3 names (comfy/lora.py, mmdit_to_diffusers)."""

    def verdicts(path):
        return {v.consumer: v.status for v in check_source(path).verdicts if v.consumer in ("diffusers", "ComfyUI")}

    kohya = original_file(tmp_path / "k.safetensors", "kohya")
    assert verdicts(kohya) == {"diffusers": "no", "ComfyUI": "yes"}
    assert verdicts(original_file(tmp_path / "c.safetensors", "comfyui")) == {"diffusers": "no", "ComfyUI": "yes"}
    base = _pipeline().transformer.state_dict()
    fused = _fused(kohya, base)
    assert all(torch.equal(fused[k], base[k]) for k in base)  # what "no" means: nothing loads
    loramix.run(loramix.Plan(adapters=[str(kohya)], method="cat", output=str(tmp_path / "out")))
    assert verdicts(tmp_path / "out" / "pytorch_lora_weights.safetensors") == {"diffusers": "yes", "ComfyUI": "yes"}


def test_patch_embedding_conv_lora(tmp_path):
    """sd-scripts' ``x_embedder`` LoRA (a conv of the patch size, its ``emb_dims``) is diffusers' ``pos_embed.proj``:
    ΔW = (α/r)·up·down over the flattened kernel, and the default (diffusers) output fuses to it in diffusers."""
    g = torch.Generator().manual_seed(6)
    down, up = torch.randn(R, 4, 2, 2, generator=g), torch.randn(H, R, 1, 1, generator=g)
    key = "lora_unet_x_embedder_proj"
    sd = {f"{key}.lora_down.weight": down, f"{key}.lora_up.weight": up, f"{key}.alpha": torch.tensor(1.0)}
    sd |= {
        f"lora_unet_{n.replace('.', '_')}.{s}": t
        for n, (a, b) in factors(0).items()
        for s, t in (("lora_down.weight", a), ("lora_up.weight", b))
    }
    save_file(sd, str(tmp_path / "conv.safetensors"))
    adapter = loramix.load_adapter(tmp_path / "conv.safetensors")
    expected = (up.flatten(1).double() @ down.flatten(1).double() / R).reshape(H, 4, 2, 2)
    delta = adapter.modules["transformer.pos_embed.proj"].delta(dtype=torch.float64)
    torch.testing.assert_close(delta.reshape(expected.shape), expected, rtol=1e-5, atol=1e-6)
    loramix.run(loramix.Plan(adapters=[str(tmp_path / "conv.safetensors")], method="cat", output=str(tmp_path / "out")))
    base = _pipeline().transformer.state_dict()
    fused = _fused(tmp_path / "out" / "pytorch_lora_weights.safetensors", base)
    key = "pos_embed.proj.weight"
    torch.testing.assert_close(fused[key], (base[key].double() + expected).float(), rtol=1e-5, atol=1e-5)


def test_lycoris_lokr_on_sd3_reads_onto_the_split_modules(tmp_path):
    """A LoKr on sd-scripts' fused qkv name: each diffusers part is its rows of the exact ΔW = (α/r)·(w1 ⊗ w2_a·w2_b)
    (float64 reference from LyCORIS's formula), checked against diffusers' checkpoint converter of that ΔW."""
    g = torch.Generator().manual_seed(5)
    key, r, alpha = "lora_unet_joint_blocks_1_x_block_attn_qkv", 2, 1.0
    w1 = torch.randn(3, 2, generator=g)  # (3H)×H = (3·16)×(2·8): w1 3×2, w2 16×8 of rank 2
    w2a, w2b = torch.randn(16, r, generator=g), torch.randn(r, 8, generator=g)
    tensors = {
        f"{key}.lokr_w1": w1,
        f"{key}.lokr_w2_a": w2a,
        f"{key}.lokr_w2_b": w2b,
        f"{key}.alpha": torch.tensor(alpha),
    }
    save_file(tensors, str(tmp_path / "lokr.safetensors"))
    delta = (alpha / r) * torch.kron(w1.double(), w2a.double() @ w2b.double())
    converted = convert_sd3_transformer_checkpoint_to_diffusers(
        _original_checkpoint({"joint_blocks.1.x_block.attn.qkv": delta})
    )
    expected = {
        f"transformer.transformer_blocks.1.attn.to_{x}": converted[f"transformer_blocks.1.attn.to_{x}.weight"]
        for x in "qkv"
    }
    assert_deltas(loramix.load_adapter(tmp_path / "lokr.safetensors"), expected)
