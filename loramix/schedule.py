"""Values that vary by layer or module: adapter weights and method options (mergekit's gradients and name filters,
kohya's SD block weights), written as plain YAML/JSON data, `parse`d into a `Schedule` of its kind and resolved to one
float per module (`Schedule.at`).

A value is one of:

- a number (`Constant`): the same in every module;
- a list of numbers, a *gradient* (`Gradient`): interpolated linearly across layer indices exactly as mergekit does
  (mergekit/config.py ``evaluate_setting``, with the layer's ``t`` from mergekit/plan.py ``MergePlanner.plan_slice``:
  ``t = i/(n-1)`` for layer ``i`` of ``n``, 1 when ``n == 1``; then ``scaled = t·(len-1)``, ``i0 = int(scaled)``,
  ``i1 = min(len-1, i0+1)``, value ``(1-f)·v[i0] + f·v[i1]`` with ``f = scaled - i0``). ``[0, 1]`` goes from 0 in
  the first layer to 1 in the last;
- a mapping of name filters to values (numbers or gradients) that ends with ``default`` (`Filtered`):
  ``{self_attn.q_proj: 1.0, default: 0.2}``. As in mergekit's ``evaluate_setting``, a filter matches when it is a
  substring of the module name, and the first match in the order written wins; ``default`` (mergekit's filter-less
  entry, also spelled ``*``) matches every module. kohya module names are flattened with underscores, so a filter
  also matches with its dots read as underscores. mergekit's own list form, ``[{filter: self_attn, value: 1.0},
  {value: 0.2}]``, is read as the same mapping;
- ``{lbw: [...], ratio: r}`` (`BlockWeights`): kohya/A1111 "LoRA Block Weight" for Stable Diffusion — 12 or 20 values
  (SDXL) or 17 or 26 (SD 1.x/2.x) in the block order of sd-scripts' networks/svd_merge_lora.py (``LAYER12``…``LAYER26``:
  BASE = the text encoders, IN00–IN11, MID, OUT00–OUT11, the shorter lists covering only the blocks that hold LoRA
  modules). A module's weight is ``ratio`` (default 1) times its block's value, and ``ratio`` alone for a module in no
  listed block, as sd-scripts' merge scripts do. The same form weights diffusion transformers by block, in diffusers'
  block order (the names `loramix.formats.diffusion` reads every naming onto, kohya's included): 57 values for Flux.1
  (double blocks 0–18, then single blocks 0–37: ``transformer_blocks.N``, ``single_transformer_blocks.N``), 24 (SD3
  Medium, SD3.5 Medium) or 38 (SD3.5 Large) for SD3's joint blocks (``transformer_blocks.N``). Modules outside the
  blocks (embedders, final layer) take ``ratio`` alone.

Layer index: the number after a path component ``layers``, ``layer``, ``h`` or ``block`` (``model.layers.12.…``,
``transformer.h.3.…``, ``encoder.layer.5.…``, T5's ``encoder.block.2.…``; with dots or kohya's underscores:
``lora_te_text_model_encoder_layers_0_…``; SDXL's ``middle_block_1`` is a block name, not a layer). The number of
layers is the largest index among the modules being combined, plus one (an adapter trained on the last layers only
therefore spans fewer layers than its base). A module with no layer index (embeddings, heads, SD UNet modules: use
``lbw`` for those) takes ``t = 0`` — the first value of a gradient — as mergekit plans the tensors outside its layer
slices (``plan_module``'s pre/post weights, read at ``t=0``).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from loramix.errors import SettingError

DEFAULT = ("default", "*")
_LAYER = re.compile(r"(?:^|[._])(?<!middle_)(?:layers|layer|h|block)[._](\d+)(?=[._]|$)")

# sd-scripts networks/svd_merge_lora.py: which of the 26 blocks (BASE, IN00–IN11, MID, OUT00–OUT11) a list of each
# length covers, as (first, last) ranges of block indices.
_COVERED = {
    12: [(0, 0), (5, 6), (8, 9), (13, 19)],
    17: [(0, 0), (2, 3), (5, 6), (8, 9), (13, 13), (17, 25)],
    20: [(0, 9), (13, 22)],
    26: [(0, 25)],
}
# diffusion transformers' block lists: length → the (block kind, count) runs they list, in order
_DIT = {57: (("transformer_blocks", 19), ("single_transformer_blocks", 38)), 24: (("transformer_blocks", 24),)}
_DIT[38] = (("transformer_blocks", 38),)
_DIT_BLOCK = re.compile(r"(?:^|[._])((?:single_)?transformer_blocks)[._](\d+)(?=[._]|$)")
_SD_UPDOWN = re.compile(r"(up|down)_blocks_(\d+)_(resnets|attentions|upsamplers|downsamplers)_(\d+)_")


def _number(value, what: str) -> float:
    """A finite number; a numeric string counts (mergekit validates YAML strings like "1e-3" into numbers)."""
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            pass
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise SettingError(f"{what} must be a finite number, got {value!r}")
    return float(value)


def _gradient(value: list, what: str) -> list[float]:
    if not value:
        raise SettingError(f"{what} is an empty list; a gradient needs at least one number")
    return [_number(v, f"{what}[{i}]") for i, v in enumerate(value)]


def varies(value) -> bool:
    """Whether ``value`` is one of the varying forms (a list or a mapping, or a `Schedule` other than a `Constant`)
    rather than one number or word."""
    return isinstance(value, (list, dict)) or (isinstance(value, Schedule) and value.varies)


def parse(value, *, what: str = "weight") -> Schedule:
    """``value`` checked, as the `Schedule` of its kind (a `Schedule` passes through). One-line `SettingError` naming
    ``what`` for a malformed value."""
    if isinstance(value, Schedule):
        return value
    if isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
        return parse(_mergekit_filters(value, what), what=what)
    if isinstance(value, list):
        return Gradient(tuple(_gradient(value, what)))
    if not isinstance(value, dict):
        return Constant(_number(value, what))
    if "lbw" in value:
        return _block_weights(value, what)
    if not value:
        raise SettingError(f"{what} is an empty mapping; give filters and a default")
    filters = []
    for key, item in value.items():
        if not isinstance(key, str) or not key:
            raise SettingError(f"{what}: filter {key!r} must be a non-empty string")
        if key in DEFAULT and key != list(value)[-1]:
            raise SettingError(f"{what}: filters after {key} are never reached (the first match wins); put {key} last")
        label = f"{what}[{key}]"
        inner = Gradient(tuple(_gradient(item, label))) if isinstance(item, list) else Constant(_number(item, label))
        filters.append((key, inner))
    if filters[-1][0] not in DEFAULT:
        raise SettingError(f"{what}: filters {list(value)} need a final 'default' for the modules none of them matches")
    return Filtered(tuple(filters))


def _mergekit_filters(items: list[dict], what: str) -> dict:
    out = {}
    for i, item in enumerate(items):
        if "value" not in item or set(item) - {"filter", "value"}:
            raise SettingError(f"{what}[{i}] must be {{filter: NAME, value: V}} or {{value: V}}, got {item!r}")
        out.setdefault(item.get("filter") or "default", item["value"])  # a repeated filter is never reached
    return out


def _block_weights(value: dict, what: str) -> BlockWeights:
    extra = set(value) - {"lbw", "ratio"}
    if extra:
        raise SettingError(f"{what}: an lbw mapping takes only lbw and ratio, got {', '.join(sorted(map(str, extra)))}")
    blocks = value["lbw"]
    if not isinstance(blocks, list) or len(blocks) not in (*_COVERED, *_DIT):
        count = len(blocks) if isinstance(blocks, list) else type(blocks).__name__
        raise SettingError(
            f"{what}: lbw must be a list of 12 or 20 (SDXL), 17 or 26 (SD 1.x), 57 (Flux.1: 19 double, 38 single "
            f"blocks), 24 or 38 (SD3/SD3.5 joint blocks) numbers, got {count}"
        )
    return BlockWeights(tuple(_gradient(blocks, f"{what}.lbw")), _number(value.get("ratio", 1.0), f"{what}.ratio"))


def layer_index(name: str) -> int | None:
    """The layer a module belongs to (see the module docstring), or None outside numbered layers."""
    found = _LAYER.search(name)
    return None if found is None else int(found.group(1))


def count_layers(names) -> int:
    """The number of layers the modules ``names`` span: the largest layer index plus one (1 when there is none)."""
    return max((i for n in names if (i := layer_index(n)) is not None), default=0) + 1


def _interpolation(count: int, t: float) -> list[float]:
    """The coefficients of a ``count``-value gradient at ``t`` in [0, 1] (mergekit/config.py ``evaluate_setting``,
    numeric branch: ``(1-f)·v[i0] + f·v[i1]``)."""
    scaled = t * (count - 1)
    i0 = int(scaled)
    i1 = min(count - 1, i0 + 1)
    frac = scaled - i0
    row = [0.0] * count
    row[i0] += 1 - frac
    row[i1] += frac
    return row


def layer_t(name: str, num_layers: int) -> float:
    """mergekit's ``t`` for the module: i/(n-1) in layer i of n (1 when n == 1); 0 outside layers."""
    index = layer_index(name)
    if index is None:
        return 0.0
    return index / (num_layers - 1) if num_layers > 1 else 1.0


def sd_block(name: str) -> int | None:
    """A Stable Diffusion module's block in sd-scripts' 26-block order (0 BASE = text encoders, 1–12 IN00–IN11,
    13 MID, 14–25 OUT00–OUT11), as svd_merge_lora.py's ``get_lbw_block_index`` numbers it, for kohya and diffusers
    names alike (dots read as underscores); None for a module in no block (conv_in, time embedding, …).

    diffusers' ``down_blocks.i.{resnets,attentions}.j`` is IN(3i+j+1), ``down_blocks.i.downsamplers`` IN(3i+3),
    ``up_blocks.i.{resnets,attentions}.j`` OUT(3i+j), ``up_blocks.i.upsamplers`` OUT(3i+2); the original UNet's
    ``input_blocks.n`` is IN(n), ``output_blocks.n`` OUT(n). sd-scripts reads the first naming for SD 1.x lists and
    the second for SDXL lists; both describe the same blocks, so loramix reads both for every list."""
    flat = name.replace(".", "_")
    if "text_model_encoder_" in flat:
        return 0
    found = _SD_UPDOWN.search(flat)
    if found:
        side, i, kind, j = found.group(1), int(found.group(2)), found.group(3), int(found.group(4))
        if kind in ("downsamplers", "upsamplers"):
            index = 3 * (i + 1) if side == "down" else 3 * i + 2
        else:
            index = 3 * i + j + (1 if side == "down" else 0)
        return 1 + index if side == "down" else 14 + index
    if "mid_block_" in flat or "middle_block_" in flat:
        return 13
    numbered = re.search(r"(input|output)_blocks_(\d+)_", flat)
    if numbered:
        return (1 if numbered.group(1) == "input" else 14) + int(numbered.group(2))
    return None


def dit_block(name: str, count: int) -> int | None:
    """A diffusion-transformer module's position in a ``count``-value block list (see the module docstring), from its
    diffusers name (``transformer.single_transformer_blocks.3.attn.to_q`` is 19 + 3 in Flux.1's 57); None outside
    the listed blocks."""
    found = _DIT_BLOCK.search(name)
    if found is None:
        return None
    start = 0
    for kind, blocks in _DIT[count]:
        if found.group(1) == kind:
            index = int(found.group(2))
            return start + index if index < blocks else None
        start += blocks
    return None


def _matches(pattern: str, name: str) -> bool:
    return pattern in DEFAULT or pattern in name or pattern.replace(".", "_") in name


class Schedule:
    """A value that may vary by layer or module, `parse`d: `Constant`, `Gradient`, `Filtered` or `BlockWeights`.

    Every kind is an affine function of the numbers it holds (``numbers``): a number holds 1, a gradient its k values,
    name filters their values in order (gradients inside included), ``lbw`` its block values (``ratio`` stays a
    fixed factor, and is the constant term of a module in no listed block). Gradient interpolation and filter
    selection are linear in these numbers, so every module's value is coefficients·numbers + constant (`affine`);
    `at` is exactly that, and a weight search searches the numbers of a schedule (`with_numbers` rebuilds it)."""

    varies = True

    @property
    def numbers(self) -> tuple[float, ...]:
        raise NotImplementedError

    def affine(self, name: str, num_layers: int) -> tuple[list[float], float]:
        """(coefficients, constant): the value in module ``name`` of a model with ``num_layers`` layers is
        ``Σ coefficients[j]·numbers[j] + constant``."""
        raise NotImplementedError

    def at(self, name: str, num_layers: int) -> float:
        """The value in module ``name`` of a model with ``num_layers`` layers (`affine` applied to `numbers`)."""
        row, constant = self.affine(name, num_layers)
        return float(sum(c * v for c, v in zip(row, self.numbers) if c) + constant)

    def with_numbers(self, values) -> Schedule:
        """The same kind holding ``values`` (as many as it holds): ``[0, 1]`` with (0.3, 0.8) → ``[0.3, 0.8]``."""
        values = [float(v) for v in values]
        if len(values) != len(self.numbers):
            raise SettingError(f"{self.describe()} holds {len(self.numbers)} number(s), got {len(values)}")
        return self._rebuild(iter(values))

    def _rebuild(self, numbers) -> Schedule:
        raise NotImplementedError

    def data(self) -> object:
        """The value as plain data in its canonical form (floats; filters as a mapping), for a recipe, a card, JSON."""
        raise NotImplementedError

    def describe(self, number: str = "g") -> str:
        """The value in one short line: ``0.5``, ``[0, 1] across layers``, ``{self_attn: 1, default: 0.2}``,
        ``lbw [17] × 0.8``; ``number`` is the format of each number."""
        raise NotImplementedError


@dataclass(frozen=True)
class Constant(Schedule):
    """The same number in every module."""

    value: float
    varies = False

    @property
    def numbers(self) -> tuple[float, ...]:
        return (self.value,)

    def affine(self, name: str, num_layers: int) -> tuple[list[float], float]:
        return [1.0], 0.0

    def _rebuild(self, numbers) -> Constant:
        return Constant(next(numbers))

    def data(self) -> float:
        return self.value

    def describe(self, number: str = "g") -> str:
        return f"{self.value:{number}}"


@dataclass(frozen=True)
class Gradient(Schedule):
    """Numbers interpolated across layer indices as mergekit does (see the module docstring)."""

    values: tuple[float, ...]

    @property
    def numbers(self) -> tuple[float, ...]:
        return self.values

    def affine(self, name: str, num_layers: int) -> tuple[list[float], float]:
        return _interpolation(len(self.values), layer_t(name, num_layers)), 0.0

    def _rebuild(self, numbers) -> Gradient:
        return Gradient(tuple(next(numbers) for _ in self.values))

    def data(self) -> list[float]:
        return list(self.values)

    def describe(self, number: str = "g") -> str:
        return "[" + ", ".join(f"{v:{number}}" for v in self.values) + "] across layers"


@dataclass(frozen=True)
class Filtered(Schedule):
    """Name filters, each with a number or a gradient, the first match winning; the last is ``default``."""

    filters: tuple[tuple[str, Constant | Gradient], ...]

    @property
    def numbers(self) -> tuple[float, ...]:
        return tuple(x for _, value in self.filters for x in value.numbers)

    def affine(self, name: str, num_layers: int) -> tuple[list[float], float]:
        row: list[float] = []
        found = False
        for pattern, value in self.filters:
            if not found and _matches(pattern, name):
                row += value.affine(name, num_layers)[0]
                found = True
            else:
                row += [0.0] * len(value.numbers)
        return row, 0.0

    def _rebuild(self, numbers) -> Filtered:
        return Filtered(tuple((pattern, value._rebuild(numbers)) for pattern, value in self.filters))

    def data(self) -> dict:
        return {pattern: value.data() for pattern, value in self.filters}

    def describe(self, number: str = "g") -> str:
        shown = (
            f"[{', '.join(f'{x:{number}}' for x in v.numbers)}]" if v.varies else v.describe(number)
            for _, v in self.filters
        )
        return "{" + ", ".join(f"{k}: {v}" for (k, _), v in zip(self.filters, shown)) + "}"


@dataclass(frozen=True)
class BlockWeights(Schedule):
    """kohya/A1111 "LoRA Block Weight" (``lbw``) values by block, times a fixed ``ratio`` (see the module docstring)."""

    blocks: tuple[float, ...]
    ratio: float = 1.0

    @property
    def numbers(self) -> tuple[float, ...]:
        return self.blocks

    def affine(self, name: str, num_layers: int) -> tuple[list[float], float]:
        count = len(self.blocks)
        row = [0.0] * count
        if count in _DIT:
            position = dit_block(name, count)
        else:
            block = sd_block(name)
            covered = [b for first, last in _COVERED[count] for b in range(first, last + 1)]
            position = covered.index(block) if block in covered else None
        if position is None:
            return row, self.ratio
        row[position] = self.ratio
        return row, 0.0

    def _rebuild(self, numbers) -> BlockWeights:
        return BlockWeights(tuple(next(numbers) for _ in self.blocks), self.ratio)

    def data(self) -> dict:
        return {"lbw": list(self.blocks), "ratio": self.ratio}

    def describe(self, number: str = "g") -> str:
        return f"lbw [{', '.join(f'{v:{number}}' for v in self.blocks)}] × {self.ratio:g}"


def plain(value) -> object:
    """``value`` as plain data: a `Schedule`'s `Schedule.data`, anything else (a number, a word) as it is."""
    return value.data() if isinstance(value, Schedule) else value


def resolve_options(options: dict, name: str, num_layers: int) -> dict:
    """Method options for one module: the varying ones (`parse_options`) resolved, the others as given."""
    return {k: v.at(name, num_layers) if isinstance(v, Schedule) else v for k, v in options.items()}


def parse_options(options: dict) -> dict:
    """``options`` with their varying values checked and made `Schedule`s (numbers and words pass through)."""
    return {k: parse(v, what=f"option {k}") if varies(v) else v for k, v in options.items()}
