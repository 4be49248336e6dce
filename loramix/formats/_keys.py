"""PEFT key and config parsing shared by every reader of PEFT-style files (LoRA, AdaLoRA, hand-made state dicts).

Real files repeat ``base_model.model.``, carry adapter names inside keys, wrap heads (``modules_to_save.``,
``original_module.``, ``base_layer.``): `split_keys` normalises them into LoRA parts per module and full extra
tensors. `read_config` validates what the readers rely on; `pattern_key` is PEFT's rule for rank/alpha patterns.

Patterns from a config are matched as PEFT matches them (the same expression, the same anchoring), but with a time
limit (the ``regex`` module's ``timeout``): a key such as ``(a+)+b`` backtracks for minutes on a 30-character
name, so one that runs out of time is refused with an error naming it instead of hanging the command.
"""

from __future__ import annotations

import json
import math
import re
from collections import Counter, defaultdict
from pathlib import Path

import torch

from loramix.adapter import ExtraTensor, LoraAdapter, LoraModule
from loramix.errors import AdapterFormatError
from loramix.io.files import check_finite, read_tensors

CONFIG_FILE = "adapter_config.json"
WEIGHT_FILES = ("adapter_model.safetensors", "adapter_model.bin")
PREFIX = "base_model.model."
LORA_KINDS = ("lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B", "lora_magnitude_vector")
PARAM_NAMES = ("weight", "bias")
MATCH_SECONDS = 1.0  # the most one config pattern may take to match one module name


def load_folder(
    path: str | Path, *, allow_nonfinite: bool, peft_types: tuple[str, ...] = ("LORA",)
) -> tuple[dict, Path, dict[str, torch.Tensor]]:
    """(config, weights file, tensors) of a PEFT-style folder, the tensors checked for NaN/Inf unless allowed."""
    folder = Path(path)
    config = read_config(folder, peft_types=peft_types)
    weights = weights_file(folder)
    tensors = read_tensors(weights)
    if not allow_nonfinite:
        check_finite(weights, tensors)
    return config, weights, tensors


def finish_adapter(path, config: dict, weights: Path, modules, extra, notes: list[str], **fields) -> LoraAdapter:
    """The checks every PEFT-config reader ends with, and the `LoraAdapter` it returns."""
    folder = Path(path)
    return build_adapter(
        config,
        modules,
        extra,
        notes,
        source=str(path),
        name=folder.resolve().name,
        file_bytes=sum(f.stat().st_size for f in (folder / CONFIG_FILE, weights)),
        **fields,
    )


def build_adapter(config: dict, modules, extra, notes: list[str], **fields) -> LoraAdapter:
    """The checks every PEFT-config reader ends with (files and live models alike), and the `LoraAdapter`."""
    check_targets(config, modules, notes)
    if all(not m.B.any() for m in modules.values()):
        notes.append("every lora_B is zero: this adapter changes nothing")
    return LoraAdapter(
        modules=modules,
        base_model=config.get("base_model_name_or_path") or None,
        extra=extra,
        task_type=config.get("task_type"),
        warnings=notes,
        **fields,
    )


def read_config(folder: Path, *, peft_types: tuple[str, ...] = ("LORA",)) -> dict:
    path = folder / CONFIG_FILE
    try:
        config = json.loads(path.read_text())
    except FileNotFoundError:
        raise AdapterFormatError(f"{folder}: no {CONFIG_FILE} (not a PEFT adapter folder)") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise AdapterFormatError(f"{path}: not valid JSON ({exc})") from None
    except RecursionError:
        raise AdapterFormatError(f"{path}: not valid JSON (nested too deeply)") from None
    except OSError as exc:
        raise AdapterFormatError(f"{path}: cannot be read ({exc.strerror or type(exc).__name__})") from None
    return check_config(config, path, peft_types=peft_types)


def folder_peft_type(path: Path) -> str | None:
    """The ``peft_type`` of a folder's adapter_config.json (LORA when it names none); None when there is no readable
    config (the PEFT reader then says what is wrong with it)."""
    if not (path.is_dir() and (path / CONFIG_FILE).is_file()):
        return None
    try:
        config = json.loads((path / CONFIG_FILE).read_text())
    except (OSError, ValueError, RecursionError):
        return None
    peft_type = config.get("peft_type", "LORA") if isinstance(config, dict) else None
    return peft_type if isinstance(peft_type, str) else None


def check_config(config, path: str | Path, *, peft_types: tuple[str, ...] = ("LORA",)) -> dict:
    """``config`` (an adapter_config.json's content, from ``path``) if it holds what the readers rely on."""
    if not isinstance(config, dict):
        raise AdapterFormatError(f"{path}: expected a JSON object")
    peft_type = config.get("peft_type", "LORA")
    if peft_type not in peft_types:
        raise AdapterFormatError(f"{path}: peft_type {peft_type!r} is not supported (only {', '.join(peft_types)})")
    for key, (valid, expected) in _FIELDS.items():
        if key == "r" and peft_type == "OFT":  # OFT's r is its block count, 0 when the block size sets it
            continue
        if key in config and not valid(config[key]):
            raise AdapterFormatError(f"{path}: {key} must be {expected}, got {short(config[key])}")
    for key in ("rank_pattern", "alpha_pattern"):
        if not isinstance(config.get(key) or {}, dict):
            raise AdapterFormatError(f"{path}: {key} must be a mapping, got {config[key]!r}")
    return config


def is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _is_optional(kind: type):
    return lambda value: value is None or isinstance(value, kind)


def _is_names(value) -> bool:
    return isinstance(value, list) and all(isinstance(v, str) for v in value)


# What the reader relies on in a config, and what each field must be (a wrong type is an error, not a guess).
_FIELDS = {
    "r": (lambda v: is_number(v) and v > 0, "a positive number"),
    "lora_alpha": (lambda v: is_number(v) and v >= 0, "a number ≥ 0"),  # 0: AdaLoRA scales by the rank
    "use_rslora": (_is_optional(bool), "true or false"),
    "use_dora": (_is_optional(bool), "true or false"),
    "fan_in_fan_out": (_is_optional(bool), "true or false"),
    "bias": (lambda v: v in ("none", "all", "lora_only"), "'none', 'all' or 'lora_only'"),
    "base_model_name_or_path": (_is_optional(str), "a string"),
    "task_type": (_is_optional(str), "a string"),
    "target_modules": (lambda v: v is None or isinstance(v, str) or _is_names(v), "a regex or a list of names"),
    "modules_to_save": (lambda v: v is None or _is_names(v), "a list of names"),
    "target_parameters": (lambda v: v is None or _is_names(v), "a list of parameter names"),
}


def short(value, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def check_patterns(path: Path, config: dict) -> None:
    """rank_pattern / alpha_pattern: every key a regex PEFT can use, every value a finite number."""
    for key in ("rank_pattern", "alpha_pattern"):
        for pattern, value in (config.get(key) or {}).items():
            try:
                re.compile(pattern_regex(pattern))
            except re.error as exc:
                raise AdapterFormatError(f"{path}: {key} key {short(pattern)} is not a valid regex ({exc})") from None
            if not is_number(value):
                raise AdapterFormatError(f"{path}: {key}[{short(pattern)}] must be a finite number, got {short(value)}")


def weights_file(folder: Path) -> Path:
    for name in WEIGHT_FILES:
        if (folder / name).is_file():
            return folder / name
    raise AdapterFormatError(f"{folder}: no {' or '.join(WEIGHT_FILES)}")


def strip_prefix(key: str) -> tuple[str, int]:
    count = 0
    while key.startswith(PREFIX):
        key, count = key[len(PREFIX) :], count + 1
    return key, count


def split_keys(
    tensors: dict[str, torch.Tensor],
    notes: list[str],
    kinds: tuple[str, ...] = LORA_KINDS,
    *,
    config: dict | None = None,
    where: str | Path = "<tensors>",
) -> tuple[dict[str, dict[tuple[str, str], torch.Tensor]], dict[str, ExtraTensor]]:
    """Sort keys into LoRA parts per module ({(kind, param): tensor}) and full extra tensors.

    Two keys that normalise to the same name are one tensor saved twice (noted) if equal, an error otherwise.
    """
    parts: dict[str, dict[tuple[str, str], torch.Tensor]] = defaultdict(dict)
    extra: dict[str, ExtraTensor] = {}
    prefix_counts: Counter[int] = Counter()
    dropped: list[str] = []
    origin: dict[tuple, str] = {}
    repeats: list[str] = []

    def place(table: dict, name, value, key: str, label: tuple) -> None:
        if label in origin:
            old, new = (v.tensor if isinstance(v, ExtraTensor) else v for v in (table[name], value))
            if old.shape != new.shape or not torch.equal(old, new.to(old.dtype)):
                raise AdapterFormatError(
                    f"{where}: keys {origin[label]} and {key} name one tensor with different values"
                )
            repeats.append(key)
        origin[label] = key
        table[name] = value

    for key, tensor in tensors.items():
        name, count = strip_prefix(key)
        prefix_counts[count] += 1
        tokens = name.split(".")
        kind_at = next((i for i, t in enumerate(tokens) if t in kinds), None)
        if kind_at == 0:
            raise AdapterFormatError(f"{where}: key {key} holds a LoRA factor but names no module")
        if kind_at is not None:
            rest = tokens[kind_at + 1 :]
            param = rest[-1] if rest and rest[-1] in PARAM_NAMES else "weight"
            module, slot = ".".join(tokens[:kind_at]), (tokens[kind_at], param)
            place(parts[module], slot, tensor, key, (module, *slot))
        elif "original_module" in tokens:
            dropped.append(key)
        elif "modules_to_save" in tokens:
            at = tokens.index("modules_to_save")
            name = ".".join(tokens[:at] + tokens[at + 2 :])
            place(extra, name, ExtraTensor(tensor, "modules_to_save"), key, (name,))
        elif "base_layer" in tokens:
            name = ".".join(t for t in tokens if t != "base_layer")
            place(extra, name, ExtraTensor(tensor, "base_layer"), key, (name,))
        else:
            place(extra, name, ExtraTensor(tensor, plain_kind(name, config or {})), key, (name,))
    repeated = {c: n for c, n in prefix_counts.items() if c > 1}
    if repeated:
        times = ", ".join(f"{n} keys {c} times" for c, n in sorted(repeated.items()))
        notes.append(f"key prefix '{PREFIX}' repeated ({times}); normalised")
    if dropped:
        notes.append(f"dropped {len(dropped)} original_module tensor(s) (copies of the base model): {dropped[0]}, ...")
    if repeats:
        notes.append(f"{len(repeats)} key(s) repeat an equal tensor under another spelling: {sample(repeats)}")
    return parts, extra


def plain_kind(name: str, config: dict) -> str:
    """A tensor saved under its own name is a head (modules_to_save) or, with bias="all", a bias trained in place."""
    module = name.rpartition(".")[0]
    heads = config.get("modules_to_save") or []
    if config.get("bias") == "all" and name.endswith(".bias") and not targets_module(heads, module):
        return "bias"
    return "modules_to_save"


def bounded_match(pattern: str, name: str, *, where: str | Path, what: str, full: bool = False) -> bool:
    """Whether ``pattern`` matches ``name`` (at its start, or the whole of it with ``full``) as `re` would; an
    `AdapterFormatError` naming ``where`` and ``what`` when that takes longer than ``MATCH_SECONDS``."""
    import regex  # here: it costs 0.13 s to import, and only adapters with pattern keys need it

    try:
        found = (regex.fullmatch if full else regex.match)(pattern, name, timeout=MATCH_SECONDS)
    except TimeoutError:
        raise AdapterFormatError(
            f"{where}: {what} {short(pattern)} takes over {MATCH_SECONDS:g} s to match {short(name)} "
            "(a pathological regex, e.g. a nested quantifier); refused"
        ) from None
    return found is not None


def pattern_key(patterns: dict, module: str, *, where: str | Path = CONFIG_FILE) -> str | None:
    """PEFT's rule for rank_pattern/alpha_pattern: the first key matching the module name's tail."""
    for key in patterns:
        if bounded_match(pattern_regex(key), module, where=where, what="pattern key"):
            return key
    return None


def pattern_regex(key: str) -> str:
    return rf"(.*\.)?({key})$"


def pattern_value(patterns: dict, module: str, default, *, where: str | Path = CONFIG_FILE):
    key = pattern_key(patterns, module, where=where)
    return default if key is None else patterns[key]


def sample(names: list[str], limit: int = 3) -> str:
    return ", ".join(names[:limit]) + (", ..." if len(names) > limit else "")


def module_from_parts(weights: Path, name: str, found: dict, fan_in_fan_out: bool) -> LoraModule:
    def get(kind: str, param: str = "weight") -> torch.Tensor | None:
        return found.get((kind, param))

    embedding = get("lora_embedding_A") is not None or get("lora_embedding_B") is not None
    a_kind, b_kind = ("lora_embedding_A", "lora_embedding_B") if embedding else ("lora_A", "lora_B")
    A, B = get(a_kind), get(b_kind)
    if A is None or B is None:
        missing = a_kind if A is None else b_kind
        raise AdapterFormatError(f"{weights}: module {name} has no {missing} tensor")
    kernel: tuple[int, ...] = ()
    if A.dim() == 4 and B.dim() == 4:
        if tuple(B.shape[2:]) != (1, 1):
            raise AdapterFormatError(f"{weights}: module {name}: conv lora_B kernel {tuple(B.shape[2:])} is not 1×1")
        kernel = tuple(A.shape[2:])
        A, B = A.flatten(1), B.flatten(1)
        layout = "conv2d"
    elif A.dim() == 2 and B.dim() == 2:
        layout = "embedding" if embedding else ("conv1d_fan_in_fan_out" if fan_in_fan_out else "out_in")
    else:
        raise AdapterFormatError(
            f"{weights}: module {name}: unsupported LoRA shapes A{tuple(A.shape)} B{tuple(B.shape)}"
        )
    if B.shape[1] != A.shape[0] or not A.numel() or not B.numel():
        raise AdapterFormatError(
            f"{weights}: module {name}: {a_kind} {tuple(A.shape)} and {b_kind} {tuple(B.shape)} "
            "disagree on the rank or are empty"
        )
    bias, magnitude = get("lora_B", "bias"), get("lora_magnitude_vector")
    for label, vector in (("lora_B.bias", bias), ("lora_magnitude_vector", magnitude)):
        if vector is not None and vector.numel() != B.shape[0]:
            raise AdapterFormatError(
                f"{weights}: module {name}: {label} has {vector.numel()} values, expected {B.shape[0]}"
            )
    if not (A.is_floating_point() and B.is_floating_point()):
        raise AdapterFormatError(f"{weights}: module {name}: LoRA factors are not floating point ({A.dtype})")
    return LoraModule(
        A=A.contiguous(),
        B=B.contiguous(),
        scale=1.0,
        layout=layout,
        kernel_size=kernel,
        bias=bias,
        magnitude=None if magnitude is None else magnitude.reshape(-1),
    )


def targets_module(target_modules, name: str) -> bool:
    """PEFT's target_modules rule: a regex string must match the whole name; a list entry matches a suffix."""
    if isinstance(target_modules, str):
        return bounded_match(target_modules, name, where=CONFIG_FILE, what="target_modules", full=True)
    return any(name == t or name.endswith("." + t) for t in target_modules)


def check_targets(config: dict, modules: dict[str, LoraModule], notes: list[str]) -> None:
    targets = config.get("target_modules")
    if not targets or targets == "all-linear":
        return
    if isinstance(targets, str):
        try:
            re.compile(targets)
        except re.error:
            notes.append(f"target_modules {targets!r} is not a valid regex; ignored")
            return
    untargeted = [n for n, m in modules.items() if m.expert is None and not targets_module(targets, n)]
    if untargeted:
        notes.append(
            f"the tensors hold LoRA factors for {len(untargeted)} module(s) that target_modules {targets!r} "
            f"does not name ({sample(untargeted)}): kept"
        )
    if isinstance(targets, list):
        idle = [t for t in targets if not any(targets_module([t], n) for n, m in modules.items() if m.expert is None)]
        if idle:
            notes.append(f"target_modules names {idle} but the file has no LoRA factors for them")
