"""LoRAHub-style weight search: `search` (in `run`), its batched evaluator, objective and optimizers."""

from loramix.weight_search.run import SearchResult, load_base, search

__all__ = ["SearchResult", "load_base", "search"]
