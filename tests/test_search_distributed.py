"""`search` across processes (torch.distributed, gloo on the CPU) and on a base dispatched by accelerate.

Two processes with gloo stand in for two GPUs with NCCL: the code path is the same (`scatter_gather`, `launch`),
only the backend differs. Each test that starts processes pays their start (importing torch in each), so there are
two of them.
"""

from __future__ import annotations

import json
import pickle

import pytest
import torch
from click.testing import CliRunner
from distributed_worker import gather_unless_rank_1
from test_search import EXAMPLES, Setup, llama

from loramix.cli import main
from loramix.errors import IncompatibleAdaptersError, SearchError
from loramix.pipeline import write_search
from loramix.weight_search import distributed as D
from loramix.weight_search import search


@pytest.fixture(scope="module")
def causal(tmp_path_factory):
    return Setup(tmp_path_factory.mktemp("causal"), llama, ["q_proj", "v_proj", "down_proj"])


@pytest.mark.parametrize("size,world", [(7, 2), (8, 2), (10, 4), (5, 4), (1, 2)])
def test_population_slices_cover_it_once_in_order(size, world):
    parts = [D.population_slice(size, r, world) for r in range(world)]
    assert [i for p in parts for i in range(size)[p]] == list(range(size))
    chunk = -(-size // world)  # the slices are one process's chunks with max_candidates = ⌈size/world⌉
    assert [range(size)[p] for p in parts if p.stop > p.start] == [
        range(i, min(i + chunk, size)) for i in range(0, size, chunk)
    ]


def test_two_processes_give_one_process_result_bit_for_bit(causal, tmp_path):
    """CMA-ES with a population of 7 (not divisible by 2) over 2 gloo processes (`--gpus 2` on a CPU-only machine)
    equals one process scoring the population in chunks of ⌈7/2⌉ = 4: the same forward shapes on the same CPU code,
    and every rank steps the optimizer from the same gathered losses, so weights, history and loss are identical
    (==, not approx), and so are the bytes of the written adapter."""
    examples = tmp_path / "ex.jsonl"
    examples.write_text("".join(json.dumps(e) + "\n" for e in EXAMPLES))
    out = tmp_path / "two"
    args = ["search", "--base", str(causal.base), "--examples", str(examples), *map(str, causal.adapters)]
    args += ["--optimizer", "cma", "--popsize", "7", "--steps", "3", "--seed", "3", "--device", "cpu"]
    result = CliRunner().invoke(main, ["-q", *args, "--gpus", "2", "-o", str(out)])
    assert result.exit_code == 0, result.output
    two = json.loads((out / "search.json").read_text())
    one = search(
        causal.base, causal.adapters, EXAMPLES, optimizer="cma", popsize=7, steps=3, seed=3, device="cpu",
        max_candidates=4,
    )  # fmt: skip
    assert two["settings"]["processes"] == 2 and two["evaluations"] == one.evaluations == 21
    assert two["weights"] == one.weights and two["history"] == one.history and two["loss"] == one.loss
    assert result.output.startswith(f"wrote {out}: weights [") and result.output.count("\n") == 1
    write_search(one, tmp_path / "one")
    name = "adapter_model.safetensors"
    assert (out / name).read_bytes() == (tmp_path / "one" / name).read_bytes()


def test_a_failing_process_is_one_line_and_stops_the_others():
    with pytest.raises(SearchError) as caught:
        D.launch(gather_unless_rank_1, ["cpu", "cpu"])
    assert str(caught.value) == "search process 1 failed: RuntimeError: rank one broke"


class _Pipe:
    """Stands in for the queue a child reports into."""

    def __init__(self) -> None:
        self.sent, self.flushed = [], False

    def put(self, item) -> None:
        self.sent.append(pickle.loads(pickle.dumps(item)))

    def close(self) -> None:
        pass

    def join_thread(self) -> None:
        self.flushed = True


def test_a_childs_loramix_error_arrives_as_raised_and_is_flushed_first():
    pipe = _Pipe()
    D._report(pipe, 1, IncompatibleAdaptersError("module x: ranks differ", option="composition", value="delta"))
    [(kind, rank, payload)] = pipe.sent
    error = pickle.loads(payload)
    assert (kind, rank, type(error), str(error), pipe.flushed) == (
        "error",
        1,
        IncompatibleAdaptersError,
        "module x: ranks differ (pass composition='delta')",
        True,
    )


def test_settings_that_cannot_run_are_refused_before_any_process_starts(causal):
    with pytest.raises(SearchError, match="multiple of gpus_per_base"):
        search(causal.base, causal.adapters, EXAMPLES, gpus=3, gpus_per_base=2, device="cpu")
    with pytest.raises(SearchError, match="only over GPUs"):
        search(causal.base, causal.adapters, EXAMPLES, gpus=2, gpus_per_base=2, device="cpu")
    with pytest.raises(SearchError, match="auto, cuda or cpu"):
        search(causal.base, causal.adapters, EXAMPLES, gpus=2, device="cuda:1")
    with pytest.raises(SearchError, match="must be a folder"):
        search(llama(), causal.adapters, EXAMPLES, gpus=2, device="cpu", tokenizer=causal.tokenizer)


def test_evaluator_on_a_base_dispatched_by_accelerate(causal):
    """accelerate's hooks (device alignment per block, as `device_map` installs them) and the evaluator's hooks
    compose: the same losses, to float32 rounding, as on the plain model (here every block on the CPU)."""
    dispatch_model = pytest.importorskip("accelerate").dispatch_model

    W = torch.tensor([[0.5, -1.0, 0.25], [1.2, 0.3, -0.7]])
    with causal.evaluator(EXAMPLES, "lorahub") as ev:
        plain = ev.cross_entropy(W)
    blocks = {"model.embed_tokens": "cpu", "model.layers.0": "cpu", "model.layers.1": "cpu"}
    device_map = {**blocks, "model.norm": "cpu", "model.rotary_emb": "cpu", "lm_head": "cpu"}
    with causal.evaluator(EXAMPLES, "lorahub") as ev:
        dispatch_model(ev.model, device_map=device_map, force_hooks=True)
        assert hasattr(ev.model.model.layers[0], "_hf_hook")
        split = ev.cross_entropy(W)
    torch.testing.assert_close(split, plain, rtol=1e-6, atol=0)
