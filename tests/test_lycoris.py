"""LyCORIS files read exactly (issue 15, part 2): the ``lycoris-lora`` package is the oracle.

Its own modules (LohaModule, LokrModule, LoConModule) are built on tiny layers, given random weights, saved the way
LyCORIS saves them (the module's / network's ``state_dict``: ``custom_state_dict``, names ``<lora_name>.<key>``), and
loramix's s·B·A must equal the ΔW LyCORIS applies in its forward pass: ``get_weight(shape)`` times the multiplier 1
(``_rebuild_forward``; LyCORIS's ``get_diff_weight``/``merge_to`` multiply alpha/dim in a second time, which is not
what training or ComfyUI/A1111 apply, see `test_lycoris_get_diff_weight_scales_twice`). LyCORIS computes in float32
and loramix's factors hold float32 products (formed in float64), so the two agree to float32 rounding of sums of a
few dozen terms: rtol 1e-5 on max|ΔW| (observed ~1e-7).
"""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner
from helpers import tiny_convnet, tiny_llama
from lycoris import create_lycoris
from lycoris.modules.locon import LoConModule
from lycoris.modules.loha import LohaModule
from lycoris.modules.lokr import LokrModule
from safetensors.torch import load_file, save_file
from test_checkpoint import read_checkpoint, save_base
from torch import nn

import loramix
from loramix.cli import main
from loramix.errors import AdapterFormatError

TOL = 1e-5  # relative to max|ΔW|: float32 rounding of LyCORIS's own rebuild (see the module docstring)
LINEAR, CONV = (12, 16), (8, 12, 3)  # nn.Linear(in, out); nn.Conv2d(in, out, k)


def cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def _randomise(module: nn.Module, seed: int) -> nn.Module:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if not name.startswith("org_"):
                p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
    return module


def _save(path, modules: dict[str, nn.Module], dtype=None):
    tensors = {
        f"{n}.{k}": v.detach().to(dtype or v.dtype).contiguous()
        for n, m in modules.items()
        for k, v in m.state_dict().items()
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path))
    return path


def _oracle(module: nn.Module) -> torch.Tensor:
    """The ΔW LyCORIS's forward adds (multiplier 1), flattened to out × in·kh·kw, float64."""
    weight = module.make_weight() * module.scale if isinstance(module, LoConModule) else module.get_weight(module.shape)
    return weight.detach().double().reshape(weight.shape[0], -1)


def _layer(kind):
    return nn.Linear(*LINEAR) if kind == "linear" else nn.Conv2d(*CONV)


CASES = {
    "loha": lambda: LohaModule("x", _layer("linear"), lora_dim=3, alpha=6),
    "loha_alpha_missing_is_rank": lambda: LohaModule("x", _layer("linear"), lora_dim=2, alpha=0),
    "loha_conv": lambda: LohaModule("x", _layer("conv"), lora_dim=2, alpha=1),
    "loha_conv_tucker": lambda: LohaModule("x", _layer("conv"), lora_dim=2, alpha=1, use_tucker=True),
    "lokr_full_w1_lowrank_w2": lambda: LokrModule("x", nn.Linear(16, 32), lora_dim=2, alpha=3, factor=4),
    "lokr_both_lowrank": lambda: LokrModule("x", _layer("linear"), lora_dim=1, alpha=3, factor=4, decompose_both=True),
    "lokr_both_full_alpha_ignored": lambda: LokrModule("x", _layer("linear"), lora_dim=2, alpha=7, full_matrix=True),
    "lokr_conv": lambda: LokrModule("x", _layer("conv"), lora_dim=1, alpha=3, factor=4),
    "lokr_conv_tucker": lambda: LokrModule("x", _layer("conv"), lora_dim=1, alpha=3, factor=4, use_tucker=True),
    "lokr_conv_full_w2": lambda: LokrModule("x", _layer("conv"), lora_dim=8, alpha=3, factor=4),
    "locon_conv_tucker": lambda: LoConModule("x", _layer("conv"), lora_dim=3, alpha=1, use_tucker=True),
}
# what loramix reads: (layout, kernel, rank, scale)
EXPECTED = {
    "loha": ("out_in", (), 9, 2.0),
    "loha_alpha_missing_is_rank": ("out_in", (), 4, 1.0),
    "loha_conv": ("out_in", (), 4, 0.5),  # LyCORIS stores plain conv LoHa factors flattened: no kernel in the file
    "loha_conv_tucker": ("conv2d", (3, 3), 4, 0.5),
    "lokr_full_w1_lowrank_w2": ("out_in", (), 8, 1.5),
    "lokr_both_lowrank": ("out_in", (), 1, 3.0),
    "lokr_both_full_alpha_ignored": ("out_in", (), 12, 1.0),
    "lokr_conv": ("out_in", (), 2, 3.0),
    "lokr_conv_tucker": ("conv2d", (3, 3), 2, 3.0),
    "lokr_conv_full_w2": ("conv2d", (3, 3), 8, 1.0),
    "locon_conv_tucker": ("conv2d", (3, 3), 3, 1 / 3),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_module_delta_equals_lycoris(case, tmp_path):
    module = _randomise(CASES[case](), seed=1)
    name = f"lora_unet_{case}"
    file = _save(tmp_path / f"{case}.safetensors", {name: module})
    adapter = loramix.load_adapter(file)
    m = adapter.modules[name]
    assert (m.layout, m.kernel_size, m.rank, pytest.approx(m.scale)) == EXPECTED[case]
    expected = _oracle(module)
    got = m.B.double() @ m.A.double() * m.scale
    torch.testing.assert_close(got, expected, rtol=0, atol=TOL * expected.abs().max().item())
    if m.layout == "conv2d":  # delta() puts it on the conv weight as LyCORIS's get_weight(shape) does
        torch.testing.assert_close(m.delta(dtype=torch.float64), expected.reshape(module.shape), rtol=0, atol=1e-5)
    assert adapter.provenance["format"] == "lycoris" and len(adapter.provenance["lycoris"]) == 1


def test_lycoris_forward_is_the_oracle(tmp_path):
    """What loramix reads is what LyCORIS's forward adds to the layer's output (bf16 file: factors exact in float32)."""
    layer = nn.Linear(*LINEAR)
    module = _randomise(LohaModule("lora_te_q", layer, lora_dim=3, alpha=6), seed=2)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(p.to(torch.bfloat16).float())  # the file below is bf16: the same numbers
    x = torch.randn(5, LINEAR[0], generator=torch.Generator().manual_seed(3))
    base = layer(x)
    module.apply_to()
    lycoris_out = module(x).detach()
    tensors = {f"lora_te_q.{k}": v.detach().to(torch.bfloat16) for k, v in module.state_dict().items()}
    save_file(tensors, str(tmp_path / "q.safetensors"))
    adapter = loramix.load_adapter(tmp_path / "q.safetensors")
    (m,) = adapter.modules.values()
    assert m.A.dtype == torch.float32  # products of two bf16 numbers are exact in float32
    ours = base.detach() + x @ m.delta().T
    torch.testing.assert_close(ours, lycoris_out, rtol=1e-5, atol=1e-5)


def test_lycoris_get_diff_weight_scales_twice():
    """Why the oracle is get_weight/forward: in lycoris-lora get_diff_weight multiplies alpha/dim in again."""
    module = _randomise(LohaModule("x", nn.Linear(*LINEAR), lora_dim=3, alpha=6), seed=4)
    diff = module.get_diff_weight()[0].detach()
    torch.testing.assert_close(diff, module.get_weight(module.shape).detach() * module.scale)
    assert module.scale == 2.0


def test_face_splitting_identity_float64():
    """(B₁A₁) ⊙ (B₂A₂) = (B₁ ⊙ᵣ B₂)(A₁ᵀ ⊙ᵣ A₂ᵀ)ᵀ, checked in float64 on the reader's own factors."""
    gen = torch.Generator().manual_seed(5)
    B1, B2 = (
        torch.randn(7, 3, generator=gen, dtype=torch.float64),
        torch.randn(7, 2, generator=gen, dtype=torch.float64),
    )
    A1, A2 = (
        torch.randn(3, 9, generator=gen, dtype=torch.float64),
        torch.randn(2, 9, generator=gen, dtype=torch.float64),
    )
    parts = {"hada_w1_a": B1, "hada_w1_b": A1, "hada_w2_a": B2, "hada_w2_b": A2}
    from loramix.formats.lycoris import _loha

    (B, A), label, rank, kernel = _loha(parts)
    assert B.shape == (7, 6) and A.shape == (6, 9) and label == "LoHa rank 3×2"
    torch.testing.assert_close(B @ A, (B1 @ A1) * (B2 @ A2), rtol=1e-12, atol=1e-12)


def test_rank_above_min_dimension_is_kept_exact_at_that_rank(tmp_path):
    module = _randomise(LohaModule("x", nn.Linear(6, 5), lora_dim=4, alpha=4), seed=6)  # 4·4 = 16 > min(5, 6)
    file = _save(tmp_path / "big.safetensors", {"lora_unet_big": module})
    (m,) = loramix.load_adapter(file).modules.values()
    assert m.rank == 5
    expected = _oracle(module)
    torch.testing.assert_close(m.B.double() @ m.A.double() * m.scale, expected, rtol=0, atol=TOL * expected.abs().max())


# --------------------------------------------------------------------------------------- commands on LyCORIS files


def _loha_lokr_file(tmp_path):
    modules = {
        "lora_unet_attn_to_q": _randomise(LohaModule("q", nn.Linear(32, 32), lora_dim=3, alpha=2), seed=7),
        "lora_unet_attn_to_k": _randomise(LokrModule("k", nn.Linear(32, 32), lora_dim=2, alpha=2, factor=4), seed=8),
    }
    return _save(tmp_path / "mix.safetensors", modules), {n: _oracle(m) for n, m in modules.items()}


def test_inspect_says_what_the_file_is(tmp_path):
    file, _ = _loha_lokr_file(tmp_path)
    result = cli("inspect", file)
    assert result.exit_code == 0, result.output
    assert "LoHa rank 3×3 → exact LoRA rank 9 (1 module)" in result.output
    assert "LoKr full ⊗ rank 2 → exact LoRA rank 8 (1 module)" in result.output
    (item,) = json.loads(cli("inspect", "--json", file).stdout)
    assert item["ranks"] == [8, 9] and len(item["lycoris"]) == 2
    checked = cli("check", file)  # diffusers reads kohya lora_down/lora_up files, not LoHa: the fix writes one
    assert "a LyCORIS file" in checked.output and "--format kohya" in checked.output


def test_combine_one_at_rank_k_is_the_truncated_svd(tmp_path):
    file, deltas = _loha_lokr_file(tmp_path)
    out = tmp_path / "r4"
    result = cli("-q", "combine", file, "--rank", 4, "--format", "kohya", "-o", out)
    assert result.exit_code == 0, result.output
    written = loramix.load_adapter(out / "r4.safetensors")
    for name, delta in deltas.items():
        m = written.modules[name]
        U, S, Vh = torch.linalg.svd(delta)
        best = U[:, :4] @ torch.diag(S[:4]) @ Vh[:4]
        got = m.B.double() @ m.A.double() * m.scale
        assert m.rank == 4
        torch.testing.assert_close(got, best, rtol=0, atol=1e-5 * S[0].item())


def test_combine_loha_with_a_plain_lora_is_the_weighted_sum(tmp_path):
    file, deltas = _loha_lokr_file(tmp_path)
    gen = torch.Generator().manual_seed(9)
    down, up = torch.randn(4, 32, generator=gen), torch.randn(32, 4, generator=gen)
    lora = tmp_path / "plain.safetensors"
    name = "lora_unet_attn_to_q"
    save_file(
        {f"{name}.lora_down.weight": down, f"{name}.lora_up.weight": up, f"{name}.alpha": torch.tensor(2.0)}, str(lora)
    )
    merged = loramix.combine([str(file), str(lora)], weights=[0.7, 0.3], method="cat")
    expected = 0.7 * deltas[name] + 0.3 * 0.5 * up.double() @ down.double()
    m = merged.modules[name]
    torch.testing.assert_close(
        m.B.double() @ m.A.double() * m.scale, expected, rtol=0, atol=1e-5 * expected.abs().max()
    )
    assert "lora_unet_attn_to_k" in merged.modules  # the LoKr module, only in the first file, is kept (weighted)


def test_merge_into_a_tiny_base_equals_base_plus_lycoris_delta(tmp_path):
    """A LyCORIS network on a transformers model (names ``lycoris_model_layers_…``) merged into the saved base."""
    model = tiny_llama()
    base = save_base(model, tmp_path / "base")
    network = create_lycoris(model, 1.0, linear_dim=2, linear_alpha=1, algo="loha")  # preset "full": every Linear
    network.apply_to()
    for lora in network.loras:
        _randomise(lora, seed=10)
    file = tmp_path / "llama_loha.safetensors"
    save_file({k: v.detach().contiguous() for k, v in network.state_dict().items()}, str(file))  # as save_weights
    out = tmp_path / "merged"
    result = cli("-q", "combine", file, "--merge-into", base, "-o", out)
    assert result.exit_code == 0, result.output
    merged, original = read_checkpoint(out), read_checkpoint(base)
    assert len(network.loras) == 15
    changed = set()
    for lora in network.loras:
        key = next(
            k for k in original if k.endswith(".weight") and "lycoris_" + k[:-7].replace(".", "_") == lora.lora_name
        )
        expected = original[key].double() + _oracle(lora)
        assert merged[key].dtype == torch.float32  # the base's dtype
        # W + ΔW in float32: loramix adds in float32, the reference in float64 (float32 rounding: rtol 1e-5, atol 1e-6)
        torch.testing.assert_close(merged[key].double(), expected, rtol=1e-5, atol=1e-6)
        changed.add(key)
    untouched = [k for k in original if k not in changed]
    assert all(torch.equal(merged[k], original[k]) for k in untouched)


def test_dora_scale_and_other_algorithms_are_refused_in_one_line(tmp_path):
    dora = _randomise(LohaModule("x", nn.Linear(*LINEAR), lora_dim=2, alpha=1, weight_decompose=True), seed=11)
    file = _save(tmp_path / "dora.safetensors", {"lora_unet_dora": dora})
    result = cli("inspect", file)
    assert result.exit_code == 2 and result.output.count("\n") == 1
    assert "lora_unet_dora is DoRA-LyCORIS (dora_scale)" in result.output and str(file) in result.output
    ia3 = tmp_path / "ia3.safetensors"
    save_file({"lycoris_q.weight": torch.ones(4), "lycoris_q.on_input": torch.tensor(False)}, str(ia3))
    with pytest.raises(AdapterFormatError, match=r"ia3\.safetensors: module lycoris_q is LyCORIS \(IA\)³"):
        loramix.load_adapter(ia3)


def test_kohya_names_and_files_are_shared(tmp_path):
    """A plain kohya LoRA file stays kohya's; LyCORIS's own LoCon keys (lycoris_ prefix) are read as LoRA."""
    module = _randomise(LoConModule("x", nn.Linear(*LINEAR), lora_dim=3, alpha=3), seed=12)
    kohya_file = _save(tmp_path / "k" / "locon.safetensors", {"lora_te_x": module})
    assert loramix.load_adapter(kohya_file).provenance["format"] == "kohya"
    lycoris_file = _save(tmp_path / "l" / "locon.safetensors", {"lycoris_x": module})
    adapter = loramix.load_adapter(lycoris_file.parent)  # a folder holding one file
    assert adapter.provenance["lycoris"] == ["LoCon rank 3 → exact LoRA rank 3 (1 module)"]
    out = tmp_path / "out"
    assert cli("-q", "combine", lycoris_file, "--format", "kohya", "-o", out).exit_code == 0
    assert set(load_file(str(out / "out.safetensors"))) == {
        f"lycoris_x.{k}" for k in ("lora_down.weight", "lora_up.weight", "alpha")
    }


def test_flat_conv_loha_merges_into_a_live_conv_layer(tmp_path):
    """LyCORIS stores plain conv LoHa factors flattened (out × in·kh·kw); on the 4-D conv weight they take its kernel,
    as LyCORIS's get_weight(shape) does. Names ``lycoris_conv`` find the model's ``conv`` (flattened-name rule)."""
    model = tiny_convnet()
    network = create_lycoris(model, 1.0, linear_dim=2, linear_alpha=1, conv_dim=2, conv_alpha=1, algo="loha")
    network.apply_to()
    for lora in network.loras:
        _randomise(lora, seed=13)
    conv = next(lora for lora in network.loras if lora.lora_name == "lycoris_conv")
    file = tmp_path / "conv_loha.safetensors"
    save_file({k: v.detach().contiguous() for k, v in network.state_dict().items()}, str(file))
    adapter = loramix.load_adapter(file)
    assert adapter.modules["lycoris_conv"].layout == "out_in"  # the file holds no kernel
    fresh = tiny_convnet()
    before = fresh.conv.weight.detach().double().clone()
    loramix.merge_into_model(fresh, adapter)
    expected = before + _oracle(conv).reshape(before.shape)
    torch.testing.assert_close(fresh.conv.weight.detach().double(), expected, rtol=0, atol=1e-6)


def test_flat_conv_loha_combines_with_a_kohya_conv_lora(tmp_path):
    """A flat conv LoHa module takes the kernel of the same module in a kohya LoCon file it is combined with."""
    loha = _randomise(LohaModule("x", _layer("conv"), lora_dim=2, alpha=1), seed=14)
    locon = _randomise(LoConModule("x", _layer("conv"), lora_dim=3, alpha=3), seed=15)
    name = "lora_unet_down_blocks_0_resnets_0_conv1"
    files = [_save(tmp_path / f"{kind}.safetensors", {name: m}) for kind, m in (("loha", loha), ("locon", locon))]
    merged = loramix.combine([str(f) for f in files], weights=[0.6, 0.4], method="cat")
    m = merged.modules[name]
    assert (m.layout, m.kernel_size) == ("conv2d", (3, 3))
    expected = 0.6 * _oracle(loha) + 0.4 * _oracle(locon)
    torch.testing.assert_close(m.B.double() @ m.A.double() * m.scale, expected, rtol=0, atol=TOL * expected.abs().max())
