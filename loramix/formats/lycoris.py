"""LyCORIS files (LoHa, LoKr, LoCon), read exactly as LoRAs: every module becomes factors B, A with ΔW = scale·B·A.

LyCORIS (the ``lycoris-lora`` package, and kohya's sd-scripts with ``--network_module lycoris.kohya``) saves one tensor
file with kohya's flattened names (``lora_unet_…``, ``lora_te_…``; ``lycoris_<module path>`` when it wraps any other
torch model) and, per module, the keys of its algorithm. The conventions below are LyCORIS's own (modules/loha.py,
modules/lokr.py, functional/), as its forward pass applies them (``get_weight`` times the multiplier: the scale once;
its ``get_diff_weight`` multiplies the scale in a second time and is not what training or inference use; rank and
module dropout are training-only and off).

LoHa: ΔW = γ·(W1a·W1b) ⊙ (W2a·W2b), with W1a, W2a out×r and W1b, W2b r×in, γ = alpha/r (r = rows of hada_w1_b;
alpha missing or 0 means γ = 1). Element-wise, (B₁A₁)_{pq}(B₂A₂)_{pq} = Σ_{ij} (B₁_{pi}B₂_{pj})(A₁_{iq}A₂_{jq}), so
ΔW = γ·(B₁ ⊙ᵣ B₂)(A₁ᵀ ⊙ᵣ A₂ᵀ)ᵀ with ⊙ᵣ the row-wise Kronecker (face-splitting) product: a LoRA of rank r₁·r₂.

LoKr: ΔW = γ·kron(W1, W2), each of W1 (lokr_w1) and W2 (lokr_w2) stored full or as a pair (``_a`` times ``_b``).
kron(U₁V₁, U₂V₂) = kron(U₁, U₂)·kron(V₁, V₂), so a LoRA of rank rank₁·rank₂; a full factor m×n is written exactly
as I·W (m ≤ n) or W·I, rank min(m, n). γ = alpha/r with r the rows of the ``_b`` factor of the low-rank pair; when both
halves are full LyCORIS ignores alpha and γ = 1.

Conv layers: the factors span in·kh·kw columns in PyTorch's (in, kh, kw) order, as conv LoRA does (layout
``conv2d``). The kernel is known when the file holds it (lora_down, a full 4-D lokr_w2, a Tucker core); LyCORIS stores
the plain LoHa/LoKr conv factors flattened, so those modules read as out × in·kh·kw (layout ``linear``). Tucker
cores (``hada_t1``/``hada_t2``, ``lokr_t2``, LoCon's ``lora_mid``): W[p, (c, k)] = Σ_{ij} t[i, j, k]·a[i, p]·b[j, c]
is the pair (aᵀ, Σ_j t[i, j, k]·b[j, c]), exact as well.

Products are formed in float64 and kept as float32 (float64 inputs stay float64): the product of two half-precision
numbers is exact in float32. A module whose r₁·r₂ exceeds min(out, in) is kept as I·ΔW or ΔW·I (rank min(out, in)).
Refused with the file and module named: DoRA (``dora_scale``) and the algorithms that are not low-rank sums ((IA)³,
OFT/BOFT, GLoRA, full/diff, norms, T-LoRA).
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import torch

from loramix.adapter import LoraAdapter, LoraModule
from loramix.errors import AdapterFormatError
from loramix.formats import kohya
from loramix.formats.diffusion import identify
from loramix.io.files import check_finite, read_tensors

NAME = "lycoris"
LOHA_PARTS = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2")
LOKR_PARTS = ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t1", "lokr_t2")
LOCON_PARTS = ("lora_down.weight", "lora_up.weight", "lora_mid.weight")
KNOWN_PARTS = (*LOHA_PARTS, *LOKR_PARTS, *LOCON_PARTS, "alpha", "dora_scale")
# parts of the LyCORIS algorithms that are not a sum of low-rank products (modules/*.py weight_list)
OTHER_ALGOS = {
    "weight": "(IA)³",
    "on_input": "(IA)³",
    "oft_blocks": "OFT/BOFT",
    "rescale": "OFT/BOFT",
    "a1.weight": "GLoRA",
    "a2.weight": "GLoRA",
    "b1.weight": "GLoRA",
    "b2.weight": "GLoRA",
    "bm.weight": "GLoRA",
    "diff": "full (diff)",
    "diff_b": "full (diff)",
    "w_norm": "norm",
    "b_norm": "norm",
    "lambda_layer": "T-LoRA",
}


def is_lycoris_file(path: Path) -> bool:
    """A single tensor file holding LyCORIS keys (see `loramix.formats.kohya.lycoris_key`)."""
    return any(kohya.lycoris_key(k) for k in kohya.file_keys(path))


def detect(path: Path) -> bool:
    return kohya.find_file(path, accept=is_lycoris_file) is not None


def read(path: str | Path, *, allow_nonfinite: bool = False) -> LoraAdapter:
    """Read a LyCORIS file (or a folder holding one) into a `LoraAdapter` of exact LoRA modules."""
    path = Path(path)
    file = kohya.find_file(path, accept=is_lycoris_file) or path
    tensors = read_tensors(file)
    parts: dict[str, dict[str, torch.Tensor]] = defaultdict(dict)
    ignored = []
    for key, tensor in tensors.items():
        found = kohya.FLAT_KEY.match(key)
        if found is None:
            ignored.append(key)
            continue
        module, part = found["module"], found["part"]
        if part in OTHER_ALGOS:
            raise AdapterFormatError(
                f"{file}: module {module} is LyCORIS {OTHER_ALGOS[part]} ({key}), not a low-rank update: "
                "loramix reads LoRA/LoCon, LoHa and LoKr"
            )
        if part not in KNOWN_PARTS:
            raise AdapterFormatError(f"{file}: module {module}: unknown LyCORIS key {key}")
        if part == "dora_scale":
            raise AdapterFormatError(
                f"{file}: module {module} is DoRA-LyCORIS (dora_scale): its weight-decomposed update is not a "
                "low-rank sum, so loramix does not read it"
            )
        parts[module][part] = tensor
    if not parts:
        raise AdapterFormatError(f"{file}: no LyCORIS (LoHa, LoKr, LoCon) modules found")
    if not allow_nonfinite:
        check_finite(file, tensors)
    modules, kinds = {}, defaultdict(list)
    for name, found in sorted(parts.items()):
        modules[name], kind = _module(file, name, found)
        kinds[kind].append(modules[name].rank)
    notes = []
    if ignored:
        notes.append(f"{len(ignored)} key(s) are not LyCORIS factors and were dropped ({', '.join(ignored[:3])})")
    if all(not m.B.any() for m in modules.values()):
        notes.append("every module's update is zero: this adapter changes nothing")
    adapter = LoraAdapter(
        modules=modules,
        base_model=kohya.file_base(kohya.metadata(file)),
        source=str(path),
        name=file.stem,
        warnings=notes,
        file_bytes=file.stat().st_size,
        provenance={
            "format": NAME,
            "file": file.name,
            "lycoris": _summary(kinds),
            **kohya.trained_on(kohya.metadata(file)),
        },
    )
    return identify(adapter, str(file))  # a diffusion transformer's modules onto diffusers' names


def _summary(kinds: dict[str, list[int]]) -> list[str]:
    """``LoHa rank 4×4 → exact LoRA rank 16 (12 modules)`` per algorithm and stored rank."""
    counts: dict[tuple[str, int], int] = defaultdict(int)
    for kind, ranks in kinds.items():
        for rank in ranks:
            counts[(kind, rank)] += 1
    return [
        f"{kind} → exact LoRA rank {rank} ({n} module{'s' * (n > 1)})" for (kind, rank), n in sorted(counts.items())
    ]


def _module(file: Path, name: str, found: dict[str, torch.Tensor]) -> tuple[LoraModule, str]:
    """The exact LoRA of one LyCORIS module, and what it was (``LoHa rank 4×4``, ``LoKr …``, ``LoCon rank 8``)."""
    where = f"{file}: module {name}"
    kinds = {
        k
        for k, group in (("LoHa", LOHA_PARTS), ("LoKr", LOKR_PARTS), ("LoCon", LOCON_PARTS))
        if found.keys() & set(group)
    }
    if len(kinds) != 1:
        raise AdapterFormatError(
            f"{where}: holds {' and '.join(sorted(kinds)) or 'only alpha'} keys ({', '.join(found)})"
        )
    kind = kinds.pop()
    for key, tensor in found.items():
        if key != "alpha" and not (tensor.is_floating_point() and tensor.numel()):
            raise AdapterFormatError(f"{where}: {key} {tuple(tensor.shape)} is empty or not floating point")
    alpha = found.get("alpha")
    if kind == "LoCon" and "lora_mid.weight" not in found:
        sides = {"A": found.get("lora_down.weight"), "B": found.get("lora_up.weight"), "alpha": alpha}
        module = kohya.lora_module(
            file, name, {k: v for k, v in sides.items() if v is not None}, zero_alpha_is_rank=True
        )
        return module, f"LoCon rank {module.rank}"
    module, label, rank = exact_lora(where, kind, found)
    if rank is not None:
        module.scale = kohya.alpha_scale(file, name, alpha, rank, zero_alpha_is_rank=True)
    return module, label


def exact_lora(where: str, kind: str, found: dict[str, torch.Tensor]) -> tuple[LoraModule, str, int | None]:
    """(the exact LoRA of one ``kind`` module — LoHa, LoKr or LoCon with a Tucker core — at scale 1, what it was,
    the rank its alpha divides: None when it has none, a LoKr of two full halves) from its LyCORIS-named parts;
    `AdapterFormatError` naming ``where`` for missing parts or shapes that do not chain. PEFT's LoHa/LoKr layers
    name and lay out their parameters the same way."""
    try:
        if kind == "LoHa":
            (B, A), label, rank, kernel = _loha(found)
        elif kind == "LoKr":
            (B, A), label, rank, kernel = _lokr(found)
        else:
            (B, A), label, rank, kernel = _locon_tucker(found)
    except KeyError as missing:
        raise AdapterFormatError(f"{where}: {kind} without {missing.args[0]}") from None
    except RuntimeError as exc:  # shapes that do not chain
        raise AdapterFormatError(f"{where}: {kind} factors {_shapes(found)} do not chain ({exc})") from None
    stored = next(t.dtype for k, t in found.items() if k != "alpha")  # half-precision products are exact in float32
    dtype = torch.promote_types(stored, torch.float32)
    B, A = _bounded(B, A)
    module = LoraModule(
        A=A.to(dtype), B=B.to(dtype), scale=1.0, layout="conv2d" if kernel else "out_in", kernel_size=kernel
    )
    return module, label, rank


def _shapes(found: dict[str, torch.Tensor]) -> str:
    return ", ".join(f"{k} {tuple(v.shape)}" for k, v in found.items() if k != "alpha")


def _f64(t: torch.Tensor) -> torch.Tensor:
    return t.to(torch.float64)


def _tucker(core: torch.Tensor, up: torch.Tensor, down: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, A) of W[p, (c, k)] = Σ_{ij} core[i, j, k]·up[i, p]·down[j, c]: B = upᵀ, A[i, (c, k)] = Σ_j core·down."""
    A = torch.einsum("ij...,jc->ic...", _f64(core), _f64(down.reshape(down.shape[0], -1)))
    return _f64(up).T, A.reshape(A.shape[0], -1)


def _loha(found: dict[str, torch.Tensor]):
    """LoHa → (B₁ ⊙ᵣ B₂, (A₁ᵀ ⊙ᵣ A₂ᵀ)ᵀ); the rank is the rows of hada_w1_b (LyCORIS's lora_dim)."""
    halves = []
    for i in (1, 2):
        up, down, core = found[f"hada_w{i}_a"], found[f"hada_w{i}_b"], found.get(f"hada_t{i}")
        halves.append(
            _tucker(core, up, down) if core is not None else (_f64(up), _f64(down).reshape(down.shape[0], -1))
        )
    (B1, A1), (B2, A2) = halves
    if B1.shape[0] != B2.shape[0] or A1.shape[1] != A2.shape[1]:
        raise RuntimeError(f"the two halves are {B1.shape[0]}×{A1.shape[1]} and {B2.shape[0]}×{A2.shape[1]}")
    r1, r2 = A1.shape[0], A2.shape[0]
    B = (B1[:, :, None] * B2[:, None, :]).reshape(B1.shape[0], r1 * r2)
    A = (A1[:, None, :] * A2[None, :, :]).reshape(r1 * r2, A1.shape[1])
    core = found.get("hada_t1")
    kernel = tuple(core.shape[2:]) if core is not None else ()
    return (B, A), f"LoHa rank {r1}×{r2}", found["hada_w1_b"].shape[0], kernel


def _lokr(found: dict[str, torch.Tensor]):
    """LoKr → (kron(U₁, U₂), kron(V₁, V₂)); the rank for alpha is the rows of the low-rank pair's ``_b``."""
    if "lokr_t1" in found:
        raise RuntimeError("lokr_t1 is not written by LyCORIS")
    if "lokr_w1" in found:
        U1, V1 = _full(found["lokr_w1"])
    else:
        U1, V1 = _f64(found["lokr_w1_a"]), _f64(found["lokr_w1_b"])
    kernel: tuple[int, ...] = ()
    if "lokr_w2" in found:
        w2 = found["lokr_w2"]
        kernel = tuple(w2.shape[2:])
        U2, V2 = _full(w2.reshape(w2.shape[0], -1))
    elif "lokr_t2" in found:
        kernel = tuple(found["lokr_t2"].shape[2:])
        U2, V2 = _tucker(found["lokr_t2"], found["lokr_w2_a"], found["lokr_w2_b"])
    else:
        U2, V2 = _f64(found["lokr_w2_a"]), _f64(found["lokr_w2_b"]).reshape(found["lokr_w2_b"].shape[0], -1)
    if U1.shape[1] != V1.shape[0] or U2.shape[1] != V2.shape[0]:
        raise RuntimeError("a low-rank pair's inner sizes differ")
    if "lokr_w1" in found and "lokr_w2" in found:
        rank = None  # both halves full: LyCORIS sets alpha = lora_dim, so the scale is 1
    else:
        rank = (found["lokr_w1_b"] if "lokr_w1" not in found else found["lokr_w2_b"]).shape[0]
    halves = [("full" if f"lokr_w{i}" in found else f"rank {U.shape[1]}") for i, U in ((1, U1), (2, U2))]
    label = f"LoKr {halves[0]} ⊗ {halves[1]}"
    return (_kron(U1, U2), _kron(V1, V2)), label, rank, kernel


def _kron(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """kron(a, b) of two matrices (torch.kron trips over the strides of transposed inputs with a size-1 dimension)."""
    return (a[:, None, :, None] * b[None, :, None, :]).reshape(a.shape[0] * b.shape[0], a.shape[1] * b.shape[1])


def _full(W: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A full m×n factor as an exact pair of rank min(m, n): I·W or W·I."""
    W = _f64(W)
    m, n = W.shape
    return (torch.eye(m, dtype=W.dtype), W) if m <= n else (W, torch.eye(n, dtype=W.dtype))


def _locon_tucker(found: dict[str, torch.Tensor]):
    """LoCon with a Tucker core: lora_up (out×r×1×1) · lora_mid (r×r×kh×kw) · lora_down (r×in×1×1)."""
    up, mid, down = found["lora_up.weight"], found["lora_mid.weight"], found["lora_down.weight"]
    B, A = _tucker(mid, up.reshape(up.shape[0], -1).T, down)
    return (B, A), f"LoCon rank {A.shape[0]} (Tucker)", down.shape[0], tuple(mid.shape[2:])


def _bounded(B: torch.Tensor, A: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The same product at rank ≤ min(out, in): I·(BA) or (BA)·I when the factors' rank is larger."""
    out, inp = B.shape[0], A.shape[1]
    if B.shape[1] <= min(out, inp):
        return B, A
    product = B @ A
    return (torch.eye(out, dtype=B.dtype), product) if out <= inp else (product, torch.eye(inp, dtype=B.dtype))
