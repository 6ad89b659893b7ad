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
* **checkpoints**: the hook state of *every* rank (error-feedback residuals differ per rank) is gathered into the
  callback's entry of the Lightning checkpoint and each rank takes its own back on resume, so a resumed run
  continues exactly where it stopped. The entry holds plain dicts and tensors (``torch.load(weights_only=True)``
  reads it).

Single-process runs (``devices=1``) have nothing to average: the callback warns once and does nothing.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import torch

try:
    import pytorch_lightning as pl
    from pytorch_lightning.strategies import DDPStrategy
except ImportError as err:  # pragma: no cover - exercised only without the extra
    raise ImportError(
        "tailq.lightning needs pytorch-lightning (pip install 'tailq[lightning]' or pip install pytorch-lightning)"
    ) from err

from tailq.hooks import HookState, ddp_hook, prime_buckets

from ._ranks import gather_states, own_state

__all__ = ["TailqCallback"]

log = logging.getLogger("tailq")


class TailqCallback(pl.Callback):
    """Average gradients with tailq's ``name`` hook (``tailq list``, or fp32/fp16/bf16/powersgd) under Lightning DDP.

    ``options`` are those of :func:`tailq.ddp_hook` (``bits``, ``route``, ``error_feedback``, ``measure_every``, …)
    and are validated here, before the Trainer starts its workers. ``log_every_n_steps`` (default 1) thins the
    ``pl_module.log`` calls.
    """

    def __init__(self, name: str, *, log_every_n_steps: int = 1, **options: Any) -> None:
        if not isinstance(log_every_n_steps, int) or log_every_n_steps < 1:
            raise ValueError(f"TailqCallback: log_every_n_steps must be an integer >= 1; got {log_every_n_steps!r}")
        if "process_group" in options:
            raise TypeError("TailqCallback: process_group is taken from the strategy's DDP model; do not pass it")
        probe, _ = ddp_hook(name, **options)  # validates every option now (no process group needed)
        probe.close()
        self.name = name
        self.options = options
        self.log_every_n_steps = log_every_n_steps
        self.state: HookState | None = None
        self._pending: dict[str, Any] | None = None  # a checkpoint's entry, applied when the state exists
        self._logged_plan = False
        self._warned = False
        self._prime = False  # resumed: prime DDP's buckets before the first real step

    @property
    def state_key(self) -> str:
        return self._generate_state_key(name=self.name, **{k: repr(v) for k, v in sorted(self.options.items())})

    def __getstate__(self) -> dict[str, Any]:  # ddp_spawn pickles callbacks: the live state (threads) stays here
        return {**self.__dict__, "state": None}

    # -- lifecycle ------------------------------------------------------------------------------------------
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit" and trainer.world_size > 1 and not isinstance(trainer.strategy, DDPStrategy):
            raise ValueError(f"TailqCallback needs strategy='ddp' (a DDPStrategy); got "
                             f"{type(trainer.strategy).__name__}. For FSDP2 use tailq.fsdp.compress")

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        ddp = trainer.strategy.model
        if not isinstance(ddp, torch.nn.parallel.DistributedDataParallel):
            if not self._warned:
                log.warning("TailqCallback: the model is not wrapped in DistributedDataParallel (world size %d): "
                            "nothing to average, the callback does nothing", trainer.world_size)
                self._warned = True
            return
        if getattr(trainer.strategy, "_ddp_comm_hook", None) is not None:
            raise ValueError("TailqCallback: the DDPStrategy already has a ddp_comm_hook; pass the hook either "
                             "through DDPStrategy(ddp_comm_hook=...) or through TailqCallback, not both")
        if self.state is not None:
            self.state.close()
        self.state, hook = ddp_hook(self.name, process_group=ddp.process_group, **self.options)
        self._prime = False
        if self._pending is not None:
            self._load(self._pending)
            self._pending = None
            self._prime = True
        ddp.register_comm_hook(self.state, hook)

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.state is not None:
            self.state.close()  # its metrics stay readable

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
        """Every rank's hook state (Lightning calls this on every rank before rank 0 writes the file)."""
        return {} if self.state is None else gather_states(self.state)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if not state_dict:
            return
        if self.state is not None and self.state.bound:  # a live state (restored mid-fit): apply now
            self._load(state_dict)
        else:  # Lightning restores callbacks before the strategy wraps the model: keep it for on_fit_start
            self._pending = state_dict

    def _load(self, entry: dict[str, Any]) -> None:
        assert self.state is not None
        self.state.load_state_dict(own_state(entry, "TailqCallback"))
