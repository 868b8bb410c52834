"""Build the ``accelerate.Accelerator`` a FlexLoRA training script should use, and check it is the one launched.

``accelerate launch --config_file accelerate_configs/<engine>.yaml script.py`` describes the engine through
environment variables (``ACCELERATE_USE_FSDP``, ``FSDP_VERSION``, ``ACCELERATE_USE_DEEPSPEED``, ``WORLD_SIZE`` ...).
A plain ``Accelerator()`` does not always honour them: on CPU it silently turns FSDP into DDP (and refuses an HSDP
mesh), DeepSpeed cannot create its process group without the gloo backend, and some launch commands start fewer
processes than asked.
``build_accelerator`` applies the workarounds and raises when the result still differs from what was launched.
"""

from __future__ import annotations

import os

import torch
from accelerate import Accelerator, ParallelismConfig
from accelerate.state import PartialState
from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin, InitProcessGroupKwargs

from .errors import UserError


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "false").strip().lower() in ("1", "true", "yes")


def _has_accelerator_device() -> bool:
    return torch.accelerator.is_available()


# Mesh dimensions FlexLoRA's allocator cannot edit: they split or re-partition the adapter tensors other than by rows.
UNSUPPORTED_PARALLELISM = {"tp": "tensor parallelism", "cp": "context parallelism", "sp": "sequence parallelism"}


def _parallelism_config(accelerator_kwargs: dict) -> ParallelismConfig | None:
    """The parallelism config passed in, or the one the launch config asks for (its ``parallelism_config`` section,
    which ``accelerate launch`` hands over as PARALLELISM_CONFIG_* variables); refused with a ``ValueError`` naming
    any dimension besides data parallelism (dp_replicate_size x dp_shard_size)."""
    config = accelerator_kwargs.get("parallelism_config")
    if config is None and _env_flag("ACCELERATE_USE_PARALLELISM_CONFIG"):
        config = ParallelismConfig()  # reads PARALLELISM_CONFIG_*, as Accelerator() would
    if config is None:
        return None
    refused = [
        f"{UNSUPPORTED_PARALLELISM[dim]} ({dim}_size={getattr(config, f'{dim}_size')})"
        for dim in UNSUPPORTED_PARALLELISM
        if getattr(config, f"{dim}_size") > 1
    ]
    if refused:  # the launch config is the user's: a one-line refusal, not a traceback
        raise UserError(
            f"parallelism_config asks for {' and '.join(refused)}: FlexLoRA's allocator edits adapter tensors sharded "
            "by rows only; use data parallelism: dp_shard_size (FSDP2), times dp_replicate_size for HSDP "
            "(accelerate_configs/hsdp_multinode.yaml)"
        )
    return config


def build_accelerator(**accelerator_kwargs) -> Accelerator:
    """Create the ``Accelerator`` for the engine selected by the launch config, and validate it.

    Takes exactly the keyword arguments of ``accelerate.Accelerator`` (``gradient_accumulation_steps``,
    ``mixed_precision``, ``kwargs_handlers``, ``fsdp_plugin`` ...) and returns the Accelerator. Use it instead
    of ``Accelerator(...)`` in every FlexLoRA script, then inject adapters, then ``accelerator.prepare``.

    What it adds to a plain ``Accelerator(...)``:

    * FSDP must be FSDP2 (``fsdp_version: 2``); FSDP1 is refused here with a ``ValueError``, because FlexLoRA
      edits DTensor shards of its adapter tensors and FSDP1's flat parameters have no per-tensor shards.
    * On a machine without GPUs: plain and DDP runs get ``cpu=True`` (otherwise ``torchrun`` starts N
      unsynchronised copies); FSDP2 gets the patch accelerate lacks (accelerate never enables FSDP for
      ``MULTI_CPU`` and silently runs DDP instead): the distributed type of both ``PartialState`` and the
      ``AcceleratorState`` is set to ``FSDP`` with the FSDP plugin from the launch config; DeepSpeed gets
      ``InitProcessGroupKwargs(backend="gloo")`` unless a process-group handler is given. An HSDP
      ``parallelism_config`` (which accelerate refuses on CPU before the FSDP patch) gets its 2-D device mesh after it.
    * A ``parallelism_config`` with tensor, context or sequence parallelism is refused with a ``ValueError``:
      FlexLoRA's allocator supports the data-parallel mesh dimensions only (``dp_replicate_size`` x ``dp_shard_size``).
    * Validation, raising ``RuntimeError`` naming the problem: the process count differs from the launcher's
      ``WORLD_SIZE``; several processes are running without a distributed type; the launch asked for FSDP or
      DeepSpeed but the Accelerator uses something else; or ``MASTER_PORT`` is set without ``WORLD_SIZE``, which
      is what ``accelerate launch --cpu --num_processes N`` does when it starts only ONE process.
    """
    use_deepspeed = _env_flag("ACCELERATE_USE_DEEPSPEED") or accelerator_kwargs.get("deepspeed_plugin") is not None
    use_fsdp = _env_flag("ACCELERATE_USE_FSDP") or accelerator_kwargs.get("fsdp_plugin") is not None
    if use_deepspeed and use_fsdp:
        raise UserError("the launch config asks for both FSDP and DeepSpeed; choose one accelerate config")
    world_size = os.environ.get("WORLD_SIZE")
    if world_size is None and os.environ.get("MASTER_PORT"):
        raise RuntimeError(
            "MASTER_PORT is set but WORLD_SIZE is not: the script was started by a launcher that asked for several "
            "processes but started only this one (e.g. `accelerate launch --cpu --num_processes N`). On CPU launch "
            "with an accelerate config such as accelerate_configs/cpu_ddp.yaml (multi-GPU launcher, use_cpu: true); "
            "to run one process on purpose, unset MASTER_PORT"
        )

    kwargs = dict(accelerator_kwargs)
    on_cpu = not _has_accelerator_device() or bool(kwargs.get("cpu"))
    parallelism_config = _parallelism_config(kwargs)
    cpu_mesh = use_fsdp and on_cpu and parallelism_config is not None
    if cpu_mesh:
        # Accelerator() checks a parallelism config against its distributed type, which on CPU is MULTI_CPU until the
        # FSDP patch below, and refuses it: start with the trivial config (no mesh), install the real one after it.
        kwargs["parallelism_config"] = ParallelismConfig(
            dp_replicate_size=1, dp_shard_size=1, tp_size=1, cp_size=1, sp_size=1
        )
    elif parallelism_config is not None:
        kwargs["parallelism_config"] = parallelism_config
    fsdp_plugin = None
    if use_fsdp:
        fsdp_plugin = kwargs.get("fsdp_plugin") or FullyShardedDataParallelPlugin()
        if fsdp_plugin.fsdp_version != 2:
            raise UserError(
                f"FSDP version {fsdp_plugin.fsdp_version} requested: FlexLoRA supports FSDP2 only. Set "
                "`fsdp_version: 2` under fsdp_config in the accelerate config (see accelerate_configs/fsdp2.yaml), "
                "or pass FullyShardedDataParallelPlugin(fsdp_version=2)"
            )
        kwargs["fsdp_plugin"] = fsdp_plugin
    if use_deepspeed:
        if on_cpu and not any(isinstance(h, InitProcessGroupKwargs) for h in kwargs.get("kwargs_handlers") or []):
            # Without it accelerate initialises DeepSpeed with nccl and fails later on a batch-size assertion.
            kwargs["kwargs_handlers"] = [*(kwargs.get("kwargs_handlers") or []), InitProcessGroupKwargs(backend="gloo")]
    elif on_cpu:
        kwargs["cpu"] = True

    accelerator = Accelerator(**kwargs)

    if use_fsdp and on_cpu and accelerator.num_processes > 1 and accelerator.distributed_type != DistributedType.FSDP:
        # accelerate 1.15 maps every multi-process CPU run to MULTI_CPU (DDP). Both states must be patched: a later
        # AcceleratorState() re-reads the PartialState and would undo a patch of the AcceleratorState alone.
        partial = PartialState()
        for state in (partial, accelerator.state):
            state.distributed_type = DistributedType.FSDP
            state.device = torch.device("cpu")
        if accelerator.mixed_precision != "no":
            fsdp_plugin.set_mixed_precision(accelerator.mixed_precision)  # what AcceleratorState does for FSDP
        accelerator.state.fsdp_plugin = fsdp_plugin
    if cpu_mesh:
        # What Accelerator() does with a parallelism config, now that the distributed type is FSDP.
        accelerator.state.parallelism_config = parallelism_config
        parallelism_config._validate_accelerator(accelerator)
        accelerator.state.device_mesh = parallelism_config.get_device_mesh(accelerator.device.type)

    _validate(accelerator, world_size, use_fsdp, use_deepspeed)
    return accelerator


def _validate(accelerator: Accelerator, world_size: str | None, use_fsdp: bool, use_deepspeed: bool) -> None:
    kind = accelerator.distributed_type
    n = accelerator.num_processes
    if world_size is not None and int(world_size) != n:
        raise RuntimeError(f"the launcher started WORLD_SIZE={world_size} processes but the Accelerator sees {n}")
    if n > 1 and kind == DistributedType.NO:
        raise RuntimeError(
            f"{n} processes are running without a distributed type: they would train unsynchronised copies"
        )
    if use_fsdp and n > 1:
        if kind != DistributedType.FSDP:
            raise RuntimeError(f"the launch config asks for FSDP but the Accelerator runs {kind.value}")
        if not accelerator.is_fsdp2:
            raise RuntimeError("the Accelerator runs FSDP1; FlexLoRA supports FSDP2 only (fsdp_version: 2)")
    if use_deepspeed and kind != DistributedType.DEEPSPEED:
        raise RuntimeError(f"the launch config asks for DeepSpeed but the Accelerator runs {kind.value}")
    if not use_fsdp and not use_deepspeed and n > 1 and not kind.value.startswith("MULTI_"):
        # Plain data parallelism is MULTI_CPU / MULTI_GPU / MULTI_XPU ...; anything else was not asked for.
        raise RuntimeError(f"unexpected distributed type {kind.value} for a launch config without FSDP or DeepSpeed")
