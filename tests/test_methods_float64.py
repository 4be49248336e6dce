"""float64 references for the mergekit-family methods, written from their definitions (cited per reference), and
the properties that tie the dense and core paths together.

References work on the out×in task vectors τᵢ = sᵢ·Bᵢ·Aᵢ in float64 with plain loops and sorts, sharing no code with
loramix. Tolerances (relative Frobenius error):
- dense path vs reference: 2e-5 — the dense path forms ΔWᵢ and re-factorises the merge in float32 (SVD rounding
  ≈ 1e-6 relative); ranks and signs are decided on float32 entries, which for these random inputs never tie;
- core path of the spherical methods vs reference: 1e-10 — it is exact (float64 inner products from the factors);
- core path of the element-wise methods vs the reference applied to the cores U_Bᵀ·τᵢ·V_A: 1e-10. There the core path
  is a different merge, not an approximation of the dense one (which entries are kept depends on the coordinates),
  so it is checked against its own definition and shown to differ from the dense merge.
"""

from __future__ import annotations

import math

import pytest
import torch
from click.testing import CliRunner

import loramix.methods.task_arithmetic as task_arithmetic
from loramix.cli import main
from loramix.errors import MethodError
from loramix.linalg import RankRule
from loramix.methods import REGISTRY, Term
from loramix.methods._elementwise import joint_basis

OUT, IN = 24, 20
RANKS = (3, 4, 2)
WEIGHTS = (0.7, 1.3, 0.5)
SCALES = (2.0, 0.5, 1.5)
FULL = RankRule(rank=64)  # ≥ min(out, in): nothing truncated


def _terms(n=3, seed=0, weights=WEIGHTS):
    g = torch.Generator().manual_seed(seed)
    return [
        Term(w * s, torch.randn(OUT, r, generator=g) / 4, torch.randn(r, IN, generator=g) / 4, weight=w)
        for w, s, r in zip(weights[:n], SCALES[:n], RANKS[:n])
    ]


def _tasks(terms, with_weight=False):
    return [(t.coef if with_weight else t.coef / t.weight) * (t.B.double() @ t.A.double()) for t in terms]


def _delta(factors) -> torch.Tensor:
    return factors.B.double() @ factors.A.double()


def _close(got, expected, tol):
    error = float((got - expected).norm() / expected.norm())
    assert error <= tol, f"relative error {error:.3g} > {tol:g}"


def _uniform(shape) -> torch.Tensor:
    return torch.rand(tuple(shape), generator=torch.Generator().manual_seed(3), dtype=torch.float64)


@pytest.fixture
def fixed_draws(monkeypatch):
    """DELLA's draws replaced by keep-iff-U<p with one fixed uniform field U, which the references use too."""
    monkeypatch.setattr(task_arithmetic, "random_mask", lambda shape, probs, generator: _uniform(shape) < probs)


# ------------------------------------------------------------------- references: generalized task arithmetic


def ref_breadcrumbs_mask(task, density, gamma):
    """Davari & Belilovsky 2023 (arXiv:2312.06795) as mergekit's magnitude_outliers: of the entries sorted by
    magnitude, drop the ⌊gamma·n⌋ largest and keep the ⌊density·n⌋ just below them."""
    flat = [abs(float(x)) for x in task.reshape(-1)]
    order = sorted(range(len(flat)), key=flat.__getitem__)
    n = len(flat)
    keep_n = int(density * n)
    start = max(0, n - keep_n - int(gamma * n))
    mask = torch.zeros(n, dtype=torch.float64)
    for j in order[start : start + keep_n]:
        mask[j] = 1
    return mask.view_as(task)


def ref_della_mask(task, density, epsilon):
    """Deep et al. 2024 (arXiv:2406.11617) MagPrune as mergekit's della_magprune: in each row, pⱼ = density − ε +
    2ε·(rankⱼ − 1)/(in − 1) by ascending magnitude rank; keep iff U < p (U: the fixed field)."""
    probs = torch.empty_like(task)
    for i, row in enumerate(task):
        order = sorted(range(len(row)), key=lambda j: abs(float(row[j])))
        for rank, j in enumerate(order):
            probs[i, j] = density - epsilon + 2 * epsilon * rank / (len(row) - 1)
    return (_uniform(task.shape) < probs).double()


def ref_task_arithmetic(tasks, weights, masks, *, consensus, normalize, rescale, lam):
    """mergekit's GeneralizedTaskArithmeticMerge.merge_group, entry by entry (TIES consensus: Yadav et al. 2023)."""
    deltas = []
    for task, mask, w in zip(tasks, masks, weights):
        kept = task * mask
        if rescale and kept.abs().sum() > 0:
            kept = kept * task.abs().sum() / kept.abs().sum()
        deltas.append(w * kept)
    out = torch.zeros_like(tasks[0])
    for a in range(out.shape[0]):
        for b in range(out.shape[1]):
            values = [float(d[a, b]) for d in deltas]
            if consensus:
                sign = 1.0 if sum(values) >= 0 else -1.0
                chosen = [(v, w) for v, w in zip(values, weights) if v != 0 and math.copysign(1, v) == sign]
                total, divisor = sum(v for v, _ in chosen), sum(w for _, w in chosen) or 1.0
            else:
                total, divisor = sum(values), (sum(weights) if abs(sum(weights)) >= 1e-8 else 1.0)
            out[a, b] = (total / divisor if normalize else total) * lam
    return out


def ref_sce(tasks, select_topk):
    """Wan et al. 2024 (FuseChat, arXiv:2408.07990) as mergekit's sce_merge: select top-variance entries, weights from
    mean squares, erase minority signs, weighted mean."""
    stack = torch.stack(tasks)
    if select_topk < 1:
        var = ((stack - stack.mean(0)) ** 2).mean(0).reshape(-1)
        k = int(int((var != 0).sum()) * select_topk)
        keep = torch.zeros_like(var)
        keep[sorted(range(len(var)), key=lambda j: -float(var[j]))[:k]] = 1
        stack = stack * keep.view(stack.shape[1:])
    energy = [float((t**2).mean()) for t in stack]
    weights = [e / sum(energy) for e in energy]
    out = torch.zeros_like(tasks[0])
    for a in range(out.shape[0]):
        for b in range(out.shape[1]):
            values = [float(t[a, b]) for t in stack]
            sign = 1.0 if sum(values) >= 0 else -1.0
            chosen = [(v, w) for v, w in zip(values, weights) if v != 0 and math.copysign(1, v) == sign]
            out[a, b] = sum(v * w for v, w in chosen) / max(sum(w for _, w in chosen), 1e-6)
    return out


ELEMENTWISE = {
    "breadcrumbs": (dict(density=0.7, gamma=0.05, lam=1.0, normalize=False, rescale=False), False),
    "breadcrumbs_ties": (dict(density=0.7, gamma=0.05, lam=0.8, normalize=True, rescale=True), True),
    "della": (dict(density=0.5, epsilon=0.2, lam=1.0, normalize=True, rescale=True), True),
    "della_linear": (dict(density=0.5, epsilon=0.2, lam=1.2, normalize=False, rescale=True), False),
}


def _elementwise_reference(name, tasks, weights):
    settings, consensus = ELEMENTWISE[name]
    if name.startswith("della"):
        masks = [ref_della_mask(t, settings["density"], settings["epsilon"]) for t in tasks]
    else:
        masks = [ref_breadcrumbs_mask(t, settings["density"], settings["gamma"]) for t in tasks]
    return ref_task_arithmetic(
        tasks,
        weights,
        masks,
        consensus=consensus,
        normalize=settings["normalize"],
        rescale=settings["rescale"],
        lam=settings["lam"],
    )


def _elementwise_options(name):
    settings = dict(ELEMENTWISE[name][0])
    settings["lambda"] = settings.pop("lam")
    return settings


def _cores(terms, tasks):
    U = joint_basis(torch.cat([t.B.double() for t in terms], dim=1))
    V = joint_basis(torch.cat([t.A.double() for t in terms], dim=0).T)
    return U, [U.T @ t @ V for t in tasks], V


@pytest.mark.parametrize("name", list(ELEMENTWISE))
def test_elementwise_dense_and_core_equal_their_references(name, fixed_draws):
    terms = _terms()
    tasks, weights = _tasks(terms), list(WEIGHTS)
    options = _elementwise_options(name)
    dense = _delta(REGISTRY[name].apply(terms, rule=FULL, **options))
    _close(dense, _elementwise_reference(name, tasks, weights), 2e-5)
    U, cores, V = _cores(terms, tasks)
    core = _delta(REGISTRY[name].apply(terms, rule=FULL, space="core", **options))
    _close(core, U @ _elementwise_reference(name, cores, weights) @ V.T, 1e-10)
    assert float((core - dense).norm() / dense.norm()) > 1e-3  # a different merge, not a rounding of the dense one


@pytest.mark.parametrize("select_topk", [1.0, 0.4])
def test_sce_dense_and_core_equal_the_reference(select_topk):
    terms = _terms()
    tasks = _tasks(terms, with_weight=True)  # SCE weighs tasks itself: weights multiply the task vectors
    _close(_delta(REGISTRY["sce"].apply(terms, rule=FULL, select_topk=select_topk)), ref_sce(tasks, select_topk), 2e-5)
    U, cores, V = _cores(terms, tasks)
    core = _delta(REGISTRY["sce"].apply(terms, rule=FULL, select_topk=select_topk, space="core"))
    _close(core, U @ ref_sce(cores, select_topk) @ V.T, 1e-10)


def test_full_density_is_the_weighted_sum():
    """With density 1 nothing is dropped (and no outliers either): the linear variants are Σ wᵢ·τᵢ (Task Arithmetic)."""
    terms = _terms()
    exact = sum(w * t for w, t in zip(WEIGHTS, _tasks(terms)))
    for name in ("breadcrumbs", "della_linear"):
        for space in ("dense", "core"):
            merged = REGISTRY[name].apply(terms, rule=FULL, density=1.0, rescale=False, space=space)
            _close(_delta(merged), exact, 2e-6 if space == "dense" else 1e-12)


def test_della_is_seeded_per_module():
    terms = _terms()
    first, again = (_delta(REGISTRY["della"].apply(terms, rule=FULL, seed=5)) for _ in range(2))
    assert torch.equal(first, again)
    other = _delta(REGISTRY["della"].apply(terms, rule=FULL, seed=6))
    assert float((other - first).norm() / first.norm()) > 1e-2


# --------------------------------------------------------------------------------- references: spherical


def ref_slerp(t, v0, v1, threshold=0.9995):
    """Shoemake 1985, over the whole matrix (mergekit nuslerp with nuslerp_flatten, slerp's dot threshold)."""
    cos = float((v0 * v1).sum() / (v0.norm() * v1.norm()))
    if abs(cos) > threshold:
        return (1 - t) * v0 + t * v1
    theta = math.acos(max(-1.0, min(1.0, cos)))
    return (math.sin((1 - t) * theta) * v0 + math.sin(t * theta) * v1) / math.sin(theta)


def ref_multislerp(tasks, weights):
    """Goddard 2025 (mergekit multislerp): tangent-space barycentre at the weighted mean direction, exp map back."""
    eps = 1e-8  # mergekit's guard, in the norms of the units and of the tangent
    w = [x / sum(weights) for x in weights]
    units = [t / (t.norm() + eps) for t in tasks]
    mean = sum(a * u for a, u in zip(w, units))
    mean = mean / mean.norm()
    tangent = sum(a * (u - (u * mean).sum() * mean) for a, u in zip(w, units))
    size = tangent.norm() + eps
    point = mean * torch.cos(size) + tangent * torch.sin(size) / size
    return point * sum(a * t.norm() for a, t in zip(w, tasks))


def ref_karcher(tasks, weights, steps=10, tol=1e-5):
    """Weighted Karcher mean on the unit sphere (Karcher 1977; mergekit karcher): gradient steps along
    Σ αᵢ·log_m(uᵢ), scaled by Σ αᵢ‖τᵢ‖."""
    alpha = [x / sum(weights) for x in weights]
    units = [t / t.norm() for t in tasks]
    mean = sum(a * u for a, u in zip(alpha, units))
    mean = mean / mean.norm()
    for _ in range(steps):
        tangent = torch.zeros_like(mean)
        for a, u in zip(alpha, units):
            cos = float((mean * u).sum().clamp(-1, 1))
            theta = math.acos(cos)
            if theta >= tol:
                tangent = tangent + a * theta / math.sin(theta) * (u - cos * mean)
        size = tangent.norm()
        if size < tol:
            break
        mean = torch.cos(size) * mean + torch.sin(size) * tangent / size
        mean = mean / mean.norm()
    return mean * sum(a * t.norm() for a, t in zip(alpha, tasks))


def ref_model_stock(tasks, filter_wise=False):
    """Jang et al. 2024 (arXiv:2403.19522) as mergekit's model_stock, relative to the base: t·mean τᵢ with
    t = N·cos/(1 + (N−1)·cos), cos the mean pairwise cosine (of whole matrices, or row by row)."""
    n = len(tasks)
    rows = [t.unsqueeze(0).reshape(1, -1) if not filter_wise else t for t in tasks]
    pairs = [(i, k) for i in range(n) for k in range(i + 1, n)]
    cos = sum((rows[i] * rows[k]).sum(-1) / (rows[i].norm(dim=-1) * rows[k].norm(dim=-1)) for i, k in pairs) / len(
        pairs
    )
    t = n * cos / (1 + (n - 1) * cos)
    mean = sum(tasks) / n
    return t.reshape(-1, 1) * mean if filter_wise else float(t) * mean


def ref_nuslerp_rows(t, v0, v1):
    """mergekit nuslerp without flattening: each row (the input dimension) slerped on its own."""
    return torch.stack([ref_slerp(t, a, b, threshold=1.0) for a, b in zip(v0, v1)])


SPHERICAL = {
    "slerp": (2, dict(t=0.3), lambda terms: ref_slerp(0.3, *_tasks(terms, with_weight=True))),
    "nuslerp": (2, {}, lambda terms: ref_slerp(WEIGHTS[1] / sum(WEIGHTS[:2]), *_tasks(terms), threshold=1.0)),
    "nuslerp_rows": (
        2,
        dict(nuslerp_flatten=False),
        lambda terms: ref_nuslerp_rows(WEIGHTS[1] / sum(WEIGHTS[:2]), *_tasks(terms)),
    ),
    "nuslerp_columns": (
        2,
        dict(nuslerp_flatten=False, nuslerp_row_wise=True),
        lambda terms: ref_nuslerp_rows(WEIGHTS[1] / sum(WEIGHTS[:2]), *(t.T for t in _tasks(terms))).T,
    ),
    "multislerp": (3, {}, lambda terms: ref_multislerp(_tasks(terms), list(WEIGHTS))),
    "karcher": (3, {}, lambda terms: ref_karcher(_tasks(terms), list(WEIGHTS))),
    "model_stock": (3, {}, lambda terms: ref_model_stock(_tasks(terms, with_weight=True))),
    "model_stock_filter_wise": (
        3,
        dict(filter_wise=True),
        lambda terms: ref_model_stock(_tasks(terms, with_weight=True), filter_wise=True),
    ),
}


@pytest.mark.parametrize("case", list(SPHERICAL))
def test_spherical_dense_and_core_equal_the_reference(case):
    n, options, reference = SPHERICAL[case]
    method = REGISTRY[case.split("_rows")[0].split("_columns")[0].replace("_filter_wise", "")]
    terms = _terms(n)
    expected = reference(terms)
    _close(_delta(method.apply(terms, rule=FULL, space="dense", **options)), expected, 2e-5)
    _close(_delta(method.apply(terms, rule=FULL, space="core", **options)), expected, 1e-10)


def test_core_space_never_forms_an_out_by_in_matrix(monkeypatch):
    """The core path of every spherical method works on factors alone: no tensor of out×in entries."""
    original = torch.Tensor.__matmul__

    def guarded(a, b):
        result = original(a, b)
        assert tuple(result.shape[-2:]) != (OUT, IN), "an out×in matrix was formed"
        return result

    monkeypatch.setattr(torch.Tensor, "__matmul__", guarded)
    for name, n in (("slerp", 2), ("nuslerp", 2), ("multislerp", 3), ("karcher", 3), ("model_stock", 3)):
        REGISTRY[name].apply(_terms(n), rule=RankRule(rank=4), space="core")


def test_slerp_endpoints_and_karcher_stationarity():
    two = _terms(2, weights=(1.0, 1.0))
    tasks = _tasks(two, with_weight=True)
    for t, expected in ((0.0, tasks[0]), (1.0, tasks[1])):
        _close(_delta(REGISTRY["slerp"].apply(two, rule=FULL, t=t)), expected, 1e-10)
    # Karcher 1977: at the mean m, Σ αᵢ·log_m(uᵢ) = 0 (run to convergence)
    terms = _terms()
    merged = _delta(REGISTRY["karcher"].apply(terms, rule=FULL, max_iter=200, tol=1e-12))
    m = merged / merged.norm()
    alpha = [w / sum(WEIGHTS) for w in WEIGHTS]
    gradient = torch.zeros_like(m)
    for a, task in zip(alpha, _tasks(terms)):
        u = task / task.norm()
        cos = float((m * u).sum())
        theta = math.acos(cos)
        gradient += a * theta / math.sin(theta) * (u - cos * m)
    assert float(gradient.norm()) < 1e-9


def test_model_stock_of_equal_updates_is_their_mean():
    """cos = 1 gives t = 1: the merge is the mean itself (Jang et al. 2024, eq. for t)."""
    term = _terms(1)[0]
    merged = _delta(REGISTRY["model_stock"].apply([term, term, term], rule=FULL))
    _close(merged, term.coef * (term.B.double() @ term.A.double()), 1e-10)


@pytest.mark.parametrize(
    "name, terms, options, message",
    [
        ("slerp", 3, {}, "interpolates two adapters"),
        ("nuslerp", 1, {}, "interpolates two adapters"),
        ("model_stock", 1, {}, "at least two adapters"),
        ("della", 3, {"density": 0.1, "epsilon": 0.2}, "density ± epsilon"),
        ("breadcrumbs", 3, {"gamma": 2}, "gamma must be a number in [0, 1]"),
        ("slerp", 2, {"t": 1.5}, "t must be a number in [0, 1]"),
        ("nuslerp", 2, {"nuslerp_flatten": "yes"}, "nuslerp_flatten must be true or false"),
        ("karcher", 3, {"max_iter": -1}, "max_iter must be a non-negative integer"),
    ],
)
def test_bad_inputs_are_one_line_method_errors(name, terms, options, message):
    with pytest.raises(MethodError, match=message.replace("[", r"\[").replace("]", r"\]")):
        REGISTRY[name].apply(_terms(terms), rule=FULL, **options)


def test_methods_lists_mergekit_option_names():
    """`loramix methods` lists options as mergekit spells them (``lambda``, not the parameter ``lambda_``)."""
    output = CliRunner().invoke(main, ["methods"]).output
    for name in ("breadcrumbs", "breadcrumbs_ties", "della", "della_linear", "sce", "slerp", "nuslerp"):
        assert f"\n{name} " in output
    assert "lambda=1.0" in output and "lambda_" not in output
    assert "epsilon=0.15" in output and "nuslerp_flatten=True" in output and "select_topk=1.0" in output
    assert REGISTRY["della"].apply(_terms(), rule=FULL, **{"lambda": 0.0}).B.abs().max() == 0


def test_a_module_one_adapter_lacks_is_its_zero_task_vector():
    """summarize has no o_proj: slerp(0, τ) = sin(tπ/2)·τ there (cos θ = 0, θ = π/2), as mergekit computes for a model
    that left the weight alone; where both have the module it is the two-vector slerp."""
    import loramix
    from loramix.examples import path

    first, second = loramix.load_adapter(path("summarize")), loramix.load_adapter(path("formal"))
    merged = loramix.combine([first, second], weights=[1.0, 1.0], method="slerp", t=0.3, device="cpu")
    only = [n for n in second.modules if n not in first.modules]
    assert only
    for name in only:
        expected = math.sin(0.3 * math.pi / 2) * second.modules[name].delta(dtype=torch.float64)
        _close(merged.modules[name].delta(dtype=torch.float64), expected, 1e-6)
    name = next(n for n in first.modules if n in second.modules)
    pair = [a.modules[name].delta(dtype=torch.float64) for a in (first, second)]
    _close(merged.modules[name].delta(dtype=torch.float64), ref_slerp(0.3, *pair), 1e-6)
