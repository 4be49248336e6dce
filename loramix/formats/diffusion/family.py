"""A diffusion transformer family's module map, as data: `Rule`s from the original (reference-code) module names to
diffusers' module names, and the `Family` that holds them with what recognises it.

A rule's names are templates with ``{i}`` for a block number. ``split`` says how the original module's rows lie on
its diffusers modules: ``one`` (the same weight), ``thirds`` (q, k, v of equal rows: out = 3·in), ``qkv_rest``
(q, k, v of ``in`` rows each, then the MLP's ``mlp_ratio``·in rows: Flux.1's single-block ``linear1``; Flux.2's,
whose gated MLP has other sizes, is refused), ``swap`` (one module with the two row halves exchanged: shift/scale
against scale/shift), ``swap_last`` (``swap`` where the module has 2·in rows — SD3's last joint block, whose context
modulation is an ``AdaLayerNormContinuous`` — else ``one``). Names are matched dotted (ComfyUI/BFL, diffusers) or
flattened with underscores (kohya ``lora_unet_…``, diffusers' ``lora_transformer_…``): a template fixes where the
dots are, so a flat name has one reading.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import cache

from loramix.errors import AdapterFormatError
from loramix.formats.diffusion.fused import Piece

SPLITS = ("one", "thirds", "qkv_rest", "swap", "swap_last")


@dataclass(frozen=True)
class Rule:
    """One original module and the diffusers module(s) it is (see the module docstring for ``split``)."""

    original: str
    targets: tuple[str, ...]
    split: str = "one"

    def name(self, template: str, block: str | None) -> str:
        return template.replace("{i}", block or "")


@dataclass(frozen=True)
class Family:
    """A family of diffusion transformers: its map and how its LoRAs are recognised. ``markers``: substrings of
    names only this family has; ``mlp_ratio``: MLP rows per hidden row, for a fused module whose MLP part no LoRA
    module shows."""

    name: str
    label: str
    model_class: str
    rules: tuple[Rule, ...]
    markers: tuple[str, ...]
    mlp_ratio: int = 4

    def match(self, name: str, *, flat: bool, original: bool) -> tuple[Rule, str | None, int] | None:
        """(rule, block number, target index; -1 for the original) of a dotted or flat original or diffusers name."""
        for rule in self.rules:
            templates = [rule.original] if original else list(rule.targets)
            for index, template in enumerate(templates):
                found = _regex(template, flat).match(name)
                if found is not None:
                    return rule, found.groupdict().get("i"), -1 if original else index
        return None

    def marked(self, rule: Rule) -> bool:
        return any(m in t for t in (rule.original, *rule.targets) for m in self.markers)

    def pieces(self, rule: Rule, block: str | None, in_features: int, out_features: int, where: str) -> list[Piece]:
        """The diffusers parts of original module ``rule`` (block ``block``) of shape out×in, refused when the
        shape does not fit the split."""
        targets = [rule.name(t, block) for t in rule.targets]
        h, out = in_features, out_features
        mlp = (3 + self.mlp_ratio) * h  # q, k, v and the MLP; q, k, v alone for XLabs' single-block qkv
        split = rule.split if rule.split != "swap_last" else ("swap" if out == 2 * h else "one")
        fits = {"one": True, "thirds": out == 3 * h, "qkv_rest": out in (3 * h, mlp), "swap": out % 2 == 0}[split]
        if not fits:
            raise AdapterFormatError(
                f"{where}: module {rule.name(rule.original, block)} has ΔW {out}×{in_features}, which is not "
                f"{self.label}'s {rule.split} layout of {', '.join(targets)}"
            )
        if split == "one":
            return [Piece(targets[0], ((0, out),))]
        if split == "swap":
            return [Piece(targets[0], ((out // 2, out // 2), (0, out // 2)))]
        pieces = [Piece(t, ((k * h, h),)) for k, t in enumerate(targets[:3])]
        if split == "qkv_rest" and out > 3 * h:
            pieces.append(Piece(targets[3], ((3 * h, out - 3 * h),)))
        return pieces


@cache
def _regex(template: str, flat: bool) -> re.Pattern:
    """A name template as a whole-name regex, dotted or flattened with underscores."""
    text = re.escape(template.replace(".", "_") if flat else template)
    return re.compile("^" + text.replace(re.escape("{i}"), r"(?P<i>\d+)") + "$")
