"""kohya/A1111 LoRA files (``lora_down``/``lora_up``/``alpha``) and diffusers' LoRA naming, read and written.

kohya (sd-scripts) and A1111 save one ``.safetensors`` file whose keys are ``<name>.lora_down.weight`` (rank×in, or
rank×in×kh×kw for a conv), ``<name>.lora_up.weight`` (out×rank, or out×rank×1×1) and ``<name>.alpha`` (a scalar;
the scale is alpha/rank, and alpha = rank when it is missing). ``<name>`` is the module path flattened with
underscores behind a component prefix: ``lora_unet_down_blocks_0_attentions_0_proj_in``,
``lora_te_text_model_encoder_layers_0_self_attn_q_proj`` (``lora_te1_``/``lora_te2_`` for SDXL's two text encoders).

diffusers saves ``unet.<dotted path>.lora.down.weight``/``.lora.up.weight`` (its old attention processors) or
PEFT's ``lora_A``/``lora_B`` under ``unet.``/``text_encoder.``/``text_encoder_2.`` prefixes
(``pytorch_lora_weights.safetensors``); ``.alpha`` keys are honoured when present, else the scale is 1 — unless the
file's ``lora_adapter_metadata`` holds the component's LoraConfig (``lora_alpha``, ``alpha_pattern``, ``use_rslora``),
which diffusers' loader then follows, and so does loramix.

Module names. A flattened kohya name cannot be turned back into a dotted path by itself — ``down_blocks_0`` and
``proj_in`` hold underscores of their own, and only the base model's key list can say where the dots were — so a
kohya module keeps its kohya name (``lora_unet_down_blocks_0_attentions_0_proj_in``) as its loramix module name.
Two kohya files for the same base therefore line up with each other, and writing back to kohya restores every key
exactly. A diffusers-named module keeps its dotted name with the component prefix (``unet.down_blocks.0…``); written
as kohya it becomes the kohya key diffusers' own converter expects (``unet.`` → ``lora_unet_``, ``text_encoder.`` →
``lora_te_``, ``text_encoder_2.`` → ``lora_te2_``, dots → underscores; a CLIP layer's path always with kohya's
``text_model_``, which transformers 5 no longer has in its module paths). A PEFT adapter of SD's CLIP text encoder
(``text_model.encoder.layers.0.self_attn.q_proj``, or ``encoder.layers.0…`` from transformers 5) is written as
``lora_te_text_model_encoder_layers_0_self_attn_q_proj``, one of its UNet (``down_blocks.0.…``) with ``lora_unet_``
(SDXL's second text encoder cannot be told from the first: its names come out as ``lora_te_``). Mixing kohya-named
and diffusers-named adapters does not line their modules up: convert one of them first. Merged into a base
(`loramix.io.base.with_base_names`; a diffusers pipeline: `loramix.io.diffusers`) a kohya name finds the base's
dotted module path again, where that is unambiguous.

Written files hold ``<name>.lora_down.weight``, ``<name>.lora_up.weight`` and a float32 ``<name>.alpha`` equal to
scale·rank (so alpha/rank gives back the scale), plus kohya's ``ss_network_dim``/``ss_network_alpha`` metadata and
the base kohya's trainers record (``ss_base_model_version``, ``ss_sd_model_name``; read as the adapter's base, see
`file_base`). The format has no place for heads, lora_B biases, DoRA magnitudes or embedding LoRA: those are refused
on write.
"""

from __future__ import annotations

import json
import math
import re
from collections import defaultdict
from pathlib import Path

import torch
from safetensors import safe_open

from loramix.adapter import LoraAdapter, LoraModule
from loramix.errors import AdapterFormatError, OutputError
from loramix.formats._keys import is_number, pattern_value
from loramix.formats.diffusion import COMFY, identify, to_original
from loramix.io.files import check_finite, read_tensors, tensor_keys
from loramix.io.tensorfile import write_safetensors

NAME = "kohya"
SUFFIXES = (".safetensors", ".pt", ".pth", ".bin")
DIFFUSERS_FILE = "pytorch_lora_weights.safetensors"
DIFFUSERS_METADATA = "lora_adapter_metadata"  # diffusers' LoRA_ADAPTER_METADATA_KEY: each component's LoraConfig
BASE_VERSION, MODEL_NAME = "ss_base_model_version", "ss_sd_model_name"  # sd-scripts' metadata of the base
MAX_SCALE = 2.0**16  # alpha/rank beyond this is no trained LoRA (and overflows float16 outputs)
KOHYA_PREFIX = re.compile(r"^(?:lora_(?:unet|te\d?|transformer)|lycoris)_")  # lycoris_: LyCORIS on any torch model
# (key pattern, style): groups module, side (down/up/A/B/alpha)
_DIFFUSERS = r"^(?P<module>(?:unet|text_encoder(?:_\d)?|transformer)\..+)"
KEY_RULES = (
    (re.compile(r"^(?P<module>lora_[^.]+)\.(?P<side>lora_down|lora_up)\.weight$"), "kohya"),
    (re.compile(r"^(?P<module>lora_[^.]+)\.(?P<side>alpha)$"), "kohya"),
    (re.compile(_DIFFUSERS + r"\.lora\.(?P<side>down|up)\.weight$"), "diffusers"),
    (re.compile(_DIFFUSERS + r"\.(?P<side>lora_A|lora_B)\.weight$"), "diffusers"),
    (re.compile(_DIFFUSERS + r"\.(?P<side>alpha)$"), "diffusers"),
)
# LyCORIS files (`loramix.formats.lycoris`) use the same flattened names with factor keys of their own (hada_w1_a,
# lokr_w1, lora_mid.weight, dora_scale, …) or the ``lycoris_`` prefix: any such key makes a file LyCORIS's, not kohya's.
FLAT_KEY = re.compile(r"^(?P<module>(?:lora|lycoris)_[^.]+)\.(?P<part>.+)$")
LORA_PARTS = ("lora_down.weight", "lora_up.weight", "alpha")
SIDES = {"lora_down": "A", "down": "A", "lora_A": "A", "lora_up": "B", "up": "B", "lora_B": "B", "alpha": "alpha"}
COMPONENTS = {
    "unet": "lora_unet_",
    "text_encoder": "lora_te_",
    "text_encoder_2": "lora_te2_",
    "transformer": "lora_transformer_",
}
# A PEFT adapter of one pipeline component names modules by their path inside it: a UNet's blocks get kohya's
# lora_unet_ prefix, and an adapter all of whose modules are CLIP text-model layers (SD's text encoder; transformers 5
# drops the text_model. level) gets lora_te_text_model_…, as kohya and A1111 name them.
UNET_PARTS = ("down_blocks", "mid_block", "up_blocks", "conv_in", "conv_out", "time_embedding", "add_embedding")
CLIP_TEXT = re.compile(
    r"^(?:text_model\.)?(?:encoder\.layers\.\d+\.(?:self_attn\.[qkv]_proj|self_attn\.out_proj|mlp\.fc[12]))$"
)


def _match(key: str):
    for rule, style in KEY_RULES:
        found = rule.match(key)
        if found:
            return found, style
    return None, None


def lycoris_key(key: str) -> bool:
    """Whether ``key`` is a LyCORIS key: a flattened kohya-style name with a part plain LoRA files do not have, or
    LyCORIS's own ``lycoris_`` prefix."""
    found = FLAT_KEY.match(key)
    return found is not None and (found["part"] not in LORA_PARTS or found["module"].startswith("lycoris_"))


def is_kohya_file(path: Path) -> bool:
    """A single tensor file whose LoRA keys are kohya's (``lora_unet_…``, ``.alpha``) or diffusers' (``unet.…``)
    and that holds no LyCORIS key."""
    keys = file_keys(path)
    return any(_match(k)[0] is not None for k in keys) and not any(lycoris_key(k) for k in keys)


def file_keys(path: Path) -> list[str]:
    """The tensor keys of ``path`` when it is a tensor file of a suffix these formats use, else none."""
    return tensor_keys(path) if path.is_file() and path.suffix in SUFFIXES else []


def find_file(path: Path, accept=is_kohya_file) -> Path | None:
    """The file ``path`` names that ``accept`` takes (default: a kohya/diffusers file): the file itself, or a
    folder's only one (loramix writes one)."""
    if path.is_file():
        return path if accept(path) else None
    if not path.is_dir() or (path / "adapter_config.json").exists():
        return None
    if (path / DIFFUSERS_FILE).is_file() and accept(path / DIFFUSERS_FILE):
        return path / DIFFUSERS_FILE
    found = [p for p in sorted(path.glob("*.safetensors")) if accept(p)]
    return found[0] if len(found) == 1 else None


def detect(path: Path) -> bool:
    return find_file(path) is not None


def read(path: str | Path, *, allow_nonfinite: bool = False) -> LoraAdapter:
    """Read a kohya/A1111 or diffusers LoRA file (or a folder holding one) into a `LoraAdapter`."""
    path = Path(path)
    file = find_file(path) or path
    tensors = read_tensors(file)
    if any(lycoris_key(k) for k in tensors):
        raise AdapterFormatError(f"{file}: a LyCORIS file, not a kohya LoRA: read it with loramix.load_adapter")
    if not allow_nonfinite:
        check_finite(file, tensors)
    parts: dict[str, dict[str, torch.Tensor]] = defaultdict(dict)
    styles, ignored = set(), []
    for key, tensor in tensors.items():
        found, style = _match(key)
        if found is None:
            ignored.append(key)
            continue
        styles.add(style)
        parts[found["module"]][SIDES[found["side"]]] = tensor
    if not parts:
        raise AdapterFormatError(f"{file}: no kohya (lora_down/lora_up) or diffusers LoRA keys found")
    notes = []
    if ignored:
        notes.append(f"{len(ignored)} key(s) are not LoRA factors and were dropped ({', '.join(ignored[:3])})")
    modules = {name: lora_module(file, name, found) for name, found in sorted(parts.items())}
    meta = metadata(file)
    _diffusers_scales(file, modules, meta)
    if all(not m.B.any() for m in modules.values()):
        notes.append("every lora_up factor is zero: this adapter changes nothing")
    adapter = LoraAdapter(
        modules=modules,
        base_model=file_base(meta),
        source=str(path),
        name=file.stem if file.name != DIFFUSERS_FILE else file.resolve().parent.name,  # diffusers' one name
        warnings=notes,
        file_bytes=file.stat().st_size,
        provenance={"format": "kohya", "key_style": "+".join(sorted(styles)), "file": file.name, **trained_on(meta)},
    )
    return identify(adapter, str(file))


def file_base(meta: dict[str, str]) -> str | None:
    """The base a kohya/LyCORIS file's metadata names: loramix's own key, else kohya's ``ss_base_model_version``
    (``sd_v1``, ``sdxl_base_v1-0``, …; older sd-scripts wrote only ``ss_v2``), the model family its LoRAs fit — not
    ``ss_sd_model_name``, the checkpoint file it was trained on, which two LoRAs of one family rarely share."""
    if meta.get("loramix_base_model"):
        return meta["loramix_base_model"]
    if meta.get(BASE_VERSION):
        return meta[BASE_VERSION]
    return {"True": "sd_v2", "False": "sd_v1"}.get(meta.get("ss_v2", ""))


def trained_on(meta: dict[str, str]) -> dict[str, str]:
    """``{"sd_model_name": …}``: the checkpoint kohya's metadata says the LoRA was trained on, when it says."""
    return {"sd_model_name": meta[MODEL_NAME]} if meta.get(MODEL_NAME) else {}


def metadata(file: Path) -> dict[str, str]:
    if file.suffix != ".safetensors":
        return {}
    with safe_open(str(file), "pt") as f:
        return f.metadata() or {}


def _diffusers_scales(file: Path, modules: dict[str, LoraModule], metadata: dict[str, str]) -> None:
    """diffusers' ``save_lora_weights`` may store each component's LoraConfig in the file's metadata
    (``lora_adapter_metadata``: ``unet.lora_alpha``, ``unet.alpha_pattern``, ``unet.use_rslora``, …), and its loader
    then builds the LoRA layers from it (over any ``.alpha`` keys): the scales follow it, with PEFT's pattern rule."""
    raw = metadata.get(DIFFUSERS_METADATA)
    if not raw:
        return
    try:
        config = json.loads(raw)
    except (ValueError, RecursionError):
        raise AdapterFormatError(f"{file}: metadata {DIFFUSERS_METADATA} is not valid JSON") from None
    if not isinstance(config, dict):
        raise AdapterFormatError(f"{file}: metadata {DIFFUSERS_METADATA} is not a JSON object")
    for name, module in modules.items():
        component, _, path = name.partition(".")
        alpha = config.get(f"{component}.lora_alpha")
        if alpha is None or not path:
            continue
        patterns = config.get(f"{component}.alpha_pattern") or {}
        if not (isinstance(patterns, dict) and all(is_number(v) for v in [alpha, *patterns.values()])):
            raise AdapterFormatError(f"{file}: metadata {DIFFUSERS_METADATA}: {component}'s alphas are not numbers")
        alpha = pattern_value(patterns, path, alpha, where=file)
        rslora = config.get(f"{component}.use_rslora") is True
        module.scale = float(alpha) / (math.sqrt(module.rank) if rslora else module.rank)
        if not 0 < module.scale <= MAX_SCALE:
            raise AdapterFormatError(f"{file}: module {name}: lora_alpha {alpha:g} gives scale {module.scale:g}")


def lora_module(
    file: Path, name: str, found: dict[str, torch.Tensor], *, zero_alpha_is_rank: bool = False
) -> LoraModule:
    """One kohya module from its tensors ``{"A": lora_down, "B": lora_up, "alpha": …}`` (see `alpha_scale`)."""
    down, up = found.get("A"), found.get("B")
    if down is None or up is None:
        missing = "lora_down" if down is None else "lora_up"
        raise AdapterFormatError(f"{file}: module {name} has no {missing} weight")
    if (
        up.ndim not in (2, 4)
        or down.ndim != up.ndim
        or up.shape[1] != down.shape[0]
        or up.shape[2:] not in ((), (1, 1))
    ):
        raise AdapterFormatError(
            f"{file}: module {name}: lora_down {tuple(down.shape)} and lora_up {tuple(up.shape)} do not chain"
        )
    rank = down.shape[0]
    if rank == 0 or not down.numel() or not up.numel():
        raise AdapterFormatError(f"{file}: module {name}: lora_down {tuple(down.shape)} has rank 0 or no values")
    if not (down.is_floating_point() and up.is_floating_point()):
        raise AdapterFormatError(f"{file}: module {name}: LoRA factors are not floating point ({down.dtype})")
    conv = down.ndim == 4
    return LoraModule(
        A=down.reshape(rank, -1),
        B=up.reshape(up.shape[0], rank),
        scale=alpha_scale(file, name, found.get("alpha"), rank, zero_alpha_is_rank=zero_alpha_is_rank),
        layout="conv2d" if conv else "out_in",
        kernel_size=tuple(down.shape[2:]) if conv else (),
    )


def alpha_scale(
    file: Path, name: str, alpha: torch.Tensor | None, rank: int, *, zero_alpha_is_rank: bool = False
) -> float:
    """The scale alpha/rank of module ``name``: 1 without alpha (and, with ``zero_alpha_is_rank``, for alpha 0, as
    LyCORIS reads it); refused unless positive and at most `MAX_SCALE`."""
    if alpha is not None and alpha.numel() != 1:
        raise AdapterFormatError(f"{file}: module {name}: alpha must be a scalar, got shape {tuple(alpha.shape)}")
    value = None if alpha is None else float(alpha.item())
    if value is None or (zero_alpha_is_rank and value == 0):
        return 1.0
    scale = value / rank
    if not 0 < scale <= MAX_SCALE:
        raise AdapterFormatError(
            f"{file}: module {name}: alpha {value:g} over rank {rank} gives scale {scale:g}; "
            f"expected a positive scale of at most {MAX_SCALE:g}"
        )
    return scale


def kohya_name(module: str, *, clip_text: bool = False) -> str:
    """The kohya key stem of a loramix module name (kohya names pass through unchanged; see the module docstring);
    ``clip_text``: the module is a layer of SD's CLIP text encoder (see `is_clip_text`)."""
    if KOHYA_PREFIX.match(module):
        return module
    component, dot, rest = module.partition(".")
    if dot and component in COMPONENTS:
        if component.startswith("text_encoder") and CLIP_TEXT.match(rest):  # transformers 5 drops text_model.
            rest = "text_model." + rest.removeprefix("text_model.")
        return COMPONENTS[component] + rest.replace(".", "_")
    if clip_text:
        return "lora_te_text_model_" + module.removeprefix("text_model.").replace(".", "_")
    return ("lora_unet_" if component in UNET_PARTS else "lora_") + module.replace(".", "_")


def kohya_named(names) -> bool:
    """Whether every module name is a flattened kohya name (``lora_unet_…``): a name no torch model has, which only
    kohya-file readers map onto a model."""
    names = list(names)
    return bool(names) and all(KOHYA_PREFIX.match(name) for name in names)


def is_clip_text(names) -> bool:
    """Whether every module name is a CLIP text-model layer (an adapter of SD's text encoder)."""
    names = list(names)
    return bool(names) and all(CLIP_TEXT.match(name) for name in names)


def state_dict(
    adapter: LoraAdapter, dtype: torch.dtype | None = None, *, naming: str = "kohya"
) -> dict[str, torch.Tensor]:
    """kohya's key layout for ``adapter`` (a diffusion transformer's modules under sd-scripts'/musubi-tuner's names,
    or ComfyUI's ``diffusion_model.…`` with ``naming="comfyui"``: `loramix.formats.diffusion.to_original`); refuses
    what the format cannot hold."""
    adapter = to_original(adapter, naming)
    if adapter.extra:
        raise OutputError(f"kohya files cannot hold heads or saved layers ({', '.join(sorted(adapter.extra)[:3])})")
    out: dict[str, torch.Tensor] = {}
    seen: dict[str, str] = {}
    clip_text = is_clip_text(adapter.modules)
    for name, m in adapter.modules.items():
        if m.bias is not None or m.magnitude is not None:
            raise OutputError(f"module {name}: kohya files cannot hold lora_B biases or DoRA magnitudes")
        if m.layout not in ("out_in", "conv2d"):
            raise OutputError(f"module {name}: kohya files hold linear and conv2d LoRA only, not {m.layout}")
        key = name if name.startswith(COMFY) else kohya_name(name, clip_text=clip_text)
        if key in seen:
            raise OutputError(f"modules {seen[key]} and {name} both flatten to the kohya name {key}")
        seen[key] = name
        cast = dtype or m.A.dtype
        if m.layout == "conv2d":
            down = m.A.reshape(m.rank, -1, *m.kernel_size)
            up = m.B.reshape(m.out_features, m.rank, 1, 1)
        else:
            down, up = m.A, m.B
        out[f"{key}.lora_down.weight"] = down.to(cast).contiguous()
        out[f"{key}.lora_up.weight"] = up.to(cast).contiguous()
        out[f"{key}.alpha"] = torch.tensor(m.scale * m.rank, dtype=torch.float32)
    return out


def write(
    adapter: LoraAdapter,
    folder: Path,
    *,
    dtype: torch.dtype | None = None,
    file_name: str | None = None,
    naming: str = "kohya",
) -> Path:
    """Write ``adapter`` as a kohya/A1111 file ``FOLDER/<file_name>`` (default: the folder's name +
    ``.safetensors``) into the existing ``folder``, a diffusion transformer's modules in ``naming`` (see
    `state_dict`); returns the file."""
    if not adapter.modules:
        raise OutputError(f"{folder}: the adapter has no LoRA modules, so there is no kohya file to write")
    tensors = state_dict(adapter, dtype, naming=naming)
    ranks = sorted({m.rank for m in adapter.modules.values()})
    alphas = sorted({float(t) for k, t in tensors.items() if k.endswith(".alpha")})
    metadata = {
        "ss_network_module": "networks.lora",
        "ss_network_dim": str(ranks[-1]),
        "ss_network_alpha": f"{alphas[-1]:g}",
        "ss_network_args": json.dumps({"loramix_ranks": ranks}),
        "loramix_base_model": adapter.base_model or "",
    }
    if adapter.base_model and "/" not in adapter.base_model and kohya_named(adapter.modules):  # a kohya family name
        metadata[BASE_VERSION] = adapter.base_model
    if adapter.provenance.get("sd_model_name"):
        metadata[MODEL_NAME] = adapter.provenance["sd_model_name"]
    file = folder / (file_name or folder.name + ".safetensors")
    return write_safetensors(file, tensors, metadata)
