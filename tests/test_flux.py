"""Flux.1 LoRAs in every naming people share (kohya/sd-scripts, ComfyUI/BFL, XLabs, diffusers/PEFT) read onto one
module identity (diffusers' FluxTransformer2DModel modules), combined across namings, written as kohya or diffusers
files, and merged into a pipeline's transformer.

Oracle: diffusers itself — ``FluxPipeline.lora_state_dict`` (its kohya, XLabs and ComfyUI converters) for the ΔW of
every module, ``load_lora_weights`` + ``fuse_lora`` on a tiny ``FluxTransformer2DModel`` (hidden 16) for whole files.
diffusers' kohya converter splits ``linear1`` at Flux.1's real sizes (3072, 12288), so that module is checked at
hidden 3072 on a single block, through ``lora_state_dict`` and random probes (ΔW·X, in float64). Tolerances: float32
factor products against diffusers' own float32 products, rtol 1e-5 / atol 1e-6; fused weights atol 1e-5.
"""

from __future__ import annotations

import json

import pytest
import torch
from dit_helpers import assert_deltas
from safetensors import safe_open
from safetensors.torch import save_file

import loramix
from loramix.adapter import LoraAdapter, LoraModule
from loramix.compat import check_source
from loramix.errors import AdapterFormatError
from loramix.formats.diffusion import identify
from loramix.formats.kohya import state_dict as kohya_state_dict

diffusers = pytest.importorskip("diffusers")
pytest.importorskip("peft")

H, R = 16, 2
CONFIG = dict(
    patch_size=1,
    in_channels=4,
    num_layers=2,
    num_single_layers=2,
    attention_head_dim=8,
    num_attention_heads=2,
    joint_attention_dim=16,
    pooled_projection_dim=12,
    guidance_embeds=True,
    axes_dims_rope=(2, 2, 4),
)
# kohya/sd-scripts modules of the tiny model (out, in), single-block linear1 aside (diffusers splits it at 3072 only)
# (BFL module path: kohya flattens it with underscores, ComfyUI prefixes diffusion_model.)
KOHYA = {
    "double_blocks.0.img_attn.qkv": (3 * H, H),
    "double_blocks.0.img_attn.proj": (H, H),
    "double_blocks.1.txt_attn.qkv": (3 * H, H),
    "double_blocks.1.img_mlp.0": (4 * H, H),
    "double_blocks.0.txt_mlp.2": (H, 4 * H),
    "double_blocks.1.img_mod.lin": (6 * H, H),
    "single_blocks.0.linear2": (H, 5 * H),
    "single_blocks.1.modulation.lin": (3 * H, H),
}
# modules diffusers' kohya converter names without the transformer. prefix, so load_lora_weights drops them; its
# converter also ignores their alpha (scale 1): alpha = rank where they are used here
TOP = {"img_in": (H, 4), "final_layer.adaLN_modulation.1": (2 * H, H)}


def _factors(g, out, inp, rank=R):
    return torch.randn(rank, inp, generator=g) * 0.3, torch.randn(out, rank, generator=g) * 0.3


def kohya_file(path, seed=0, modules=KOHYA, alpha=1.0):
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for dotted, (out, inp) in modules.items():
        name = "lora_unet_" + dotted.replace(".", "_")
        down, up = _factors(g, out, inp)
        sd |= {f"{name}.lora_down.weight": down, f"{name}.lora_up.weight": up, f"{name}.alpha": torch.tensor(alpha)}
    save_file(sd, str(path))
    return path


def xlabs_file(path, seed=1):
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for key, (out, inp) in {
        "double_blocks.0.processor.qkv_lora1": (3 * H, H),
        "double_blocks.0.processor.qkv_lora2": (3 * H, H),
        "double_blocks.1.processor.proj_lora1": (H, H),
        "double_blocks.1.processor.proj_lora2": (H, H),
        "single_blocks.0.processor.qkv_lora": (3 * H, H),
        "single_blocks.1.processor.proj_lora": (H, 5 * H),
    }.items():
        down, up = _factors(g, out, inp)
        sd |= {f"{key}.down.weight": down, f"{key}.up.weight": up}
    save_file(sd, str(path))
    return path


DIFFUSERS = {
    "transformer_blocks.0.attn.to_q": (H, H),
    "transformer_blocks.0.attn.to_v": (H, H),
    "transformer_blocks.1.attn.add_k_proj": (H, H),
    "single_transformer_blocks.1.proj_out": (H, 5 * H),
}
SINGLE_QKV = {"single_transformer_blocks.0.attn.to_k": (H, H), "single_transformer_blocks.0.proj_mlp": (4 * H, H)}


def diffusers_file(path, seed=2, modules=DIFFUSERS | SINGLE_QKV):
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for name, (out, inp) in modules.items():
        down, up = _factors(g, out, inp)
        sd |= {f"transformer.{name}.lora_A.weight": down, f"transformer.{name}.lora_B.weight": up}
    save_file(sd, str(path))
    return path


def oracle_deltas(source) -> dict[str, torch.Tensor]:
    """ΔW per transformer module as diffusers' FluxPipeline.lora_state_dict reads ``source`` (alphas baked in)."""
    sd = diffusers.FluxPipeline.lora_state_dict(str(source) if not isinstance(source, dict) else dict(source))
    out = {}
    for key, A in sd.items():
        if key.endswith(".lora_A.weight"):
            name = key.removesuffix(".lora_A.weight")
            B = sd[f"{name}.lora_B.weight"]
            out["transformer." + name.removeprefix("transformer.")] = B.double() @ A.double()
    return out


@pytest.mark.parametrize("make", [kohya_file, xlabs_file, diffusers_file])
def test_every_naming_reads_the_delta_diffusers_gets(tmp_path, make):
    path = make(tmp_path / "lora.safetensors")
    adapter = loramix.load_adapter(path)
    if make is diffusers_file:  # diffusers' names of Flux.1's blocks are HunyuanVideo's too: no one family
        assert "family" not in adapter.provenance
    else:
        assert adapter.provenance["architecture"] == "Flux.1 (FluxTransformer2DModel, hidden 16)"
    assert_deltas(adapter, oracle_deltas(path))


def test_comfyui_names_read_like_kohya(tmp_path):
    """ComfyUI/BFL ``diffusion_model.<module>`` keys (lora_down/lora_up/alpha): diffusers reads them as kohya's."""
    kohya = kohya_file(tmp_path / "k.safetensors", modules={**KOHYA, **TOP}, alpha=float(R))
    flat = {"lora_unet_" + d.replace(".", "_"): d for d in (*KOHYA, *TOP)}
    with safe_open(str(kohya), "pt") as f:
        comfy = {}
        for key in f.keys():
            name, _, side = key.partition(".")
            comfy[f"diffusion_model.{flat[name]}.{side}"] = f.get_tensor(key)
    save_file(comfy, str(tmp_path / "comfy.safetensors"))
    a, b = loramix.load_adapter(kohya), loramix.load_adapter(tmp_path / "comfy.safetensors")
    assert a.provenance["key_style"] == "kohya" and b.provenance["key_style"] == "comfyui"
    assert_deltas(b, oracle_deltas(tmp_path / "comfy.safetensors"))
    assert_deltas(a, {n: m.delta(dtype=torch.float64) for n, m in b.modules.items()})


def test_single_block_linear1_at_flux_sizes():
    """linear1 (q, k, v, MLP rows) and XLabs' single-block qkv (q, k, v only) at hidden 3072, where diffusers'
    converters split them; ΔW compared on random probes in float64."""
    hidden, g = 3072, torch.Generator().manual_seed(3)
    down, up = _factors(g, 7 * hidden, hidden)
    kohya = {
        "lora_unet_single_blocks_0_linear1.lora_down.weight": down,
        "lora_unet_single_blocks_0_linear1.lora_up.weight": up,
        "lora_unet_single_blocks_0_linear1.alpha": torch.tensor(1.0),
    }
    xdown, xup = _factors(g, 3 * hidden, hidden)
    xlabs = {
        "single_blocks.0.processor.qkv_lora.down.weight": xdown,
        "single_blocks.0.processor.qkv_lora.up.weight": xup,
    }
    probe = torch.randn(hidden, 4, generator=g, dtype=torch.float64)
    for sd, parts in ((kohya, ("to_q", "to_k", "to_v", "proj_mlp")), (xlabs, ("to_q", "to_k", "to_v"))):
        converted = diffusers.FluxPipeline.lora_state_dict(dict(sd))
        adapter = identify(_as_adapter(sd), "<test>")
        assert sorted(adapter.modules) == sorted(
            f"transformer.single_transformer_blocks.0.{'attn.' if p != 'proj_mlp' else ''}{p}" for p in parts
        )
        for name, m in adapter.modules.items():
            A, B = (converted[f"{name}.lora_{s}.weight"].double() for s in "AB")
            ours = m.scale * (m.B.double() @ (m.A.double() @ probe))
            torch.testing.assert_close(ours, B @ (A @ probe), rtol=1e-5, atol=1e-6)
        written = diffusers.FluxPipeline.lora_state_dict(kohya_state_dict(adapter))  # joined again, read by diffusers
        for name, m in adapter.modules.items():
            A, B = (written[f"{name}.lora_{s}.weight"].double() for s in "AB")
            torch.testing.assert_close(m.scale * (m.B.double() @ (m.A.double() @ probe)), B @ (A @ probe))


def _as_adapter(sd: dict) -> LoraAdapter:
    """The raw modules of a kohya or XLabs state dict, by their file names, before identify."""
    modules = {}
    for key in sd:
        if key.endswith(("lora_down.weight", "down.weight")):
            name = key.removesuffix(".lora_down.weight").removesuffix(".down.weight")
            up = sd[key.replace("down.weight", "up.weight")]
            alpha = sd.get(f"{name}.alpha")
            scale = 1.0 if alpha is None else float(alpha) / sd[key].shape[0]
            if ".processor." in name:
                name = name.replace("processor.qkv_lora", "linear1")
            modules[name] = LoraModule(A=sd[key], B=up, scale=scale)
    return LoraAdapter(modules=modules)


def test_combining_namings_equals_the_float64_weighted_sum(tmp_path):
    """kohya (fused qkv) + diffusers (split to_q/to_v) + XLabs: one module each in the result, the weighted sum."""
    paths = [
        kohya_file(tmp_path / "k.safetensors"),
        diffusers_file(tmp_path / "d.safetensors"),
        xlabs_file(tmp_path / "x.safetensors"),
    ]
    weights = [0.5, 0.3, 0.2]
    merged = loramix.combine(paths, weights=weights, method="cat")
    expected: dict[str, torch.Tensor] = {}
    for path, w in zip(paths, weights):
        for name, delta in oracle_deltas(path).items():
            expected[name] = expected.get(name, 0) + w * delta
    assert_deltas(merged, expected)
    assert "transformer.transformer_blocks.0.attn.to_q" in merged.modules  # kohya qkv and diffusers to_q: one module


def _tiny_pipeline(seed=0):
    torch.manual_seed(seed)
    transformer = diffusers.FluxTransformer2DModel(**CONFIG).eval()
    return diffusers.FluxPipeline(
        scheduler=None,
        vae=None,
        text_encoder=None,
        tokenizer=None,
        text_encoder_2=None,
        tokenizer_2=None,
        transformer=transformer,
    )


def _fused(source, base_state) -> dict[str, torch.Tensor]:
    """The transformer's weights after diffusers' load_lora_weights + fuse_lora of ``source``."""
    pipe = _tiny_pipeline()
    pipe.transformer.load_state_dict(base_state)
    pipe.load_lora_weights(str(source))
    pipe.fuse_lora()
    pipe.unload_lora_weights()
    return {k: v.clone() for k, v in pipe.transformer.state_dict().items()}


def _expected(base_state, adapter) -> dict[str, torch.Tensor]:
    out = {k: v.clone() for k, v in base_state.items()}
    for name, m in adapter.modules.items():
        key = name.removeprefix("transformer.") + ".weight"
        out[key] = (out[key].double() + m.delta(dtype=torch.float64)).float()
    return out


@pytest.mark.parametrize("fmt", [None, "kohya", "diffusers"])
def test_written_files_load_in_diffusers_to_the_same_delta(tmp_path, fmt):
    """The default output of Flux inputs is a kohya file in sd-scripts' names; kohya and diffusers outputs both load
    in diffusers' load_lora_weights + fuse_lora to the combined ΔW. (A kohya file's single-block linear1 is split
    by diffusers at hidden 3072 only: `test_single_block_linear1_at_flux_sizes` writes it there.)"""
    single = {} if fmt != "diffusers" else SINGLE_QKV
    paths = [
        kohya_file(tmp_path / "k.safetensors"),
        diffusers_file(tmp_path / "d.safetensors", modules=DIFFUSERS | single),
    ]
    plan = loramix.Plan(adapters=[str(p) for p in paths], weights=[0.7, 0.3], method="cat", format=fmt)
    report = loramix.run(loramix.Plan(**{**plan.__dict__, "output": str(tmp_path / "out")}))
    written = sorted(p.name for p in (tmp_path / "out").glob("*.safetensors"))
    assert written == (["pytorch_lora_weights.safetensors"] if fmt == "diffusers" else ["out.safetensors"])
    if fmt != "diffusers":
        with safe_open(str(tmp_path / "out" / written[0]), "pt") as f:
            keys = set(f.keys())
        assert "lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight" in keys  # joined again, sd-scripts' name
    base = _tiny_pipeline().transformer.state_dict()
    fused = _fused(tmp_path / "out" / written[0], base)
    expected = _expected(base, report.adapter)
    for key in expected:
        torch.testing.assert_close(fused[key], expected[key], rtol=1e-5, atol=1e-5)
    assert loramix.load_adapter(tmp_path / "out").modules.keys() == report.adapter.modules.keys()


def test_kohya_round_trip_keeps_names_and_ranks(tmp_path):
    """A fused qkv read as to_q/to_k/to_v (one A) and written back is the same fused LoRA: same keys, same rank."""
    path = kohya_file(tmp_path / "k.safetensors")
    loramix.save_adapter(loramix.load_adapter(path), tmp_path / "out", format="kohya")
    with safe_open(str(path), "pt") as a, safe_open(str(tmp_path / "out" / "out.safetensors"), "pt") as b:
        assert set(a.keys()) == set(b.keys())
        for key in a.keys():
            torch.testing.assert_close(b.get_tensor(key), a.get_tensor(key))


def test_merge_into_pipeline_equals_fuse_lora(tmp_path):
    pipe = _tiny_pipeline()
    folder = tmp_path / "flux"
    pipe.transformer.save_pretrained(folder / "transformer")
    index = {"_class_name": "FluxPipeline", "transformer": ["diffusers", "FluxTransformer2DModel"]}
    (folder / "model_index.json").write_text(json.dumps(index))
    lora = kohya_file(tmp_path / "k.safetensors")
    loramix.merge_into_base(loramix.load_adapter(lora), folder, tmp_path / "merged", dtype=torch.float32)
    merged = diffusers.FluxTransformer2DModel.from_pretrained(tmp_path / "merged" / "transformer").state_dict()
    fused = _fused(lora, pipe.transformer.state_dict())
    for key, value in fused.items():
        torch.testing.assert_close(merged[key], value, rtol=1e-5, atol=1e-5)


def test_unknown_flux_names_are_one_line_errors(tmp_path):
    modules = {**KOHYA, "double_blocks.0.img_attn.norm_x": (H, H), "single_blocks.0.linear9": (H, H)}
    with pytest.raises(AdapterFormatError, match=r"2 module name\(s\) fit no Flux.1 transformer module") as err:
        loramix.load_adapter(kohya_file(tmp_path / "bad.safetensors", modules=modules))
    assert "lora_unet_double_blocks_0_img_attn_norm_x" in str(err.value) and "\n" not in str(err.value)
    wrong = {"double_blocks.0.img_attn.qkv": (2 * H, H)}  # not q, k, v of equal rows
    with pytest.raises(AdapterFormatError, match="not Flux.1's thirds layout"):
        loramix.load_adapter(kohya_file(tmp_path / "shape.safetensors", modules=wrong))
    flux2 = {"single_blocks.0.linear1": (9 * H, H)}  # Flux.2: q, k, v and a gated MLP of 2·3·hidden rows
    with pytest.raises(AdapterFormatError, match="not Flux.1's qkv_rest layout"):
        loramix.load_adapter(kohya_file(tmp_path / "flux2.safetensors", modules=flux2))


def test_check_says_what_diffusers_and_comfyui_make_of_flux_files(tmp_path):
    """Verdicts follow diffusers' converters (checked here by loading: modules outside the blocks are dropped) and
    ComfyUI's key maps."""

    def verdicts(path):
        return {v.consumer: v.status for v in check_source(path).verdicts if v.consumer in ("diffusers", "ComfyUI")}

    assert verdicts(kohya_file(tmp_path / "k.safetensors")) == {"diffusers": "yes", "ComfyUI": "yes"}
    top = kohya_file(tmp_path / "top.safetensors", modules={**KOHYA, **TOP}, alpha=float(R))
    assert verdicts(top) == {"diffusers": "wrong", "ComfyUI": "yes"}
    base = _tiny_pipeline().transformer.state_dict()
    fused = _fused(top, base)
    torch.testing.assert_close(fused["x_embedder.weight"], base["x_embedder.weight"])  # what "wrong" means
    assert verdicts(xlabs_file(tmp_path / "x.safetensors")) == {"diffusers": "yes", "ComfyUI": "no"}
    assert verdicts(diffusers_file(tmp_path / "d.safetensors")) == {"diffusers": "yes", "ComfyUI": "yes"}


def test_default_output_keeps_modules_outside_the_blocks(tmp_path):
    """diffusers' kohya converter drops img_in/final_layer & co., so a Flux LoRA holding them is written by default
    in diffusers' names, which load_lora_weights reads whole (norm_out.linear's halves swapped back)."""
    path = kohya_file(tmp_path / "top.safetensors", modules={**KOHYA, **TOP}, alpha=float(R))
    report = loramix.run(loramix.Plan(adapters=[str(path)], method="cat", output=str(tmp_path / "out")))
    assert report.format == "diffusers"
    base = _tiny_pipeline().transformer.state_dict()
    fused = _fused(tmp_path / "out" / "pytorch_lora_weights.safetensors", base)
    expected = _expected(base, report.adapter)
    assert not torch.equal(expected["x_embedder.weight"], base["x_embedder.weight"])
    for key in expected:
        torch.testing.assert_close(fused[key], expected[key], rtol=1e-5, atol=1e-5)


def test_lycoris_loha_on_flux_reads_onto_the_split_modules(tmp_path):
    """A LoHa on kohya's fused qkv name: each diffusers part is its rows of the exact ΔW = (α/r)(B₁A₁)⊙(B₂A₂)
    (float64 reference from LyCORIS's formula)."""
    g = torch.Generator().manual_seed(5)
    key, r, alpha = "lora_unet_double_blocks_0_img_attn_qkv", 2, 1.0
    w = {n: torch.randn(*s, generator=g) for n, s in (("1_a", (3 * H, r)), ("1_b", (r, H)), ("2_a", (3 * H, r)))}
    w["2_b"] = torch.randn(r, H, generator=g)
    save_file(
        {f"{key}.hada_w{n}": t for n, t in w.items()} | {f"{key}.alpha": torch.tensor(alpha)},
        str(tmp_path / "l.safetensors"),
    )
    d = (alpha / r) * (w["1_a"].double() @ w["1_b"].double()) * (w["2_a"].double() @ w["2_b"].double())
    adapter = loramix.load_adapter(tmp_path / "l.safetensors")
    parts = [f"transformer.transformer_blocks.0.attn.to_{x}" for x in "qkv"]
    assert_deltas(adapter, {p: d[i * H : (i + 1) * H] for i, p in enumerate(parts)})


def _bfl(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A diffusers Flux transformer's weights in Black Forest Labs' single-file layout (the modules the tests use),
    under ComfyUI's ``model.diffusion_model.`` prefix: q, k, v (and the MLP) stacked by rows, norm_out's halves
    swapped — written here from the checkpoint layout, not from loramix's map."""

    def cat(*names):
        return torch.cat([state[f"{n}.weight"] for n in names])

    out = {}
    same = {"img_attn.proj": "attn.to_out.0", "img_mlp.0": "ff.net.0.proj", "img_mod.lin": "norm1.linear"}
    same |= {"txt_mlp.2": "ff_context.net.2"}
    for i in range(2):
        d, s = f"transformer_blocks.{i}", f"single_transformer_blocks.{i}"
        out[f"double_blocks.{i}.img_attn.qkv"] = cat(*(f"{d}.attn.to_{x}" for x in "qkv"))
        out[f"double_blocks.{i}.txt_attn.qkv"] = cat(*(f"{d}.attn.add_{x}_proj" for x in "qkv"))
        out |= {f"double_blocks.{i}.{bfl}": cat(f"{d}.{name}") for bfl, name in same.items()}
        out[f"single_blocks.{i}.linear1"] = cat(*(f"{s}.attn.to_{x}" for x in "qkv"), f"{s}.proj_mlp")
        out[f"single_blocks.{i}.linear2"] = cat(f"{s}.proj_out")
        out[f"single_blocks.{i}.modulation.lin"] = cat(f"{s}.norm.linear")
    out["img_in"] = cat("x_embedder")
    out["final_layer.adaLN_modulation.1"] = torch.cat(list(cat("norm_out.linear").chunk(2))[::-1])
    out["double_blocks.0.img_attn.norm.query_norm"] = state["transformer_blocks.0.attn.norm_q.weight"]  # untouched
    return {f"model.diffusion_model.{k}.weight": v.contiguous() for k, v in out.items()}


def test_merge_into_a_bfl_single_file_checkpoint(tmp_path):
    """kohya + diffusers Flux LoRAs merged into a ComfyUI/BFL single file (fused qkv/linear1 keys, no config.json):
    each fused weight gets its parts' ΔW in its rows — the diffusers model's weights plus ΔW, laid out again."""
    base = _tiny_pipeline().transformer.state_dict()
    (tmp_path / "flux1").mkdir()
    save_file(_bfl(base), str(tmp_path / "flux1" / "flux1-dev.safetensors"))
    paths = [
        kohya_file(tmp_path / "k.safetensors", modules={**KOHYA, **TOP}, alpha=float(R)),
        diffusers_file(tmp_path / "d.safetensors"),
    ]
    adapter = loramix.combine(paths, weights=[1.0, 1.0], method="cat")
    loramix.merge_into_base(adapter, tmp_path / "flux1", tmp_path / "merged", dtype=torch.float32)
    assert sorted(p.name for p in (tmp_path / "merged").iterdir()) == ["README.md", "flux1-dev.safetensors"]
    with safe_open(str(tmp_path / "merged" / "flux1-dev.safetensors"), "pt") as f:
        merged = {k: f.get_tensor(k) for k in f.keys()}
    expected = _bfl(_expected(base, adapter))
    assert merged.keys() == expected.keys()
    for key, value in expected.items():
        torch.testing.assert_close(merged[key], value, rtol=1e-5, atol=1e-5)


def test_diffusers_flat_names_read_and_check_as_diffusers_does(tmp_path):
    """diffusers' own flattened names (``lora_transformer_…``, OneTrainer's; diffusers' "mixture" converter) read the
    ΔW diffusers gets, modules outside the blocks included, and check says diffusers reads them."""
    g = torch.Generator().manual_seed(7)
    sd = {}
    attention = {n: shape for n, shape in DIFFUSERS.items() if ".attn." in n}
    modules = {**attention, "x_embedder": (H, 4), "norm_out.linear": (2 * H, H)}
    for name, (out, inp) in modules.items():
        key = "lora_transformer_" + name.replace(".", "_")
        down, up = _factors(g, out, inp)
        sd |= {f"{key}.lora_down.weight": down, f"{key}.lora_up.weight": up, f"{key}.alpha": torch.tensor(1.0)}
    save_file(sd, str(tmp_path / "flat.safetensors"))
    adapter = loramix.load_adapter(tmp_path / "flat.safetensors")
    assert_deltas(adapter, oracle_deltas(tmp_path / "flat.safetensors"))
    verdicts = {v.consumer: v.status for v in check_source(tmp_path / "flat.safetensors").verdicts}
    assert verdicts["diffusers"] == "yes"
    base = _tiny_pipeline().transformer.state_dict()
    fused, expected = _fused(tmp_path / "flat.safetensors", base), _expected(base, adapter)
    for key in expected:
        torch.testing.assert_close(fused[key], expected[key], rtol=1e-5, atol=1e-5)
    # a block module other than attention: diffusers keys it by its block alone, and check says no
    key = "lora_transformer_single_transformer_blocks_1_proj_out"
    sd |= {f"{key}.lora_down.weight": torch.ones(R, 5 * H), f"{key}.lora_up.weight": torch.ones(H, R)}
    save_file(sd | {f"{key}.alpha": torch.tensor(1.0)}, str(tmp_path / "block.safetensors"))
    assert "transformer.single_transformer_blocks.1" in oracle_deltas(tmp_path / "block.safetensors")
    verdicts = {v.consumer: v.status for v in check_source(tmp_path / "block.safetensors").verdicts}
    assert verdicts["diffusers"] == "no"
