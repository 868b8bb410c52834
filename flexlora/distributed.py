"""The only cross-process and engine-specific pieces of the allocator.

Every process holds some of the elements of each adapter tensor, always one contiguous range of the tensor
flattened row-major (a ``Piece``):

* single process, DDP, DeepSpeed ZeRO-1/2 module parameters: the whole tensor;
* FSDP2 (DTensor ``Shard(0)``, split like ``torch.chunk``): a block of rows, possibly empty; under HSDP (a 2-D
  mesh, placements ``(Replicate(), Shard(0))``) every replica holds the same blocks as the others;
* DeepSpeed ZeRO-3: the ``ds_tensor`` partition, ``ceil(numel / world)`` elements per rank.

DeepSpeed also keeps fp32 master copies and optimizer state in its own flat partitions; those are pieces too.
The allocator edits one direction ("slot": a column of P, an element of lambda, a row of Q) by writing the
slot's elements that fall inside each piece this process holds, so no process needs P or Q from another. The
only collectives are: one all-gather of every module's local lambda in one flat buffer (when lambda is
sharded; over the shard group only, never across replicas) and one tiny all-reduce over every process checking
that they all took the same decision.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist

from .errors import UserError
from .names import EXPAND_INITS, FACTOR_TENSORS, GLOBAL_EXPAND_INITS, GRADIENT_METRICS, IMPORTANCE_METRICS

try:
    from torch.distributed.tensor import DTensor, Replicate, Shard
except ImportError:  # pragma: no cover - torch without DTensor
    DTensor = None


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _is_dtensor(t: torch.Tensor) -> bool:
    return DTensor is not None and isinstance(t, DTensor)


def is_zero3_param(t: torch.Tensor) -> bool:
    """A parameter partitioned by DeepSpeed ZeRO-3 (its local data is empty; ``ds_tensor`` holds this rank's part)."""
    return hasattr(t, "ds_id")


def is_zero12_param(t: torch.Tensor) -> bool:
    """A parameter of a DeepSpeed ZeRO-1/2 optimizer: full locally, fp32 master and optimizer state partitioned."""
    return hasattr(t, "_hp_mapping")


def is_sharded(t: torch.Tensor) -> bool:
    """True when this process holds only part of ``t``'s values (FSDP2 ``Shard``, ZeRO-3)."""
    if is_zero3_param(t):
        return True
    return _is_dtensor(t) and any(not isinstance(p, Replicate) for p in t.placements)


def shard_mesh_dim(t: torch.Tensor) -> int:
    """The mesh dimension over which the rows of the sharded DTensor ``t`` are split: FSDP2's ``(Shard(0),)`` or
    HSDP's ``(Replicate(), Shard(0))``, where the other dimensions replicate. Any other layout (tensor or context
    parallelism, rows split over two dimensions) is refused, naming the mesh dimensions and placements."""
    sharded = [dim for dim, placement in enumerate(t.placements) if not isinstance(placement, Replicate)]
    if len(sharded) != 1 or t.placements[sharded[0]] != Shard(0):
        mesh = t.device_mesh
        names = mesh.mesh_dim_names or tuple(f"dim{dim}" for dim in range(mesh.ndim))
        raise NotImplementedError(
            f"FlexLoRA's allocator edits adapter tensors whose rows are sharded over one data-parallel mesh dimension "
            f"(FSDP2 (Shard(0),) or HSDP (Replicate(), Shard(0))); this one has placements {tuple(t.placements)} on "
            f"the mesh {dict(zip(names, mesh.shape))}: tensor / context parallelism of the adapters is not supported"
        )
    return sharded[0]


def full_shape(t: torch.Tensor) -> tuple[int, ...]:
    return tuple(t.ds_shape) if is_zero3_param(t) else tuple(t.shape)


def local_rows(t: torch.Tensor) -> tuple[torch.Tensor, int, int]:
    """(local tensor, first row, end row) of the dim-0 rows of ``t`` this process holds (plain tensor or DTensor)."""
    if is_zero3_param(t):
        raise NotImplementedError("ZeRO-3 partitions are flat, not rows: use local_pieces() for ZeRO-3 parameters")
    if not _is_dtensor(t):
        return t.data if isinstance(t, torch.nn.Parameter) else t, 0, t.shape[0]
    local = t.to_local()
    start, stop = 0, t.shape[0]
    for mesh_dim, placement in enumerate(t.placements):
        if isinstance(placement, Replicate):
            continue
        if not (isinstance(placement, Shard) and placement.dim == 0):
            raise NotImplementedError(
                f"FlexLoRA edits dim-0 shards only; got placement {placement} for a tensor of shape {tuple(t.shape)}"
            )
        size = t.device_mesh.size(mesh_dim)
        coord = t.device_mesh.get_local_rank(mesh_dim)
        chunk = math.ceil((stop - start) / size)  # torch.chunk semantics, as FSDP2 uses
        new_start = min(start + coord * chunk, stop)
        start, stop = new_start, min(new_start + chunk, stop)
    if local.shape[0] != stop - start:
        raise RuntimeError(f"unexpected shard layout: local rows {local.shape[0]} vs computed [{start}, {stop})")
    return local, start, stop


# ---- pieces: the elements of a full tensor one process holds, and writing one slot into them ---------------
@dataclass
class Piece:
    """Elements ``[start, start + values.numel())`` of a tensor of ``shape`` flattened row-major.

    ``values`` is a 1-D view that writes through to the real storage, unless ``commit`` is given: then it is
    a copy, and ``commit()`` stores it back (DeepSpeed ZeRO-3's get/set API).
    """

    values: torch.Tensor
    start: int
    shape: tuple[int, ...]
    commit: Callable[[], None] | None = None


def _flat_view(t: torch.Tensor) -> torch.Tensor:
    if not t.is_contiguous():
        raise RuntimeError(f"cannot edit a non-contiguous tensor of shape {tuple(t.shape)} in place")
    return t.view(-1)


def _zero3_partition_start(param: torch.Tensor) -> int:
    # ZeRO-3 pads every parameter to a multiple of the group size and gives rank r elements [r * n, (r + 1) * n).
    return dist.get_rank(group=param.ds_process_group) * param.ds_tensor.numel()


def local_piece(t: torch.Tensor) -> Piece:
    """The piece of a plain tensor or DTensor (dim-0 shards only) this process holds."""
    local, start, _ = local_rows(t)
    row = math.prod(t.shape[1:])
    return Piece(_flat_view(local), start * row, tuple(t.shape))


def value_pieces(param: torch.Tensor) -> list[Piece]:
    """Every local copy of ``param``'s values that must change with it: the one the forward reads and, under
    DeepSpeed, the fp32 master partition the optimizer updates (else the next step would undo the edit)."""
    shape = full_shape(param)
    if is_zero3_param(param):
        from deepspeed.utils import safe_get_local_fp32_param, safe_set_local_fp32_param

        start = _zero3_partition_start(param)
        pieces = [Piece(_flat_view(param.ds_tensor.data), start, shape)]
        if param.data.numel() == param.ds_numel:
            # Gathered right now (small parameters persist gathered: stage3_param_persistence_threshold), and the
            # forward reads this full copy until DeepSpeed re-gathers it from the partitions after the next step.
            pieces.append(Piece(_flat_view(param.data), 0, shape))
        master = safe_get_local_fp32_param(param)
        if master is not None:
            master = master.detach().clone().view(-1)
            pieces.append(Piece(master, start, shape, lambda: safe_set_local_fp32_param(param, master)))
        return pieces
    pieces = [local_piece(param)]
    if is_zero12_param(param) and param._hp_mapping is not None:
        # ZeRO-1/2: this rank's fragment of the fp32 master (the tensor safe_set_full_fp32_param writes into).
        mapping = param._hp_mapping
        pieces.append(Piece(mapping.get_hp_fragment(), mapping.lp_fragment_address.start, shape))
    return pieces


def deepspeed_state_pieces(param: torch.Tensor) -> list[Piece]:
    """This rank's pieces of the element-wise optimizer state (e.g. Adam moments) DeepSpeed keeps for ``param``.

    Empty before the first optimizer step (DeepSpeed creates the state lazily).
    """
    shape = full_shape(param)
    if is_zero3_param(param):
        from deepspeed.utils import safe_get_local_optimizer_state, safe_set_local_optimizer_state

        keys = sorted(
            {
                key
                for state in param._z3_optimizer.optimizer.state.values()
                for key, value in state.items()
                if torch.is_tensor(value) and value.dim() > 0
            }
        )
        start = _zero3_partition_start(param)
        pieces = []
        for key in keys:
            values = safe_get_local_optimizer_state(param, key).detach().clone().view(-1)
            commit = lambda values=values, key=key: safe_set_local_optimizer_state(param, values, key)  # noqa: E731
            pieces.append(Piece(values, start, shape, commit))
        return pieces
    mapping = getattr(param, "_hp_mapping", None)
    if mapping is None or not mapping.optim_fragment:
        return []
    start = mapping.lp_fragment_address.start
    return [Piece(mapping.get_hp_fragment(key), start, shape) for key in mapping.get_optim_state_keys()]


def _slot_positions(shape: tuple[int, ...], slot: int, slot_dim: int) -> torch.Tensor:
    """Flat row-major positions of the elements of ``slot`` along ``slot_dim`` (ascending)."""
    if len(shape) == 1:
        return torch.tensor([slot])
    if len(shape) != 2 or slot_dim not in (0, 1):
        raise ValueError(
            f"slots are defined for 1-D and 2-D tensors along dim 0 or 1, not shape {shape} dim {slot_dim}"
        )
    rows, cols = shape
    if slot_dim == 0:
        return slot * cols + torch.arange(cols)
    return torch.arange(rows) * cols + slot


@torch.no_grad()
def write_slot(piece: Piece, slot: int, slot_dim: int, value: torch.Tensor | float) -> None:
    """Write ``value`` (a scalar, or the full-length vector of the slot) into the slot's elements this piece holds."""
    positions = _slot_positions(piece.shape, slot, slot_dim)
    inside = (positions >= piece.start) & (positions < piece.start + piece.values.numel())
    if not inside.any():
        return
    index = (positions[inside] - piece.start).to(piece.values.device)
    if torch.is_tensor(value):
        if value.numel() != positions.numel():
            raise ValueError(
                f"slot of a {piece.shape} tensor along dim {slot_dim} has {positions.numel()} elements, "
                f"got {value.numel()}"
            )
        piece.values[index] = value.flatten()[inside].to(piece.values)
    else:
        piece.values[index] = value
    if piece.commit is not None:
        piece.commit()


def write_param_slot(param: torch.Tensor, slot: int, slot_dim: int, value: torch.Tensor | float) -> None:
    """Set one direction of an adapter parameter on this process, in every local copy of its values."""
    for piece in value_pieces(param):
        write_slot(piece, slot, slot_dim, value)


def comm_device(device: torch.device, group=None) -> torch.device:
    """Where a collective's buffer must live: NCCL needs the GPU even when tensors are offloaded to CPU."""
    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return device


# ---- gathering ---------------------------------------------------------------------------------------------
def _lambda_layout(lambdas: list[torch.Tensor]) -> tuple[str, int, object]:
    """('replicated' | 'dtensor' | 'zero3', capacity, process group) shared by every lambda, or raise."""
    kinds = {"zero3" if is_zero3_param(lam) else "dtensor" if is_sharded(lam) else "replicated" for lam in lambdas}
    if len(kinds) > 1:
        raise RuntimeError(
            f"lambda tensors are laid out differently across modules ({sorted(kinds)}): shard all adapted layers alike"
        )
    kind = kinds.pop()
    capacity = full_shape(lambdas[0])[0]
    if any(full_shape(lam)[0] != capacity for lam in lambdas):
        raise RuntimeError("all lambda tensors must have the same capacity (max_rank)")
    if kind == "dtensor":
        mesh, placements = lambdas[0].device_mesh, lambdas[0].placements
        if any(lam.device_mesh != mesh or lam.placements != placements for lam in lambdas):
            raise RuntimeError("all lambda tensors must share one device mesh and placement")
        # Replicas hold the same shards: gathering within the shard group gives every process the whole lambda.
        return kind, capacity, mesh.get_group(shard_mesh_dim(lambdas[0]))
    if kind == "zero3":
        group = lambdas[0].ds_process_group
        if any(lam.ds_process_group is not group for lam in lambdas):
            raise RuntimeError("all lambda tensors must be partitioned over one process group")
        return kind, capacity, group
    return kind, capacity, None


def lambda_gather_payload(num_modules: int, capacity: int, world: int) -> tuple[int, int]:
    """(elements each process contributes, elements every process receives) for one sharded lambda gather over a
    shard group of ``world`` processes (all processes under FSDP2 / ZeRO-3, one replica's under HSDP)."""
    chunk = math.ceil(capacity / world)
    return num_modules * chunk, world * num_modules * chunk


def gather_lambda_matrix(lambdas: list[torch.Tensor]) -> tuple[torch.Tensor, int]:
    """Stack every module's full lambda into [N, R] float64 on CPU.

    Returns the matrix and the number of collectives used: 0 when lambda is replicated (single process, DDP,
    ZeRO-1/2), 1 when it is sharded (FSDP2, ZeRO-3): one all-gather of one flat float32 buffer holding every
    module's local part (``ceil(R / shards)`` elements per module and rank of the shard group, zero-padded).
    """
    kind, capacity, group = _lambda_layout(lambdas)
    if kind == "replicated":
        return torch.stack([local_rows(lam)[0].detach().double().cpu() for lam in lambdas]), 0
    shards = dist.get_world_size(group)
    chunk = math.ceil(capacity / shards)
    locals_ = [lam.ds_tensor.data[:chunk] if kind == "zero3" else lam.to_local().detach() for lam in lambdas]
    buffer = torch.zeros(len(lambdas), chunk, dtype=torch.float32, device=comm_device(locals_[0].device, group))
    for row, piece in enumerate(locals_):
        buffer[row, : piece.shape[0]] = piece.float()
    gathered = torch.empty(shards * buffer.numel(), dtype=buffer.dtype, device=buffer.device)
    dist.all_gather_into_tensor(gathered, buffer.flatten(), group=group)
    full = gathered.view(shards, len(lambdas), chunk).permute(1, 0, 2).reshape(len(lambdas), shards * chunk)
    return full[:, :capacity].double().cpu(), 1


def sum_over_shards(partial: torch.Tensor, like: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Sum ``partial``, computed on each process from the rows of ``like`` it holds, over the processes holding
    the other rows (the shard group; replicas hold the same rows, so summing over them would count them twice).
    Returns the sum (on ``partial``'s device) and the number of collectives used: 0 when ``like`` is not sharded."""
    if not (_is_dtensor(like) and is_sharded(like)):
        return partial, 0
    group = like.device_mesh.get_group(shard_mesh_dim(like))
    summed = partial.to(comm_device(partial.device, group))
    dist.all_reduce(summed, group=group)
    return summed.to(partial.device), 1


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor, detached on CPU. Collective for a sharded DTensor or a ZeRO-3 parameter: every rank
    must call it (it moves this one tensor only)."""
    if is_zero3_param(t):
        import deepspeed

        with deepspeed.zero.GatheredParameters([t]):
            return t.detach().cpu().clone()
    full = t.full_tensor() if _is_dtensor(t) else t
    return full.detach().cpu().contiguous()


# ---- checks ----------------------------------------------------------------------------------------------
def check_allocation_support(model: torch.nn.Module, layers: list, config) -> None:
    """Raise a clear error for an engine / config combination the allocator cannot handle correctly.

    Call at start-up, after ``accelerator.prepare`` (the allocator does it on construction and first step).
    """
    from torch.distributed.fsdp import FullyShardedDataParallel

    if any(isinstance(m, FullyShardedDataParallel) for m in model.modules()):
        raise RuntimeError(
            "the model is wrapped by FSDP1 (FullyShardedDataParallel), whose flat parameters FlexLoRA cannot edit "
            "per direction: use FSDP2 (fsdp_version: 2 in the accelerate config, see accelerate_configs/fsdp2.yaml)"
        )
    params = [getattr(layer, name) for layer in layers for name in FACTOR_TENSORS]
    for param in params:
        if _is_dtensor(param) and is_sharded(param):
            shard_mesh_dim(param)  # refuses a mesh layout the allocator cannot edit, naming it
    deepspeed = any(is_zero3_param(p) or is_zero12_param(p) for p in params)
    if config.importance in GRADIENT_METRICS and deepspeed:
        lambda_metrics = ", ".join(m for m in IMPORTANCE_METRICS if m not in GRADIENT_METRICS)
        raise UserError(
            f"importance={config.importance!r} needs each adapter parameter's gradient after the optimizer step, "
            f"which DeepSpeed frees inside its step: use FSDP2 or DDP for this metric, or a lambda-based metric "
            f"({lambda_metrics}) with DeepSpeed",
            ("importance",),
        )
    if config.expand_init in GLOBAL_EXPAND_INITS and any(is_sharded(p) for p in params):
        local_inits = " or ".join(repr(init) for init in EXPAND_INITS if init not in GLOBAL_EXPAND_INITS)
        raise UserError(
            f"expand_init={config.expand_init!r} orthogonalises a new direction against all active columns of P "
            f"and rows of Q, which a sharded engine (FSDP2, ZeRO-3) spreads over processes: use expand_init="
            f"{local_inits} there, or DDP / ZeRO-2 / one device for this ablation",
            ("expand_init",),
        )


def assert_same_decision(decision: list[tuple], device: torch.device, step: int, finite: bool = True) -> None:
    """Raise if any process reached a different allocation decision, or found non-finite values (``finite`` False)
    in the P / Q rows it holds of the matrices the decision touches: one tiny all-reduce, the same on every process."""
    if not is_distributed():
        if not finite:
            raise FloatingPointError(f"step {step}: P or Q of a matrix this allocation touches holds NaN or inf")
        return
    # A 7-byte digest is never 0; 0 marks a process that found non-finite P / Q, so every process sees it in the min.
    digest = int.from_bytes(hashlib.sha256(repr(decision).encode()).digest()[:7], "little") or 1 if finite else 0
    value = torch.tensor([digest], dtype=torch.int64, device=comm_device(device))
    both = torch.cat([value, -value])  # min of both halves gives the smallest and the largest digest
    dist.all_reduce(both, op=dist.ReduceOp.MIN)
    if both[0].item() == 0:
        raise FloatingPointError(
            f"step {step}: P or Q of a matrix this allocation touches holds NaN or inf (found on "
            f"{'this' if not finite else 'another'} process, rank {dist.get_rank()})"
        )
    if both[0].item() != value.item() or -both[1].item() != value.item():
        raise RuntimeError(
            f"rank {dist.get_rank()}: allocation decision differs across processes ({decision}); "
            "the gathered lambdas or the configs are not identical on every rank"
        )
