"""LoRAHub-style weight search: `search` (in `run`), its batched evaluator, objective and optimizers; and the input
Gram matrices data-aware merges need (`grams`: `input_grams`, and `combine`, which collects them when asked); and
the module-subset search (`subset`: `search_subset`, which modules or layers of each adapter to keep before a merge)."""

from loramix.weight_search.grams import combine, input_grams
from loramix.weight_search.run import SearchResult, load_base, search
from loramix.weight_search.subset import search_subset

__all__ = ["SearchResult", "combine", "input_grams", "load_base", "search", "search_subset"]
