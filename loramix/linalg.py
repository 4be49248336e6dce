"""Factor-space linear algebra: SVD of B·A without forming it, rank choices, subspace measures.

For ΔW = B·A with B out×R and A R×in: orthonormalise both factors (B = Q_B R_B, Aᵀ = Q_A R_A), take the SVD of
the R×R core R_B R_Aᵀ = U Σ Vᵀ; then ΔW = (Q_B U) Σ (Q_A V)ᵀ. Cost O((out+in)·R²). Cores are computed in float64.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from loramix.errors import ArgumentError, SettingError
from loramix.lazy import lazy
from loramix.settings import KOHYA_RULES, KohyaRule

torch = lazy("torch")


@dataclass
class Factors:
    """What every merge method returns: factors ``B`` (out×k) and ``A`` (k×in) whose product is the merged ΔW, and,
    for a method that truncated a spectrum, ``kept`` — the share of the untruncated result's Σσ² that B·A holds
    (then ‖ΔW_full − B·A‖/‖ΔW_full‖ = √(1 − kept), Eckart–Young). ``kept`` is None when nothing was truncated by a
    rule (exact methods, mixing). Unpacks as ``B, A = factors``."""

    B: torch.Tensor
    A: torch.Tensor
    kept: float | None = None

    def __iter__(self):
        return iter((self.B, self.A))

    @property
    def relative_error(self) -> float | None:
        """‖ΔW_full − B·A‖_F / ‖ΔW_full‖_F of the truncation, from ``kept``."""
        return None if self.kept is None else math.sqrt(max(0.0, 1.0 - self.kept))


@dataclass
class FactorSVD:
    """ΔW = U · diag(S) · Vh with orthonormal U (out×k) and Vh (k×in), S descending."""

    U: torch.Tensor
    S: torch.Tensor
    Vh: torch.Tensor

    def factors(self, k: int) -> Factors:
        """Balanced rank-k factors (B, A) with B·A the best rank-k approximation (Eckart–Young), and the share of
        Σσ² they keep."""
        root = self.S[:k].sqrt()
        return Factors(self.U[:, :k] * root, root[:, None] * self.Vh[:k], kept=kept_share(self.S, k))


def kept_share(S: torch.Tensor, k: int) -> float:
    """Σ_{i<k} σᵢ² / Σ σᵢ² (1 for a zero spectrum), computed in float64."""
    energy = S.to(torch.float64).square()
    total = float(energy.sum())
    return float(energy[:k].sum()) / total if total > 0 else 1.0


def factor_svd(B: torch.Tensor, A: torch.Tensor, *, dtype: torch.dtype | None = None) -> FactorSVD:
    """Thin SVD of B·A (B out×R, A R×in) from the factors alone.

    The tall products stay on the factors' device (matrix products only, which a GPU does fast); the R×R
    decompositions run on the CPU, where they take microseconds instead of a GPU solver's launch latency.
    Computes in ``dtype`` (default float64).
    """
    dtype = dtype or torch.float64
    (q_b, r_b), (q_a, r_a) = orthonormal_bases(B.to(dtype), A.to(dtype).T)
    u, s, vh = torch.linalg.svd((r_b @ r_a.T).cpu(), full_matrices=False)
    device = B.device
    return FactorSVD(q_b @ u.to(device), s.to(device), vh.to(device) @ q_a.T)


def orthonormal_bases(*tall: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """For each X (n×R, all with the same R): X = Q·R with orthonormal Q (n×k) over X's numerical column space.

    A rank-revealing pass (one batched eigh of the Gram matrices XᵀX: directions with σ ≤ σ₁·√(n·eps) are
    dropped) followed by a Cholesky pass that restores orthonormality to working precision, as CholeskyQR2 does.
    """
    grams = torch.stack([(X.T @ X) for X in tall]).cpu()
    eigenvalues, eigenvectors = torch.linalg.eigh(grams)
    return _refine([_eigh_pass(X, lam, V) for X, lam, V in zip(tall, eigenvalues, eigenvectors)])


def _eigh_pass(X: torch.Tensor, lam: torch.Tensor, V: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    V, lam = _kept_eigenpairs(lam, V, max(X.shape))
    if lam.numel() == 0:  # X is zero: one orthonormal direction with a zero coefficient, as QR gives
        q = torch.zeros(X.shape[0], 1, dtype=X.dtype, device=X.device)
        q[0, 0] = 1
        return q, torch.zeros(1, X.shape[1], dtype=X.dtype, device=X.device)
    root = lam.sqrt()
    return X @ (V / root).to(X.device), (root[:, None] * V.T).to(X.device)


def _refine(pairs: list[tuple[torch.Tensor, torch.Tensor]]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Re-orthonormalise nearly orthonormal qs (qᵀq = LLᵀ ≈ I): q·L⁻ᵀ, with Lᵀ·r keeping the product.

    All the small Cholesky factors come from one block-diagonal matrix: one transfer each way, one solve.
    """
    blocks = torch.block_diag(*[q.T @ q for q, _ in pairs]).cpu()
    L = torch.linalg.cholesky(blocks)
    inverse_t = torch.linalg.solve_triangular(L, torch.eye(L.shape[0], dtype=L.dtype), upper=False).T
    device = pairs[0][0].device
    L_t, inverse_t = L.T.to(device), inverse_t.to(device)
    out, at = [], 0
    for q, r in pairs:
        k = q.shape[1]
        block = slice(at, at + k)
        out.append((q @ inverse_t[block, block], L_t[block, block] @ r))
        at += k
    return out


def numerical_rank(S: torch.Tensor, shape: tuple[int, int]) -> int:
    """Singular values above max(shape)·eps·σ₁ (numpy's matrix_rank rule) for S's dtype."""
    if S.numel() == 0 or S[0] <= 0:
        return 0
    tol = S[0] * max(shape) * torch.finfo(S.dtype).eps
    return int((S > tol).sum())


@dataclass(frozen=True)
class RankRule:
    """How to truncate a spectrum: a fixed ``rank``, an ``energy`` share of Σσ², or a kohya rule.

    Kohya rules (from kohya-ss resize_lora): ``sv_ratio`` keeps σᵢ > σ₁/value; ``sv_fro`` keeps the smallest k
    whose retained Frobenius norm is ≥ value·‖ΔW‖_F (i.e. energy value²); ``sv_cumulative`` keeps the smallest k
    with Σ_{i≤k} σᵢ ≥ value·Σσ. ``rank`` also caps the rule-chosen rank. With no rule and no rank, all nonzero
    directions are kept (the numerical rank). ``conv_rank`` takes the place of ``rank`` in conv modules whose kernel
    is not 1×1 (`for_kernel`), as kohya's ``--new_conv_rank`` does for 3×3 convs (sd-scripts networks/resize_lora.py;
    its code tests for a 4-D lora_down, which also catches 1×1 convs, while its help and the trainer's ``conv_dim``
    mean k×k convs only: loramix follows the latter).
    """

    rank: int | None = None
    energy: float | None = None
    rule: KohyaRule | None = None
    rule_value: float | None = None
    conv_rank: int | None = None

    @classmethod
    def given(cls, rule: RankRule | None, *, conv: bool = True) -> RankRule:
        """The rule a public function was passed (None: none, ``RankRule()``); refused in one line if it is no
        `RankRule`, or, where the function has no conv modules to cap (not ``conv``), if it sets ``conv_rank``."""
        if rule is None:
            return cls()
        if not isinstance(rule, RankRule):
            raise ArgumentError(f"rank_rule must be a loramix.RankRule (RankRule(rank=16)), got {type(rule).__name__}")
        if rule.conv_rank is not None and not conv:
            raise SettingError("`conv_rank` caps the conv modules of a combine or a conversion; give `rank` here")
        return rule

    def __post_init__(self) -> None:
        for label, value, kinds in (
            ("rank", self.rank, int),
            ("conv_rank", self.conv_rank, int),
            ("energy", self.energy, float),
            ("rule_value", self.rule_value, float),
        ):
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, kinds))):
                raise SettingError(f"{label} must be {'an int' if kinds is int else 'a number'}, got {value!r}")
        for label, rank in (("rank", self.rank), ("conv_rank", self.conv_rank)):
            if rank is not None and rank < 1:
                raise SettingError(f"{label} must be at least 1, got {rank}")
        if self.energy is not None and not 0 < self.energy <= 1:
            raise SettingError(f"energy must be in (0, 1], got {self.energy}")
        if self.rule_value is not None and self.rule is None:
            raise SettingError(
                f"a rule value ({self.rule_value:g}) is given without a rule (sv_ratio, sv_fro, sv_cumulative)"
            )
        if self.energy is not None and self.rule is not None:
            raise SettingError("give either `energy` or a kohya `rule`, not both")
        if self.rule is not None:
            if self.rule not in KOHYA_RULES:
                raise SettingError(f"unknown rank rule {self.rule!r}; choose from {', '.join(KOHYA_RULES)}")
            if self.rule_value is None or self.rule_value <= 0:
                raise SettingError(f"rule {self.rule} needs a positive value")
            if self.rule != "sv_ratio" and self.rule_value > 1:
                raise SettingError(f"rule {self.rule} takes a value in (0, 1], got {self.rule_value}")

    def keywords(self, conv: bool = False) -> dict:
        """The rule as flat settings (``rank``, ``energy``, ``rule``, ``rule_value``; with ``conv``, ``conv_rank``
        too): what a recipe and a search's settings record."""
        named = {"rank": self.rank, "energy": self.energy, "rule": self.rule, "rule_value": self.rule_value}
        return {**named, "conv_rank": self.conv_rank} if conv else named

    def for_kernel(self, kernel_size: tuple[int, ...]) -> RankRule:
        """The rule for a module with this conv ``kernel_size`` (() for a linear layer): ``conv_rank`` in place of
        ``rank`` for a kernel other than 1×1 when one is given; else this rule. The result has no ``conv_rank``."""
        conv = bool(kernel_size) and any(k != 1 for k in kernel_size)
        rank = self.conv_rank if conv and self.conv_rank is not None else self.rank
        return RankRule(rank=rank, energy=self.energy, rule=self.rule, rule_value=self.rule_value)

    def choose(self, S: torch.Tensor, shape: tuple[int, int]) -> int:
        """The rank to keep for spectrum ``S`` (descending) of a matrix of ``shape``; at least 1."""
        live = max(numerical_rank(S, shape), 1)
        if self.energy is not None:
            k = _share_rank(S.square(), self.energy)
        elif self.rule == "sv_ratio":
            k = int((S > S[0] / self.rule_value).sum())
        elif self.rule == "sv_fro":
            k = _share_rank(S.square(), self.rule_value**2)
        elif self.rule == "sv_cumulative":
            k = _share_rank(S, self.rule_value)
        else:
            k = live
        k = min(max(k, 1), live)
        return k if self.rank is None else min(k, self.rank)

    def describe(self) -> str:
        parts = []
        if self.energy is not None:
            parts.append(f"energy {self.energy:g}")
        if self.rule is not None:
            parts.append(f"{self.rule} {self.rule_value:g}")
        if self.rank is not None:
            parts.append(f"rank ≤ {self.rank}" if parts else f"rank {self.rank}")
        if self.conv_rank is not None:
            spectral = self.energy is not None or self.rule is not None
            parts.append(f"conv rank ≤ {self.conv_rank}" if spectral else f"conv rank {self.conv_rank}")
        return ", ".join(parts) or "full numerical rank"


def _share_rank(values: torch.Tensor, share: float) -> int:
    """Smallest k with Σ_{i<k} values ≥ share·Σ values (values descending, non-negative)."""
    total = values.sum()
    if total <= 0:
        return 1
    cumulative = values.cumsum(0) / total
    # a relative slack of a few ulps so that share=1 keeps exactly the nonzero part
    return int((cumulative < share - 4 * torch.finfo(values.dtype).eps).sum()) + 1


def effective_rank(S: torch.Tensor) -> float:
    """Roy–Vetterli effective rank: exp of the entropy of σᵢ/Σσ."""
    p = S[S > 0] / S.sum()
    return float(torch.exp(-(p * p.log()).sum())) if p.numel() else 0.0


def stable_rank(S: torch.Tensor) -> float:
    """Σσ² / σ₁²."""
    return float(S.square().sum() / S[0].square()) if S.numel() and S[0] > 0 else 0.0


# ----------------------------------------------------------------------------------------------- subspace measures


def factor_inner(B1: torch.Tensor, A1: torch.Tensor, B2: torch.Tensor, A2: torch.Tensor) -> float:
    """Frobenius inner product ⟨B₁A₁, B₂A₂⟩ = tr((B₁ᵀB₂)(A₂A₁ᵀ)) from the factors in float64, O((out+in)·r₁r₂)."""
    B1, A1, B2, A2 = (t.to(torch.float64) for t in (B1, A1, B2, A2))
    return float(((B1.T @ B2) * (A1 @ A2.T)).sum())


def svd_inner(S1: torch.Tensor, cross_u: torch.Tensor, cross_v: torch.Tensor, S2: torch.Tensor) -> torch.Tensor:
    """⟨U₁ diag(S₁) V₁ᵀ, U₂ diag(S₂) V₂ᵀ⟩_F from ``cross_u = U₁ᵀU₂`` and ``cross_v = V₁ᵀV₂`` (batched)."""
    return (S1[..., :, None] * cross_u * cross_v * S2[..., None, :]).sum((-2, -1))


def subspace_similarity(cross: torch.Tensor, k1=None, k2=None) -> torch.Tensor:
    """The LoRA paper's φ = ‖Q₁ᵀQ₂‖_F² / min(k₁, k₂) for orthonormal bases, from ``cross = Q₁ᵀQ₂`` (batched).

    ``k1``/``k2`` default to cross's shape (give them when blocks are zero-padded). 1 when the smaller subspace lies
    inside the larger, 0 when they are orthogonal, about max(k₁, k₂)/n for random subspaces of an n-space.
    """
    k1 = cross.shape[-2] if k1 is None else k1
    k2 = cross.shape[-1] if k2 is None else k2
    return cross.square().sum((-2, -1)) / torch.minimum(torch.as_tensor(k1), torch.as_tensor(k2))


def principal_angles(cross: torch.Tensor) -> torch.Tensor:
    """Principal angles (radians, ascending) between subspaces from ``cross = Q₁ᵀQ₂`` (batched): arccos of its
    singular values, min(k₁, k₂) of them (zero-padded blocks add angles of π/2 at the end)."""
    return torch.arccos(torch.linalg.svdvals(cross).clamp(-1.0, 1.0))


def projected_share(S: torch.Tensor, cross_u: torch.Tensor, cross_v: torch.Tensor) -> torch.Tensor:
    """Share of ‖X‖_F² (X = U diag(S) Vᵀ) lying in other subspaces on both sides: ‖P_out X P_in‖² / ‖X‖² (batched).

    ``cross_u = UᵀQ_out`` and ``cross_v = VᵀQ_in`` for orthonormal bases Q_out (output side) and Q_in (input side).
    """
    inside = (cross_u.mT @ (S[..., :, None] * cross_v)).square().sum((-2, -1))
    return inside / S.square().sum(-1)


def psd_root(gram: torch.Tensor) -> torch.Tensor:
    """L with L·Lᵀ = gram for a symmetric positive semi-definite matrix: Cholesky (backward stable when it
    completes), or from the SVD where Cholesky breaks down on a singular gram."""
    root, info = torch.linalg.cholesky_ex(gram)
    if int(info) == 0:
        return root
    u, s, _ = torch.linalg.svd(gram)
    return u * s.sqrt()


def stacked_singular_values(gram_u: torch.Tensor, coef: torch.Tensor, gram_v: torch.Tensor) -> torch.Tensor:
    """Singular values (descending) of U·diag(coef)·Vᵀ from the Gram matrices ``gram_u = UᵀU``, ``gram_v = VᵀV``.

    U has the same singular values as L_Uᵀ for any L_U·L_Uᵀ = UᵀU, so the values are those of the K×K core
    L_Uᵀ·diag(coef)·L_V. Cost O(K³), independent of out and in. Values near zero carry an absolute error of about
    √eps·σ₁ (a Gram squares the conditioning); shares of Σσ² are accurate to about eps.
    """
    return torch.linalg.svdvals(psd_root(gram_u).T @ (coef[:, None] * psd_root(gram_v)))


@dataclass
class GramSVD:
    """The SVD of s·B·A in factor coordinates: U = B·M and V = Aᵀ·N are orthonormal, ΔW = U·diag(S)·Vᵀ.

    ``S`` holds every singular value of the core (descending); ``M`` and ``N`` only the first ``rank`` directions,
    the numerical rank.
    """

    M: torch.Tensor
    S: torch.Tensor
    N: torch.Tensor

    @property
    def rank(self) -> int:
        return self.M.shape[1]


def _kept_eigenpairs(lam: torch.Tensor, vec: torch.Tensor, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The eigenpairs of a factor's Gram above the matrix_rank tolerance (size·eps·λ₁): (vectors, values)."""
    keep = lam > lam.max().clamp(min=0) * size * torch.finfo(lam.dtype).eps
    return vec[:, keep], lam[keep]


def _gram_range(gram: torch.Tensor, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Eigenvectors and eigenvalues of a factor's Gram above the matrix_rank tolerance (size·eps·λ₁)."""
    lam, vec = torch.linalg.eigh(gram)
    return _kept_eigenpairs(lam, vec, size)


def gram_svd(gram_b: torch.Tensor, gram_a: torch.Tensor, shape: tuple[int, int], *, scale: float = 1.0) -> GramSVD:
    """SVD of scale·B·A (shape out×in) from the r×r Grams ``gram_b = BᵀB`` and ``gram_a = A·Aᵀ`` alone.

    With BᵀB = E_B Λ_B E_Bᵀ, B = Q_B·Λ_B^½E_Bᵀ for an orthonormal Q_B = B·E_BΛ_B^-½ (likewise A), so the core is
    Λ_B^½ E_Bᵀ E_A Λ_A^½ (r×r) and U = B·E_BΛ_B^-½·u. One Gram product per factor instead of two QRs: the fast
    route for many tall factors. Directions of B or A below the matrix_rank tolerance are dropped, and the
    numerical rank of ΔW applies numpy's rule to ΔWᵀΔW (σᵢ² > max(out, in)·eps·σ₁²), the resolution a Gram has.
    """
    vec_b, lam_b = _gram_range(gram_b, max(gram_b.shape[0], shape[0]))
    vec_a, lam_a = _gram_range(gram_a, max(gram_a.shape[0], shape[1]))
    root_b, root_a = lam_b.sqrt(), lam_a.sqrt()
    core = (vec_b * root_b).T @ (vec_a * root_a)
    u, S, vh = torch.linalg.svd(core, full_matrices=False)
    k = numerical_rank(S.square(), shape) if S.numel() else 0
    sign = -1.0 if scale < 0 else 1.0
    return GramSVD(
        M=sign * (vec_b / root_b) @ u[:, :k],
        S=S * abs(scale),
        N=(vec_a / root_a) @ vh[:k].T,
    )


def truncated_factors(B: torch.Tensor, A: torch.Tensor, rule: RankRule) -> Factors:
    """Balanced factors of B·A re-factorised in factor space and truncated to ``rule.choose`` of its spectrum."""
    decomposition = factor_svd(B, A)
    return decomposition.factors(rule.choose(decomposition.S, (B.shape[0], A.shape[1])))


def dense_factors(delta: torch.Tensor, rule: RankRule) -> Factors:
    """Balanced factors (B, A) of a dense out×in ΔW by its full SVD, truncated to ``rule.choose`` of its spectrum
    (with an empty rule: the full numerical rank, which a dense merge of sparsified matrices makes large), with the
    share of Σσ² kept. Computes in ΔW's dtype."""
    U, S, Vh = torch.linalg.svd(delta, full_matrices=False)
    return FactorSVD(U, S, Vh).factors(rule.choose(S, (delta.shape[0], delta.shape[1])))


def stacked_factors(terms, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """[c₁B₁ … cₙBₙ] and [A₁; …; Aₙ] of terms with ``coef``, ``B``, ``A``: their product is Σ cᵢ·Bᵢ·Aᵢ exactly."""
    B = torch.cat([t.B.to(dtype) * t.coef for t in terms], dim=1)
    A = torch.cat([t.A.to(dtype) for t in terms], dim=0)
    return B, A
