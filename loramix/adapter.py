"""The data model — one LoRA target module (`LoraModule`), a whole adapter (`LoraAdapter`) — and the facts about
adapters that every command relies on: which bases are the same (`canonical_base`) and which adapters can be used
together (`check_compatible`).

Factors are kept in "math" orientation whatever the base layer is: ``A`` is r×in and ``B`` is out×r, so that
ΔW = scale·B·A maps inputs to outputs. ``layout`` says how ΔW lies on the base weight (``delta()`` puts it there).
Tensors keep the dtype they were read in; computation casts them up.
"""

from __future__ import annotations

import math
import os
from collections import Counter
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from loramix.errors import IncompatibleAdaptersError, SettingError
from loramix.settings import RANK_LAYOUTS

# how ΔW (out×in) lies on the base weight: as it is (out_in: nn.Linear and every out×in weight), transposed (GPT-2's
# Conv1D, PEFT's fan_in_fan_out; PEFT's embeddings), or reshaped to a conv2d kernel
LAYOUTS = ("out_in", "conv1d_fan_in_fan_out", "embedding", "conv2d")
_PARTS = ("A", "B", "bias", "magnitude")  # a module's tensors


@dataclass(frozen=True)
class ExpertSlot:
    """Where a module lies inside a fused mixture-of-experts parameter: expert ``index`` of ``count`` in ``param``
    (the parameter's in-memory name, ``model.layers.0.mlp.experts.gate_up_proj``). Each expert is its own module
    (ΔW of that expert, ``out × in``); `loramix.experts` owns the layouts around it."""

    param: str
    index: int
    count: int


@dataclass
class LoraModule:
    """One target module: ΔW = scale · B · A (B out×r, A r×in), laid on the base weight per ``layout``.

    ``kernel_size`` is the conv2d kernel (A then holds in·kh·kw columns). ``bias`` is PEFT's ``lora_B.bias``
    (its effect on the output is ``scale·bias``); ``magnitude`` is DoRA's per-output-row magnitude vector.
    ``expert`` says which expert of a fused expert parameter the module is (None for an ordinary module).
    """

    A: torch.Tensor
    B: torch.Tensor
    scale: float
    layout: str = "out_in"
    kernel_size: tuple[int, ...] = ()
    bias: torch.Tensor | None = None
    magnitude: torch.Tensor | None = None
    expert: ExpertSlot | None = None

    @property
    def rank(self) -> int:
        return self.A.shape[0]

    @property
    def out_features(self) -> int:
        return self.B.shape[0]

    @property
    def in_features(self) -> int:
        return self.A.shape[1]

    @property
    def base_shape(self) -> tuple[int, ...]:
        """Shape of the base weight this module applies to, in that weight's own layout."""
        out, inp = self.out_features, self.in_features
        if self.layout in ("conv1d_fan_in_fan_out", "embedding"):
            return (inp, out)
        if self.layout == "conv2d":
            kernel = math.prod(self.kernel_size)
            return (out, inp // kernel, *self.kernel_size)
        return (out, inp)

    def on_weight(self, shape: tuple[int, ...]) -> LoraModule:
        """This module as it lies on a weight of ``shape``: a module read flat, out × in·kh·kw (LyCORIS stores plain
        conv LoHa/LoKr factors so, without the kernel), on a 4-D conv weight of that size takes the weight's kernel,
        as LyCORIS's own ``get_weight(shape)`` reshapes it; any other module is returned as it is."""
        shape = tuple(shape)
        flat = self.layout == "out_in" and len(shape) == 4 and shape[0] == self.out_features
        if flat and math.prod(shape[1:]) == self.in_features:
            return replace(self, layout="conv2d", kernel_size=shape[2:])
        return self

    def delta(self, *, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu") -> torch.Tensor:
        """ΔW in the base weight's own layout. Code that needs a dense ΔW of a whole module calls this; the
        checkpoint writer forms row chunks of it instead (`loramix.merge.kernels.delta_rows`), and element-wise
        methods form each term's s·B·A in their own working dtype."""
        product = self.B.to(device=device, dtype=dtype) @ self.A.to(device=device, dtype=dtype)
        product = product * self.scale
        if self.layout in ("conv1d_fan_in_fan_out", "embedding"):
            return product.T
        return product.reshape(self.base_shape)

    def bias_delta(self) -> torch.Tensor | None:
        """What the module adds to the base layer's bias (PEFT scales lora_B.bias like the product)."""
        return None if self.bias is None else self.bias.float() * self.scale

    def num_params(self) -> int:
        extra = sum(t.numel() for t in (self.bias, self.magnitude) if t is not None)
        return self.A.numel() + self.B.numel() + extra

    def __repr__(self) -> str:  # shapes and facts, not the tensors' values
        parts = [f"{self.out_features}×{self.in_features}", f"rank {self.rank}", f"scale {self.scale:g}", self.layout]
        parts += [f"kernel {self.kernel_size}"] * bool(self.kernel_size) + ["bias"] * (self.bias is not None)
        parts += ["DoRA"] * (self.magnitude is not None) + [dtype_name(self.A.dtype)]
        return f"LoraModule({', '.join(parts)})"


@dataclass
class ExtraTensor:
    """A full tensor that replaces the base model's tensor of the same name.

    ``kind`` is ``"modules_to_save"`` (a trained head or layer copy), ``"base_layer"`` (PEFT's saved copy of a
    targeted layer's base weight, written when embeddings are resized) or ``"bias"`` (a base bias trained in place
    with PEFT's ``bias="all"``; not a head, so not listed in modules_to_save).
    """

    tensor: torch.Tensor
    kind: str = "modules_to_save"

    def __repr__(self) -> str:
        return f"ExtraTensor({self.kind}, {tuple(self.tensor.shape)}, {dtype_name(self.tensor.dtype)})"


@dataclass
class LoraAdapter:
    """A LoRA adapter in memory: modules by normalised name, plus full extra tensors and where it came from.

    Module names are the base model's own module paths (``model.layers.0.self_attn.q_proj``); extra tensor names
    are the base model's parameter names (``classifier.weight``).
    """

    modules: dict[str, LoraModule]
    base_model: str | None = None
    extra: dict[str, ExtraTensor] = field(default_factory=dict)
    task_type: str | None = None
    use_rslora: bool = False
    source: str = "<memory>"
    name: str = "adapter"
    warnings: list[str] = field(default_factory=list)
    file_bytes: int = 0
    provenance: dict = field(default_factory=dict)

    @property
    def dtype(self) -> torch.dtype:
        """The dtype most of the LoRA factors are stored in."""
        counts = Counter(m.A.dtype for m in self.modules.values())
        return counts.most_common(1)[0][0] if counts else torch.float32

    @property
    def ranks(self) -> list[int]:
        return sorted({m.rank for m in self.modules.values()})

    @property
    def has_dora(self) -> bool:
        return any(m.magnitude is not None for m in self.modules.values())

    @property
    def has_lora_bias(self) -> bool:
        return any(m.bias is not None for m in self.modules.values())

    def num_params(self) -> int:
        return sum(m.num_params() for m in self.modules.values()) + sum(e.tensor.numel() for e in self.extra.values())

    def nonfinite(self) -> dict[str, int]:
        """How many NaN/Inf values each tensor holds (``<module>.A``, ``<module>.B``, ``.bias``, ``.magnitude``, and
        extra tensors by name), for the tensors that hold any."""
        tensors = {f"{name}.{part}": getattr(m, part) for name, m in self.modules.items() for part in _PARTS}
        tensors |= {name: e.tensor for name, e in self.extra.items()}
        counts = {}
        for name, tensor in tensors.items():
            if tensor is not None and tensor.is_floating_point():
                bad = int((~torch.isfinite(tensor if tensor.element_size() > 1 else tensor.float())).sum())
                if bad:
                    counts[name] = bad
        return counts

    def with_modules(self, modules: dict[str, LoraModule], **changes) -> LoraAdapter:
        return replace(self, modules=modules, **changes)

    def __repr__(self) -> str:  # a summary: print(adapter) on a large adapter must not dump every tensor
        ranks = self.ranks
        parts = [
            f"{self.name!r}",
            f"{len(self.modules)} module{'s' * (len(self.modules) != 1)}",
            f"rank {ranks[0]}" if len(ranks) == 1 else f"ranks {ranks[0]}–{ranks[-1]}" if ranks else "no rank",
            dtype_name(self.dtype),
            f"base {self.base_model or 'unknown'}",
        ]
        parts += [f"{len(self.extra)} extra tensor{'s' * (len(self.extra) != 1)}"] * bool(self.extra)
        parts += [f"{len(self.warnings)} warning{'s' * (len(self.warnings) != 1)}"] * bool(self.warnings)
        return f"LoraAdapter({', '.join(parts)}; source {self.source})"


def dtype_name(dtype: torch.dtype) -> str:
    """``float32`` for ``torch.float32``."""
    return str(dtype).removeprefix("torch.")


# Canonical Hub models that moved under an organisation keep working under their old bare name.
_LEGACY_NAMESPACES = {
    "gpt2": "openai-community",
    "gpt2-medium": "openai-community",
    "gpt2-large": "openai-community",
    "gpt2-xl": "openai-community",
    "openai-gpt": "openai-community",
    "distilgpt2": "distilbert",
    "distilbert-base-uncased": "distilbert",
    "distilbert-base-cased": "distilbert",
    "distilroberta-base": "distilbert",
    "bert-base-uncased": "google-bert",
    "bert-base-cased": "google-bert",
    "bert-large-uncased": "google-bert",
    "bert-large-cased": "google-bert",
    "bert-base-multilingual-cased": "google-bert",
    "roberta-base": "FacebookAI",
    "roberta-large": "FacebookAI",
    "xlm-roberta-base": "FacebookAI",
    "t5-small": "google-t5",
    "t5-base": "google-t5",
    "t5-large": "google-t5",
}


def canonical_base(base: str) -> str:
    """A Hub id with legacy bare names mapped to their organisation (``gpt2`` → ``openai-community/gpt2``); a local
    folder by its resolved path, so that ``base``, ``./base`` and its absolute path are one base."""
    name = base.strip().rstrip("/")
    local = Path(name).expanduser()
    if name and name not in _LEGACY_NAMESPACES and local.exists():
        return str(local.resolve())
    name = os.path.normpath(name) if name else name
    namespace = _LEGACY_NAMESPACES.get(name)
    return f"{namespace}/{name}".lower() if namespace else name.lower()


def check_compatible(adapters: list[LoraAdapter], *, allow_different_bases: bool = False) -> None:
    """Refuse adapters made for different bases (unless allowed) and modules whose shapes disagree. Adapters whose
    base is unknown are checked by their module shapes only."""
    known = [(a, canonical_base(a.base_model)) for a in adapters if a.base_model]
    if not allow_different_bases and len({base for _, base in known}) > 1:
        listing = ", ".join(f"{a.name}: {a.base_model}" for a, _ in known)
        raise IncompatibleAdaptersError(
            f"adapters were made for different base models ({listing})", option="allow_different_bases"
        )
    seen: dict[str, tuple[LoraAdapter, LoraModule]] = {}
    for a in adapters:
        for name, m in a.modules.items():
            if name not in seen:
                seen[name] = (a, m)
                continue
            first, other = seen[name]
            if m.expert != other.expert:
                raise IncompatibleAdaptersError(
                    f"module {name}: {first.name} has it as {describe_slot(other.expert)} but {a.name} as "
                    f"{describe_slot(m.expert)}"
                )
            if (m.out_features, m.in_features, m.kernel_size) != (
                other.out_features,
                other.in_features,
                other.kernel_size,
            ):
                raise IncompatibleAdaptersError(
                    f"module {name}: {first.name} has ΔW {other.base_shape} but {a.name} has {m.base_shape}"
                )


def describe_slot(slot: ExpertSlot | None) -> str:
    return "an ordinary module" if slot is None else f"expert {slot.index} of {slot.count} in {slot.param}"


# ----------------------------------------------------------------------------------------------- rank layout

# Who misreads an adapter whose ranks or scales differ per module (rank_pattern / alpha_pattern / rsLoRA).
MISREADERS = "vLLM, SGLang, LoRAX/TGI and llama.cpp"


def portable_rank(ranks) -> int:
    """The one rank every serving engine keeps as it is: the largest of ``ranks`` rounded up to 8 when ≤ 8, else to
    a multiple of 16 (LoRAX/TGI pad to these and then read the padded rank as config r; vLLM's --max-lora-rank
    values and SGLang's buffers take them as they are)."""
    top = max(ranks)
    return 8 if top <= 8 else -(-top // 16) * 16


def common_scale(adapter: LoraAdapter) -> float:
    """The scale most modules have (ties: the first in module order): the one a single lora_alpha/r keeps."""
    counts = Counter(m.scale for m in adapter.modules.values())
    return counts.most_common(1)[0][0] if counts else 1.0


def is_portable(adapter: LoraAdapter) -> bool:
    """Whether one r, one lora_alpha and no rsLoRA describe ``adapter`` at a rank every engine keeps."""
    if not adapter.modules:
        return True
    rank = portable_rank(adapter.ranks)
    return not adapter.use_rslora and adapter.ranks == [rank] and len({m.scale for m in adapter.modules.values()}) == 1


def unpadded_rank(module: LoraModule) -> int:
    """The module's rank without its trailing all-zero components (a row of A and a column of B both zero): the zero
    padding `portable_layout` adds, seen in the stored tensors (a module of zeros keeps its rank)."""
    used = (module.A.ne(0).any(dim=1) | module.B.ne(0).any(dim=0)).nonzero()
    return int(used[-1]) + 1 if len(used) else module.rank


def check_rank_layout(rank_layout: str) -> None:
    if rank_layout not in RANK_LAYOUTS:
        raise SettingError(f"rank_layout must be {' or '.join(map(repr, RANK_LAYOUTS))}, got {rank_layout!r}")


def portable_layout(adapter: LoraAdapter) -> LoraAdapter:
    """``adapter`` with one rank R = `portable_rank` and one scale, describing the same ΔW in every module.

    Factors are zero-padded to R (extra rows of A and columns of B: the product is unchanged); a module whose scale
    differs from the most common one (`common_scale`) gets the ratio folded into B (and its lora_B bias), computed in
    float32 and cast back to the factor's dtype. A module already at rank R with the common scale keeps its tensors
    bit for bit. rsLoRA is resolved away (scales are already per module), so ``use_rslora`` is false.
    """
    if is_portable(adapter):
        return adapter
    rank, scale = portable_rank(adapter.ranks), common_scale(adapter)
    modules = {name: refit(m, rank, scale) for name, m in adapter.modules.items()}
    return adapter.with_modules(modules, use_rslora=False)


def refit(m: LoraModule, rank: int, scale: float) -> LoraModule:
    """``m`` at ``rank`` (≥ its own: zero-padded) and ``scale`` (the ratio folded into B and its bias, computed in
    float32 and cast back), describing the same ΔW; ``m`` itself when it already is."""
    A, B, bias = m.A, m.B, m.bias
    if m.scale != scale:
        ratio = m.scale / scale
        B = (B.float() * ratio).to(B.dtype)
        bias = None if bias is None else (bias.float() * ratio).to(bias.dtype)
    if m.rank < rank:
        A = torch.cat([A, A.new_zeros(rank - m.rank, A.shape[1])])
        B = torch.cat([B, B.new_zeros(B.shape[0], rank - m.rank)], dim=1)
    return m if (A is m.A and B is m.B and m.scale == scale) else replace(m, A=A, B=B, scale=scale, bias=bias)


def _laid_out(adapter: LoraAdapter, shapes: dict[str, LoraModule], rank: int, scale: float) -> LoraAdapter:
    """``adapter`` on the modules of ``shapes`` at one ``rank`` and ``scale`` (`refit`); a module of ``shapes`` the
    adapter lacks is zero factors of that module's shape."""
    modules = {}
    for name, shape in shapes.items():
        m = adapter.modules.get(name)
        if m is None:
            zero_A, zero_B = shape.A.new_zeros(rank, shape.in_features), shape.B.new_zeros(shape.out_features, rank)
            modules[name] = replace(shape, A=zero_A, B=zero_B, scale=scale, bias=None, magnitude=None)
        else:
            modules[name] = refit(m, rank, scale)
    return adapter.with_modules(modules, use_rslora=False)


def serving_set(adapters: list[LoraAdapter]) -> list[LoraAdapter]:
    """``adapters`` (of one base) as a serving set: every one on the union of their modules (zero factors where it
    has none), at one rank R = `portable_rank` of all their ranks and one scale (the most common of all their
    modules'; others folded into B), so that each describes its own ΔW unchanged and all have the same tensor names
    and shapes and the same config (what PEFT's ``hotswap_adapter`` under ``torch.compile`` and the engines' fixed
    adapter slots need). `IncompatibleAdaptersError` for DoRA, lora_B biases and full tensors, which no slot holds."""
    for a in adapters:
        held = [
            what
            for what, has in (("DoRA", a.has_dora), ("lora_B biases", a.has_lora_bias), ("full tensors", a.extra))
            if has
        ]
        if held:
            raise IncompatibleAdaptersError(
                f"{a.source}: holds {', '.join(held)}, which a serving set's adapter slots do not hold "
                "(loramix convert makes DoRA a plain LoRA)"
            )
    shapes: dict[str, LoraModule] = {}
    for a in adapters:
        for name, m in a.modules.items():
            shapes.setdefault(name, m)
    shapes = dict(sorted(shapes.items()))
    rank = portable_rank([r for a in adapters for r in a.ranks])
    scale = Counter(m.scale for a in adapters for m in a.modules.values()).most_common(1)[0][0]
    return [_laid_out(a, shapes, rank, scale) for a in adapters]
