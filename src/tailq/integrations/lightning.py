"""PyTorch Lightning: :class:`TailqCallback` registers a tailq (or built-in) DDP hook on the strategy's model.

    import pytorch_lightning as pl
    from tailq.lightning import TailqCallback

    trainer = pl.Trainer(accelerator="cpu", devices=2, strategy="ddp", callbacks=[TailqCallback("tnq", bits=3)])

Why a callback and not ``DDPStrategy(ddp_comm_state=…, ddp_comm_hook=…)``: Lightning 2.6's
``DDPStrategy._register_ddp_hooks`` registers a comm hook only when the root device is CUDA, so on CPU/Gloo a hook
passed that way is silently dropped. The callback registers it in ``on_fit_start`` — after the strategy wrapped the
model in ``DistributedDataParallel``, before the first backward — on any device. (On CUDA the ``DDPStrategy`` path
works too: :func:`tailq.ddp_hook` states may be created before the process group exists and bind on the first
bucket.)

What it adds to Lightning:

* **logging** through ``pl_module.log`` every step: ``tailq/bits_per_coord`` (bits handed to the method's
  collectives per gradient coordinate, that step), ``tailq/step``, ``tailq/fallbacks``, ``tailq/vnmse`` on
  measured steps (``measure_every``), and ``tailq/route/<route>`` (buckets on each route); the planner's choice
  once to the logger's hyperparameters;
* **checkpoints**: ``trainer.save_checkpoint(path)`` (and ``ModelCheckpoint``) makes every rank write its own hook
  state (error-feedback residuals differ per rank) to ``<path>.tailq_hook_rank{r}.pt`` beside the checkpoint, and
  the callback's entry in the checkpoint holds only small metadata (hook, world size, configuration, step, the file
  names). Each file is ``torch.save`` of plain dicts and tensors, read back with ``torch.load(weights_only=True)``;
  its size does not grow with the number of ranks, and saving needs no collective. ``fit(ckpt_path=…)`` restores
  each rank's own file, so a resumed run continues exactly where it stopped. The entry is keyed by the callback's
  class alone: options that do not change the arithmetic (``timeout_s``) and equivalent spellings
  (``error_feedback=True``/``"all"``) may differ on resume; one that does (``bits``, ``route``, …) is refused by
  name, as are a missing file and another number of processes. ``TailqCallback(..., restore=False)`` starts the
  hook afresh instead. (To know the checkpoint's path on every rank the callback wraps the strategy's
  ``save_checkpoint``/``remove_checkpoint``; ``ModelCheckpoint`` removing a checkpoint removes its files too.)

Single-process runs (``devices=1``, with or without ``strategy="ddp"``) have nothing to average: the callback warns
once and does nothing. Under ``strategy="ddp_spawn"`` the hook lives in the spawned workers: the launching process
gets the run's totals in ``trainer.callback_metrics`` (``tailq/run_steps``, ``tailq/run_bits_per_coord``,
``tailq/run_fallbacks``), and reading ``callback.state`` there raises an error that says so.
"""

from __future__ import annotations

import logging
import math
import os
from multiprocessing.context import get_spawning_popen
from typing import Any

import torch

try:
    import pytorch_lightning as pl
    from lightning_fabric.utilities.cloud_io import get_filesystem
    from pytorch_lightning.strategies import DDPStrategy, Strategy
    from pytorch_lightning.trainer.states import TrainerFn
except ImportError as err:  # pragma: no cover - exercised only without the extra
    raise ImportError(
        "tailq.lightning needs pytorch-lightning (pip install 'tailq[lightning]' or pip install pytorch-lightning)"
    ) from err

from tailq.hooks import HookState, ddp_hook, prime_buckets

from ._ranks import FORMAT, load_checked, rank_and_world, rank_file_state, read_rank_file, write_rank_file

__all__ = ["TailqCallback"]

log = logging.getLogger("tailq")


SUFFIX = ".tailq_hook_rank{rank}.pt"
"""Rank ``r``'s hook state is ``<checkpoint path>`` + this, beside the checkpoint."""

_WHO = "TailqCallback"
_FRESH = "TailqCallback(..., restore=False)"
_AFRESH = "to start the hook afresh (step 0, warm-up, zero residuals)"


class TailqCallback(pl.Callback):
    """Average gradients with tailq's ``name`` hook (``tailq list``, or fp32/fp16/bf16/powersgd) under Lightning DDP.

    ``options`` are those of :func:`tailq.ddp_hook` (``bits``, ``route``, ``error_feedback``, ``measure_every``, …)
    and are validated here, before the Trainer starts its workers. ``log_every_n_steps`` (default 1) thins the
    ``pl_module.log`` calls. ``restore`` (default on): ``fit(ckpt_path=…)`` restores the hook's state from the
    checkpoint's per-rank files; ``False`` leaves it alone (the hook starts afresh: step 0, warm-up, zero
    residuals) — to resume with another number of processes or other arithmetic options.
    """

    def __init__(self, name: str, *, log_every_n_steps: int = 1, restore: bool = True, **options: Any) -> None:
        if not isinstance(log_every_n_steps, int) or log_every_n_steps < 1:
            raise ValueError(f"TailqCallback: log_every_n_steps must be an integer >= 1; got {log_every_n_steps!r}")
        if not isinstance(restore, bool):
            raise TypeError(f"TailqCallback: restore must be True or False; got {restore!r}")
        if "process_group" in options:
            raise TypeError("TailqCallback: process_group is taken from the strategy's DDP model; do not pass it")
        probe, _ = ddp_hook(name, **options)  # validates every option now (no process group needed)
        probe.close()
        self.name = name
        self.options = options
        self.log_every_n_steps = log_every_n_steps
        self.restore = restore
        self._state: HookState | None = None
        self._world = 1
        self._pending: dict[str, Any] | None = None  # this rank's saved hook state, applied in on_fit_start
        self._pending_from = ""
        self._logged_plan = False
        self._warned = False
        self._prime = False  # resumed: prime DDP's buckets before the first real step
        self._spawned = False  # sent to ddp_spawn's workers: the hook and its state live there

    @property
    def state_key(self) -> str:
        """The checkpoint entry's key: the class alone. Options may be spelled differently or differ harmlessly on
        resume (``timeout_s``); what must match is checked when the state is loaded, and a difference is named."""
        return type(self).__name__

    @property
    def state(self) -> HookState | None:
        """The live hook state (``metrics``, ``step``); ``None`` before ``fit`` and in single-process runs."""
        if self._state is None and self._spawned:
            raise RuntimeError(
                "TailqCallback.state: this callback was sent to the worker processes of strategy='ddp_spawn'; the "
                "hook and its state lived there and ended with them (Lightning brings back only the weights and "
                "trainer.callback_metrics). The run's totals are in trainer.callback_metrics: 'tailq/run_steps', "
                "'tailq/run_bits_per_coord', 'tailq/run_fallbacks'. With strategy='ddp' the launching process is "
                "rank 0 and holds the state")
        return self._state

    @state.setter
    def state(self, value: HookState | None) -> None:
        self._state = value

    def __getstate__(self) -> dict[str, Any]:  # ddp_spawn pickles callbacks: the live state (threads) stays here
        if get_spawning_popen() is not None:  # pickled for a spawned process: the hook will run there
            self._spawned = True
        return {**self.__dict__, "_state": None, "_spawned": False}

    # -- lifecycle ------------------------------------------------------------------------------------------
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit" and trainer.world_size > 1 and not isinstance(trainer.strategy, DDPStrategy):
            raise ValueError(f"TailqCallback needs strategy='ddp' (a DDPStrategy); got "
                             f"{type(trainer.strategy).__name__}. For FSDP2 use tailq.fsdp.compress")

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        ddp = trainer.strategy.model
        if not isinstance(ddp, torch.nn.parallel.DistributedDataParallel) or trainer.world_size <= 1:
            if not self._warned:
                log.warning("TailqCallback: one process (world size %d): nothing to average, the callback does "
                            "nothing", trainer.world_size)
                self._warned = True
            self._pending = None
            return
        if getattr(trainer.strategy, "_ddp_comm_hook", None) is not None:
            raise ValueError("TailqCallback: the DDPStrategy already has a ddp_comm_hook; pass the hook either "
                             "through DDPStrategy(ddp_comm_state=...) or through TailqCallback, not both")
        if self._state is not None:
            self._state.close()
        self._state, hook = ddp_hook(self.name, process_group=ddp.process_group, **self.options)
        self._world = trainer.world_size
        self._prime = False
        if self._pending is not None:
            saved, where = self._pending, self._pending_from
            self._pending = None
            try:
                load_checked(self._state, saved, who=_WHO, fresh=_FRESH, where=where)
            except Exception:
                self._state.close()
                self._state = None
                raise
            self._prime = True
        ddp.register_comm_hook(self._state, hook)
        self._wrap_strategy(trainer.strategy)

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        st = self._state
        if st is None:
            return
        st.close()  # its metrics stay readable
        # the run's totals, also where Lightning carries them to the launching process (ddp_spawn)
        totals = {"tailq/run_steps": float(st.step), "tailq/run_bits_per_coord": st.metrics.wire.bits_per_coord(),
                  "tailq/run_fallbacks": float(len(st.metrics.fallbacks))}
        trainer.callback_metrics.update({k: torch.tensor(v) for k, v in totals.items()})

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        if self._prime:
            self._prime = False
            self._prime_buckets(trainer, pl_module, batch, batch_idx)

    def _prime_buckets(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int) -> None:
        """After a resume: give the fresh DDP model its final bucket layout before the first real step.

        DDP groups the parameters differently in its first iteration (see :func:`tailq.hooks.prime_buckets`), and
        the hook keys its residuals and kept designs by bucket content, so without this the first resumed step
        would compress over other buckets than the uninterrupted run did. One forward and backward of this batch
        runs with the hook in priming mode (plain fp32 mean, hook state untouched); the gradients are discarded and
        the module's buffers and the RNG states are restored and ``self.log`` is muted, so the real step that follows
        is the one the uninterrupted run took. Not possible with manual optimization (its ``training_step`` steps
        the optimizer): the first resumed step then differs slightly, and a warning says so.
        """
        if not pl_module.automatic_optimization:
            log.warning("TailqCallback: manual optimization — DDP's first-iteration buckets cannot be primed after "
                        "a resume, so the first resumed step compresses over another bucket layout")
            return
        ddp = trainer.strategy.model
        muted = {"log": lambda *a, **k: None, "log_dict": lambda *a, **k: None}
        pl_module.__dict__.update(muted)  # training_step's self.log calls must not count twice

        def forward_backward() -> None:
            out: Any = trainer.strategy.training_step(batch, batch_idx)
            loss = out.get("loss") if isinstance(out, dict) else out
            if isinstance(loss, torch.Tensor):  # None: the module skips this batch, and so does priming
                loss.backward()

        try:
            prime_buckets(ddp, self.state, forward_backward)
        finally:
            for k in muted:
                pl_module.__dict__.pop(k, None)

    # -- logging --------------------------------------------------------------------------------------------
    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        st = self.state
        if st is None or st.step == 0 or trainer.global_step % self.log_every_n_steps:
            return
        m = st.metrics
        values: dict[str, float] = {"tailq/step": float(st.step), "tailq/fallbacks": float(len(m.fallbacks))}
        bits = m.wire.step_bits_per_coord(st.step - 1)
        if not math.isnan(bits):
            values["tailq/bits_per_coord"] = bits
        if m.vnmse and m.vnmse[-1]["step"] == st.step - 1:
            recs = [r for r in m.vnmse if r["step"] == st.step - 1 and not math.isnan(r["vnmse"])]
            if recs:
                values["tailq/vnmse"] = sum(r["vnmse"] for r in recs) / len(recs)
        routes: dict[str, int] = {}
        for rec in m.last.values():
            routes[rec.get("route", "?")] = routes.get(rec.get("route", "?"), 0) + 1
        values.update({f"tailq/route/{r}": float(c) for r, c in routes.items()})
        pl_module.log_dict(values, on_step=True, on_epoch=False, batch_size=1)
        if not self._logged_plan and routes and trainer.logger is not None:
            plan = {str(k): v["route"] for k, v in m.plan.get("buckets", {}).items()}
            trainer.logger.log_hyperparams({"tailq_hook": self.name, "tailq_routes": plan or sorted(routes)})
            self._logged_plan = True

    # -- checkpoints ----------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """The checkpoint's entry: small metadata (rank 0's is kept) naming each rank's file of hook state.

        The files themselves are written by every rank when the strategy saves (see :meth:`_wrap_strategy`).
        """
        st = self._state
        if st is None:
            return {}
        return {"format": FORMAT, "hook": self.name, "world_size": self._world, "step": int(st.step),
                "config": st.config(), "files": None}

    def _wrap_strategy(self, strategy: Strategy) -> None:
        """Have ``strategy.save_checkpoint``/``remove_checkpoint`` (called on every rank, with the path) write and
        remove this rank's file beside the checkpoint. Lightning writes the checkpoint itself from rank 0 only and
        passes the path to no callback hook; the wrap stays for the strategy's lifetime (``trainer.save_checkpoint``
        after ``fit`` must write the files too)."""
        if getattr(strategy.save_checkpoint, "_tailq_callback", None) is self:
            return
        save, remove = strategy.save_checkpoint, strategy.remove_checkpoint

        def save_checkpoint(checkpoint: dict[str, Any], filepath: Any, storage_options: Any = None) -> None:
            self._save_rank_file(checkpoint, str(filepath))  # first: a checkpoint never names a file not yet there
            save(checkpoint, filepath, storage_options=storage_options)

        def remove_checkpoint(filepath: Any) -> None:
            remove(filepath)
            path = f"{filepath}{SUFFIX.format(rank=rank_and_world()[0])}"
            fs = get_filesystem(path)
            if fs.exists(path):
                fs.rm(path)

        save_checkpoint._tailq_callback = self  # type: ignore[attr-defined]
        strategy.save_checkpoint = save_checkpoint  # type: ignore[method-assign]
        strategy.remove_checkpoint = remove_checkpoint  # type: ignore[method-assign]

    def _save_rank_file(self, checkpoint: dict[str, Any], path: str) -> None:
        entry = (checkpoint.get("callbacks") or {}).get(self.state_key)
        st = self._state
        if not entry or st is None:  # a weights-only checkpoint carries no callback state
            return
        rank, world = rank_and_world()
        base = os.path.basename(path.rstrip("/"))
        entry["files"] = [base + SUFFIX.format(rank=r) for r in range(world)]
        fs = get_filesystem(path)
        fs.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        write_rank_file(path + SUFFIX.format(rank=rank), rank_file_state(st, rank, world, checkpoint=base), fs=fs)

    def on_load_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                           checkpoint: dict[str, Any]) -> None:
        """Read this rank's file of the checkpoint's hook state (applied in ``on_fit_start``, once the hook exists).

        Every rank checks every rank's file, so a missing one fails all ranks at once rather than leaving the
        others waiting in a collective.
        """
        self._pending = None
        if trainer.state.fn != TrainerFn.FITTING:
            return
        ckpt = str(trainer.ckpt_path)
        entry = (checkpoint.get("callbacks") or {}).get(self.state_key)
        if trainer.world_size <= 1:
            if entry:
                log.warning("TailqCallback: one process: the hook state in %s is not used", ckpt)
            return
        if not entry:
            log.warning("TailqCallback: %s holds no TailqCallback state (saved without the callback or weights "
                        "only): the hook starts afresh (step 0, warm-up, zero residuals)", ckpt)
            return
        if not self.restore:
            log.warning("TailqCallback: restore=False: the hook state in %s (step %s) is not loaded; the hook "
                        "starts afresh (step 0, warm-up, zero residuals)", ckpt, entry.get("step"))
            return
        if entry.get("format") != FORMAT or not entry.get("files"):
            raise ValueError(f"{_WHO}: {ckpt}'s TailqCallback entry is not one this version of tailq reads (format "
                             f"{entry.get('format')!r}, expected {FORMAT!r} naming each rank's file); pass {_FRESH} "
                             f"{_AFRESH}")
        rank, world = trainer.global_rank, trainer.world_size
        files = list(entry["files"])
        if int(entry["world_size"]) != world:
            raise ValueError(f"{_WHO}: {ckpt} holds the hook state of {entry['world_size']} ranks "
                             f"({', '.join(files)}); this run has {world}. Each rank's state (its residuals) belongs "
                             f"to that rank: resume with {entry['world_size']} processes, or pass {_FRESH} {_AFRESH}")
        directory = os.path.dirname(ckpt)
        paths = [os.path.join(directory, f) for f in files]
        fs = get_filesystem(paths[rank])
        missing = [p for p in paths if not fs.exists(p)]
        if missing:
            raise FileNotFoundError(f"{_WHO}: {', '.join(missing)} missing: each rank's hook state is a file beside "
                                    f"the checkpoint {ckpt} (<checkpoint>{SUFFIX.format(rank='{r}')}); keep them "
                                    f"with the checkpoint when copying or moving it, or pass {_FRESH} {_AFRESH}")
        saved = read_rank_file(paths[rank], rank=rank, world=world, who=_WHO, fresh=_FRESH, fs=fs)
        if int(saved["step"]) != int(entry["step"]):
            raise ValueError(f"{_WHO}: {paths[rank]} holds the hook state of step {saved['step']} but {ckpt} was "
                             f"saved at hook step {entry['step']}: the file is from another save (one interrupted on "
                             f"some rank?). Resume from a complete checkpoint, or pass {_FRESH} {_AFRESH}")
        self._pending, self._pending_from = saved["state"], paths[rank]
