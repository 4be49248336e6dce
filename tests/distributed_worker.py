"""A worker for `loramix.weight_search.distributed.launch` in tests, in a module of its own so that the processes
it starts import torch and nothing else (importing a test module would import PEFT and transformers in each)."""

import torch
import torch.distributed as dist


def gather_unless_rank_1(device: str) -> None:
    """Rank 1 fails (a two-line message) while rank 0 waits for it at a collective."""
    if dist.get_rank() == 1:
        raise RuntimeError("rank one broke\nsecond line of its message")
    dist.all_gather([torch.empty(1), torch.empty(1)], torch.zeros(1))
