"""A recorder of the collectives a block of code dispatches: what the tests and bench/comm_volume.py use to check
that an allocation step moves only lambda, and under HSDP only within the shard group. It issues none itself."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch.utils._python_dispatch import TorchDispatchMode


def _group_size(args: tuple) -> int:
    """Processes in the group a dispatched collective runs over: c10d ops carry the ProcessGroup (as a TorchScript
    object), functional ones its name as their last argument."""
    for arg in args:
        if isinstance(arg, torch.ScriptObject) and "ProcessGroup" in str(arg._type()):
            return dist.ProcessGroup.unbox(arg).size()
    return dist.distributed_c10d._resolve_process_group(args[-1]).size()


class CollectiveRecorder(TorchDispatchMode):
    """Records every collective dispatched inside the ``with`` block (c10d and functional) as (op name, bytes this
    process sends, processes in its group): how the tests and bench/comm_volume.py check that an allocation moves
    only lambda, and under HSDP gathers it within the shard group only."""

    def __init__(self):
        super().__init__()
        self.calls: list[tuple[str, int, int]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func.overloadpacket)
        if "c10d" in name and not name.endswith("wait_tensor"):  # waiting on a functional collective sends nothing
            # c10d all-gathers take (output, input, ...), functional ones (input, ...): what this process sends
            sent = args[1] if "allgather" in name else args[0]
            tensors = sent if isinstance(sent, (list, tuple)) else [sent]
            self.calls.append((name, sum(t.numel() * t.element_size() for t in tensors), _group_size(args)))
        return func(*args, **(kwargs or {}))
