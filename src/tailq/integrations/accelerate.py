"""Hugging Face Accelerate: :func:`register_hook` puts a tailq hook on the model ``accelerator.prepare`` returned.

    from accelerate import Accelerator
    from tailq.integrations.accelerate import register_hook

    accelerator = Accelerator()
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    hook = register_hook(accelerator, model, "tnq", bits=3)   # before the first backward

Why a helper: ``DistributedDataParallelKwargs(comm_hook=…)`` accepts only Accelerate's own enum (fp16, bf16,
PowerSGD), so a custom hook has to be registered on the ``DistributedDataParallel`` that ``prepare`` built. This
finds it (through ``torch.compile``'s wrapper too), creates the hook on its process group, registers it, and
registers a checkpoint object with ``accelerator.register_for_checkpointing`` so ``save_state``/``load_state``
carry every rank's hook state (error-feedback residuals differ per rank; Accelerate writes from the main process
only). After ``load_state``, call ``hook.prime(forward_backward)`` once so DDP's first-iteration bucket layout does
not differ from the saved run's (see :func:`tailq.hooks.prime_buckets`): the resumed run then continues exactly.

Works under ``accelerate launch`` and ``torchrun`` (Gloo on CPU, NCCL on GPU). A single process (no DDP) gets a
no-op: there is nothing to average.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import torch

try:
    import accelerate
except ImportError as err:  # pragma: no cover - exercised only without the extra
    raise ImportError(
        "tailq.integrations.accelerate needs accelerate (pip install 'tailq[accelerate]' or pip install accelerate)"
    ) from err

from tailq.hooks import HookState, ddp_hook, prime_buckets

from ._ranks import gather_states, own_state

__all__ = ["AccelerateHook", "register_hook"]

log = logging.getLogger("tailq")


class AccelerateHook:
    """The registered hook: ``state`` (its metrics), and the checkpoint object Accelerate saves and loads."""

    def __init__(self, ddp: torch.nn.parallel.DistributedDataParallel | None, state: HookState | None) -> None:
        self.ddp = ddp
        self.state = state
        self._restored = False

    def state_dict(self) -> dict[str, Any]:
        """Every rank's hook state (a collective: Accelerate's ``save_state`` runs on every process)."""
        return {} if self.state is None else gather_states(self.state)

    def load_state_dict(self, entry: dict[str, Any]) -> None:
        if self.state is not None and entry:
            self.state.load_state_dict(own_state(entry, "tailq.integrations.accelerate"))
            self._restored = True

    def prime(self, forward_backward: Callable[[], Any]) -> None:
        """After ``load_state``: one forward and backward (any batch) in priming mode, gradients discarded."""
        if self.ddp is not None and self.state is not None:
            prime_buckets(self.ddp, self.state, forward_backward)

    def close(self) -> None:
        if self.state is not None:
            self.state.close()


def _find_ddp(model: Any) -> torch.nn.parallel.DistributedDataParallel | None:
    seen = 0
    while model is not None and seen < 8:
        if isinstance(model, torch.nn.parallel.DistributedDataParallel):
            return model
        model = getattr(model, "_orig_mod", None)  # torch.compile's OptimizedModule
        seen += 1
    return None


def register_hook(accelerator: accelerate.Accelerator, model: Any, name: str, *, checkpoint: bool = True,
                  **options: Any) -> AccelerateHook:
    """Register tailq's ``name`` hook (``tailq list``, or fp32/fp16/bf16/powersgd) on ``model`` from ``prepare``.

    ``options`` are :func:`tailq.ddp_hook`'s. ``checkpoint`` (default on): include the hook's state in
    ``accelerator.save_state``/``load_state``. Call before the first backward, on every process.
    """
    if "process_group" in options:
        raise TypeError("register_hook: process_group is taken from the prepared DDP model; do not pass it")
    ddp = _find_ddp(model)
    if ddp is None:
        probe, _ = ddp_hook(name, **options)  # options are still validated
        probe.close()
        if accelerator.num_processes > 1:
            raise ValueError(f"register_hook: {type(model).__name__} is not a DistributedDataParallel model; pass "
                             "the model returned by accelerator.prepare (for FSDP2 use tailq.fsdp.compress)")
        log.warning("tailq.integrations.accelerate: one process, no DDP model: nothing to average, no hook")
        return AccelerateHook(None, None)
    state, hook = ddp_hook(name, process_group=ddp.process_group, **options)
    ddp.register_comm_hook(state, hook)
    handle = AccelerateHook(ddp, state)
    if checkpoint:
        accelerator.register_for_checkpointing(handle)
    return handle
