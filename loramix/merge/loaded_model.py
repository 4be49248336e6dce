"""Merge an adapter into a loaded model's weights in place (`merge_into_model`) and take it out again (`unmerge`).

The in-memory twin of `loramix.merge.checkpoint.write_merged`, with its kernels (`delta_rows`, `dora_merge`,
`decide_layout`), its name rule (`loramix.io.base.NameMatcher`, here over the model's module names) and its survival
measure. Each weight is updated on its own device: W + ΔW in float32, cast once to the weight's dtype. The layout
comes from the model itself: transformers' ``Conv1D`` layers hold their weight in×out. An adapter module is found as
``model.get_submodule(name)`` (one side may carry a prefix the other lacks), so a ``PeftModel``'s wrapped layers
work too (their base layer is updated). Tied weights are one tensor: merging into a tied output head changes the
input embedding with it, as PEFT's ``merge_and_unload`` does.

`unmerge` subtracts ΔW again. The float32 arithmetic of the merge is not exactly reversible: the result lies within
one rounding of the original weight in its own dtype. A DoRA merge rescales rows by ‖W+ΔW‖, which the merged weight
no longer holds, so `unmerge` needs the report `merge_into_model` returned; so do extra tensors (heads), whose replaced
originals the report keeps.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import torch
from transformers.pytorch_utils import Conv1D

from loramix import experts
from loramix.adapter import LoraAdapter
from loramix.errors import ArgumentError, CheckpointError, SettingError
from loramix.formats import load_adapter
from loramix.io.base import NameMatcher
from loramix.merge.kernels import (
    StoredUpdate,
    Survival,
    Update,
    decide_layout,
    delta_rows,
    dora_merge,
    row_shape,
    warn_stored,
)


@dataclass
class ModelMergeReport:
    """What `merge_into_model` or `unmerge` did to a live model.

    ``survival``: per module, how the change stored in the weight's dtype compares with the intended ±ΔW
    (`loramix.merge.kernels.StoredUpdate`: kept share, relative error, cosine; as in a merged checkpoint's report).
    ``replaced``: the original values of the parameters the adapter's extra tensors (heads) replaced;
    ``dora_norms``: per DoRA module the row norms ‖W+ΔW‖. `unmerge` uses both.
    """

    survival: dict[str, StoredUpdate] = field(default_factory=dict)
    replaced: dict[str, torch.Tensor] = field(default_factory=dict)
    dora_norms: dict[str, torch.Tensor] = field(default_factory=dict)


@dataclass
class _Target:
    layer: torch.nn.Module
    update: Update


def _check_model(model, what: str) -> None:
    if not isinstance(model, torch.nn.Module):
        raise ArgumentError(
            f"{what} takes a loaded torch model (a transformers model or PeftModel), not a {type(model).__name__}; "
            "for a model folder or Hub id use merge_into_base"
        )


def _plan(model: torch.nn.Module, adapter: LoraAdapter) -> list[_Target]:
    """Every module's layer and layout, checked before any weight changes."""
    experts.refuse(adapter, "merge_into_model / unmerge (a loaded model)")
    matcher = NameMatcher([name for name, _ in model.named_modules() if name])
    label = type(model).__name__
    targets, owners = [], {}
    for name, module in adapter.modules.items():
        key = matcher.find(name)
        if key is None:
            raise CheckpointError(f"adapter module {name} has no matching module in the {label}")
        layer = model.get_submodule(key)
        layer = layer.get_base_layer() if hasattr(layer, "get_base_layer") else layer
        weight = getattr(layer, "weight", None)
        if not isinstance(weight, torch.Tensor) or not weight.is_floating_point():
            raise CheckpointError(f"adapter module {name}: {label} module {key} has no floating-point weight")
        conv1d = isinstance(layer, Conv1D)
        module = module.on_weight(tuple(weight.shape))
        layout = decide_layout(module, name, f"{key}.weight", tuple(weight.shape), None, conv1d=conv1d)
        if module.bias is not None and getattr(layer, "bias", None) is None:
            raise CheckpointError(f"adapter module {name} has a lora_B bias but {label} module {key} has no bias")
        others = owners.setdefault(id(weight), [])
        others.append(module)
        if len(others) > 1 and any(m.magnitude is not None for m in others):
            raise CheckpointError(f"several adapter modules apply to {label} weight {key}.weight, and one is DoRA")
        targets.append(_Target(layer, Update(name, module, layout)))
    return targets


def _extras(model: torch.nn.Module, adapter: LoraAdapter) -> dict[str, tuple[str, torch.Tensor]]:
    """The parameter each extra tensor replaces: {adapter name: (model name, parameter)}."""
    params = dict(model.named_parameters(remove_duplicate=False))
    matcher = NameMatcher(list(params))
    found = {}
    for name, extra in adapter.extra.items():
        key = matcher.find(name)
        if key is None:
            label = type(model).__name__
            raise CheckpointError(f"adapter tensor {name} ({extra.kind}) has no matching {label} parameter")
        if tuple(params[key].shape) != tuple(extra.tensor.shape):
            raise CheckpointError(
                f"adapter tensor {name} has shape {tuple(extra.tensor.shape)} but parameter {key} has "
                f"{tuple(params[key].shape)}"
            )
        found[name] = (key, params[key])
    return found


def _store(weight: torch.Tensor, result: torch.Tensor, before: torch.Tensor, name: str) -> StoredUpdate:
    """Write ``result`` (float32) into ``weight`` in its dtype; how the stored change compares with the intended one
    (as in a checkpoint: `loramix.merge.kernels.StoredUpdate`)."""
    intended = result - before
    if not torch.isfinite(intended).all():
        raise CheckpointError(f"adapter module {name}: W ± ΔW holds NaN/Inf (the adapter or the model is broken)")
    weight.copy_(result.to(weight.dtype))
    measure = Survival()
    measure.add(weight.float() - before, intended)
    return measure.measure()


def merge_into_model(model: torch.nn.Module, adapter) -> ModelMergeReport:
    """Add ``adapter``'s ΔW (a `LoraAdapter` or any source `load_adapter` takes) into ``model``'s weights in place,
    as PEFT's ``merge_and_unload`` does (DoRA exactly, lora_B biases into the layer biases, heads replaced). Nothing
    changes when a module does not fit the model. Returns a `ModelMergeReport` (keep it to `unmerge` DoRA or heads).
    """
    _check_model(model, "merge_into_model")
    adapter = load_adapter(adapter)
    targets, extras = _plan(model, adapter), _extras(model, adapter)
    report = ModelMergeReport()
    with torch.no_grad():
        fresh = {}  # a saved base layer is what ΔW is added to, at its full precision
        for name, (key, param) in extras.items():
            report.replaced[key] = param.detach().to("cpu", copy=True)
            param.copy_(adapter.extra[name].tensor)
            fresh[id(param)] = adapter.extra[name].tensor
        for target in targets:
            update, weight = target.update, target.layer.weight
            source = fresh.pop(id(weight), weight).detach()
            before = source.to(device=weight.device, dtype=torch.float32, copy=True)
            if update.module.magnitude is not None:
                result, norm = dora_merge(before, update, weight.device)
                report.dora_norms[update.name] = norm.cpu()
            else:
                result = before + delta_rows(update.module, update.layout, 0, weight.shape[0], weight.device)
            report.survival[update.name] = _store(weight, result, before, update.name)
            _add_bias(target, +1.0)
    _warn(model, report, adapter)
    return report


def unmerge(model: torch.nn.Module, adapter, *, merged: ModelMergeReport | None = None) -> ModelMergeReport:
    """Take ``adapter``'s ΔW out of ``model``'s weights again (in place), within one rounding of the weights before
    `merge_into_model`. DoRA modules and extra tensors need ``merged``, the report `merge_into_model` returned."""
    _check_model(model, "unmerge")
    adapter = load_adapter(adapter)
    targets, extras = _plan(model, adapter), _extras(model, adapter)
    needs = [t.update.name for t in targets if t.update.module.magnitude is not None]
    lacking = [n for n in needs if merged is None or n not in merged.dora_norms]
    lacking += [key for key, _ in extras.values() if merged is None or key not in merged.replaced]
    if lacking:
        raise SettingError(
            f"{lacking[0]}: a DoRA module or replaced head cannot be taken out of the weights alone; pass the report "
            "merge_into_model returned as merged="
        )
    report = ModelMergeReport()
    with torch.no_grad():
        for target in targets:
            update, weight = target.update, target.layer.weight
            before = weight.detach().to(torch.float32, copy=True)
            delta = delta_rows(update.module, update.layout, 0, weight.shape[0], weight.device)
            if update.module.magnitude is not None:
                norm = merged.dora_norms[update.name].to(weight.device)
                factor = update.module.magnitude.to(device=weight.device, dtype=torch.float32) / norm
                result = before / factor.reshape(row_shape(update.layout, before.dim())) - delta
            else:
                result = before - delta
            report.survival[update.name] = _store(weight, result, before, update.name)
            _add_bias(target, -1.0)
        for key, param in extras.values():
            param.copy_(merged.replaced[key])
    _warn(model, report, adapter)
    return report


def _add_bias(target: _Target, sign: float) -> None:
    bias = target.update.module.bias_delta()
    if bias is not None:
        layer_bias = target.layer.bias
        layer_bias.copy_((layer_bias.float() + sign * bias.to(layer_bias.device)).to(layer_bias.dtype))


def _warn(model: torch.nn.Module, report: ModelMergeReport, adapter: LoraAdapter) -> None:
    dtypes = Counter(p.dtype for p in model.parameters() if p.is_floating_point())
    if dtypes:
        warn_stored(report.survival, dtypes.most_common(1)[0][0], adapter.name)
