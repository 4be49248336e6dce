"""One module identity across the names transformers maps between: a model's in-memory names and its checkpoint's.

transformers 5 loads many checkpoints under other names than they are stored with (Qwen2-VL's text layers are
``model.language_model.layers.N`` in memory, ``model.layers.N`` on disk) and fuses per-expert tensors into 3-D
parameters (``mlp.experts.{e}.gate_proj.weight`` + ``up_proj`` on disk → ``mlp.experts.gate_up_proj`` (E, 2I, H)).
Its checkpoint conversion mapping says how; ``save_pretrained`` reverses it (``revert_weight_conversion``).
`model_names` asks transformers itself, on a meta-device instance of the base's architecture (no weights):

- renamed parameters: the reverse conversion of every in-memory parameter, matched by identity;
- fused parameters: the reverse conversion of coordinate probes (expanded views: no memory) gives, for every
  on-disk tensor, which expert, rows and columns of the fused parameter it holds, and whether it is transposed.
  An on-disk tensor whose probe is not such a block is refused, never guessed.

No table per model: what transformers' installed version does is what loramix does (and the tests compare the
result with PEFT's ``merge_and_unload`` + ``save_pretrained``).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from pathlib import Path

import torch

from loramix import experts
from loramix.adapter import ExpertSlot, LoraAdapter, LoraModule
from loramix.errors import CheckpointError, ExpertLayoutError
from loramix.io.base import BaseCheckpoint


@dataclass(frozen=True)
class DiskBlock:
    """An on-disk tensor that holds part of a fused parameter: ``disk[i, j] = param[expert, rows[0]+i, cols[0]+j]``,
    or ``param[expert, rows[0]+j, cols[0]+i]`` when ``transposed``."""

    param: str
    expert: int
    rows: tuple[int, int]
    cols: tuple[int, int]
    transposed: bool


@dataclass
class ModelNames:
    """The names of one architecture in memory and on disk (see the module docstring)."""

    model: torch.nn.Module  # on the meta device
    to_disk: dict[str, str]  # in-memory parameter name → checkpoint name (renamed parameters, and unchanged ones)
    fused: set[str]  # in-memory parameters that transformers stores as other tensors (fused experts)

    @functools.cached_property
    def stored_blocks(self) -> dict[str, DiskBlock]:
        """Every stored tensor that holds a block of a fused parameter, and that block."""
        return {name: block for param in sorted(self.fused) for name, block in self.blocks(param)}

    @functools.cached_property
    def to_memory(self) -> dict[str, str]:
        return {disk: memory for memory, disk in self.to_disk.items()}

    def memory_name(self, module: str) -> str | None:
        """The in-memory name of the module (``…q_proj``) an adapter names under either naming; None if neither."""
        weight = f"{module}.weight"
        if weight in self.to_disk:
            return module
        found = self.to_memory.get(weight)
        return None if found is None else found.removesuffix(".weight")

    def is_transposed(self, param: str) -> bool:
        """Whether the experts module holding ``param`` keeps it as (E, in, out) (transformers' ``is_transposed``)."""
        owner = self.model.get_submodule(param.rpartition(".")[0])
        return bool(getattr(owner, "is_transposed", False))

    def shape(self, param: str) -> tuple[int, ...]:
        return tuple(self.model.get_parameter(param).shape)

    def blocks(self, param: str) -> list[tuple[str, DiskBlock]]:
        """The checkpoint tensors of the fused parameter ``param`` and the block of it each holds."""
        shape = self.shape(param)
        if len(shape) != 3:
            raise ExpertLayoutError(f"{param}: a fused expert parameter of shape {shape}, expected 3-D (E, ·, ·)")
        probes = [_coordinate(shape, axis) for axis in range(3)]
        outputs = [_revert(self.model, {param: probe}) for probe in probes]
        names = sorted(outputs[0])
        if any(sorted(out) != names for out in outputs):
            raise ExpertLayoutError(f"{param}: transformers' reverse conversion names different tensors per probe")
        return [(name, _decode(param, name, *(out[name] for out in outputs))) for name in names]


def _coordinate(shape: tuple[int, ...], axis: int) -> torch.Tensor:
    """A tensor of ``shape`` whose every element holds its index along ``axis`` (a view: no memory)."""
    view = [1] * len(shape)
    view[axis] = shape[axis]
    return torch.arange(shape[axis]).reshape(view).expand(shape)


def _decode(param: str, name: str, expert: torch.Tensor, row: torch.Tensor, col: torch.Tensor) -> DiskBlock:
    if expert.dim() != 2 or int(expert.min()) != int(expert.max()):
        raise ExpertLayoutError(
            f"{name}: transformers stores part of {param} in it, but not one 2-D block of one expert; not supported"
        )
    transposed = _along(row, 1) or _along(col, 0)  # the fused parameter's rows run along the tensor's columns
    if transposed:
        row, col = row.T, col.T
    r0, c0 = int(row[0, 0]), int(col[0, 0])
    grid_r = torch.arange(r0, r0 + row.shape[0]).unsqueeze(1).expand(row.shape)
    grid_c = torch.arange(c0, c0 + col.shape[1]).unsqueeze(0).expand(col.shape)
    if not (torch.equal(row, grid_r) and torch.equal(col, grid_c)):
        raise ExpertLayoutError(f"{name}: transformers stores a part of {param} in it that is not a block of rows")
    return DiskBlock(param, int(expert[0, 0]), (r0, r0 + row.shape[0]), (c0, c0 + col.shape[1]), transposed)


def _along(coordinate: torch.Tensor, dim: int) -> bool:
    """Whether ``coordinate`` changes along ``dim``."""
    return coordinate.shape[dim] > 1 and bool(coordinate.narrow(dim, 1, 1).flatten()[0] != coordinate.flatten()[0])


def _revert(model: torch.nn.Module, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    from transformers.core_model_loading import revert_weight_conversion  # transformers ≥ 5

    return revert_weight_conversion(model, dict(tensors))


@functools.lru_cache(maxsize=4)
def model_names(folder: Path) -> ModelNames | None:
    """The names of the architecture in ``folder``'s config.json (None when transformers has no class for it)."""
    import transformers

    try:
        config = transformers.AutoConfig.from_pretrained(folder)
    except (OSError, ValueError, KeyError) as exc:
        raise CheckpointError(f"{folder}: transformers cannot read its config.json ({exc})") from None
    architecture = next(iter(getattr(config, "architectures", None) or []), None)
    model_class = getattr(transformers, architecture, None) if architecture else None
    if model_class is None:
        return None
    with torch.device("meta"):
        model = model_class._from_config(config)
    params = dict(model.named_parameters())
    reverted = _revert(model, params)
    by_id = {id(tensor): name for name, tensor in params.items()}
    to_disk = {by_id[id(t)]: disk for disk, t in reverted.items() if id(t) in by_id}
    fused = {name for name in params if name not in to_disk and math.prod(params[name].shape) > 0}
    return ModelNames(model, to_disk, fused)


def in_memory(adapter: LoraAdapter, names: ModelNames) -> LoraAdapter:
    """``adapter`` with every module under its in-memory name (the naming transformers 5 and PEFT use): a module on
    a stored per-expert tensor (transformers 4's ``experts.{e}.w1``, ``gate_proj`` …) becomes its block of that
    expert's module on the fused parameter (blocks of one expert joined along the rank: exact); modules the model
    has under neither naming keep their names."""
    renamed: dict[str, LoraModule] = {}
    pieces: dict[tuple[str, int], list[tuple[DiskBlock, LoraModule]]] = {}
    for name, m in adapter.modules.items():
        block = names.stored_blocks.get(f"{name}.weight") if m.expert is None else None
        if block is not None:
            pieces.setdefault((block.param, block.expert), []).append((block, m))
            continue
        key = (names.memory_name(name) or name) if m.expert is None else name
        if key in renamed:
            raise CheckpointError(f"{adapter.source}: names module {key} twice, under its old and its new name")
        renamed[key] = m
    for (param, e), found in pieces.items():
        key = experts.module_name(param, e)
        if key in renamed:
            raise CheckpointError(f"{adapter.source}: holds {key} both fused and as per-expert modules")
        renamed[key] = _joined(names, param, e, found)
    return adapter if renamed.keys() == adapter.modules.keys() else adapter.with_modules(renamed)


def _joined(names: ModelNames, param: str, e: int, found: list[tuple[DiskBlock, LoraModule]]) -> LoraModule:
    """Expert ``e``'s module on fused ``param`` from modules on the stored tensors that hold blocks of it."""
    shape, transposed = names.shape(param), names.is_transposed(param)
    out, inp = (shape[2], shape[1]) if transposed else (shape[1], shape[2])
    As, Bs = [], []
    for block, m in found:
        A, B = m.A.float(), m.B.float() * m.scale
        if block.transposed != transposed:  # the stored tensor holds this block of ΔWᵀ
            A, B = B.T, A.T
        rows, cols = (block.cols, block.rows) if transposed else (block.rows, block.cols)
        full_a, full_b = A.new_zeros(A.shape[0], inp), B.new_zeros(out, B.shape[1])
        full_a[:, slice(*cols)], full_b[slice(*rows)] = A, B
        As.append(full_a.to(m.A.dtype))
        Bs.append(full_b.to(m.B.dtype))
    slot = ExpertSlot(param, e, shape[0])
    return LoraModule(A=torch.cat(As), B=torch.cat(Bs, dim=1), scale=1.0, expert=slot)


# Experts a checkpoint stores fused (as in memory): by stored tensor, each expert's module as it lies on its slab
# (out × in of that slab) and the rows of the tensor flattened to 2-D, (E·a, b), that the slab holds.
Stacked = dict[str, list[tuple[str, LoraModule, tuple[int, int]]]]


def on_disk(adapter: LoraAdapter, names: ModelNames) -> tuple[LoraAdapter, Stacked]:
    """``adapter`` with its modules under the checkpoint's names: renamed modules renamed, and each expert of a
    fused parameter split onto the tensors the checkpoint stores it in (rows and columns of its ΔW, transposed
    where the tensor is), as plain modules on those tensors; experts the checkpoint stores fused as `Stacked`."""
    modules: dict[str, LoraModule] = {}
    stacked: Stacked = {}

    def put(name: str, module: LoraModule) -> None:
        if name in modules:
            raise CheckpointError(f"{adapter.source}: two adapter modules change checkpoint tensor {name}.weight")
        modules[name] = module

    for name, m in adapter.modules.items():
        if m.expert is None:
            memory = names.memory_name(name)
            put(names.to_disk[f"{memory}.weight"].removesuffix(".weight") if memory else name, m)
    for param, found in experts.groups(adapter.modules).items():
        transposed = names.is_transposed(param)
        _check_shape(adapter, names, param, next(iter(found.values())))
        if param in names.to_disk:  # stored fused: each expert is a slab of the stored tensor
            count, rows, cols = names.shape(param)
            stacked[names.to_disk[param]] = [
                (
                    name,
                    _on_block(m, DiskBlock(param, m.expert.index, (0, rows), (0, cols), False), transposed),
                    (m.expert.index * rows, (m.expert.index + 1) * rows),
                )
                for name, m in ((experts.module_name(param, e), found[e]) for e in sorted(found))
            ]
            continue
        for disk, block in names.blocks(param):
            m = found.get(block.expert)
            if m is not None:
                put(disk.removesuffix(".weight"), _on_block(m, block, transposed))
    return adapter.with_modules(modules), stacked


def _check_shape(adapter: LoraAdapter, names: ModelNames, param: str, sample: LoraModule) -> None:
    if param not in names.to_disk and param not in names.fused:
        raise ExpertLayoutError(f"{adapter.source}: the base model has no fused expert parameter {param}")
    shape = names.shape(param)
    expected = (sample.expert.count, sample.out_features, sample.in_features)
    if names.is_transposed(param):
        expected = (expected[0], expected[2], expected[1])
    if shape != expected:
        why = (
            " (transposed: PEFT 0.17–0.19 read (E, out, in) experts as (E, in, out))"
            if shape[1:] == expected[:0:-1]
            else ""
        )
        raise ExpertLayoutError(
            f"{adapter.source}: {param} is {shape} in the base, the adapter's experts {expected}{why}"
        )


def _on_block(m: LoraModule, block: DiskBlock, param_transposed: bool) -> LoraModule:
    """Expert ``m``'s ΔW on one checkpoint tensor, as a plain module laid on it as it is (out × in of the tensor)."""
    rows, cols = (block.cols, block.rows) if param_transposed else (block.rows, block.cols)
    A, B = m.A[:, slice(*cols)], m.B[slice(*rows)]
    if block.transposed != param_transposed:  # the tensor holds ΔWᵀ = s·Aᵀ·Bᵀ
        A, B = B.T, A.T
    return LoraModule(A=A.contiguous(), B=B.contiguous(), scale=m.scale)


def for_checkpoint(adapter: LoraAdapter, base: BaseCheckpoint) -> tuple[LoraAdapter, Stacked]:
    """``adapter`` as it applies to ``base``'s stored tensors: as it is when every module finds its tensor, else
    through transformers' names for the base's architecture (`on_disk`)."""
    if not experts.is_expert_adapter(adapter) and all(base.weight_key(n)[0] is not None for n in adapter.modules):
        return adapter, {}
    names = model_names(base.folder) if base.config.get("architectures") else None
    if names is None:
        experts.refuse(adapter, f"merging into {base.folder} (an architecture transformers does not know)")
        return adapter, {}
    return on_disk(adapter, names)
