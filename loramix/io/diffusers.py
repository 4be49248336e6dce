"""diffusers pipeline folders as bases: their components, and adapter module names mapped onto them.

A pipeline folder holds ``model_index.json`` and one folder per component; the ones that hold weights (``unet/``,
``text_encoder/``, ``text_encoder_2/``, ``transformer/``, ``vae/``) are model folders of their own — a diffusers
config with ``diffusion_pytorch_model*.safetensors`` or a transformers config with ``model*.safetensors``, sharded or
not — each read through `loramix.io.base.open_base`.

Names. An adapter for a pipeline names its modules in one of two ways (see `loramix.formats.kohya`):

- diffusers: ``unet.down_blocks.0.attentions.0.proj_in``, ``text_encoder.text_model.encoder.layers.0.self_attn.q_proj``
  — the component, then the module's path inside it;
- kohya: ``lora_unet_…``, ``lora_te_…`` (``lora_te1_``/``lora_te2_`` for SDXL's two text encoders),
  ``lora_transformer_…`` — the component's prefix, then the path with dots read as underscores. The path is found
  among the component's own modules (`loramix.io.base.NameMatcher.find_flat`: only an unambiguous match counts).
  kohya trains SD 1.x/2.x on diffusers' UNet, so its names are diffusers' paths; for SDXL it trains on Stability's
  own UNet (``input_blocks_4_1_…``, ``middle_block_1_…``, ``output_blocks_2_2_conv``), whose blocks `sgm_to_diffusers`
  maps to diffusers' from the UNet's config, as diffusers' own loader does.
"""

from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import dataclass
from pathlib import Path

from loramix.adapter import LoraAdapter
from loramix.errors import CheckpointError
from loramix.io.base import BaseCheckpoint, is_kohya_name, open_base

PIPELINE_INDEX = "model_index.json"
# kohya's component prefixes (sd-scripts' LoRANetwork names: LORA_PREFIX_UNET, LORA_PREFIX_TEXT_ENCODER(1/2))
KOHYA_COMPONENTS = {
    "lora_unet_": "unet",
    "lora_te_": "text_encoder",
    "lora_te1_": "text_encoder",
    "lora_te2_": "text_encoder_2",
    "lora_transformer_": "transformer",
}
_SGM_RESNET = {"in_layers_2": "conv1", "out_layers_3": "conv2", "emb_layers_1": "time_emb_proj"}
_SGM_RESNET |= {"skip_connection": "conv_shortcut"}
_SGM_TOP = {"time_embed_0": "time_embedding_linear_1", "time_embed_2": "time_embedding_linear_2"}
_SGM_TOP |= {"label_emb_0_0": "add_embedding_linear_1", "label_emb_0_2": "add_embedding_linear_2"}
_SGM_TOP |= {"input_blocks_0_0": "conv_in", "out_2": "conv_out"}
_SGM_BLOCK = re.compile(r"^(?P<where>input_blocks|output_blocks)_(?P<i>\d+)_(?P<j>\d+)_(?P<rest>.+)$")
_SGM_MIDDLE = re.compile(r"^middle_block_(?P<i>[012])_(?P<rest>.+)$")


@dataclass
class Pipeline:
    """A diffusers pipeline folder: its index and the components that hold weights (by folder name)."""

    folder: Path
    index: dict
    components: dict[str, BaseCheckpoint]


def is_pipeline(folder: Path) -> bool:
    return (Path(folder) / PIPELINE_INDEX).is_file()


def open_pipeline(folder: str | Path) -> Pipeline:
    """Read ``model_index.json`` and the headers of every component folder that holds weights."""
    folder = Path(folder)
    try:
        index = json.loads((folder / PIPELINE_INDEX).read_text())
    except (OSError, ValueError, RecursionError) as exc:
        raise CheckpointError(f"{folder / PIPELINE_INDEX}: not a readable pipeline index ({exc})") from None
    if not isinstance(index, dict):
        raise CheckpointError(f"{folder / PIPELINE_INDEX}: expected a JSON object")
    components = {}
    for name, entry in sorted(index.items()):
        part = folder / name
        listed = isinstance(entry, list) and len(entry) == 2 and entry[0] is not None
        if listed and not name.startswith((".", "_")) and "/" not in name and part.is_dir():
            if (part / "config.json").is_file() and _has_weights(part):
                components[name] = open_base(part)
    if not components:
        raise CheckpointError(f"{folder}: a diffusers pipeline with no component that holds weights")
    return Pipeline(folder, index, components)


def _has_weights(folder: Path) -> bool:
    return any(folder.glob("*.safetensors")) or any(folder.glob("*.bin"))


def split_adapter(adapter: LoraAdapter, pipeline: Pipeline) -> dict[str, LoraAdapter]:
    """One adapter per component the adapter changes, its modules named by their paths inside that component.
    Raises `CheckpointError` naming the first module that fits no component's module."""
    parts: dict[str, dict] = {}
    for name, module in adapter.modules.items():
        component, path = _locate(name, pipeline)
        found = parts.setdefault(component, {})
        if path in found:
            raise CheckpointError(f"two adapter modules name {component} module {path} (the second is {name})")
        found[path] = module
    return {c: dataclasses.replace(adapter, modules=m) for c, m in sorted(parts.items())}


def _locate(name: str, pipeline: Pipeline) -> tuple[str, str]:
    where = f"pipeline {pipeline.folder}"
    if is_kohya_name(name):
        prefix = next((p for p in KOHYA_COMPONENTS if name.startswith(p)), None)
        component = KOHYA_COMPONENTS.get(prefix)
        if component not in pipeline.components:
            has = ", ".join(pipeline.components)
            raise CheckpointError(f"kohya module {name}: {where} has no component for it (it has {has})")
        base = pipeline.components[component]
        flat = name.removeprefix(prefix)
        path = base.matcher.find_flat(flat)
        if path is None and component == "unet":
            path = base.matcher.find_flat(sgm_to_diffusers(flat, base.config))
        if path is None:
            raise CheckpointError(f"kohya module {name} matches no module of {component} in {where}")
        return component, path
    component, _, path = name.partition(".")
    if component not in pipeline.components or not path:
        raise CheckpointError(f"adapter module {name} names no component of {where} ({', '.join(pipeline.components)})")
    key = pipeline.components[component].matcher.find(f"{path}.weight")
    if key is None:
        raise CheckpointError(f"adapter module {name} has no weight {path}.weight in {component} of {where}")
    return component, key.removesuffix(".weight")


def sgm_to_diffusers(flat: str, config: dict) -> str:
    """A kohya SDXL UNet name (Stability's blocks, flat) as the flat diffusers path: ``input_blocks_4_1_proj_in`` →
    ``down_blocks_1_attentions_0_proj_in``. Stability's input block i ≥ 1 is down block (i−1)//(L+1), layer
    (i−1)%(L+1), the last being the downsampler; output block i is up block i//(L+1), layer i%(L+1), its third part
    the upsampler (the second when the block has no attention); middle block parts 0, 1, 2 are resnet 0, attention 0,
    resnet 1 (L = layers_per_block). Names outside these blocks come back as they were."""
    if flat in _SGM_TOP:
        return _SGM_TOP[flat]
    middle = _SGM_MIDDLE.match(flat)
    if middle is not None:
        i, rest = int(middle["i"]), middle["rest"]
        return f"mid_block_attentions_0_{rest}" if i == 1 else f"mid_block_resnets_{i // 2}_{_resnet_part(rest)}"
    found = _SGM_BLOCK.match(flat)
    layers = config.get("layers_per_block")
    if found is None or not isinstance(layers, int) or isinstance(layers, bool):
        return flat
    i, j, rest = int(found["i"]), int(found["j"]), found["rest"]
    if found["where"] == "input_blocks":
        block, layer = divmod(i - 1, layers + 1)
        if layer == layers:  # the downsampler: its conv is called op
            return f"down_blocks_{block}_downsamplers_0_{rest.replace('op', 'conv')}"
        kinds = config.get("down_block_types") or ()
        part = "resnets" if j == 0 else "attentions"
        inner = _resnet_part(rest) if j == 0 else rest
        return f"down_blocks_{block}_{part}_{layer}_{inner}" if block < len(kinds) else flat
    block, layer = divmod(i, layers + 1)
    kinds = config.get("up_block_types") or ()
    if block >= len(kinds):
        return flat
    if j == 0:
        return f"up_blocks_{block}_resnets_{layer}_{_resnet_part(rest)}"
    if j == 1 and "CrossAttn" in kinds[block]:
        return f"up_blocks_{block}_attentions_{layer}_{rest}"
    return f"up_blocks_{block}_upsamplers_0_{rest}"


def _resnet_part(rest: str) -> str:
    return next((new + rest[len(old) :] for old, new in _SGM_RESNET.items() if rest.startswith(old)), rest)
