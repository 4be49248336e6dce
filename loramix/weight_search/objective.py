"""The search objective: few-shot examples → token batches with masked labels, and the per-candidate loss.

An example is ``{"input": ..., "output": ...}``. Causal LMs see ``input ⧺ output (⧺ eos)`` with the input tokens
masked out of the labels; seq2seq models see ``input`` on the encoder and ``output`` as labels. The loss of one
candidate is the mean cross-entropy over all output tokens of all examples (token-weighted, as transformers'
``outputs.loss`` with ``-100`` labels), plus ``l1 · mean|wᵢ|`` (LoRAHub's regulariser). The ``entropy`` objective
(AdaMerging's, Yang et al. 2024, ICLR 2024, arXiv:2310.02575: minimise the entropy of the merged model's
predictions on unlabeled inputs) scores the same positions by the Shannon entropy of the predicted next-token
distribution instead: the output text is then only read as context, never as a target.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from loramix.errors import SearchError
from loramix.settings import OBJECTIVES, OPTIMIZERS

IGNORE = -100


@dataclass
class Example:
    input: str
    output: str


def read_examples(path: str | Path) -> list[Example]:
    """Read JSON lines ``{"input": str, "output": str}``; a bad line names the file and its line number."""
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise SearchError(f"{path}: cannot read the examples ({type(exc).__name__}: {exc})") from None
    examples = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
        except json.JSONDecodeError as exc:
            raise SearchError(f"{path}:{number}: not valid JSON ({exc.msg})") from None
        except RecursionError:
            raise SearchError(f"{path}:{number}: not valid JSON (nested too deeply)") from None
        if (
            not isinstance(item, dict)
            or not isinstance(item.get("input"), str)
            or not isinstance(item.get("output"), str)
        ):
            raise SearchError(f'{path}:{number}: expected an object with string fields "input" and "output"')
        examples.append(Example(item["input"], item["output"]))
    if not examples:
        raise SearchError(f"{path}: no examples")
    return examples


def as_examples(examples) -> list[Example]:
    """A JSONL path, or a list of `Example`s / dicts / (input, output) pairs."""
    if isinstance(examples, (str, Path)):
        return read_examples(examples)
    out = []
    for i, item in enumerate(examples):
        if isinstance(item, Example):
            out.append(item)
        elif isinstance(item, dict) and isinstance(item.get("input"), str) and isinstance(item.get("output"), str):
            out.append(Example(item["input"], item["output"]))
        elif isinstance(item, (tuple, list)) and len(item) == 2 and all(isinstance(s, str) for s in item):
            out.append(Example(*item))
        else:
            raise SearchError(f'example {i}: expected {{"input": str, "output": str}} or an (input, output) pair')
    if not out:
        raise SearchError("no examples")
    return out


def prompt_text(tokenizer, text: str, chat_template: bool) -> str:
    """The input as the model sees it: raw, or wrapped as one user turn by the tokenizer's chat template."""
    if not chat_template:
        return text
    if not getattr(tokenizer, "chat_template", None):
        raise SearchError("chat_template asked for but the base's tokenizer has no chat template")
    return tokenizer.apply_chat_template(
        [{"role": "user", "content": text}], add_generation_prompt=True, tokenize=False
    )


def _pad(rows: list[list[int]], value: int) -> torch.Tensor:
    width = max(len(r) for r in rows)
    return torch.tensor([r + [value] * (width - len(r)) for r in rows], dtype=torch.long)


def build_batch(
    examples: list[Example],
    tokenizer,
    *,
    encoder_decoder: bool,
    chat_template: bool = False,
    add_eos: bool = True,
    decoder_start_token_id: int | None = None,
) -> dict[str, torch.Tensor]:
    """Token batch for ``examples`` (right-padded): model inputs plus ``labels`` with ``-100`` on ignored tokens."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    eos = tokenizer.eos_token_id
    # A chat template writes its own special tokens (BOS included), so the tokenizer must not add them again.
    prompts = [
        tokenizer(prompt_text(tokenizer, e.input, chat_template), add_special_tokens=not chat_template)["input_ids"]
        for e in examples
    ]
    if encoder_decoder:
        targets = [tokenizer(e.output)["input_ids"] for e in examples]  # the tokenizer adds </s> (T5) itself
        if add_eos and eos is not None:
            targets = [t if t and t[-1] == eos else [*t, eos] for t in targets]
        labels = _pad(targets, IGNORE)
        start = decoder_start_token_id if decoder_start_token_id is not None else pad
        decoder = torch.cat([torch.full((len(examples), 1), start), labels[:, :-1]], dim=1)
        decoder[decoder == IGNORE] = pad
        return {
            "input_ids": _pad(prompts, pad),
            "attention_mask": _pad([[1] * len(p) for p in prompts], 0),
            "decoder_input_ids": decoder,  # padded label positions come last: the causal mask keeps them out
            "labels": labels,
        }
    rows, labels = [], []
    for prompt, e in zip(prompts, examples):
        target = tokenizer(e.output, add_special_tokens=False)["input_ids"]
        if add_eos and eos is not None:
            target = [*target, eos]
        if not target:
            raise SearchError(f"example output {e.output!r} has no tokens")
        rows.append(prompt + target)
        labels.append([IGNORE] * len(prompt) + target)
    return {
        "input_ids": _pad(rows, pad),
        "attention_mask": _pad([[1] * len(r) for r in rows], 0),
        "labels": _pad(labels, IGNORE),
    }


def model_batch(
    model,
    tokenizer,
    examples: list[Example],
    *,
    encoder_decoder: bool,
    chat_template: bool = False,
    add_eos: bool = True,
) -> dict[str, torch.Tensor]:
    """`build_batch` for ``model`` (its config's decoder start token for a seq2seq model)."""
    return build_batch(
        examples,
        tokenizer,
        encoder_decoder=encoder_decoder,
        chat_template=chat_template,
        add_eos=add_eos,
        decoder_start_token_id=getattr(model.config, "decoder_start_token_id", None),
    )


def check_search(objective: str, optimizer: str, steps: int) -> None:
    """The settings every search takes, each refused in one line when it is not one it knows."""
    if objective not in OBJECTIVES:
        raise SearchError(f"unknown objective {objective!r} (use {' or '.join(OBJECTIVES)})")
    if optimizer not in OPTIMIZERS:
        raise SearchError(f"unknown optimizer {optimizer!r} (use {', '.join(OPTIMIZERS)})")
    if steps < 1:
        raise SearchError(f"steps must be at least 1, got {steps}")


def token_losses(
    logits: torch.Tensor, labels: torch.Tensor, *, shift: bool, objective: str = "cross-entropy"
) -> torch.Tensor:
    """Summed per row (float32), over the positions with a label (for causal LMs with the usual next-token shift):
    the cross-entropy of the labels, or with ``objective="entropy"`` the entropy of the predicted distribution."""
    if shift:
        logits, labels = logits[:, :-1], labels[:, 1:]
    logp = torch.log_softmax(logits.float(), dim=-1)
    mask = labels != IGNORE
    if objective == "entropy":
        return -((logp.exp() * logp).sum(-1) * mask).sum(dim=1)
    picked = logp.gather(-1, labels.clamp_min(0).unsqueeze(-1)).squeeze(-1)
    return -(picked * mask).sum(dim=1)


def l1_penalty(weights: torch.Tensor, l1: float) -> torch.Tensor:
    """LoRAHub's regulariser ``l1 · mean|wᵢ|`` per candidate (weights: P×n)."""
    return l1 * weights.abs().mean(dim=-1)
