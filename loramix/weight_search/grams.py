"""Input Gram matrices for data-aware merges (`regmean`, `lot`), and `combine` that collects them when the method
needs them.

For adapter i and each module any of the adapters targets, Gᵢ = XᵢᵀXᵢ / Nᵢ (in×in, float64): the rows of Xᵢ are
the module's inputs at every token of every example (input and output text together, as the model reads them;
labels are not used) in the model base + adapter i — RegMean's Gram of model i. The adapter is applied by the
search's evaluator hooks (the ``delta`` composition at weight 1 for adapter i, 0 for the others); a second hook on
each module sums x·xᵀ. Examples run one at a time, so no padding enters a Gram. The base is loaded once (float32 on
the CPU, bf16 on a GPU) and never rewritten. Memory: one in×in float64 matrix per module and adapter.
"""

from __future__ import annotations

import torch

from loramix import combination
from loramix.adapter import LoraAdapter
from loramix.errors import MethodError
from loramix.formats import load_adapters
from loramix.methods import get_method
from loramix.runtime import resolve_device
from loramix.weight_search.evaluator import Evaluator
from loramix.weight_search.objective import as_examples, model_batch
from loramix.weight_search.run import load_base


def input_grams(
    base,
    adapters: list[LoraAdapter],
    examples,
    *,
    device: str = "auto",
    tokenizer=None,
    chat_template: bool = False,
) -> list[dict[str, torch.Tensor]]:
    """Per adapter, the input Gram matrix XᵀX/N of every module any adapter targets, in base + that adapter (see the
    module docstring).

    ``base`` is a folder or Hub id with its tokenizer, or a model with ``tokenizer=``; ``examples`` a JSONL path or
    a list of ``{"input", "output"}`` (the file `search` reads)."""
    examples = as_examples(examples)
    model, tokenizer, encoder_decoder = load_base(base, device=resolve_device(device), tokenizer=tokenizer)
    batches = [
        model_batch(model, tokenizer, [e], encoder_decoder=encoder_decoder, chat_template=chat_template)
        for e in examples
    ]
    names = list(dict.fromkeys(n for a in adapters for n in a.modules))
    with Evaluator(model, adapters, batches[0], composition="delta") as evaluator:
        return [
            _grams(model, evaluator, names, [float(j == i) for j in range(len(adapters))], batches)
            for i in range(len(adapters))
        ]


def _grams(model, evaluator: Evaluator, names: list[str], weights: list[float], batches: list) -> dict:
    """XᵀX/N of each module in ``names`` over ``batches``, with the evaluator's adapters at ``weights``."""
    named = dict(model.named_modules())
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}

    def capture(name: str):
        def hook(module, args, output) -> None:
            x = args[0].reshape(-1, args[0].shape[-1]).double()
            sums[name] = sums.get(name, 0) + x.T @ x
            counts[name] = counts.get(name, 0) + x.shape[0]

        return hook

    handles = [named[name].register_forward_hook(capture(name)) for name in names]
    try:
        with evaluator.applied(weights), torch.no_grad():
            for batch in batches:
                model(**{k: v.to(evaluator.device) for k, v in batch.items() if k != "labels"}, use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    return {name: (sums[name] / counts[name]).cpu() for name in sums}


def combine(
    adapters: list,
    *,
    method: str = "svd",
    device: str = "auto",
    allow_different_bases: bool = False,
    allow_nonfinite: bool = False,
    load_options: dict | None = None,
    **settings,
) -> LoraAdapter:
    """`loramix.combination.combine`; for a method that needs data (``regmean``), each adapter's input Gram matrices
    are first collected from its options ``base`` and ``examples`` (`input_grams`), unless ``grams`` gives them."""
    loading = {"allow_different_bases": allow_different_bases, "allow_nonfinite": allow_nonfinite}
    if not get_method(method).data or settings.get("grams") is not None:  # or the Grams are given
        return combination.combine(
            adapters, method=method, device=device, load_options=load_options, **loading, **settings
        )
    base, examples = settings.get("base"), settings.get("examples")
    if not base or not examples:
        raise MethodError(
            f"method {method} fits each module to the inputs it sees: give base (a model folder or Hub id) and "
            'examples (a JSONL file of {"input": ..., "output": ...}); CLI: --base BASE --examples FILE'
        )
    loaded, _ = load_adapters(adapters, load_options=load_options, **loading)
    grams = input_grams(base, loaded, examples, device=device)
    return combination.combine(loaded, method=method, device=device, grams=grams, **loading, **settings)
