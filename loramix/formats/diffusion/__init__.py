"""Diffusion-transformer LoRAs (Flux.1, SD3/3.5, HunyuanVideo, Wan 2.x, Qwen-Image): every naming read onto one
module identity, and written back out.

The identity is diffusers' module path inside the pipeline's ``transformer`` component, with the component prefix
loramix uses for diffusers names: ``transformer.transformer_blocks.0.attn.to_q``. `identify` recognises a family
from an adapter's module names (and checks the shapes against its map, `loramix.formats.diffusion.family`) and
renames every transformer module onto that identity, whatever naming the file used:

- kohya/sd-scripts and musubi-tuner: ``lora_unet_double_blocks_0_img_attn_qkv``, ``lora_unet_blocks_0_self_attn_q``
  (the original module, flattened);
- ComfyUI/BFL: ``diffusion_model.double_blocks.0.img_attn.qkv`` (read by `loramix.formats.diffusion.reference_names`);
- XLabs: ``double_blocks.0.processor.qkv_lora1`` (also read there);
- diffusers/PEFT (ai-toolkit, SimpleTuner, diffusers' trainers): ``transformer.transformer_blocks.0.attn.to_q``, and
  diffusers' flattened ``lora_transformer_transformer_blocks_0_attn_to_q``.

A fused original module (``img_attn.qkv``, ``linear1``) becomes its diffusers parts, each the fused LoRA's rows of B
with the same A (`loramix.formats.diffusion.fused.split`), so LoRAs from any two namings line up module by module
and every method works on them. Text-encoder modules (``lora_te…``, ``text_encoder.…``) keep their names. Once a
family is recognised, a transformer module name its map does not know is an error naming the first few — never
dropped, never kept beside the identity. `to_original` is the way back for kohya and ComfyUI files: the parts
joined into the original fused module (`fused.join`) under sd-scripts' or ComfyUI's names.
"""

from __future__ import annotations

from collections import Counter, defaultdict

from loramix.adapter import LoraAdapter, LoraModule
from loramix.errors import AdapterFormatError, OutputError
from loramix.formats._keys import sample
from loramix.formats.diffusion.family import Family, Rule
from loramix.formats.diffusion.flux import FLUX
from loramix.formats.diffusion.fused import Piece, join, split
from loramix.formats.diffusion.hunyuan import HUNYUAN_VIDEO
from loramix.formats.diffusion.qwen import QWEN_IMAGE
from loramix.formats.diffusion.sd3 import SD3
from loramix.formats.diffusion.wan import WAN

FAMILIES = (FLUX, SD3, HUNYUAN_VIDEO, WAN, QWEN_IMAGE)
COMPONENT = "transformer."
KOHYA = "lora_unet_"  # sd-scripts' prefix for the denoiser, whatever its kind
DIFFUSERS_FLAT = "lora_transformer_"  # diffusers' own flattened names (its "mixture" kohya files)
TEXT = ("lora_te", "text_encoder", "text_encoders.")  # text-encoder modules: not the transformer's


def reading(family: Family, name: str) -> tuple[Rule, str | None, int] | None:
    """How ``name`` reads in ``family``: (rule, block, target index; -1 for an original module), or None."""
    if name.startswith(KOHYA):
        return family.match(name.removeprefix(KOHYA), flat=True, original=True)
    if name.startswith(DIFFUSERS_FLAT):
        return family.match(name.removeprefix(DIFFUSERS_FLAT), flat=True, original=False)
    if name.startswith(COMPONENT):  # diffusers' names, or the original ones under its prefix (diffusion-pipe's)
        path = name.removeprefix(COMPONENT)
        return family.match(path, flat=False, original=False) or family.match(path, flat=False, original=True)
    return family.match(name, flat=False, original=True)


def recognise(names, where: str = "the adapter", known: str | None = None) -> Family | None:
    """The family whose module names ``names`` use: the one that reads most of the transformer's names, one of
    them an original module of it or a diffusers module only it has (see `Family.markers`); None when no family
    has such a name. Where families tie, ``known`` (the family the files were read as: see `family_of`) decides;
    else names every tied family reads alike decide by `FAMILIES`' order (musubi-tuner's HunyuanVideo
    ``lora_unet_double_blocks_0_img_attn_qkv`` is sd-scripts' Flux.1 name too, and the same diffusers modules),
    except diffusers' own names alone (``transformer_blocks.0.attn.to_q``: Flux.1's, SD3's and HunyuanVideo's), which
    are no family (they are the identity already, and the families write them back differently); names two families
    read differently (``img_in`` alone: Flux.1's original and Qwen-Image's diffusers name) are refused, naming
    ``where``."""
    best = _best(names)
    if not best:
        return None
    if len(best) == 1:
        return best[0][0]
    chosen = [family for family, _ in best if family.name == known]
    if chosen:
        return chosen[0]
    if all(meaning == best[0][1] for _, meaning in best):
        return best[0][0] if any(m[1] != "identity" for m in best[0][1]) else None
    labels = " and ".join(f.label for f, _ in best)
    raise AdapterFormatError(
        f"{where}: its module names fit {labels} alike ({sample([n for n in names if not n.startswith(TEXT)])}); "
        "cannot tell which"
    )


def fits_a_family(names) -> bool:
    """Whether module ``names`` are a diffusion-transformer family's (one family's, or diffusers' names several
    share)."""
    return bool(_best(names))


def _best(names) -> list[tuple[Family, list]]:
    """The families that read the most of the transformer's ``names`` (one of them marked: see `recognise`), each
    with what it reads them as."""
    names = [n for n in names if not n.startswith(TEXT)]
    scores = []
    for family in FAMILIES:
        found = [f for n in names if (f := reading(family, n)) is not None]
        if any(f[2] == -1 or family.marked(f[0]) for f in found):
            scores.append((len(found), family, [_meaning(f) for f in found]))
    top = max((count for count, _, _ in scores), default=0)
    return [(family, meaning) for count, family, meaning in scores if count == top]


def _meaning(found: tuple[Rule, str | None, int]) -> tuple[tuple[str, ...], str]:
    """The diffusers module(s) a name reads as and how (its rule's split, or ``identity`` for a diffusers name)."""
    rule, block, index = found
    if index >= 0:
        return (rule.name(rule.targets[index], block),), "identity"
    return tuple(rule.name(t, block) for t in rule.targets), rule.split


BASE_WORDS = (("flux", "flux"), ("stable-diffusion-3", "sd3"), ("sd3", "sd3"), ("hunyuan", "hunyuan-video"))


def family_of(adapter: LoraAdapter) -> Family | None:
    """The family of an adapter already read: by its names, a tie decided by the family its file(s) were recognised
    as (``provenance["family"]``, set by `identify` and kept by a combination of one family's adapters) or else by
    the base model it names (``black-forest-labs/FLUX.1-dev``, a kohya ``ss_base_model_version`` such as ``flux1``:
    `BASE_WORDS`)."""
    base = (adapter.base_model or "").lower()
    named = next((family for word, family in BASE_WORDS if word in base), None)
    return recognise(adapter.modules, known=adapter.provenance.get("family") or named)


def identify(adapter: LoraAdapter, where: str) -> LoraAdapter:
    """``adapter`` with its transformer modules under diffusers' names (see the module docstring); an adapter of no
    known family comes back as it is. ``where`` names the file in errors."""
    family = recognise(adapter.modules, where)
    if family is None:  # no family, or diffusers' names of several (``fits``, for `loramix check`)
        fits = [f.name for f, _ in _best(adapter.modules)]
        if not fits:
            return adapter
        return adapter.with_modules(adapter.modules, provenance={**adapter.provenance, "fits": fits})
    modules: dict[str, LoraModule] = {}
    origin: dict[str, str] = {}
    unknown = []
    for name, module in adapter.modules.items():
        if name.startswith(TEXT):
            parts = {name: module}
        elif (found := reading(family, name)) is None:
            unknown.append(name)
            continue
        else:
            parts = _parts(family, found, name, module, where)
        for target, part in parts.items():
            if target in modules:
                raise AdapterFormatError(f"{where}: modules {origin[target]} and {name} both change {target}")
            modules[target], origin[target] = part, name
    if unknown:
        raise AdapterFormatError(
            f"{where}: {len(unknown)} module name(s) fit no {family.label} transformer module ({sample(unknown)}); "
            f"expected its kohya (lora_unet_…), ComfyUI/BFL, XLabs or diffusers (transformer.…) names"
        )
    hidden = Counter(m.in_features for n, m in modules.items() if n.startswith(COMPONENT)).most_common(1)
    architecture = f"{family.label} ({family.model_class}, hidden {hidden[0][0]})" if hidden else family.label
    namings = sorted({naming(n, family) for n in adapter.modules if not n.startswith(TEXT)})
    provenance = {**adapter.provenance, "family": family.name, "architecture": architecture, "namings": namings}
    return adapter.with_modules(modules, provenance=provenance)


def naming(name: str, family: Family | None = None) -> str:
    """Which naming a transformer module name is in: ``kohya`` (``lora_unet_``), ``diffusers-flat``
    (``lora_transformer_``), ``diffusers`` (``transformer.``) or ``original`` (dotted, from ComfyUI/BFL or XLabs, or
    under diffusers' ``transformer.`` prefix where ``family`` reads it as its original module: diffusion-pipe's)."""
    for prefix, label in ((KOHYA, "kohya"), (DIFFUSERS_FLAT, "diffusers-flat"), (COMPONENT, "diffusers")):
        if name.startswith(prefix):
            found = reading(family, name) if family is not None and prefix == COMPONENT else None
            return "original" if found is not None and found[2] == -1 else label
    return "original"


def _parts(family: Family, found, name: str, module: LoraModule, where: str) -> dict[str, LoraModule]:
    rule, block, index = found
    if index >= 0:
        return {COMPONENT + rule.name(rule.targets[index], block): module}
    if module.layout != "out_in" and rule.split != "one":
        raise AdapterFormatError(f"{where}: module {name} is a {module.layout} LoRA; {family.label}'s are linear")
    pieces = family.pieces(rule, block, module.in_features, module.out_features, f"{where}: {name}")
    return {COMPONENT + n: m for n, m in split(module, pieces).items()}


NAMINGS = ("kohya", "comfyui")
COMFY = "diffusion_model."  # ComfyUI's and BFL's prefix for the denoiser's own module names


def original_name(path: str, naming: str) -> str:
    """An original module path under ``naming``: kohya's ``lora_unet_…`` (flattened) or ComfyUI's
    ``diffusion_model.…`` (dotted)."""
    return COMFY + path if naming == "comfyui" else KOHYA + path.replace(".", "_")


def to_original(adapter: LoraAdapter, naming: str = "kohya") -> LoraAdapter:
    """``adapter`` with a recognised family's diffusers-named transformer modules joined back into the original
    modules under sd-scripts'/musubi-tuner's names (``lora_unet_double_blocks_0_img_attn_qkv``) or, with ``naming``
    ``comfyui``, ComfyUI's (``diffusion_model.double_blocks.0.img_attn.qkv``); any other adapter as it is. A
    transformer module outside the family's map is refused."""
    family = family_of(adapter)
    if family is None:
        return adapter
    out: dict[str, LoraModule] = {}
    groups: dict[tuple[Rule, str | None], dict[str, LoraModule]] = defaultdict(dict)
    for name, module in adapter.modules.items():
        found = reading(family, name)
        if found is None and not name.startswith(TEXT):
            raise OutputError(f"module {name} is no {family.label} transformer module, so it has no {naming} name")
        if found is None:  # a text encoder's: kohya's names, which ComfyUI reads too
            out[name] = module
        elif found[2] == -1:  # an original module's already
            out[original_name(found[0].name(found[0].original, found[1]), naming)] = module
        else:
            rule, block, index = found
            groups[(rule, block)][COMPONENT + rule.name(rule.targets[index], block)] = module
    mlp = _mlp_rows(family, adapter.modules)
    for (rule, block), parts in groups.items():
        out[original_name(rule.name(rule.original, block), naming)] = _joined(family, rule, block, parts, mlp)
    return adapter.with_modules(out)


def file_naming(adapters: list[LoraAdapter]) -> str:
    """The format of a diffusion LoRA file that diffusers and ComfyUI both load for ``adapters``' family: ComfyUI's
    names for HunyuanVideo (diffusion-pipe's file, `loramix.formats.diffusion.comfyui`) and Wan (diffusers reads
    musubi-tuner's names only when every block holds all ten attention and FFN modules, its ``diffusion_model.``
    names in any subset); diffusers' for SD3 (diffusers has no converter of its original names; ComfyUI maps
    diffusers' SD3 names), for Flux.1 with modules outside the blocks (diffusers' kohya converter drops those: see
    `loramix.compat.diffusion`) and for diffusers' transformer names of no one family (``transformer_blocks.0.attn
    .to_q`` alone: Flux.1's or SD3's); kohya's otherwise."""
    families = {f.name if (f := family_of(a)) else None for a in adapters}
    if families == {None} and any(n.startswith(COMPONENT) for a in adapters for n in a.modules):
        return "diffusers"
    if families in ({"wan"}, {"hunyuan-video"}):
        return "comfyui"
    if families == {"sd3"}:
        return "diffusers"
    outside = any(_outside_blocks(n) for a in adapters for n in a.modules)
    return "diffusers" if families == {"flux"} and outside else "kohya"


def _outside_blocks(name: str) -> bool:
    """A Flux.1 transformer module outside its double and single blocks (by any of its namings)."""
    found = reading(FLUX, name)
    return found is not None and found[1] is None


def onto_base(adapter: LoraAdapter, keys) -> LoraAdapter:
    """``adapter`` in the names of a base checkpoint whose tensor ``keys`` are the family's original modules (a
    ComfyUI/BFL single file such as ``flux1-dev.safetensors``, keys ``double_blocks.0.img_attn.qkv.weight``, with or
    without ``model.diffusion_model.``): the parts joined into the original modules (`to_original`), each named by
    the base's own module path; any other adapter or base as is (a module the base lacks is named by the merge)."""
    family = family_of(adapter)
    if family is None:
        return adapter
    paths = {}
    for key in keys:
        if key.endswith(".weight"):
            path = key.removesuffix(".weight")
            paths[path.rpartition(COMFY)[2]] = path
    if not any(family.match(p, flat=False, original=True) for p in paths):
        return adapter
    joined = to_original(adapter, "comfyui")
    return joined.with_modules({paths.get(n.removeprefix(COMFY), n): m for n, m in joined.modules.items()})


def _joined(family: Family, rule: Rule, block, parts: dict[str, LoraModule], mlp) -> LoraModule:
    first = next(iter(parts.values()))
    for name, module in parts.items():
        if (
            module.bias is not None
            or module.magnitude is not None
            or (module.layout != "out_in" and rule.split != "one")
        ):
            raise OutputError(f"module {name}: kohya files hold a plain linear LoRA for {family.label}")
    if rule.split == "one":
        return first
    hidden = first.in_features
    rows = {"thirds": 3 * hidden, "qkv_rest": 3 * hidden + mlp(hidden)}.get(rule.split, first.out_features)
    pieces = [Piece(COMPONENT + p.name, p.segments) for p in family.pieces(rule, block, hidden, rows, "the output")]
    return join(parts, pieces, rows)


def _mlp_rows(family: Family, modules: dict[str, LoraModule]):
    """The MLP rows of a fused q,k,v,MLP module, from a module that shows them (an MLP projection's rows, or the
    output projection's columns past the hidden size), else the family's MLP ratio."""

    def rows(hidden: int) -> int:
        for name, m in modules.items():
            if name.endswith(".proj_mlp"):
                return m.out_features
            if name.startswith(COMPONENT + "single_transformer_blocks.") and name.endswith(".proj_out"):
                return m.in_features - hidden
        return family.mlp_ratio * hidden

    return rows
