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
from loramix.linalg import RankRule
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
    rank_rule: RankRule | None = None,
    device: str = "auto",
    allow_different_bases: bool = False,
    allow_nonfinite: bool = False,
    load_options: dict | None = None,
    progress: bool = False,
    grams: list[dict] | None = None,
    **settings,
) -> LoraAdapter:
    """Combine ``adapters`` (paths, Hub ids or `LoraAdapter`s) with ``weights`` by ``method``.

    Each weight, and each numeric method option, is a number or a value that varies by layer or module (a gradient
    ``[0, 1]``, name filters ``{"self_attn": 1.0, "default": 0.2}``, SD block weights ``{"lbw": [...]}``; see
    `loramix.schedule`): it is resolved per module, and the method runs on each module with plain numbers.
    ``rank_rule`` (a `loramix.RankRule`: ``RankRule(rank=16)``, ``energy``, or a kohya ``rule`` and ``rule_value``)
    truncates re-factorising methods; its ``conv_rank`` caps conv modules with a kernel other than 1×1 instead of
    ``rank`` (kohya's ``--new_conv_rank``). ``heads="average"`` takes the weighted average of heads several adapters
    carry, ``heads="drop"`` leaves them out (the base's own stay). ``rank_layout="portable"`` (the default) prepares
    the layout every serving engine reads (one rank R for all modules, see `loramix.adapter.portable_layout`): where
    the rule's ``energy`` or kohya ``rule`` chose a module's rank for an exact method (svd), the module keeps its best
    rank-R approximation instead (more of its own singular directions, where it has them; never above the rule's
    ``rank``); ``"exact"`` keeps each module at the rank the rule chose. ``device``:
    ``cpu``, ``cuda[:N]`` or ``auto`` (a GPU when there is one: results agree with the CPU's to float32 rounding).
    ``load_options`` go to `load_adapter` for every source (``scale``/``alpha``/``base_model``/``module_map`` for
    plain state dicts). A method that needs data (``regmean``) takes ``grams``: per adapter, each module's input Gram
    matrix (`input_grams`), collected here from the method's options ``base`` and ``examples`` unless given.
    Returns a new `LoraAdapter` (scale 1 per module).
    """
    loading = {"allow_different_bases": allow_different_bases, "allow_nonfinite": allow_nonfinite}
    loaded, weights, checked = combination.accept(
        adapters, method=method, rank_rule=rank_rule, device=device, load_options=load_options, **loading, **settings
    )
    grams = grams if grams is not None else method_grams(checked, loaded)
    return combination.combine_loaded(loaded, weights, checked, grams=grams, progress=progress)


def method_grams(settings: combination.CombineSettings, loaded: list[LoraAdapter]) -> list[dict] | None:
    """The input Gram matrices a method that needs data (``regmean``) fits to, from its options ``base`` and
    ``examples`` (None for other methods)."""
    if not settings.method.data:
        return None
    base, examples = settings.options.get("base"), settings.options.get("examples")
    if not base or not examples:
        raise MethodError(
            f"method {settings.method.name} fits each module to the inputs it sees: give base (a model folder or Hub "
            'id) and examples (a JSONL file of {"input": ..., "output": ...}); CLI: --base BASE --examples FILE'
        )
    return input_grams(base, loaded, examples, device=settings.device)
