"""Every rank's hook state in one checkpoint entry (frameworks write a checkpoint from rank 0 only).

A hook's state differs per rank (error-feedback residuals, owner-side residuals), but Lightning and Accelerate
save one file from the main process. :func:`gather_states` is called on every rank while the framework builds
its checkpoint and returns the same entry everywhere; :func:`own_state` picks this rank's part back out on load.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

from tailq.hooks import HookState

__all__ = ["gather_states", "own_state", "to_cpu"]


def to_cpu(obj: Any) -> Any:
    """``obj`` with every tensor moved to the CPU (a gathered checkpoint must not name another rank's GPU)."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu()
    if isinstance(obj, dict):
        return {k: to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return type(obj)(to_cpu(v) for v in obj)
    return obj


def gather_states(state: HookState) -> dict[str, Any]:
    """``{"world_size": N, "ranks": [rank 0's state_dict, …]}``: plain data (``torch.load(weights_only=True)``).

    A collective: every rank must call it. The states travel between our own ranks in memory
    (``all_gather_object``); no file is unpickled.
    """
    mine = to_cpu(state.state_dict())
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return {"world_size": 1, "ranks": [mine]}
    ranks: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(ranks, mine)
    return {"world_size": len(ranks), "ranks": ranks}


def own_state(entry: dict[str, Any], who: str) -> dict[str, Any]:
    """This rank's hook state from a :func:`gather_states` entry; a clear error if the world size changed."""
    rank = dist.get_rank() if dist.is_initialized() else 0
    world = dist.get_world_size() if dist.is_initialized() else 1
    if int(entry["world_size"]) != world:
        raise ValueError(f"{who}: the checkpoint holds the hook state of {entry['world_size']} ranks; this run has "
                         f"{world}. Resume with the same number of processes (or drop the hook's entry to restart "
                         "its state)")
    return dict(entry["ranks"][rank])
