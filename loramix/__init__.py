"""loramix: load, analyse and combine LoRA adapters in factor space."""

from loramix.adapter import ExtraTensor, LoraAdapter, LoraModule
from loramix.analysis import analyze
from loramix.checkpoint import merge_into_base
from loramix.combine import combine
from loramix.errors import LoramixError
from loramix.formats import load_adapter
from loramix.hub import push_to_hub
from loramix.search import search

__all__ = [
    "ExtraTensor",
    "LoraAdapter",
    "LoraModule",
    "LoramixError",
    "analyze",
    "combine",
    "load_adapter",
    "merge_into_base",
    "push_to_hub",
    "search",
]
