"""`loramix analyze` against float64 dense references written here: ΔW formed explicitly, torch.linalg.svd of it,
cosines from the flattened matrices, φ from the dense singular vectors, principal angles from scipy, projections
as explicit projector products. Shapes are small so the dense route is cheap.

Tolerances: the analysis works from factor Grams in float64 (one product per factor, then r×r eigen/SVD), so its
errors are a few ulps of σ₁² in squared quantities: shares, φ and cosines agree to 1e-9 (absolute), and singular
values to 1e-9·σ₁ (a Gram loses half the digits only for values below √eps·σ₁, far below any tested value).
Principal angles near 0 are ill-conditioned (arccos near 1: an error of eps in the cosine moves the angle by √eps
rad), so angles are compared to 1e-5 degrees.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import scipy.linalg
import torch
from click.testing import CliRunner
from safetensors.torch import save_file

from loramix import LoraAdapter, LoraModule, analyze, combine, load_adapter, save_adapter
from loramix.cli import main
from loramix.errors import IncompatibleAdaptersError, LoramixError, SourceError
from loramix.linalg import RankRule, factor_inner, factor_svd, gram_svd, principal_angles, subspace_similarity

TIGHT = 1e-9
REAL = Path(__file__).resolve().parents[2] / "shared" / "real-adapters"


# ----------------------------------------------------------------------------------------------- helpers


def module(out: int, inp: int, r: int, *, seed: int, scale: float = 1.0, dtype=torch.float32) -> LoraModule:
    g = torch.Generator().manual_seed(seed)
    B = torch.randn(out, r, generator=g, dtype=torch.float64).to(dtype)
    A = torch.randn(r, inp, generator=g, dtype=torch.float64).to(dtype)
    return LoraModule(A=A, B=B, scale=scale)


def adapter(modules: dict[str, LoraModule], name: str) -> LoraAdapter:
    return LoraAdapter(modules=modules, name=name, base_model="test/base")


def dense(m: LoraModule) -> torch.Tensor:
    return m.scale * m.B.double() @ m.A.double()


def dense_svd(m: LoraModule):
    """Float64 SVD of the explicit ΔW, trimmed to its numerical rank (numpy's matrix_rank rule on σ)."""
    U, S, Vh = torch.linalg.svd(dense(m), full_matrices=False)
    k = int((S > S[0] * max(U.shape[0], Vh.shape[1]) * torch.finfo(S.dtype).eps).sum()) if S[0] > 0 else 0
    return U[:, :k], S, Vh[:k].T


def energy_rank(S: torch.Tensor, share: float) -> int:
    """Smallest k with Σ_{i<k} σᵢ² ≥ share·Σσ², counted in plain Python."""
    total, running = float(S.square().sum()), 0.0
    for k, s in enumerate(S.tolist(), start=1):
        running += s * s
        if running >= share * total * (1 - 1e-12):
            return k
    return len(S)


def projected(x: torch.Tensor, U: torch.Tensor, V: torch.Tensor) -> float:
    """‖U Uᵀ X V Vᵀ‖² / ‖X‖² with explicit projectors."""
    return float((U @ U.T @ x @ V @ V.T).square().sum() / x.square().sum())


SHAPES = [(40, 24, 6), (24, 40, 6), (33, 33, 8), (50, 12, 3)]


# ----------------------------------------------------------------------------------------------- spectra


@pytest.mark.parametrize("out,inp,r", SHAPES)
@pytest.mark.parametrize("scale", [2.0, -0.5])
def test_spectrum_matches_dense_svd(out, inp, r, scale):
    m = module(out, inp, r, seed=out + inp, scale=scale)
    result = analyze([adapter({"layers.0.proj": m}, "x")]).adapters[0].modules["layers.0.proj"]
    _, S, _ = dense_svd(m)
    S = S[:r]
    ours = torch.tensor(result.singular_values, dtype=torch.float64)
    assert ours.shape == S.shape
    torch.testing.assert_close(ours, S, rtol=0, atol=TIGHT * float(S[0]))
    p = S / S.sum()
    assert result.effective_rank == pytest.approx(math.exp(-float((p * p.log()).sum())), rel=1e-9)
    assert result.stable_rank == pytest.approx(float(S.square().sum() / S[0] ** 2), rel=1e-9)
    assert result.energy_rank == {"0.9": energy_rank(S, 0.9), "0.99": energy_rank(S, 0.99)}
    assert result.norm == pytest.approx(float(dense(m).norm()), rel=1e-9)
    assert result.numerical_rank == r
    assert result.suggested_rank == RankRule(energy=0.99).choose(S, (out, inp))


def test_rank_deficient_and_zero_modules():
    m = module(30, 20, 6, seed=1)
    m.B[:, 3:] = m.B[:, :3]  # columns repeat: ΔW has rank 3
    zero = module(30, 20, 4, seed=2)
    zero.B.zero_()
    result = analyze([adapter({"a": m, "z": zero}, "x")]).adapters[0]
    assert result.modules["a"].numerical_rank == torch.linalg.matrix_rank(dense(m)) == 3
    assert result.modules["a"].singular_values[3:] == pytest.approx([0.0] * 3, abs=1e-6 * result.modules["a"].norm)
    z = result.modules["z"]
    assert (z.norm, z.numerical_rank, z.suggested_rank, z.energy_rank) == (0.0, 0, 0, {"0.9": 0, "0.99": 0})


def test_gram_svd_bases_are_orthonormal_and_reconstruct():
    m = module(45, 30, 7, seed=3, scale=-1.5)
    B, A = m.B.double(), m.A.double()
    svd = gram_svd(B.T @ B, A @ A.T, (45, 30), scale=m.scale)
    U, V = B @ svd.M, A.T @ svd.N
    torch.testing.assert_close(U.T @ U, torch.eye(7, dtype=torch.float64), rtol=0, atol=1e-10)
    torch.testing.assert_close(V.T @ V, torch.eye(7, dtype=torch.float64), rtol=0, atol=1e-10)
    torch.testing.assert_close(U @ torch.diag(svd.S) @ V.T, dense(m), rtol=0, atol=1e-10)


# ----------------------------------------------------------------------------------------------- pairs


@pytest.mark.parametrize("out,inp,r", SHAPES)
def test_pair_figures_match_dense(out, inp, r):
    g = torch.Generator().manual_seed(out * inp)
    x = module(out, inp, r, seed=10 + r, scale=1.5)
    y = module(out, inp, r + 2, seed=20 + r, scale=0.7)
    # make them overlap partly: y reuses two of x's input directions and one output direction
    y.A[:2] = x.A[:2] + 0.1 * torch.randn(2, inp, generator=g)
    y.B[:, 0] = x.B[:, 0]
    pair = analyze([adapter({"m": x}, "x"), adapter({"m": y}, "y")]).pairs[0]
    o = pair.modules["m"]
    dx, dy = dense(x), dense(y)
    Ux, _, Vx = dense_svd(x)
    Uy, _, Vy = dense_svd(y)
    k = min(Ux.shape[1], Uy.shape[1])
    assert o.cosine == pytest.approx(float((dx * dy).sum() / (dx.norm() * dy.norm())), abs=TIGHT)
    assert o.phi_a == pytest.approx(float((Vx.T @ Vy).square().sum()) / k, abs=TIGHT)
    assert o.phi_b == pytest.approx(float((Ux.T @ Uy).square().sum()) / k, abs=TIGHT)
    reference_in = sorted(math.degrees(a) for a in scipy.linalg.subspace_angles(Vx.numpy(), Vy.numpy()))
    reference_out = sorted(math.degrees(a) for a in scipy.linalg.subspace_angles(Ux.numpy(), Uy.numpy()))
    assert o.angles_a == pytest.approx(reference_in, abs=1e-5)
    assert o.angles_b == pytest.approx(reference_out, abs=1e-5)
    assert o.share_a_in_b == pytest.approx(projected(dx, Uy, Vy), abs=TIGHT)
    assert o.share_b_in_a == pytest.approx(projected(dy, Ux, Vx), abs=TIGHT)
    assert o.phi_a_chance == pytest.approx(Uy.shape[1] / inp)
    assert 0.02 < o.phi_a < 1 and 0 < o.cosine < 1  # a partial overlap, not a degenerate case
    assert pair.cosine == pytest.approx(o.cosine, abs=TIGHT)  # one module: the whole adapter is that module


def test_self_overlap_is_one():
    mods = {f"layers.{i}.{t}": module(20, 16, 4, seed=i * 7 + len(t), scale=2.0) for i in range(2) for t in "qv"}
    a = adapter(mods, "same")
    result = analyze([a, a])
    pair = result.pairs[0]
    assert (pair.a, pair.b) == ("same", "same#2")
    for o in pair.modules.values():
        assert (o.cosine, o.phi_a, o.phi_b, o.share_a_in_b, o.share_b_in_a) == pytest.approx([1.0] * 5, abs=TIGHT)
        assert o.angles_a == pytest.approx([0.0] * 4, abs=1e-5)
    for group in [pair.overall, *pair.by_layer.values(), *pair.by_type.values()]:
        assert (group.cosine, group.phi_a, group.phi_b) == pytest.approx([1.0] * 3, abs=TIGHT)


def test_orthogonal_adapters_give_zero():
    """Factors on disjoint coordinates: ΔW₁ and ΔW₂ share no input and no output direction."""
    x, y = module(20, 16, 3, seed=1), module(20, 16, 3, seed=2)
    x.B[10:], x.A[:, 8:] = 0, 0
    y.B[:10], y.A[:, :8] = 0, 0
    o = analyze([adapter({"m": x}, "x"), adapter({"m": y}, "y")]).pairs[0].modules["m"]
    assert (o.cosine, o.phi_a, o.phi_b, o.share_a_in_b, o.share_b_in_a) == pytest.approx([0.0] * 5, abs=TIGHT)
    assert o.angles_b == pytest.approx([90.0] * 3, abs=1e-6)


def test_zero_module_in_a_pair():
    """An all-zero ΔW has no direction: its pair figures are None, and it adds nothing to the aggregates."""
    x = {"layers.0.q": module(12, 10, 3, seed=1), "layers.0.v": module(12, 10, 3, seed=2)}
    y = {"layers.0.q": module(12, 10, 3, seed=3), "layers.0.v": module(12, 10, 3, seed=4)}
    y["layers.0.v"].B.zero_()
    pair = analyze([adapter(x, "x"), adapter(y, "y")]).pairs[0]
    zero = pair.modules["layers.0.v"]
    assert (zero.cosine, zero.phi_a, zero.share_a_in_b, zero.inner, zero.min_rank) == (None, None, None, 0.0, 0)
    q = pair.modules["layers.0.q"]
    norm_x = math.sqrt(sum(float(dense(m).square().sum()) for m in x.values()))
    assert pair.cosine == pytest.approx(q.inner / (norm_x * float(dense(y["layers.0.q"]).norm())), abs=TIGHT)
    assert (pair.overall.phi_a, pair.overall.modules) == (pytest.approx(q.phi_a), 1)


def test_same_inputs_different_outputs():
    """Shared A, orthogonal B: φ of the input side is 1, of the output side 0, and the cosine is 0."""
    x, y = module(20, 16, 3, seed=1), module(20, 16, 3, seed=2)
    y.A = x.A.clone()
    x.B[10:], y.B[:10] = 0, 0
    o = analyze([adapter({"m": x}, "x"), adapter({"m": y}, "y")]).pairs[0].modules["m"]
    assert (o.phi_a, o.phi_b, o.cosine) == pytest.approx([1.0, 0.0, 0.0], abs=TIGHT)


def test_aggregates_match_dense_concatenation():
    """Whole-adapter cosine = cosine of all modules' ΔW flattened together, a module only one adapter has included."""
    shapes = {"model.layers.0.q": (12, 10), "model.layers.0.v": (8, 10), "model.layers.1.q": (12, 10)}
    xs = {n: module(*s, 3, seed=i, scale=1.0) for i, (n, s) in enumerate(shapes.items())}
    ys = {n: module(*s, 3, seed=i + 5, scale=0.5) for i, (n, s) in enumerate(shapes.items()) if n != "model.layers.1.q"}
    ys["model.layers.0.q"].A = xs["model.layers.0.q"].A.clone()  # some real overlap
    ys["model.layers.0.q"].B = xs["model.layers.0.q"].B + 0.3 * ys["model.layers.0.q"].B
    pair = analyze([adapter(xs, "x"), adapter(ys, "y")]).pairs[0]

    def cosine(names):
        fx = torch.cat([dense(xs[n]).flatten() for n in names])
        fy = torch.cat([dense(ys[n]).flatten() if n in ys else torch.zeros(dense(xs[n]).numel()) for n in names])
        return float(fx @ fy / (fx.norm() * fy.norm()))

    assert pair.cosine == pytest.approx(cosine(list(shapes)), abs=TIGHT)
    assert pair.by_layer["model.layers.0"].cosine == pytest.approx(cosine(["model.layers.0.q", "model.layers.0.v"]))
    assert pair.by_type["q"].cosine == pytest.approx(cosine(["model.layers.0.q", "model.layers.1.q"]), abs=TIGHT)
    assert set(pair.modules) == {"model.layers.0.q", "model.layers.0.v"}
    assert pair.by_layer["model.layers.1"].modules == 0 and pair.by_layer["model.layers.1"].phi_a is None
    # rank-weighted mean φ (all ranks equal here: the plain mean)
    mean = sum(pair.modules[n].phi_b for n in pair.modules) / 2
    assert pair.by_layer["model.layers.0"].phi_b == pytest.approx(mean, abs=TIGHT)


def test_factor_inner_and_helpers_match_dense():
    x, y = module(30, 20, 5, seed=1), module(30, 20, 4, seed=2)
    reference = float((x.B.double() @ x.A.double() * (y.B.double() @ y.A.double())).sum())
    assert factor_inner(x.B, x.A, y.B, y.A) == pytest.approx(reference, rel=1e-12)
    q1 = torch.linalg.qr(torch.randn(30, 5, dtype=torch.float64)).Q
    q2 = torch.linalg.qr(torch.randn(30, 4, dtype=torch.float64)).Q
    assert float(subspace_similarity(q1.T @ q1)) == pytest.approx(1.0)
    angles = principal_angles(q1.T @ q2)
    torch.testing.assert_close(angles.sort().values, torch.tensor(sorted(scipy.linalg.subspace_angles(q1, q2))))


# ----------------------------------------------------------------------------------------------- merge


def test_merge_spectrum_matches_dense_sum():
    xs = [module(40, 30, 6, seed=i, scale=s) for i, s in enumerate((2.0, 1.0, 0.5))]
    xs[1].A[:3] = xs[0].A[:3]  # shared input directions make the sum's rank < 18
    weights = [0.5, 0.3, 0.2]
    result = analyze(
        [adapter({"m": m}, f"a{i}") for i, m in enumerate(xs)], weights=weights, rank_rule=RankRule(energy=0.9)
    )
    merged = result.merge.modules["m"]
    total = sum(w * dense(m) for w, m in zip(weights, xs))
    S = torch.linalg.svdvals(total)[:18]
    torch.testing.assert_close(
        torch.tensor(merged.singular_values, dtype=torch.float64), S, rtol=0, atol=1e-7 * float(S[0])
    )
    assert merged.truncation_loss == pytest.approx(float(S[6:].square().sum() / S.square().sum()), abs=TIGHT)
    assert merged.suggested_rank == energy_rank(S, 0.9)
    assert merged.reference_rank == 6
    # the rank `combine --method svd --energy 0.9` would produce
    ref = factor_svd(torch.cat([w * m.scale * m.B.double() for w, m in zip(weights, xs)], 1),
                     torch.cat([m.A.double() for m in xs], 0))  # fmt: skip
    assert result.merge.suggested_rank == RankRule(energy=0.9).choose(ref.S, (40, 30))


# ----------------------------------------------------------------------------------------------- rules, base, errors


@pytest.mark.parametrize(
    "options", [{"rule": "sv_ratio", "rule_value": 3.0}, {"rule": "sv_fro", "rule_value": 0.8}, {"rank": 2}]
)
def test_rank_rule_is_combines_rule(options):
    m = module(30, 25, 8, seed=4)
    result = analyze([adapter({"m": m}, "x")], rank_rule=RankRule(**options))
    keys = {"rule": "rule", "rule_value": "rule_value", "rank": "rank"}
    rule = RankRule(**{keys[k]: v for k, v in options.items()})
    assert result.rule == rule
    _, S, _ = dense_svd(m)
    assert result.adapters[0].modules["m"].suggested_rank == rule.choose(S[:8], (30, 25))


def write_base(folder: Path, tensors: dict[str, torch.Tensor], *, sharded: bool) -> None:
    folder.mkdir()
    if not sharded:
        save_file(tensors, str(folder / "model.safetensors"))
        return
    names = sorted(tensors)
    halves = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    for file, keys in halves.items():
        save_file({k: tensors[k] for k in keys}, str(folder / file))
    weight_map = {k: f for f, keys in halves.items() for k in keys}
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


@pytest.mark.parametrize("sharded", [False, True])
def test_base_norms(tmp_path, sharded):
    mods = {"model.layers.0.q_proj": module(12, 10, 2, seed=1), "model.layers.1.q_proj": module(12, 10, 2, seed=2)}
    mods["model.layers.0.fc"] = module(6, 10, 2, seed=3)
    weights = {
        "model.layers.0.q_proj.weight": torch.randn(12, 10, dtype=torch.bfloat16),
        "model.layers.1.q_proj.weight": torch.randn(12, 10),
        "model.layers.0.q_proj.bias": torch.randn(12),
        "lm_head.weight": torch.randn(3, 10),
    }
    write_base(tmp_path / "base", weights, sharded=sharded)
    result = analyze([adapter(mods, "x")], base=tmp_path / "base").adapters[0]
    for name in ("model.layers.0.q_proj", "model.layers.1.q_proj"):
        w = weights[f"{name}.weight"].double()
        assert result.modules[name].base_norm == pytest.approx(float(w.norm()), rel=1e-12)
        assert result.modules[name].relative_norm == pytest.approx(float(dense(mods[name]).norm() / w.norm()))
    assert result.modules["model.layers.0.fc"].base_norm is None  # not in the checkpoint: left out, noted


def test_base_errors(tmp_path):
    mods = {"model.layers.0.q_proj": module(12, 10, 2, seed=1)}
    with pytest.raises(SourceError, match="base model folder not found"):
        analyze([adapter(mods, "x")], base=tmp_path / "missing")
    write_base(tmp_path / "base", {"model.layers.0.q_proj.weight": torch.randn(10, 12)}, sharded=False)
    with pytest.raises(IncompatibleAdaptersError, match=r"module model\.layers\.0\.q_proj: base weight"):
        analyze([adapter(mods, "x")], base=tmp_path / "base")


def test_mismatched_shapes_refused():
    x = adapter({"m": module(10, 8, 2, seed=1)}, "x")
    y = adapter({"m": module(10, 9, 2, seed=2)}, "y")
    with pytest.raises(IncompatibleAdaptersError, match="module m"):
        analyze([x, y])


# ----------------------------------------------------------------------------------------------- CLI and rendering


@pytest.fixture
def saved(tmp_path) -> list[str]:
    paths = []
    for i in range(3):
        mods = {f"model.layers.{j}.self_attn.{t}": module(16, 12, 4, seed=10 * i + j + len(t)) for j in range(3)
                for t in ("q_proj", "v_proj")}  # fmt: skip
        # exact layout: rank-4 files as they are (the portable layout would pad them with zero directions)
        paths.append(str(save_adapter(adapter(mods, f"ad{i}"), tmp_path / f"ad{i}", rank_layout="exact")))
    return paths


def test_cli_text_json_and_plots(saved, tmp_path):
    pytest.importorskip("matplotlib")
    out = tmp_path / "analysis.json"
    result = CliRunner().invoke(main, ["-q", "analyze", *saved, "--json-file", str(out), "--plot", str(tmp_path / "p")])
    assert result.exit_code == 0, result.output
    assert "Rank use" in result.output and "Overlap, whole adapter" in result.output
    data = json.loads(out.read_text())
    a = data["adapters"][0]
    assert {a["name"], a["source"]} == {"ad0", saved[0]}
    spectrum = a["modules"]["model.layers.0.self_attn.q_proj"]
    assert set(spectrum) >= {"singular_values", "effective_rank", "stable_rank", "energy_rank", "norm"}
    assert set(spectrum["energy_rank"]) == {"0.9", "0.99"} and len(spectrum["singular_values"]) == 4
    assert len(data["pairs"]) == 3
    pair = data["pairs"][0]
    assert (pair["a"], pair["b"]) == ("ad0", "ad1") and isinstance(pair["cosine"], float)
    assert set(pair["modules"]["model.layers.0.self_attn.q_proj"]) >= {"cosine", "phi_a", "phi_b"}
    pngs = sorted(p.name for p in (tmp_path / "p").iterdir())
    assert pngs == ["overlap_layers.png", "overlap_pairs.png", "spectra.png"]


def _poisoned(folder: str, to: Path, names: tuple[str, ...] | None = None) -> str:
    """A copy of the PEFT folder ``folder`` whose factors are NaN (those of modules containing ``names``, or all)."""
    import shutil

    from safetensors.torch import load_file

    shutil.copytree(folder, to)
    tensors = load_file(str(to / "adapter_model.safetensors"))
    for key, value in tensors.items():
        if names is None or any(n in key for n in names):
            tensors[key] = torch.full_like(value, float("nan"))
    save_file(tensors, str(to / "adapter_model.safetensors"))
    return str(to)


def test_cli_nonfinite_adapters_end_in_lines_not_a_trace(saved, tmp_path):
    """--allow-nonfinite: an all-NaN adapter, and one with a NaN module, are analysed as far as they can be; the
    modules left out are named, the rest matches the dense SVD of the clean adapter (float64, 1e-9·σ₁)."""
    pytest.importorskip("matplotlib")
    nan = _poisoned(saved[0], tmp_path / "nan")
    half = _poisoned(saved[1], tmp_path / "half", ("layers.0.self_attn.q_proj",))
    out = tmp_path / "a.json"
    args = ["-q", "analyze", "--allow-nonfinite", nan, half, saved[2], "--plot", str(tmp_path / "p")]
    result = CliRunner().invoke(main, [*args, "--json-file", str(out)])
    assert result.exit_code == 0, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)
    assert "note: nan: 6 modules with NaN/Inf factors" in result.output
    assert (
        "note: half: 1 module with NaN/Inf factors" in result.output
        and "(e.g. model.layers.0.self_attn.q_proj)" in (result.output)
    )
    data = json.loads(out.read_text())
    assert data["adapters"][0]["modules"] == {}
    assert "model.layers.0.self_attn.q_proj" not in data["adapters"][1]["modules"]
    clean = load_adapter(saved[2]).modules
    for name, m in clean.items():
        got = data["adapters"][2]["modules"][name]["singular_values"]
        S = torch.linalg.svdvals(dense(m))[: len(got)]
        assert torch.allclose(torch.tensor(got, dtype=torch.float64), S, atol=TIGHT * float(S[0]), rtol=0)
    assert sorted(p.name for p in (tmp_path / "p").iterdir()) == ["overlap_layers.png", "overlap_pairs.png",
                                                                  "spectra.png"]  # fmt: skip
    alone = CliRunner().invoke(main, ["-q", "analyze", "--allow-nonfinite", nan, "--plot", str(tmp_path / "q")])
    assert alone.exit_code == 0 and "note: nan: 6 modules with NaN/Inf factors" in alone.output, alone.output


def test_cli_json_is_a_flag_and_a_file_is_never_replaced_unasked(saved, tmp_path):
    """--json prints (as for inspect and check); --json-file FILE writes, refusing an existing file before any work
    unless --force; the earlier `--json FILE.json` still writes FILE, with a warning, and `--json -` still prints."""
    cli = CliRunner()
    printed = cli.invoke(main, ["-q", "analyze", *saved[:2], "--json"])
    assert printed.exit_code == 0, printed.output
    data = json.loads(printed.output)
    assert [a["name"] for a in data["adapters"]] == ["ad0", "ad1"] and len(data["pairs"]) == 1
    assert json.loads(cli.invoke(main, ["-q", "analyze", *saved[:2], "--json", "-"]).output) == data
    out = tmp_path / "a.json"
    out.write_text("mine\n")
    refused = cli.invoke(main, ["-q", "analyze", *saved[:2], "--json-file", str(out)])
    assert refused.exit_code == 2 and refused.output == f"error: {out}: file exists (pass --force)\n"
    assert out.read_text() == "mine\n"
    legacy = cli.invoke(main, ["analyze", *saved[:2], "--json", str(out)])
    assert legacy.exit_code == 2 and out.read_text() == "mine\n"
    assert "warning: --json FILE is now --json-file FILE" in legacy.output
    forced = cli.invoke(main, ["-q", "analyze", *saved[:2], "--json-file", str(out), "--force"])
    assert forced.exit_code == 0 and "Rank use" in forced.output and f"wrote {out}" in forced.output
    assert json.loads(out.read_text()) == data
    out.unlink()
    legacy = cli.invoke(main, ["-q", "analyze", "--json", str(out), *saved[:2]])
    assert legacy.exit_code == 0 and "Rank use" in legacy.output and json.loads(out.read_text()) == data


def test_cli_plot_without_matplotlib(saved, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib now raises ImportError
    result = CliRunner().invoke(main, ["-q", "analyze", saved[0], "--plot", str(tmp_path / "p")])
    assert result.exit_code == 2
    assert result.output.strip().splitlines()[-1] == "error: plots need matplotlib: pip install 'loramix[plot]'"


def test_cli_errors_are_one_line(saved, tmp_path):
    result = CliRunner().invoke(main, ["-q", "analyze", saved[0], "--base", str(tmp_path / "nope")])
    assert result.exit_code == 2 and result.output.count("\n") == 1 and "base model folder not found" in result.output


def test_plot_error_is_a_loramix_error(monkeypatch):
    from loramix.render.plots import analysis_plots

    monkeypatch.setitem(sys.modules, "matplotlib", None)
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    result = analyze([adapter({"m": module(6, 5, 2, seed=1)}, "x")])
    with pytest.raises(LoramixError, match="matplotlib"):
        analysis_plots(result)


# ----------------------------------------------------------------------------------------------- real adapters


QWEN = ["qwen05__posttrain_v1", "qwen05__posttrain_v2", "qwen05__inference_engine"]


@pytest.mark.skipif(not all((REAL / n).is_dir() for n in QWEN), reason="shared real adapters absent")
def test_real_qwen_trio():
    """Two training runs of one recipe against an unrelated adapter on Qwen2.5-0.5B (q_proj, v_proj, r=8).

    Reading: the two runs share their input subspace almost exactly (their A factors barely moved from the same
    seeded initialisation) yet write to different output directions, so their ΔW are nearly orthogonal; the
    unrelated adapter sits at chance level on the input side.
    """
    result = analyze([str(REAL / n) for n in QWEN])
    v1, v2, engine = result.adapters
    for a in result.adapters:
        assert len(a.modules) == 48 and a.suggested_rank <= 8
        for m in a.modules.values():
            assert m.numerical_rank == 8 and 1 <= m.effective_rank <= 8 and 1 <= m.stable_rank <= 8
    # spectra agree with the QR route (factor_svd) on every module
    for a, name in zip(result.adapters, QWEN):
        from loramix import load_adapter

        loaded = load_adapter(str(REAL / name))
        for key, m in loaded.modules.items():
            S = factor_svd(m.B.double() * m.scale, m.A).S
            got = torch.tensor(a.modules[key].singular_values, dtype=torch.float64)
            torch.testing.assert_close(got, S, rtol=0, atol=1e-10 * float(S[0]))
    runs, other = result.pairs[0], result.pairs[1]
    assert (runs.a, runs.b) == (v1.name, v2.name) and (other.a, other.b) == (v1.name, engine.name)
    assert runs.overall.phi_a > 0.95  # same A subspace
    assert runs.overall.phi_b < 0.3 and abs(runs.cosine) < 0.2
    for pair in result.pairs[1:]:
        assert pair.overall.phi_a < 2 * pair.overall.phi_a_chance
        assert abs(pair.cosine) < 0.01
    assert 0 < result.merge.truncation_loss < 0.5
    assert 8 < result.merge.suggested_rank <= 24
    # a reading becomes an action: combine --method svd with the same rule gives the rank the analysis predicts,
    # and --rank 8 keeps the share of the exact sum the analysis reports
    sources = [str(REAL / n) for n in QWEN]
    by_rule = combine(
        sources, method="svd", rank_rule=RankRule(energy=0.99), rank_layout="exact"
    )  # portable would widen to 16
    assert max(m.rank for m in by_rule.modules.values()) == result.merge.suggested_rank
    exact, cut = combine(sources, method="cat"), combine(sources, method="svd", rank_rule=RankRule(rank=8))

    def energy(adapter):
        return sum(float(dense(m).square().sum()) for m in adapter.modules.values())

    # combine stores its factors in the inputs' float32: the ratio agrees to float32 rounding, not to 1e-9
    assert energy(cut) / energy(exact) == pytest.approx(1 - result.merge.truncation_loss, abs=1e-6)


def test_cli_base_may_be_a_hub_id(tmp_path, hub_cache):
    """--base takes a Hub id (resolved from the cache here) and gives what the same folder gives."""
    from helpers import make_peft_adapter, publish, tiny_llama

    made = make_peft_adapter(tiny_llama, tmp_path, "a", target_modules=["q_proj", "v_proj"])
    tiny_llama().save_pretrained(str(tmp_path / "base"))
    publish(hub_cache, "org/tiny-llama", tmp_path / "base")
    shown = []
    for base in (str(tmp_path / "base"), "org/tiny-llama"):
        result = CliRunner().invoke(main, ["-q", "analyze", str(made.path), "--base", base, "--json", "-"])
        assert result.exit_code == 0, result.output
        shown.append(json.loads(result.output)["adapters"])
    assert shown[0] == shown[1] and "relative" in json.dumps(shown[0])


# ----------------------------------------------------------------------------------------------- advice


def suggestions(adapters, weights=None) -> list[str]:
    from loramix.analysis.report import analysis_text

    text = analysis_text(analyze(adapters, weights=weights))
    return [line.strip()[2:] for line in text.split("Suggestions", 1)[1].splitlines() if line.strip().startswith("-")]


def pair_line(lines: list[str], a: str, b: str) -> str:
    found = [line for line in lines if line.startswith(f"{a} ~ {b}:")]
    assert len(found) == 1, lines
    return found[0]


def nudged(m: LoraModule, seed: int, size: float, sign: float = 1.0) -> LoraModule:
    g = torch.Generator().manual_seed(seed)
    return LoraModule(A=m.A + size * torch.randn(m.A.shape, generator=g), B=sign * m.B, scale=m.scale)


def test_advice_for_near_duplicates_at_weights_summing_to_one():
    first = module(24, 20, 4, seed=1)
    trio = [
        adapter({"m": first}, "a"),
        adapter({"m": nudged(first, 2, 0.01)}, "b"),
        adapter({"m": nudged(first, 3, 0.01)}, "c"),
    ]
    lines = suggestions(trio)  # default weights 1/3 each
    line = pair_line(lines, "a", "b")
    assert "near-duplicates at weights 0.333 and 0.333" in line
    assert "nothing is over-counted" in line and "ties/dare buy nothing" in line
    assert "over-counts" not in " ".join(lines) and "lower their weights" not in " ".join(lines)
    # the same pair at weights 1 each: the shared direction is applied 3×, and the advice says so
    line = pair_line(suggestions(trio, weights=[1.0, 1.0, 1.0]), "a", "b")
    assert "the weights sum to 3" in line and "applied about 3×" in line and "sum to 1" in line


def test_advice_for_orthogonal_adapters():
    # disjoint output rows and input columns: cosine exactly 0
    first, second = module(24, 20, 2, seed=1), module(24, 20, 2, seed=2)
    first.B[12:], second.B[:12] = 0, 0
    line = pair_line(suggestions([adapter({"m": first}, "a"), adapter({"m": second}, "b")]), "a", "b")
    assert line.startswith("a ~ b: cosine 0.00, nearly orthogonal: an exact sum (cat/svd) keeps both")
    assert "weight 1 each keeps both at full strength" in line  # at 0.5/0.5 each keeps half its effect
    line = pair_line(suggestions([adapter({"m": first}, "a"), adapter({"m": second}, "b")], weights=[1, 1]), "a", "b")
    assert "full strength" not in line and "without interference" in line


def test_advice_for_conflicting_adapters():
    first = module(24, 20, 4, seed=1)
    pair = [adapter({"m": first}, "a"), adapter({"m": nudged(first, 2, 0.3, sign=-1.0)}, "b")]
    line = pair_line(suggestions(pair, weights=[0.6, 0.4]), "a", "b")
    assert line.startswith("a ~ b: cosine -0.") and "conflicting updates at weights 0.6 and 0.4" in line
    assert "cancels" in line and "ties/dare" in line
