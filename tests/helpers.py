"""Reusable test factories: tiny random-weight models and real PEFT adapter folders made by PEFT itself.

Nothing is downloaded: every model is built from a transformers config with random weights under a fixed seed,
so calling a factory twice gives the same weights (that is how a test rebuilds "the same base"). Adapters are made
with ``get_peft_model(..., LoraConfig(init_lora_weights=False))`` so that every lora_B is nonzero.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file, save_file
from torch import nn

REAL = Path(__file__).resolve().parents[2] / "shared" / "real-adapters"
requires_real = pytest.mark.skipif(not REAL.is_dir(), reason=f"{REAL} is absent (real adapters are not shipped)")

HIDDEN, LAYERS, VOCAB, HEADS = 32, 2, 64, 4
SEQ_LEN = 7


def seeded(seed: int, build: Callable[[], nn.Module]) -> nn.Module:
    """Build a module under a fixed seed without disturbing the global RNG; eval mode (no dropout)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = build()
    return model.eval()


def _sizes(**extra) -> dict:
    """The shared tiny sizes for transformers configs (names as Llama/Qwen2/Gemma/BERT spell them)."""
    return dict(
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        intermediate_size=2 * HIDDEN,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        max_position_embeddings=64,
        **extra,
    )


# Real models' layer shapes (for tests on real adapters and for benchmarks), to build with `random_model`.
QWEN05_LAYER = dict(
    hidden_size=896, intermediate_size=4864, num_attention_heads=14, num_key_value_heads=2, tie_word_embeddings=True
)
LLAMA32_1B = dict(
    vocab_size=128256,
    hidden_size=2048,
    intermediate_size=8192,
    num_hidden_layers=16,
    num_attention_heads=32,
    num_key_value_heads=8,
    max_position_embeddings=4096,
    tie_word_embeddings=True,
    rope_theta=500000.0,
)

HEADS_BY_TASK = {
    "causal-lm": "AutoModelForCausalLM",
    "seq2seq-lm": "AutoModelForSeq2SeqLM",
    "masked-lm": "AutoModelForMaskedLM",
    "seq-cls": "AutoModelForSequenceClassification",
}


def random_model(
    model_type: str, *, seed: int | None = 0, task: str = "causal-lm", device: str = "cpu", **config
) -> nn.Module:
    """The one builder of test and benchmark models: transformers' ``model_type`` built from its config
    (``AutoConfig.for_model(model_type, **config)``) with random weights, in eval mode.

    ``seed`` fixes the weights without disturbing the global RNG (None: draw from the global RNG as it stands);
    ``task`` picks the head; ``device="meta"`` builds the structure only (benchmarks fill big weights themselves).
    """
    import transformers

    settings = transformers.AutoConfig.for_model(model_type, **config)
    auto = getattr(transformers, HEADS_BY_TASK[task])

    def build() -> nn.Module:
        with torch.device(device):
            return auto.from_config(settings)

    return build().eval() if seed is None else seeded(seed, build)


def tiny_llama(seed: int = 0) -> nn.Module:
    return random_model("llama", seed=seed, **_sizes(num_key_value_heads=2, tie_word_embeddings=False))


def tiny_qwen2(seed: int = 0) -> nn.Module:
    return random_model("qwen2", seed=seed, **_sizes(num_key_value_heads=2, tie_word_embeddings=False))


def tiny_gemma(seed: int = 0) -> nn.Module:
    """Gemma: tied input/output embeddings, one KV head, GeGLU MLP."""
    return random_model("gemma", seed=seed, **_sizes(num_key_value_heads=1, head_dim=HIDDEN // HEADS))


def tiny_gpt2(seed: int = 0) -> nn.Module:
    """GPT-2: its attention and MLP layers are transformers' Conv1D (weight stored in×out, fan_in_fan_out)."""
    return random_model(
        "gpt2", seed=seed, vocab_size=VOCAB, n_embd=HIDDEN, n_layer=LAYERS, n_head=HEADS, n_positions=64
    )


def tiny_bert_seqcls(seed: int = 0) -> nn.Module:
    """BERT with a 3-class classification head (PEFT's SEQ_CLS saves the trained head via modules_to_save)."""
    return random_model("bert", seed=seed, task="seq-cls", **_sizes(num_labels=3))


class TinyConvNet(nn.Module):
    """A plain nn.Module with a Conv2d (3×3 kernel) and a Linear head, for conv2d LoRA."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, kernel_size=3, padding=1)
        self.head = nn.Linear(8 * 6 * 6, 5)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.conv(pixel_values)).flatten(1))


def tiny_convnet(seed: int = 0) -> nn.Module:
    return seeded(seed, TinyConvNet)


MODEL_FACTORIES: dict[str, Callable[..., nn.Module]] = {
    "llama": tiny_llama,
    "qwen2": tiny_qwen2,
    "gemma": tiny_gemma,
    "gpt2": tiny_gpt2,
    "bert_seqcls": tiny_bert_seqcls,
    "convnet": tiny_convnet,
}


def example_inputs(model_factory: Callable[..., nn.Module], seed: int = 123) -> dict[str, torch.Tensor]:
    """Fixed inputs for a model built by one of the factories above."""
    gen = torch.Generator().manual_seed(seed)
    if model_factory is tiny_convnet:
        return {"pixel_values": torch.randn(2, 3, 6, 6, generator=gen)}
    return {"input_ids": torch.randint(0, VOCAB, (2, SEQ_LEN), generator=gen)}


def model_output(model: nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    """The model's logits (or plain output tensor) on ``inputs``, without gradients."""
    with torch.no_grad():
        out = model(**inputs)
    return out if isinstance(out, torch.Tensor) else out.logits


@dataclass
class MadeAdapter:
    """A PEFT adapter folder PEFT itself wrote, the PeftModel that wrote it, and how to rebuild its base."""

    path: Path
    peft_model: PeftModel
    model_factory: Callable[..., nn.Module]

    def base(self) -> nn.Module:
        """A fresh copy of the same base model (same seed, same weights)."""
        return self.model_factory()

    def load_with_peft(self, folder: str | Path | None = None) -> PeftModel:
        """``PeftModel.from_pretrained`` of ``folder`` (default: this adapter) on a fresh copy of the base."""
        return PeftModel.from_pretrained(self.base(), str(folder or self.path)).eval()


def make_peft_adapter(
    model_factory: Callable[..., nn.Module],
    tmp_path: Path,
    name: str,
    *,
    seed: int = 1,
    base_model_name_or_path: str | None = None,
    **lora_kwargs,
) -> MadeAdapter:
    """Make a LoRA with PEFT on ``model_factory()``, save it to ``tmp_path/name`` and return it.

    ``init_lora_weights`` defaults to False (random A and B, so the adapter changes the outputs); ``seed`` fixes
    those random factors. Other keyword arguments go to `LoraConfig` (``target_modules``, ``r``, ``use_dora``...).
    """
    lora_kwargs.setdefault("init_lora_weights", False)
    lora_kwargs.setdefault("r", 4)
    lora_kwargs.setdefault("lora_alpha", 8)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = get_peft_model(model_factory(), LoraConfig(**lora_kwargs))
        _train_non_lora(model, torch.Generator().manual_seed(seed))
    model.eval()
    if base_model_name_or_path is not None:
        model.peft_config["default"].base_model_name_or_path = base_model_name_or_path
    folder = tmp_path / name
    model.save_pretrained(str(folder))
    readme = folder / "README.md"
    if readme.exists():
        readme.unlink()  # PEFT's boilerplate model card; not part of the adapter
    return MadeAdapter(folder, model, model_factory)


def _train_non_lora(model: PeftModel, gen: torch.Generator) -> None:
    """Move every trainable tensor other than the LoRA factors away from its initial value, as training would.

    That is DoRA magnitudes, lora_B biases, head copies (modules_to_save) and biases trained with bias="all" /
    "lora_only". Otherwise each equals its base counterpart (or zero), and a test could not tell a dropped tensor
    from a kept one.
    """
    factors = ("lora_A", "lora_B.", "lora_embedding_")
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.requires_grad and (not any(f in name for f in factors) or name.endswith("lora_B.default.bias")):
                param.add_(0.1 * torch.randn(param.shape, generator=gen))


# ----------------------------------------------------------------------------------------------- bf16 rounding


def bf16_ulp(x: torch.Tensor) -> torch.Tensor:
    """The spacing of bfloat16 values at |x| (8 significant bits)."""
    exponent = torch.floor(torch.log2(x.abs().clamp_min(torch.finfo(torch.bfloat16).tiny)))
    return torch.exp2(exponent - 7)


def assert_bf16_close(ours: torch.Tensor, reference: torch.Tensor, name: str) -> None:
    assert ours.dtype == torch.bfloat16, name
    assert ours.shape == reference.shape, name
    ours, reference = ours.float(), reference.detach().float()
    err = (ours - reference).abs()
    assert bool((err <= bf16_ulp(reference)).all()), f"{name}: {float(err.max())} off PEFT (over 1 bf16 ulp)"
    rounded_equal = (ours == reference.to(torch.bfloat16).float()).float().mean()
    assert rounded_equal > 0.99, f"{name}: only {float(rounded_equal):.3f} equal PEFT's rounding"


# ----------------------------------------------------------------------------------------------- raw files


def read_folder(folder: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """(adapter_config.json, tensors) of a PEFT folder, read directly (not through loramix)."""
    config = json.loads((folder / "adapter_config.json").read_text())
    return config, load_file(str(folder / "adapter_model.safetensors"))


def write_folder(folder: Path, config: dict, tensors: dict[str, torch.Tensor]) -> Path:
    """Write a PEFT-shaped folder from raw parts (for hand-made or damaged inputs)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "adapter_config.json").write_text(json.dumps(config))
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(folder / "adapter_model.safetensors"))
    return folder


def raw_lora_folder(
    folder: Path,
    *,
    shapes: dict[str, tuple[int, int, int]] | None = None,
    config: dict | None = None,
    seed: int = 0,
) -> Path:
    """A hand-made PEFT folder: ``shapes`` maps module name → (out, r, in); config defaults to r=4, alpha=8."""
    shapes = shapes or {"model.layers.0.self_attn.q_proj": (8, 4, 6), "model.layers.0.self_attn.v_proj": (4, 4, 6)}
    gen = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, (out, r, inp) in shapes.items():
        tensors[f"base_model.model.{name}.lora_A.weight"] = torch.randn(r, inp, generator=gen)
        tensors[f"base_model.model.{name}.lora_B.weight"] = torch.randn(out, r, generator=gen)
    base_config = {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"]}
    return write_folder(folder, {**base_config, **(config or {})}, tensors)


# ----------------------------------------------------------------------------------------------- Hub cache

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def publish(cache: Path, repo_id: str, source: Path, *, commit: str = COMMIT, sub: str = "", ref: str = "main") -> Path:
    """Put ``source``'s files in the cache as snapshot ``commit`` of ``repo_id`` (under ``sub``), with ``ref``."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / ref).write_text(commit)
    target = repo / "snapshots" / commit / sub
    target.mkdir(parents=True, exist_ok=True)
    for f in source.iterdir():
        shutil.copy(f, target / f.name)
    return target
