"""Plain torch LoRA state dicts from hand-written LoRA layers (MiniMind-style), one file each (given as the file, or
as a folder holding that one tensor file and no ``adapter_config.json``).

A file is a ``.safetensors`` file or a ``.pt``/``.pth``/``.bin`` pickle (read only through
``torch.load(weights_only=True)``) whose keys end in a LoRA pair. The detection rules, in order, per key:

1. ``<module>.lora.A.weight`` / ``<module>.lora.B.weight``: a LoRA module built from two ``nn.Linear``s
   (A is rank×in, B is out×rank); ``.bias`` keys of either Linear are folded into an output bias.
2. ``<module>.lora_A`` / ``<module>.lora_B``, bare parameters or ``nn.Linear``s (``.weight``/``.bias``). Bare
   parameters are read as loralib's A (rank×in) and B (out×rank); where only the other orientation chains
   (``x @ A @ B`` with A in×rank, B rank×out), or both chain and it gives the smaller rank, they are transposed,
   with a warning.
3. ``<module>.lora_down`` / ``<module>.lora_up`` (``.weight`` optional): down is rank×in, up is out×rank; conv
   weights (rank×in×kh×kw and out×rank×1×1) are read as conv2d modules.

A leading ``base_model.model.`` (PEFT), ``module.`` (DistributedDataParallel) or ``_orig_mod.`` (torch.compile)
is removed. Keys matching no rule are base weights or other state and are dropped with a warning. Files with
kohya's flattened ``lora_unet_``/``lora_te_`` names or ``.alpha`` keys are kohya/A1111 LoRAs, not plain state
dicts, and are refused here. A module name that matches GPT-2's Conv1D names still reads as a linear layer: a
hand-made model (nanoGPT) may use ``nn.Linear`` under those names, and nothing in the file says otherwise.

Scale and base model are not in such files: ``scale`` (ΔW = scale·B·A) or ``alpha`` (scale = alpha/rank per
module), and ``base_model``, supply them; without either the scale is 1 and the adapter says so once.
``module_map`` (a mapping of regexes to replacements, or a YAML/JSON file holding one) renames modules to the base
checkpoint's names: each rule is applied in order with ``re.sub`` to every module name.
"""

from __future__ import annotations

import math
import re
from collections import defaultdict
from pathlib import Path

import torch
import yaml

from loramix.adapter import LoraAdapter, LoraModule
from loramix.errors import AdapterFormatError
from loramix.formats import _keys
from loramix.io.files import check_finite, read_tensors

NAME = "statedict"
SUFFIXES = (".safetensors", ".pt", ".pth", ".bin")
LOAD_OPTIONS = ("scale", "alpha", "base_model", "module_map")  # what such a file does not say
# (key pattern, style); groups: module, side (A/B/down/up), param (weight/bias, absent for a bare parameter)
RULES = (
    (re.compile(r"^(?P<module>.+)\.lora\.(?P<side>A|B)\.(?P<param>weight|bias)$"), "lora.A/lora.B"),
    (re.compile(r"^(?P<module>.+)\.lora_(?P<side>A|B)(?:\.(?P<param>weight|bias))?$"), "lora_A/lora_B"),
    (re.compile(r"^(?P<module>.+)\.lora_(?P<side>down|up)(?:\.(?P<param>weight|bias))?$"), "lora_down/lora_up"),
)
SIDES = {"A": "A", "down": "A", "B": "B", "up": "B"}
WRAPPERS = ("module.", "_orig_mod.")
KOHYA = re.compile(r"(^lora_(unet|te\d?)_)|(\.alpha$)")


def find_file(path: Path) -> Path | None:
    """The state dict file ``path`` names: the file itself, or the only tensor file in a folder that is not a PEFT
    adapter (``adapter_config.json``)."""
    if path.is_file():
        return path if path.suffix in SUFFIXES else None
    if not path.is_dir() or (path / _keys.CONFIG_FILE).exists():
        return None
    found = [p for p in sorted(path.iterdir()) if p.is_file() and p.suffix in SUFFIXES]
    return found[0] if len(found) == 1 else None


def detect(path: Path) -> bool:
    return find_file(path) is not None


def read(
    path: str | Path,
    *,
    scale: float | None = None,
    alpha: float | None = None,
    base_model: str | None = None,
    module_map: dict | str | Path | None = None,
    allow_nonfinite: bool = False,
) -> LoraAdapter:
    """Read one hand-made LoRA state dict file (or a folder holding only that one tensor file) into a `LoraAdapter`
    (see the module docstring for the rules)."""
    source = Path(path)
    path = find_file(source) or source
    if scale is not None and alpha is not None:
        raise AdapterFormatError(f"{path}: give scale or alpha, not both (scale = alpha / rank)")
    for label, value in (("scale", scale), ("alpha", alpha)):
        if value is not None and not math.isfinite(value):
            raise AdapterFormatError(f"{path}: {label} must be a finite number, got {value!r}")
    rules = load_module_map(module_map) if module_map is not None else []
    tensors = read_tensors(path)
    if not allow_nonfinite:
        check_finite(path, tensors)
    kohya = sorted(k for k in tensors if KOHYA.search(k))
    if kohya:
        raise AdapterFormatError(
            f"{path}: looks like a kohya/A1111 LoRA ({kohya[0]}: lora_unet_/lora_te_ names or .alpha keys), "
            "not a plain LoRA state dict"
        )
    notes: list[str] = []
    pairs, style = _pairs(path, tensors, notes)
    modules, transposed = {}, []
    for name, found in sorted(pairs.items()):
        modules[name], flipped = _module(path, name, found)
        if flipped:
            transposed.append(name)
    if transposed:
        notes.append(
            f"{len(transposed)} module(s) hold bare lora_A in×rank and lora_B rank×out (x·A·B), read transposed "
            f"({_keys.sample(transposed)})"
        )
    for m in modules.values():
        m.scale = float(alpha) / m.rank if alpha is not None else (1.0 if scale is None else float(scale))
    if scale is None and alpha is None:
        notes.append("the file holds no scale: using scale 1 (give scale or alpha if the LoRA output was scaled)")
    if rules:
        modules = _rename(path, modules, rules, notes)
    if all(not m.B.any() for m in modules.values()):
        notes.append("every LoRA B/up factor is zero: this adapter changes nothing")
    return LoraAdapter(
        modules=modules,
        base_model=base_model,
        source=str(source),
        name=path.stem,
        warnings=notes,
        file_bytes=path.stat().st_size,
        provenance={"format": "statedict", "key_style": style, "scale": scale, "alpha": alpha, "file": path.name},
    )


def _pairs(path: Path, tensors: dict[str, torch.Tensor], notes: list[str]) -> tuple[dict[str, dict], str]:
    """Group LoRA keys per module: {module: {(side, param): tensor}}; also the key style(s) found."""
    pairs: dict[str, dict] = defaultdict(dict)
    styles, other = set(), []
    keys = {k: _keys.strip_prefix(k)[0] for k in tensors}
    for wrapper in WRAPPERS:
        if keys and all(k.startswith(wrapper) for k in keys.values()):
            keys = {k: v[len(wrapper) :] for k, v in keys.items()}
            notes.append(f"every key starts with '{wrapper}' (a training wrapper); removed")
    for key, name in keys.items():
        match = next(((m, style) for rule, style in RULES if (m := rule.match(name))), None)
        if match is None:
            other.append(key)
            continue
        m, style = match
        styles.add(style)
        side = SIDES[m["side"]]
        pairs[m["module"]][(side, m["param"] or "bare")] = tensors[key]
    if not pairs:
        raise AdapterFormatError(
            f"{path}: no LoRA pairs found (expected keys ending in lora.A.weight/lora.B.weight, lora_A/lora_B or "
            "lora_down/lora_up)"
        )
    if other:
        notes.append(f"dropped {len(other)} tensor(s) that are not LoRA factors ({_keys.sample(sorted(other))})")
    return pairs, ", ".join(sorted(styles))


def _factor(path: Path, name: str, found: dict, side: str) -> tuple[torch.Tensor, bool]:
    weight, bare = found.get((side, "weight")), found.get((side, "bare"))
    if weight is not None and bare is not None:
        raise AdapterFormatError(f"{path}: module {name} has its {side} factor twice (as a parameter and a .weight)")
    if weight is None and bare is None:
        other = "B" if side == "A" else "A"
        raise AdapterFormatError(f"{path}: module {name} has a LoRA {other} factor but no {side} factor")
    return (bare, True) if weight is None else (weight, False)


def _module(path: Path, name: str, found: dict) -> tuple[LoraModule, bool]:
    """One module from its pair; also whether bare factors were read transposed."""
    (A, a_bare), (B, b_bare) = _factor(path, name, found, "A"), _factor(path, name, found, "B")
    flipped = False
    if a_bare and b_bare and A.dim() == 2 and B.dim() == 2:
        standard, transposed = A.shape[0] == B.shape[1], A.shape[1] == B.shape[0]
        flipped = transposed and (not standard or A.shape[1] < A.shape[0])
        if flipped:
            A, B = A.T, B.T
    parts = {("lora_A", "weight"): A, ("lora_B", "weight"): B}
    bias = _output_bias(path, name, found, A, B)
    if bias is not None:
        parts[("lora_B", "bias")] = bias
    return _keys.module_from_parts(path, name, parts, False), flipped


def _output_bias(path: Path, name: str, found: dict, A: torch.Tensor, B: torch.Tensor) -> torch.Tensor | None:
    """Biases of the two layers as one output bias: B(Ax + a) + b = BAx + (Ba + b)."""
    a_bias, b_bias = found.get(("A", "bias")), found.get(("B", "bias"))
    if a_bias is None and b_bias is None:
        return None
    bias = torch.zeros(B.shape[0], dtype=torch.float32)
    if a_bias is not None:
        if a_bias.numel() != A.shape[0] or B.shape[1] != A.shape[0]:
            raise AdapterFormatError(f"{path}: module {name}: the A bias has {a_bias.numel()} values, not the rank")
        bias += B.flatten(1).float() @ a_bias.float()
    if b_bias is not None:
        if b_bias.numel() != B.shape[0]:
            raise AdapterFormatError(
                f"{path}: module {name}: the B bias has {b_bias.numel()} values, expected {B.shape[0]}"
            )
        bias += b_bias.float()
    return bias.to(B.dtype)


def load_module_map(value: dict | str | Path) -> list[tuple[re.Pattern, str]]:
    """A module map as compiled (pattern, replacement) rules, from a mapping or a YAML/JSON file holding one."""
    origin = "module map"
    if isinstance(value, (str, Path)):
        origin = str(value)
        try:
            value = yaml.safe_load(Path(value).read_text())
        except FileNotFoundError:
            raise AdapterFormatError(f"{origin}: no such module map file") from None
        except (OSError, yaml.YAMLError, UnicodeDecodeError) as exc:
            raise AdapterFormatError(
                f"{origin}: not a readable YAML/JSON module map ({str(exc).splitlines()[0]})"
            ) from None
    if not isinstance(value, dict) or not value or not all(isinstance(v, str) for v in (*value, *value.values())):
        raise AdapterFormatError(
            f"{origin}: a module map is a non-empty mapping of regex strings to replacement strings"
        )
    rules = []
    for pattern, replacement in value.items():
        try:
            rules.append((re.compile(pattern), replacement))
        except re.error as exc:
            raise AdapterFormatError(f"{origin}: {pattern!r} is not a valid regex ({exc})") from None
    return rules


def _rename(
    path: Path, modules: dict[str, LoraModule], rules: list[tuple[re.Pattern, str]], notes: list[str]
) -> dict[str, LoraModule]:
    renamed: dict[str, LoraModule] = {}
    origin: dict[str, str] = {}
    for name, module in modules.items():
        new = name
        for pattern, replacement in rules:
            try:
                new = pattern.sub(replacement, new)
            except (re.error, IndexError) as exc:
                raise AdapterFormatError(
                    f"{path}: module map rule {pattern.pattern!r}: bad replacement ({exc})"
                ) from None
        if new in renamed:
            raise AdapterFormatError(f"{path}: the module map renames both {origin[new]} and {name} to {new}")
        renamed[new], origin[new] = module, name
    unchanged = [n for n, old in origin.items() if n == old]
    if unchanged:
        notes.append(f"the module map left {len(unchanged)} module name(s) unchanged ({_keys.sample(unchanged)})")
    return dict(sorted(renamed.items()))
