"""Hugging Face Accelerate: :func:`register_hook` puts a tailq hook on the model ``accelerator.prepare`` returned.

    from accelerate import Accelerator
    from tailq.integrations.accelerate import register_hook

    accelerator = Accelerator()
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    hook = register_hook(accelerator, model, "tnq", bits=3)   # before the first backward

Why a helper: ``DistributedDataParallelKwargs(comm_hook=…)`` accepts only Accelerate's own enum (fp16, bf16,
PowerSGD), so a custom hook has to be registered on the ``DistributedDataParallel`` that ``prepare`` built. This
finds it (through ``torch.compile``'s wrapper too), creates the hook on its process group and registers it.

Checkpoints: ``accelerator.save_state(dir)`` writes, from every process, ``dir/tailq_hook_rank{r}.pt``: that rank's
hook state (error-feedback residuals differ per rank), ``torch.save`` of plain dicts and tensors, so its size does
not grow with the number of processes and saving needs no collective. ``accelerator.load_state(dir)`` reads each
rank's own file with ``torch.load(weights_only=True)``: nothing in it can run code (tailq registers nothing with
``register_for_checkpointing``, whose ``custom_checkpoint_*.pkl`` Accelerate unpickles). Both go through
Accelerate's ``register_save_state_pre_hook``/``register_load_state_pre_hook``. A missing file, another number of
processes or another arithmetic configuration (``bits``, ``route``, …; not ``timeout_s``) is a clear error that
names it; ``register_hook(..., restore=False)`` starts the hook afresh instead. After ``load_state``, call
``hook.prime(forward_backward)`` once so DDP's first-iteration bucket layout does not differ from the saved run's
(see :func:`tailq.hooks.prime_buckets`): the resumed run then continues exactly.

Works under ``accelerate launch`` and ``torchrun`` (Gloo on CPU, NCCL on GPU). A single process (no DDP) gets a
no-op: there is nothing to average.
"""

from __future__ import annotations

import glob
import logging
import os
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

from ._ranks import load_checked, rank_and_world, rank_file_state, read_rank_file, write_rank_file

__all__ = ["AccelerateHook", "register_hook"]

log = logging.getLogger("tailq")


FILE = "tailq_hook_rank{rank}.pt"
"""Each rank's hook state in the directory ``accelerator.save_state`` writes."""

_WHO = "tailq.integrations.accelerate"
_FRESH = "register_hook(..., restore=False)"


class AccelerateHook:
    """The registered hook: ``state`` (its metrics); saves and loads this rank's state beside Accelerate's files."""

    def __init__(self, ddp: torch.nn.parallel.DistributedDataParallel | None, state: HookState | None,
                 restore: bool = True) -> None:
        self.ddp = ddp
        self.state = state
        self.restore = restore
        self._restored = False

    def state_dict(self) -> dict[str, Any]:
        """This rank's hook state (plain data); ``{}`` without a hook."""
        return {} if self.state is None else self.state.state_dict()

    def save(self, directory: str) -> str:
        """Write this rank's ``tailq_hook_rank{r}.pt`` into ``directory`` (``save_state`` calls it); its path."""
        assert self.state is not None and self.ddp is not None
        rank, world = rank_and_world(self.ddp.process_group)
        path = os.path.join(directory, FILE.format(rank=rank))
        write_rank_file(path, rank_file_state(self.state, rank, world))
        return path

    def load(self, directory: str) -> None:
        """Restore this rank's hook state from ``directory`` (``load_state`` calls it, before Accelerate's files)."""
        if self.state is None or self.ddp is None:
            return
        rank, world = rank_and_world(self.ddp.process_group)
        path = os.path.join(directory, FILE.format(rank=rank))
        found = sorted(os.path.basename(p) for p in glob.glob(os.path.join(glob.escape(directory),
                                                                            FILE.format(rank="*"))))
        if not self.restore:
            if found:
                log.warning("%s: restore=False: the hook state in %s is not loaded; the hook starts afresh (step 0, "
                            "warm-up, zero residuals)", _WHO, directory)
            return
        if not found:
            raise FileNotFoundError(
                f"{_WHO}: {directory} holds no tailq hook state ({FILE.format(rank='N')}): it was saved without "
                f"tailq's hook, with register_hook(checkpoint=False), or by an older tailq (whose pickled "
                f"custom_checkpoint_*.pkl tailq no longer loads: unpickling can run code). Pass {_FRESH} to start "
                "the hook afresh (step 0, warm-up, zero residuals)")
        if not os.path.exists(path):
            other = read_rank_file(os.path.join(directory, found[0]), rank=-1, world=-1, who=_WHO, fresh=_FRESH,
                                   check=False)
            if int(other["world_size"]) != world:
                raise ValueError(f"{_WHO}: {directory} holds the hook state of a run of {other['world_size']} "
                                 f"processes ({', '.join(found)}); this run has {world}. Each process's hook state "
                                 f"(its residuals) belongs to its rank: resume with {other['world_size']} processes, "
                                 f"or pass {_FRESH} to start the hook afresh (step 0, warm-up, zero residuals)")
            raise FileNotFoundError(
                f"{_WHO}: {path} is missing (found: {', '.join(found)}): each process writes its own hook state, "
                f"so accelerator.save_state must be called on every process, not only the main one. Resume from a "
                f"checkpoint every process saved, or pass {_FRESH} to start the hook afresh (step 0, warm-up, zero "
                "residuals)")
        saved = read_rank_file(path, rank=rank, world=world, who=_WHO, fresh=_FRESH)
        load_checked(self.state, saved["state"], who=_WHO, fresh=_FRESH, where=path)
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
                  restore: bool = True, **options: Any) -> AccelerateHook:
    """Register tailq's ``name`` hook (``tailq list``, or fp32/fp16/bf16/powersgd) on ``model`` from ``prepare``.

    ``options`` are :func:`tailq.ddp_hook`'s. ``checkpoint`` (default on): ``accelerator.save_state`` writes each
    rank's hook state to ``tailq_hook_rank{r}.pt`` and ``load_state`` restores it. ``restore=False``: ``load_state``
    leaves the hook's state alone (it starts afresh: step 0, warm-up, zero residuals) — to resume with another
    number of processes or other options. Call before the first backward, on every process.
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
    handle = AccelerateHook(ddp, state, restore=restore)
    if checkpoint:  # files of tailq's own beside Accelerate's: nothing registered for pickling
        accelerator.register_save_state_pre_hook(lambda models, weights, output_dir: handle.save(output_dir))
        accelerator.register_load_state_pre_hook(lambda models, input_dir: handle.load(input_dir))
    return handle
