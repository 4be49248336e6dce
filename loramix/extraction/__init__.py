"""Extract a LoRA from a fully fine-tuned model: ΔW = W_tuned − W_base per module, truncated by a `RankRule`.

Both models are streamed tensor by tensor (`tensors.TensorSource`): peak memory is a few tensors (on a GPU, one
batch of same-shaped ΔWs), whatever the model's size. On a GPU two threads read the next pairs from disk while the
device works, each straight into device memory through its own pinned buffers (`staging.Staging`); each pair arrives
as stored (bfloat16), and is compared and widened to float32 there: the host only reads. Per tensor, in the base's
storage order:

- identical in both: skipped; changed by less than float rounding (‖ΔW‖_F ≤ `noise_floor`·‖W‖_F): reported as
  unchanged, noise only;
- a LoRA target (`tensors.target_layout`: linear, Conv1D, embedding, conv2d weights): ΔW in float32 on the device,
  its top singular triplets as far as the rule needs them (`spectrum.top_singular`: subspace iteration that stops once
  the rule is settled, equal to the truncated dense SVD to float rounding), balanced factors B = U·√S, A = √S·Vh
  in the output dtype, and the relative error ‖ΔW − B·A‖_F/‖ΔW‖_F measured with those stored factors;
- anything else that changed (norms, biases, a resized embedding or head): carried whole as an `ExtraTensor`
  (PEFT modules_to_save, or bias="all" for a LoRA target's bias), and listed with the reason.
"""

from __future__ import annotations

import math
import time
from collections import defaultdict, deque
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import torch

from loramix import experts
from loramix.adapter import ExpertSlot, ExtraTensor, LoraAdapter, LoraModule
from loramix.errors import SettingError
from loramix.extraction.fused_experts import FusedTensors, fused_view
from loramix.extraction.spectrum import top_singular
from loramix.extraction.staging import ThreadStaging
from loramix.extraction.tensors import TensorSource, open_model, open_pair, pair, resized, target_layout
from loramix.linalg import RankRule
from loramix.runtime import parse_dtype, progress_bar, resolve_device

T = TypeVar("T")
READ_AHEAD = 2  # on a GPU: tensor pairs read from disk while the device works on the current one
READERS = 2  # on a GPU: threads reading those pairs (one thread's reads leave the page cache half used)
GPU_BATCH = 8  # same-shaped ΔWs decomposed together on a GPU (one launch per product for all of them)
SAME_DTYPE_NOISE = 4 * torch.finfo(torch.float32).eps  # ‖ΔW‖/‖W‖ at or below this is float32 rounding


def noise_floor(a: torch.dtype, b: torch.dtype) -> float:
    """‖ΔW‖_F/‖W‖_F at or below which a change is rounding: a few float32 ulps when both are stored alike, else the
    unit roundoff of the coarser dtype (a tensor merely cast from the finer one differs by up to that)."""
    if a == b or not (a.is_floating_point and b.is_floating_point):
        return SAME_DTYPE_NOISE
    return max(torch.finfo(a).eps, torch.finfo(b).eps) / 2


@dataclass
class ModuleExtraction:
    """One module's LoRA: its rank, the share of ‖ΔW‖² kept, the measured ‖ΔW − B·A‖/‖ΔW‖ (with the stored factors)
    and ‖ΔW‖/‖W‖; ``solver`` says how its spectrum was found."""

    rank: int
    kept: float
    error: float
    change: float | None  # None: no base weight was read (a conversion in factor space)
    shape: tuple[int, ...]
    solver: str


@dataclass
class Extraction:
    """What `extract_lora` made: the adapter and the account of every tensor."""

    adapter: LoraAdapter
    base: str
    finetuned: str
    rule: RankRule
    device: str
    modules: dict[str, ModuleExtraction] = field(default_factory=dict)
    carried: dict[str, str] = field(default_factory=dict)  # tensor → why it is carried whole
    unchanged: int = 0  # identical tensors
    noise: list[str] = field(default_factory=list)  # changed by no more than rounding
    dropped: dict[str, str] = field(default_factory=dict)  # carried tensors an output format cannot hold
    seconds: float = 0.0
    read_wait: float = 0.0  # of ``seconds``: the time the device waited for the disk

    def to_json(self) -> dict:
        return {
            "base": self.base,
            "finetuned": self.finetuned,
            "rule": self.rule.describe(),
            "device": self.device,
            "seconds": round(self.seconds, 3),
            "read_wait_seconds": round(self.read_wait, 3),
            "modules": {
                name: {
                    "rank": m.rank,
                    "kept_energy": m.kept,
                    "relative_error": m.error,
                    "relative_change": m.change,
                    "shape": list(m.shape),
                    "solver": m.solver,
                }
                for name, m in self.modules.items()
            },
            "carried": self.carried,
            "not_carried": self.dropped,
            "unchanged": self.unchanged,
            "rounding_only": self.noise,
        }


@dataclass
class Pending:
    """One module's ΔW waiting for its decomposition (`Extractor` batches same-shaped ones on a GPU)."""

    name: str
    layout: str
    kernel: tuple[int, ...]
    delta: torch.Tensor  # out×in (math orientation), float32, on the device
    total: float  # ‖ΔW‖²_F (float64)
    change: float
    expert: ExpertSlot | None = None


def math_view(delta: torch.Tensor, layout: str) -> torch.Tensor:
    """ΔW as out×in from its stored layout (Conv1D and embeddings are stored in×out; conv kernels flattened)."""
    if layout in ("conv1d_fan_in_fan_out", "embedding"):
        return delta.T
    return delta.reshape(delta.shape[0], -1)


def task_type_of(config: dict) -> str | None:
    architectures = config.get("architectures") or []
    return "CAUSAL_LM" if any(str(a).endswith("ForCausalLM") for a in architectures) else None


class Extractor:
    """Decomposes queued ΔWs under the result's rank rule into the result's adapter, with each module's account."""

    def __init__(
        self,
        result: Extraction,
        device: torch.device,
        dtype: torch.dtype,
        batch: int,
        fused: dict[str, bool] | None = None,
    ) -> None:
        self.result, self.device, self.dtype, self.batch = result, device, dtype, batch
        self.fused = fused or {}  # fused expert parameter → whether it is stored (E, in, out)
        self.pending: dict[tuple[int, int], list[Pending]] = defaultdict(list)

    def add(self, item: Pending) -> None:
        group = self.pending[tuple(item.delta.shape)]
        group.append(item)
        if len(group) >= self.batch:
            self.flush(tuple(item.delta.shape))

    def flush(self, shape: tuple[int, int]) -> None:
        items = self.pending.pop(shape, [])
        if not items:
            return
        stacked = torch.stack([i.delta for i in items]) if len(items) > 1 else items[0].delta.unsqueeze(0)
        spectra = top_singular(stacked, self.result.rule, [i.total for i in items])
        for index, (item, spectrum) in enumerate(zip(items, spectra)):
            root = spectrum.S.sqrt()
            B = (spectrum.U * root).to(self.dtype)
            A = (root[:, None] * spectrum.Vh).to(self.dtype)
            residual = stacked[index].addmm_(B.float(), A.float(), alpha=-1)  # ΔW is not needed any more
            error = float(torch.linalg.vector_norm(residual)) / math.sqrt(item.total)
            kept = float(spectrum.S.double().square().sum()) / item.total
            self.result.adapter.modules[item.name] = LoraModule(
                A=A.cpu(), B=B.cpu(), scale=1.0, layout=item.layout, kernel_size=item.kernel, expert=item.expert
            )
            self.result.modules[item.name] = ModuleExtraction(
                rank=int(spectrum.S.numel()),
                kept=min(kept, 1.0),
                error=error,
                change=item.change,
                shape=tuple(stacked.shape[1:]),
                solver=spectrum.solver,
            )

    def take(self, name: str, old: torch.Tensor, new: torch.Tensor, model_type: str | None, targets: set[str]) -> None:
        """One tensor of both models: skipped, reported, carried whole, or its ΔW queued for decomposition."""
        result = self.result
        if old.shape != new.shape:
            _carry(result, name, new, f"resized {tuple(old.shape)} → {tuple(new.shape)}", targets)
            return
        host = new
        old, new = old.to(self.device, non_blocking=True), new.to(self.device, non_blocking=True)  # as stored
        if old.dtype == new.dtype and torch.equal(old, new):  # compared where they are: no float32 copies
            result.unchanged += 1
            return
        if not (old.is_floating_point() and new.is_floating_point()):
            _carry(result, name, host, "changed (not floating point)", targets)
            return
        delta = new.to(torch.float32, copy=True).sub_(old.float())  # widened on the device (new stays whole)
        total = float(torch.linalg.vector_norm(delta)) ** 2  # float32 reductions: no float64 copy of a tensor
        scale = float(torch.linalg.vector_norm(old, dtype=torch.float32))
        change = math.sqrt(total) / scale if scale > 0 else math.inf
        layout = target_layout(name, tuple(old.shape), model_type)
        if change <= noise_floor(old.dtype, new.dtype):
            result.noise.append(name)
        elif name in self.fused:
            self._experts(name, old, delta)
        elif layout is None:
            _carry(result, name, host, f"changed (‖ΔW‖/‖W‖ {change:.3g}), not a LoRA target", targets)
        else:
            kernel = tuple(old.shape[2:]) if layout == "conv2d" else ()
            self.add(Pending(name.removesuffix(".weight"), layout, kernel, math_view(delta, layout), total, change))

    def _experts(self, param: str, old: torch.Tensor, delta: torch.Tensor) -> None:
        """Each changed expert of a fused parameter as its own module (out × in), on the parameter's slot."""
        count = delta.shape[0]
        for e in range(count):
            update = delta[e].T if self.fused[param] else delta[e]
            total = float(torch.linalg.vector_norm(update)) ** 2
            if total == 0:
                continue
            scale = float(torch.linalg.vector_norm(old[e], dtype=torch.float32))
            change = math.sqrt(total) / scale if scale > 0 else math.inf
            slot = ExpertSlot(param, e, count)
            self.add(Pending(experts.module_name(param, e), "out_in", (), update.contiguous(), total, change, slot))

    def finish(self) -> None:
        for shape in list(self.pending):
            self.flush(shape)


def read_ahead(
    names: list[str], read: Callable[[str], T], depth: int = READ_AHEAD, workers: int = 1
) -> Iterator[tuple[str, T]]:
    """(name, read(name)) for each name in order, the next ``depth`` read by ``workers`` threads meanwhile: the disk
    works while the device decomposes (``depth`` 0: each read when its turn comes, for the least memory)."""
    if depth == 0:
        yield from ((name, read(name)) for name in names)
        return
    with ThreadPoolExecutor(workers) as reader:
        pending = deque((n, reader.submit(read, n)) for n in names[:depth])
        for index in range(len(names)):
            name, future = pending.popleft()
            if index + depth < len(names):
                pending.append((names[index + depth], reader.submit(read, names[index + depth])))
            yield name, future.result()


def _carry(result: Extraction, name: str, tensor: torch.Tensor, reason: str, targets: set[str]) -> None:
    module = name.rpartition(".")[0]
    kind = "bias" if name.endswith(".bias") and module in targets else "modules_to_save"
    result.adapter.extra[name] = ExtraTensor(tensor.to("cpu", copy=True), kind)  # as stored, wherever it was read
    result.carried[name] = reason


def extract_lora(
    base: str | Path,
    finetuned: str | Path,
    *,
    rank_rule: RankRule | None = None,
    device: str | torch.device = "auto",
    dtype: torch.dtype | str | None = None,
    progress: bool = False,
    base_tensors: TensorSource | None = None,
    tuned_tensors: TensorSource | None = None,
) -> Extraction:
    """The LoRA adapter that best reproduces ``finetuned`` on ``base`` (folders or Hub ids of one architecture, or two
    diffusers pipeline folders: modules named ``unet.…``/``text_encoder.…``, see `tensors.open_pair`) under
    ``rank_rule`` (a `loramix.RankRule`: ``RankRule(rank=16)``, ``energy``, or a kohya ``rule`` and ``rule_value``;
    one is needed), computed in float32 on ``device`` and stored in ``dtype`` (default: the fine-tuned model's). Returns
    the adapter (scale 1 per module, each at its own rank) with the per-module account. ``base_tensors`` /
    ``tuned_tensors`` read the models through another `TensorSource` (the labels stay ``base``/``finetuned``)."""
    started = time.perf_counter()
    truncation = RankRule.given(rank_rule, conv=False)
    if truncation == RankRule():
        raise SettingError("give `rank`, `energy` or `rule` with `rule_value`: the rank rule of every module")
    target = resolve_device(device)
    if base_tensors is None and tuned_tensors is None:
        base_tensors, tuned_tensors = open_pair(base, finetuned)
    base_tensors = base_tensors or open_model(base)
    tuned_tensors = tuned_tensors or open_model(finetuned)
    base_tensors, tuned_tensors = fused_view(base_tensors, tuned_tensors)
    names = pair(base_tensors, tuned_tensors)
    model_type = tuned_tensors.config.get("model_type") or base_tensors.config.get("model_type")
    floats = [tuned_tensors.dtype(n) for n in names if tuned_tensors.dtype(n).is_floating_point]
    out_dtype = parse_dtype(dtype) or (max(set(floats), key=floats.count) if floats else torch.float32)
    adapter = LoraAdapter(
        modules={},
        base_model=str(base),
        task_type=task_type_of(tuned_tensors.config),
        source="<extracted>",
        name=f"LoRA extracted from {finetuned}",
    )
    result = Extraction(adapter, str(base), str(finetuned), truncation, str(target))
    fused = (
        {n: base_tensors.is_transposed(n) for n in base_tensors.blocks}
        if isinstance(base_tensors, FusedTensors)
        else {}
    )
    extractor = Extractor(result, target, out_dtype, GPU_BATCH if target.type == "cuda" else 1, fused)
    targets = {n.removesuffix(".weight") for n in names if target_layout(n, base_tensors.shape(n), model_type)}
    if target.type == "cuda":  # a GPU waits for the disk: read ahead, straight into device memory
        staging = ThreadStaging(target)
        pairs = read_ahead(
            names,
            lambda n: (staging.get().read(base_tensors, n), staging.get().read(tuned_tensors, n)),
            READ_AHEAD,
            READERS,
        )
    else:  # a CPU has no time to spare
        pairs = read_ahead(names, lambda n: (base_tensors.read(n), tuned_tensors.read(n)), 0)
    with progress_bar(enabled=progress, total=len(names), desc="extract", unit="tensor") as bar:
        asked = time.perf_counter()
        for name, (old, new) in pairs:
            result.read_wait += time.perf_counter() - asked
            extractor.take(name, old, new, model_type, targets)  # a few pairs alive: read ahead, and in take()
            del old, new
            bar.update()
            asked = time.perf_counter()
        extractor.finish()
    for name, item in adapter.extra.items():  # PEFT loads a wrapped layer's bias as <module>.base_layer.bias
        if item.kind == "bias" and name.rpartition(".")[0] in adapter.modules:
            item.kind = "base_layer"
    if not adapter.modules and not adapter.extra:
        adapter.warnings.append("the fine-tuned model equals the base (to rounding): nothing to extract")
    result.seconds = time.perf_counter() - started
    return result


__all__ = ["Extraction", "ModuleExtraction", "extract_lora", "noise_floor", "resized"]
