"""Adapters in a Python session: read them out of live objects, put loramix adapters back in as PEFT adapters.

In (`read`): a ``PeftModel`` or a transformers model with adapters loaded through ``model.load_adapter`` (alone
when it holds one adapter, else ``(model, "name")``), or a PEFT state dict with its config,
``(state_dict, LoraConfig)`` (a config dict as in adapter_config.json works too). PEFT's own
``get_peft_model_state_dict`` gives the saved-format tensors, which then go through the same parsing and checks as
a PEFT folder (`loramix.formats.peft.parse`). The adapter is named after its source, e.g.
``PeftModel(LlamaForCausalLM):a``.

Out: `to_peft_state_dict` and `lora_config` (what ``PeftModel.save_pretrained`` would write) and `inject_adapter`,
which adds an adapter to a live ``PeftModel`` or transformers model under a chosen name through the public APIs
(``PeftModel.add_adapter`` or transformers' ``load_adapter``, then PEFT's ``set_peft_model_state_dict``). PEFT is
optional for loramix: it is imported when one of these is called, and a model holding adapters implies it is there.
"""

from __future__ import annotations

import enum
import importlib
from collections.abc import Mapping

import torch

from loramix import experts
from loramix.adapter import LoraAdapter, check_rank_layout, is_portable, portable_layout
from loramix.errors import AdapterFormatError, ArgumentError, CheckpointError, MissingPackageError, SettingError
from loramix.formats import _keys, peft
from loramix.io.files import check_finite

ACCEPTED = (
    "a path, a Hub id (org/name), a LoraAdapter, a PeftModel or transformers model holding adapters (or "
    '(model, "adapter name")), or (state_dict, LoraConfig)'
)


def is_live(src) -> bool:
    """Whether ``src`` is one of the in-memory sources `read` takes (not a path, Hub id or `LoraAdapter`)."""
    pair = isinstance(src, tuple) and len(src) == 2
    return _holds_adapters(src) or (pair and (_holds_adapters(src[0]) or isinstance(src[0], Mapping)))


def _holds_adapters(obj) -> bool:
    return isinstance(obj, torch.nn.Module) and isinstance(getattr(obj, "peft_config", None), dict)


def _peft():
    try:
        return importlib.import_module("peft")
    except ImportError:
        raise MissingPackageError("this needs PEFT, which is not installed (pip install peft)") from None


def read(src, *, allow_nonfinite: bool = False) -> LoraAdapter:
    """A `LoraAdapter` from a live source (see the module docstring); tensors are copied to the CPU."""
    if _holds_adapters(src):
        model, name = src, _only_adapter(src)
    elif isinstance(src, tuple) and len(src) == 2 and _holds_adapters(src[0]):
        model, name = src
        if not isinstance(name, str):
            raise AdapterFormatError(
                f"{_model_label(model)}: the second item must be an adapter name, got a {type(name).__name__}"
            )
        if name not in model.peft_config:
            raise AdapterFormatError(
                f"{_model_label(model)} has no adapter {name!r}; it holds {', '.join(map(repr, model.peft_config))}"
            )
    elif isinstance(src, tuple) and len(src) == 2 and isinstance(src[0], Mapping):
        return _from_state_dict(src[0], src[1], label=f"state dict ({type(src[1]).__name__})", check=allow_nonfinite)
    else:
        raise AdapterFormatError(f"cannot load an adapter from {describe(src)}: give {ACCEPTED}")
    # the embedding copies PEFT saves beside embedding adapters are the live model's own weights: not read (and
    # PEFT's "auto" would ask the Hub whether the vocabulary was resized)
    tensors = _peft().get_peft_model_state_dict(model, adapter_name=name, save_embedding_layers=False)
    label = f"{_model_label(model)}:{name}"
    return _from_state_dict(tensors, model.peft_config[name], label=label, check=allow_nonfinite)


def describe(src) -> str:
    """What ``src`` is, for an error message."""
    if isinstance(src, tuple):
        return "a tuple of (" + ", ".join(type(item).__name__ for item in src) + ")"
    if isinstance(src, torch.nn.Module):
        return f"a {type(src).__name__} that holds no PEFT adapters"
    return f"a {type(src).__name__}"


def _model_label(model: torch.nn.Module) -> str:
    """``PeftModel(LlamaForCausalLM)`` for a PeftModel, the class name for a transformers model."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else None
    return f"{type(model).__name__}({type(inner).__name__})" if inner is not None else type(model).__name__


def _only_adapter(model: torch.nn.Module) -> str:
    names = list(model.peft_config)
    if len(names) != 1:
        listing = ", ".join(map(repr, names)) or "none"
        raise AdapterFormatError(
            f'{_model_label(model)} holds {len(names)} adapters ({listing}): pass (model, "name") to choose one'
        )
    return names[0]


def _config_dict(config, label: str) -> dict:
    """A PEFT config object or dict as adapter_config.json would hold it (sets as lists, enums as their values)."""
    if isinstance(config, Mapping):
        raw = dict(config)
    elif callable(getattr(config, "to_dict", None)) and hasattr(config, "peft_type"):
        raw = config.to_dict()
    else:
        raise AdapterFormatError(
            f"{label}: the second item must be the adapter's LoraConfig (or its dict), got a {type(config).__name__}"
        )

    def plain(value):
        if isinstance(value, enum.Enum):
            return value.value
        if isinstance(value, (set, frozenset)):
            return sorted(value)
        return value

    return {key: plain(value) for key, value in raw.items()}


def _from_state_dict(tensors: Mapping, config, *, label: str, check: bool) -> LoraAdapter:
    config = _keys.check_config(_config_dict(config, label), label)
    bad = [k for k, v in tensors.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
    if bad:
        raise AdapterFormatError(f"{label}: a state dict maps names to tensors; {bad[0]!r} does not")
    state = {k: v.detach().to("cpu", copy=True) for k, v in tensors.items()}
    if not check:
        check_finite(label, state)
    modules, extra, notes = peft.parse(config, state, config_where=label, where=label)
    return _keys.build_adapter(
        config,
        modules,
        extra,
        notes,
        source=label,
        name=label,
        use_rslora=bool(config.get("use_rslora", False)),
    )


def to_peft_state_dict(adapter: LoraAdapter, *, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """``adapter``'s tensors under PEFT's saved key names (what adapter_model.safetensors holds); with
    `lora_config` that is what ``set_peft_model_state_dict`` or ``save_file`` + ``LoraConfig.save_pretrained`` take."""
    _check_adapter(adapter, "to_peft_state_dict")
    return peft.state_dict(adapter, dtype)


def lora_config(adapter: LoraAdapter):
    """A ``peft.LoraConfig`` that rebuilds exactly ``adapter``'s ranks and scales (needs PEFT)."""
    _check_adapter(adapter, "lora_config")
    return _peft().LoraConfig.from_peft_type(**peft.config_dict(adapter))


def _check_adapter(adapter, what: str) -> None:
    if not isinstance(adapter, LoraAdapter):
        raise ArgumentError(
            f"{what} takes a LoraAdapter (from load_adapter or combine), not a {type(adapter).__name__}"
        )


def inject_adapter(
    model: torch.nn.Module, adapter: LoraAdapter, *, adapter_name: str, rank_layout: str = "portable"
) -> torch.nn.Module:
    """Add ``adapter`` to ``model`` (a ``PeftModel``, or a transformers model: PEFT's transformers integration) as
    the PEFT adapter ``adapter_name`` and return the model; ``model.set_adapter(adapter_name)`` then uses it.

    ``rank_layout`` as `loramix.save_adapter`: "portable" (the default) injects the same ΔW in one rank and one
    scale (`loramix.adapter.portable_layout`), so that PEFT's own ``save_pretrained`` then writes a folder every
    serving engine reads right; "exact" keeps per-module ranks and scales (rank_pattern, alpha_pattern), which those
    engines misread once saved (a warning says so)."""
    _check_adapter(adapter, "inject_adapter")
    experts.refuse(adapter, "inject_adapter (PEFT injects target_parameters only from a config, not a state dict)")
    check_rank_layout(rank_layout)
    if rank_layout == "portable":
        adapter = portable_layout(adapter)
    elif not is_portable(adapter):
        peft.warn_exact_layout()
    if not isinstance(adapter_name, str) or not adapter_name:
        raise SettingError(f"adapter_name must be a non-empty string, got {adapter_name!r}")
    takes_adapters = hasattr(model, "get_base_model") or hasattr(model, "add_adapter")
    if not isinstance(model, torch.nn.Module) or not takes_adapters:
        raise ArgumentError(
            f"inject_adapter puts adapters into a PeftModel or a transformers model, not a {type(model).__name__}"
        )
    if adapter_name in (getattr(model, "peft_config", None) or {}):
        raise SettingError(
            f"{_model_label(model)} already has an adapter {adapter_name!r}: choose another adapter_name"
        )
    config = lora_config(adapter)
    tensors = to_peft_state_dict(adapter)
    if hasattr(model, "get_base_model"):  # a PeftModel: keys keep PEFT's base_model.model. prefix
        model.add_adapter(adapter_name, config)
    else:  # a transformers model: keys are the model's own names; its loader builds the layers
        tensors = {_keys.strip_prefix(k)[0]: v for k, v in tensors.items()}
        model.load_adapter(adapter_name=adapter_name, peft_config=config, adapter_state_dict=tensors)
    # PEFT's own loader sets every tensor (transformers' may miss DoRA magnitudes, depending on versions)
    result = _peft().set_peft_model_state_dict(model, tensors, adapter_name=adapter_name)
    unplaced = list(getattr(result, "unexpected_keys", []))
    if unplaced:
        raise CheckpointError(
            f"{_model_label(model)}: PEFT did not place {len(unplaced)} tensor(s) ({unplaced[0]}, ...)"
        )
    return model
