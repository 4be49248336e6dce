"""Merge an adapter into a base checkpoint: the plan (which base tensor each module and extra tensor changes), the
ΔW kernels (plain LoRA and DoRA, in row chunks) and `write_merged`, which writes the merged, sharded safetensors
checkpoint into a folder.

The base is read through `loramix.io.base` and never loaded whole: each updated tensor is read from its byte range
in row chunks, ΔW = s·B·A is added in float32 on the chosen device, and the result is cast once to the output dtype;
`loramix.io.shards` writes the shards (unchanged tensors copied byte for byte). Peak memory is about one chunk per
worker plus the adapter, whatever the model's size. How ΔW lies on a weight (Linear out×in or GPT-2 Conv1D in×out)
is settled by the base, as PEFT does: the base tensor's shape, and for square weights the model type and name.
"""

from __future__ import annotations

import json
import logging
import math
import os
import sys
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from loramix.adapter import LoraAdapter, LoraModule
from loramix.architecture import GPT2_CONV1D, tied_embedding, ties_output_head
from loramix.errors import CheckpointError
from loramix.io.base import DIFFUSERS_WEIGHTS, BaseCheckpoint, BaseTensor
from loramix.io.conversion_mapping import for_checkpoint
from loramix.io.disk.early_copy import EarlyCopy
from loramix.io.quantized import DequantizedTensor, Requantized
from loramix.io.shards import (
    base_layout,
    kept_header,
    plan_shards,
    shard_names,
    write_beside,
    write_shards,
)
from loramix.merge.chunks import Buffers, merged_chunks
from loramix.merge.kernels import StoredUpdate, Survival, Update, decide_layout, warn_stored
from loramix.merge.quantized_base import mark_quantized, requantize, written_as
from loramix.quantize import Quantization, require_dense_base, round_trip, tensors_to_round_trip
from loramix.runtime import OUTPUT_DTYPE_NAMES, parse_size, progress_bar

log = logging.getLogger(__name__)

# Rows are processed in chunks of about this many elements: on the CPU small enough (1 MB in float32) that a
# chunk's few float32 passes stay in the caches, yet few enough per tensor that the calls into torch between them
# cost little (an 8B merge on a 2-core CPU: 33.4–37.1 s of user CPU at 2^18, 38.5–42.1 at 2^17); on a GPU large
# enough to amortise each transfer.
CHUNK_ELEMENTS = 1 << 18
GPU_CHUNK_ELEMENTS = 1 << 22
# Threads feeding one GPU, each with two pinned chunks in host memory. Their time goes on reading and writing the
# page cache, not on the GPU: an 8B merge's merged modules took 1.96–2.11 s with 4 threads, 1.32–1.46 with 8 or 12
# on an H100 host. Where a computed tensor is one chunk larger than GPU_CHUNK_ELEMENTS (fused 3-D experts, DoRA,
# conv), each thread holds several float32 copies of it on the GPU and two in pinned memory: 4 threads, as before.
GPU_WORKERS = 8
GPU_WORKERS_WHOLE = 4
DEFAULT_SHARD_SIZE = "5GB"  # when the base's own shard files cannot be kept (.bin bases)


@dataclass
class Job:
    """One output tensor: where it comes from, what is added to it, and its output dtype."""

    name: str
    source: BaseTensor | DequantizedTensor  # a quantized weight read dequantized
    dtype: torch.dtype
    updates: list[Update] = field(default_factory=list)
    bias: list[tuple[str, torch.Tensor]] = field(default_factory=list)
    replaced: str | None = None  # the kind of extra tensor that replaced the base tensor
    quantization: Quantization | None = None  # round-trip W through 4-bit first (QLoRA-faithful merge)
    transposed: bool = False  # a Conv1D weight stored in×out: quantized as out×in
    home: Path | None = None  # the base safetensors file the tensor comes from (None: added, or a .bin base)
    requantized: tuple[str, int] | None = None  # (weight, part: 0 codes, 1 scales, 2 zeros) of a re-quantized weight

    @property
    def shape(self) -> tuple[int, ...]:
        return self.source.shape

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize

    @property
    def raw_copy(self) -> bool:
        untouched = not self.updates and not self.bias and self.quantization is None and self.requantized is None
        return untouched and self.source.path is not None and self.dtype == self.source.dtype


@dataclass
class MergeReport:
    """What ``merge_into_base`` wrote: the folder, shard files, and per module how the stored update compares with
    the intended ΔW (`StoredUpdate`)."""

    path: Path
    shards: list[str]
    total_size: int
    tensors: int
    dtype: torch.dtype  # the output's: the base's own (`base_dtype`) unless a dtype was asked for
    in_own_format: bool = False  # a quantized base written in its own format (re-quantized)
    survival: dict[str, StoredUpdate] = field(default_factory=dict)
    replaced: list[str] = field(default_factory=list)
    added: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    quantization: Quantization | None = None
    round_tripped: list[str] = field(default_factory=list)
    written_as: str | None = None  # for a quantized base: its format re-quantized, or the dense dtype
    below_step: dict[str, float] = field(default_factory=dict)  # share of ‖ΔW‖² below half a quantization step
    base_dtype: torch.dtype | None = None  # the base's (most of its floating-point bytes)


def _out_dtype(source: BaseTensor, dtype: torch.dtype | None) -> torch.dtype:
    """A tensor's output dtype: ``dtype`` for floating-point tensors when one was asked for, else its own."""
    return dtype if dtype is not None and source.dtype.is_floating_point else source.dtype


def base_dtype(base: BaseCheckpoint) -> torch.dtype:
    """The dtype of most of the base's floating-point bytes (a float32 norm in a bfloat16 model does not count)."""
    sizes: Counter[torch.dtype] = Counter()
    for tensor in base.tensors.values():
        if tensor.dtype.is_floating_point:
            sizes[tensor.dtype] += tensor.nbytes
    return sizes.most_common(1)[0][0] if sizes else torch.float32


def _memory_tensor(name: str, tensor: torch.Tensor) -> BaseTensor:
    return BaseTensor(name, tensor.dtype, tuple(tensor.shape), tensor=tensor.detach().cpu().contiguous())


def plan_merge(adapter: LoraAdapter, base: BaseCheckpoint, dtype: torch.dtype | None, notes: list[str]) -> list[Job]:
    """One job per output tensor, in the base's order (``dtype`` None: each in its stored dtype); raises on any name
    or shape the base does not have."""
    adapter, stacked = for_checkpoint(adapter, base)
    # a quantized weight as its dense view (shape, dtype): `mark_quantized` settles what is written
    jobs = {name: Job(name, base.dense(name), _out_dtype(t, dtype), home=t.path) for name, t in base.tensors.items()}
    where = f"base {base.folder}"
    for key, slabs in stacked.items():
        key = base.quantized.stored(key) if base.quantized else key  # MXFP4 experts: their _blocks
        if key not in jobs:
            raise CheckpointError(f"{where} has no tensor {key} (the experts of {slabs[0][0]})")
        jobs[key].updates += [Update(name, module, "out_in", rows) for name, module, rows in slabs]
    _plan_extras(adapter, base, jobs, dtype, notes)
    flipped: list[str] = []
    for name, module in adapter.modules.items():
        key, tied = base.weight_key(name)
        if key is None:
            raise CheckpointError(f"adapter module {name} has no matching tensor {name}.weight in {where}")
        if tied is not None:
            notes.append(
                f"{name}.weight is not stored in the base: {name} is tied to {key} (tie_word_embeddings), so its ΔW "
                f"is merged into {key} and the input embeddings change with it (as PEFT's merge_and_unload does)"
            )
        elif ties_output_head(base.config, base.tensors, key):
            notes.append(
                f"{key} is the input embedding and the base ties its output head to it (tie_word_embeddings, no head "
                f"stored): merging {name} changes the output head as well (as PEFT's merge_and_unload does)"
            )
        job = jobs[key]
        if not job.source.dtype.is_floating_point:
            raise CheckpointError(f"adapter module {name}: base tensor {key} is {job.source.dtype}, not floating point")
        module = module.on_weight(job.shape)
        layout = decide_layout(module, name, key, job.shape, base.model_type)
        if layout != module.layout:
            flipped.append(name)
        job.updates.append(Update(name, module, layout))
        if len(job.updates) > 1 and any(u.module.magnitude is not None for u in job.updates):
            others = ", ".join(u.name for u in job.updates)
            raise CheckpointError(f"adapter modules {others} all apply to base tensor {key}, and one is DoRA")
        bias = module.bias_delta()
        if bias is not None:
            bias_key = key.removesuffix("weight") + "bias"
            if bias_key not in jobs:
                raise CheckpointError(f"adapter module {name} has a lora_B bias but {where} has no {bias_key}")
            if jobs[bias_key].shape != (module.out_features,):
                raise CheckpointError(
                    f"adapter module {name}: lora_B bias has {module.out_features} values, base {bias_key} has "
                    f"shape {jobs[bias_key].shape}"
                )
            jobs[bias_key].bias.append((name, bias))
    if flipped:
        note = (
            f"the adapter's fan_in_fan_out disagreed with the base for {len(flipped)} module(s) ({flipped[0]}, ...): "
            "the base's layout was used, as PEFT does"
        )
        # GPT-2 Conv1D names read as linear: the PEFT reader has warned about that config already (one warning per
        # fact), and the other readers take such names as linear on purpose; the note is then for -v only.
        said = all(adapter.modules[n].layout == "out_in" and GPT2_CONV1D.search(n) for n in flipped)
        if said:
            log.info("%s: %s", adapter.name, note)
        else:
            notes.append(note)
    return list(jobs.values())


def _plan_extras(
    adapter: LoraAdapter,
    base: BaseCheckpoint,
    jobs: dict[str, Job],
    dtype: torch.dtype | None,
    notes: list[str],
) -> None:
    """Heads (modules_to_save) and saved base layers replace the base tensor of the same name, or are added."""
    for name, extra in adapter.extra.items():
        key = base.find(name)
        tensor = extra.tensor
        if key is None and extra.kind == "base_layer":
            # PEFT saves a tied head's weight under its name
            key = tied_embedding(base.config, base.tensors, name.rpartition(".")[0])
            if key is None:
                raise CheckpointError(f"adapter tensor {name} (a saved base layer) has no match in base {base.folder}")
            if jobs[key].replaced == "base_layer" and not torch.equal(jobs[key].source.tensor, tensor):
                raise CheckpointError(f"adapter tensors {name} and {key} are tied in the base but saved different")
        if key is None:
            if tied_embedding(base.config, base.tensors, name.rpartition(".")[0]) is not None:
                raise CheckpointError(
                    f"adapter tensor {name} would replace an output head that the base ties to its input embedding "
                    "and does not store; set tie_word_embeddings=false in the base to keep both"
                )
            source = _memory_tensor(name, tensor)
            jobs[name] = Job(name, source, _out_dtype(source, dtype or base_dtype(base)), replaced="added")
            notes.append(f"{name} ({extra.kind}) is not in the base: added to the merged checkpoint")
            continue
        job = jobs[key]
        if tuple(tensor.shape) != job.shape:
            if extra.kind != "base_layer":
                raise CheckpointError(
                    f"adapter tensor {name} has shape {tuple(tensor.shape)} but base tensor {key} has {job.shape}"
                )
            notes.append(f"{name}: the adapter's saved base layer {tuple(tensor.shape)} replaces {key} {job.shape}")
        job.source = _memory_tensor(key, tensor)
        job.replaced = extra.kind


def _chunks(job: Job, device: torch.device) -> Iterator[tuple[int, int]]:
    if len(job.shape) != 2 or any(u.layout == "conv2d" or u.module.magnitude is not None for u in job.updates):
        yield 0, job.shape[0] if job.shape else 0
        return
    rows, width = job.shape
    step = max(1, (CHUNK_ELEMENTS if device.type == "cpu" else GPU_CHUNK_ELEMENTS) // max(width, 1))
    for start in range(0, rows, step):
        yield start, min(rows, start + step)


def gpu_workers(jobs: list[Job], device: torch.device) -> int:
    """The default number of threads feeding a GPU for ``jobs``: `GPU_WORKERS`, or `GPU_WORKERS_WHOLE` when one of
    the computed tensors is a chunk larger than `GPU_CHUNK_ELEMENTS`."""
    firsts = ((job, next(_chunks(job, device), (0, 0))) for job in jobs if not job.raw_copy)  # a job's largest
    largest = max(((stop - start) * math.prod(job.shape[1:]) for job, (start, stop) in firsts), default=0)
    return GPU_WORKERS if largest <= GPU_CHUNK_ELEMENTS else GPU_WORKERS_WHOLE


def _mark_round_trips(jobs: list[Job], quantization: Quantization, model_type: str | None) -> None:
    """Set ``quantization`` on the jobs whose base weight is first round-tripped through 4-bit (see
    `loramix.quantize.tensors_to_round_trip`); tensors an adapter tensor replaces are left alone."""
    shapes = {j.name: j.shape for j in jobs if j.replaced is None and j.source.dtype.is_floating_point}
    targeted = {j.name for j in jobs if j.updates}
    by_name = {j.name: j for j in jobs}
    for key, transposed in tensors_to_round_trip(shapes, targeted, quantization, model_type).items():
        by_name[key].quantization = quantization
        by_name[key].transposed = transposed


def _quantized_source(job: Job, device: torch.device) -> Job:
    """``job`` reading dequantize_4bit(quantize_4bit(W)) (the whole tensor: blocks and double quantization's mean
    run over the flattened weight) instead of W; the updates then apply to it chunk by chunk as usual."""
    if job.quantization is None:
        return job
    W = job.source.rows(0, job.shape[0]).to(device)
    source = _memory_tensor(job.name, round_trip(W, job.quantization, transposed=job.transposed))
    return replace(job, source=source)


def _on_device(job: Job, device: torch.device) -> Job:
    """``job`` with its adapter factors (B scaled) and biases in float32 on ``device``, made once for all of its
    chunks."""

    def moved(tensor: torch.Tensor | None) -> torch.Tensor | None:
        return None if tensor is None else tensor.to(device=device, dtype=torch.float32)

    def scaled(m: LoraModule) -> LoraModule:  # s·B once per tensor: each chunk's ΔW is then one product
        B = moved(m.B)
        return replace(m, A=moved(m.A), B=B if m.scale == 1 else B * m.scale, scale=1.0)

    updates = [replace(u, module=scaled(u.module)) for u in job.updates]
    return replace(job, updates=updates, bias=[(name, moved(b)) for name, b in job.bias])


def _produce(stats: dict[str, Survival], device: torch.device, requantized: Requantized | None = None):
    """The writer's ``produce``: a job's merged rows, chunk by chunk, with the survival figures collected (a part
    of a re-quantized weight: from ``requantized``)."""

    def produce(job: Job) -> Iterator[torch.Tensor]:
        if job.requantized is not None:
            yield requantized.take(*job.requantized)
            return
        job = _on_device(_quantized_source(job, device), device)
        yield from merged_chunks(job, _chunks(job, device), device, stats[job.name], buffers)

    buffers = Buffers(pinned=device.type == "cuda")  # each writer thread's own
    return produce


def write_merged(
    adapter: LoraAdapter,
    base: BaseCheckpoint,
    folder: Path,
    *,
    dtype: torch.dtype | None = None,
    shard_size: int | str | None = None,
    device: torch.device | None = None,
    progress: bool = False,
    workers: int | None = None,
    quantization: Quantization | None = None,
    part: tuple[int, int] = (0, 1),
    early: EarlyCopy | None = None,
) -> MergeReport:
    """Write ``base`` with ``adapter`` merged into the existing folder ``folder``: sharded safetensors plus the
    index, config.json, and every other non-weight file (tokenizer, generation config) copied. Every tensor keeps
    the base's dtype (its own: untouched tensors byte for byte, merged ones W+ΔW rounded once to it) unless
    ``dtype`` asks for another: then every floating-point tensor is stored in ``dtype`` and config.json says so (a
    diffusers config, which has no dtype, is copied as it was). With ``shard_size`` None (the default) the output
    keeps a safetensors base's own files (names, which tensor in which file, order, index); with a size (or for a
    .bin base, 5GB) the tensors are laid out anew as transformers does (``model-0000i-of-0000N.safetensors``, one
    ``model.safetensors`` when everything fits; diffusers' names, ``diffusion_pytorch_model…``, for a diffusers
    model).
    Tensors the adapter leaves alone are copied byte for byte in the kernel; only updated tensors are read and
    computed. Heads (modules_to_save) replace the base tensors, lora_B biases are added to the base biases, DoRA is
    merged exactly as PEFT does. ΔW is computed on ``device`` (default: the CPU), ``workers`` tensors at once
    (default: one per CPU; on a GPU, `gpu_workers`); the bytes do not depend on ``workers``. With ``quantization`` (a
    QLoRA-faithful merge) each base weight it selects goes through bitsandbytes' 4-bit round trip before ΔW is added,
    so the checkpoint is the model the adapter was trained on. With ``dtype`` None a quantized base (see
    `loramix.io.quantized`) is written in its own format, each weight an adapter changes re-quantized with fresh
    scales from W + ΔW, everything else byte for byte and config.json as it was; with a ``dtype`` a quantized base
    is written dense (dequantized, scale tensors and ``quantization_config`` dropped).

    ``part`` (rank, world) writes only the shards i ≡ rank (mod world), and only rank 0 the index, config and other
    files (`loramix.merge.processes` splits one merge over processes this way). ``early``: the CLI's copy of the base
    (`loramix.io.disk.early_copy`), whose staging folder is ``folder``.

    The `MergeReport` holds, per module of the shards written, the share of ΔW that survives the rounding:
    ‖round(W+ΔW) − round(W)‖ / ‖ΔW‖ (for a base in the output dtype round(W) = W; for a float32 base, comparing
    with round(W) keeps the base's own rounding out of the measure).
    """
    if sys.byteorder != "little":
        raise CheckpointError("merging into a checkpoint needs a little-endian machine (safetensors byte order)")
    if not base.config and not all(p.suffix == ".safetensors" for p in base.weight_files):
        raise CheckpointError(f"{base.folder}: no config.json (not a model folder)")  # bare .safetensors: ComfyUI's
    notes: list[str] = []
    quantized = base.quantized
    require_dense_base(base, quantization)
    jobs = plan_merge(adapter, base, dtype, notes)
    if quantization is not None:
        _mark_round_trips(jobs, quantization, base.model_type)
    if quantized is not None:
        jobs = mark_quantized(jobs, base, quantized, dtype)
    for note in notes:
        log.warning("%s: %s", adapter.name, note)
    stem = DIFFUSERS_WEIGHTS if base.weight_files[0].name.startswith(DIFFUSERS_WEIGHTS) else "model"
    kept = base_layout(jobs, base.weight_files) if shard_size is None else None
    if kept is not None:
        (names, shards), index = kept, base.index or f"{stem}.safetensors.index.json"
        headers = [kept_header(shard) for shard in shards]
    else:  # laid out anew: diffusers' file names for a diffusers model, else transformers'
        shards = plan_shards(jobs, parse_size(shard_size or DEFAULT_SHARD_SIZE))
        names, headers, index = shard_names(len(shards), stem), None, f"{stem}.safetensors.index.json"
    rank, world = part
    mine = range(rank, len(shards), world)
    written = [job for i in mine for job in shards[i]]
    stats = {job.name: Survival() for job in written if not job.raw_copy}
    total = sum(j.nbytes for j in written)
    device = device or torch.device("cpu")
    cpus = os.cpu_count() or 1
    workers = workers or (cpus if device.type == "cpu" else min(gpu_workers(written, device), cpus))
    shares: dict[str, float] = {}
    by_name = {j.name: j for j in jobs}
    again = Requantized(lambda key: requantize(_on_device(by_name[key], device), base, device, stats[key], shares))
    with progress_bar(enabled=progress, total=total, unit="B", unit_scale=True, desc="merge") as bar:
        produce = _produce(stats, device, again)
        times = write_shards(
            folder,
            [names[i] for i in mine],
            [shards[i] for i in mine],
            produce=produce,
            bar=bar,
            workers=workers,
            headers=headers and [headers[i] for i in mine],
            early=early,
            order=lambda job: job.requantized[1] if job.requantized else 0,  # a weight's other parts wait for it
        )
    log.info("merge phases (wall-clock times): %s", json.dumps(times))
    if rank == 0:
        dense = quantized is not None and dtype is not None
        write_beside(base, folder, names, shards, index, dtype_name=dtype and OUTPUT_DTYPE_NAMES[dtype], dense=dense)
    stored = base_dtype(base)
    report = MergeReport(
        path=folder,
        shards=names,
        total_size=total,
        tensors=len(jobs),
        dtype=dtype or stored,
        survival=_survival_by_module(written, stats),
        replaced=[j.name for j in jobs if j.replaced and j.replaced != "added"],
        added=[j.name for j in jobs if j.replaced == "added"],
        notes=notes,
        quantization=quantization,
        round_tripped=[j.name for j in jobs if j.quantization is not None],
        base_dtype=stored,
        written_as=written_as(quantized, dtype),
        in_own_format=quantized is not None and dtype is None,
        below_step={u.name: shares[j.name] for j in jobs for u in j.updates if j.name in shares},
    )
    rounded = next((j.dtype for j in jobs if j.updates), torch.bfloat16)  # the base's format: its weights' dtype
    warn_stored(report.survival, dtype or rounded, adapter.name)
    return report


def _survival_by_module(jobs: list[Job], stats: dict[str, Survival]) -> dict[str, StoredUpdate]:
    survival = {}
    for job in jobs:
        s = stats.get(job.name) or Survival()
        for update in job.updates:
            survival[update.name] = s.measure()
    return dict(sorted(survival.items()))
