"""Which consumers load an adapter and read every module's scale right: PEFT (by version), transformers, vLLM,
SGLang, LoRAX/TGI, llama.cpp, and diffusers/ComfyUI for kohya files.

Each rule rebuilds what the consumer's own loader does (the comment above it names the file and function it was read
from) and compares the scale that consumer gives each module with the module's true scale (the one PEFT's newest
rules give, which is what loramix reads). `check` returns one `Verdict` per consumer: ``"yes"`` (loads, every module
right), ``"wrong"`` (loads, but some module is scaled wrong or some part is silently dropped), ``"no"`` (refused)
or ``"n/a"`` (the consumer reads another kind of file),
with the reason and the loramix command that fixes it. `check_source` loads a source and its raw config first; a
folder of adapter folders is checked as a serving set instead (`loramix.compat.sets`).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

from loramix.adapter import LoraAdapter
from loramix.compat import engines, peft_versions  # noqa: F401 — each registers its consumers' rules
from loramix.compat.diffusion import family_verdicts
from loramix.compat.engines import VLLM_MAX_RANKS, kohya_named_folder, kohya_verdicts
from loramix.compat.experts import expert_verdicts
from loramix.compat.facts import RULES, Facts, Verdict, peft_consumers
from loramix.compat.model_checkpoint import check_checkpoint, check_gguf
from loramix.compat.naming import renamed_verdicts
from loramix.compat.sets import set_verdicts
from loramix.formats import load_adapter
from loramix.formats._keys import CONFIG_FILE, read_config
from loramix.formats.kohya import KOHYA_PREFIX
from loramix.io.gguf_base import gguf_base_file
from loramix.sources import resolve

__all__ = ["VLLM_MAX_RANKS", "Report", "Verdict", "check", "check_source"]


@dataclass
class Report:
    """All verdicts for one adapter."""

    name: str
    source: str
    verdicts: list[Verdict]

    def to_dict(self) -> dict:
        return {"name": self.name, "source": self.source, "verdicts": [asdict(v) for v in self.verdicts]}


def check_source(src: str | Path, **load_options) -> Report:
    """Load ``src`` (as `load_adapter`) and its raw adapter_config.json (when a PEFT folder) and `check` it; a folder
    of adapter folders (and no adapter of its own) is checked as a serving set (`loramix.compat.sets`), a model
    folder (config.json and weights, no adapter_config.json: a merged checkpoint) gets `check_checkpoint`, a GGUF
    model file (or a folder holding one) `check_gguf`."""
    members = adapter_folders(Path(src))
    if members:
        adapters = {p.name: load_adapter(p, log_warnings=False, **load_options) for p in members}
        return Report(f"set {Path(src).name}", str(src), set_verdicts(adapters, str(src)))
    local = Path(src).expanduser()
    gguf_model = gguf_base_file(local) if local.exists() and not (local / CONFIG_FILE).is_file() else None
    if gguf_model is not None:  # a GGUF model file (a merge into a GGUF base)
        return Report(local.name, str(src), check_gguf(gguf_model))
    if local.is_dir() and (local / "config.json").is_file() and not (local / CONFIG_FILE).is_file():
        return Report(local.name, str(src), check_checkpoint(local))
    adapter = load_adapter(src, log_warnings=False, **load_options)
    path = resolve(src)
    folder = path if path.is_dir() else path.parent
    config = read_config(folder, peft_types=("LORA", "ADALORA")) if (folder / CONFIG_FILE).is_file() else None
    return check(adapter, config)


def adapter_folders(path: Path) -> list[Path]:
    """The PEFT adapter folders inside ``path`` when it is a folder holding no adapter or tensor file itself."""
    if not path.is_dir() or (path / CONFIG_FILE).exists() or any(path.glob("*.safetensors")):
        return []
    return sorted(p for p in path.iterdir() if p.is_dir() and (p / CONFIG_FILE).is_file())


def check(adapter: LoraAdapter, config: dict | None) -> Report:
    """The verdict of every consumer on ``adapter``; ``config`` is its raw adapter_config.json (None: not a PEFT
    folder, e.g. a kohya file)."""
    src = adapter.source if " " not in adapter.source else repr(adapter.source)
    diffusion = adapter.provenance.get("family") or adapter.provenance.get("fits")  # loramix.formats.diffusion
    if config is None and diffusion and adapter.provenance.get("format") == "kohya":
        verdicts = kohya_verdicts(adapter, src)[:-1] + family_verdicts(adapter, src)  # diffusers, ComfyUI apart
    elif config is None:
        verdicts = kohya_verdicts(adapter, src)
    elif any(KOHYA_PREFIX.match(name) for name in adapter.modules):
        verdicts = kohya_named_folder(adapter, src)
    else:
        facts = Facts(adapter, config)
        verdicts = [RULES[name](facts, src) for name in peft_consumers()]
        verdicts.append(
            Verdict("diffusers/ComfyUI", "n/a", "checked for kohya/diffusers files (write one with --format kohya)")
        )
        replaced = (expert_verdicts(src) if facts.experts else {}) | renamed_verdicts(adapter, src)
        verdicts = [replaced.get(v.consumer, v) for v in verdicts]
    return Report(adapter.name, adapter.source, verdicts)
