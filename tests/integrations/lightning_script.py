"""A small Lightning DDP run on CPU (2 processes), driven by tests/integrations/test_lightning.py.

``python lightning_script.py MODE OUT [--epochs E] [--save CKPT] [--resume CKPT] [--opts JSON] [--devices N]
[--strategy S] [--ckpt-dir DIR]``; Lightning's ``strategy="ddp"`` re-launches this script for rank 1. Modes:

* ``callback``: ``TailqCallback("tnq", bits=3, error_feedback=True, measure_every=4, route="twophase")`` (routes
  pinned throughout: on loopback ``route="auto"`` may rightly send bf16, and the tests check compression); ``--opts``
  (JSON) overrides options (``{"timeout_s": 600}``, ``{"bits": 4}``, ``{"restore": false}``); ``--ckpt-dir`` adds a
  ``ModelCheckpoint`` that keeps the last epoch's checkpoint only;
* ``strategy``: the documented ``DDPStrategy(ddp_comm_state=state, ddp_comm_hook=hook)`` with the state created
  before the Trainer — on CPU Lightning drops the hook;
* ``strategy-registered``: the same, with a DDPStrategy that registers the hook on CPU too (what Lightning does on
  CUDA), so the lazily bound state is shown to work wherever Lightning registers hooks.

Every rank writes ``OUT/rank{r}.pt``: its parameters, the hook's step and wire, the losses, the logged metrics.
Under ``ddp_spawn`` only the launching process runs past ``fit``: it writes ``rank0.pt`` with what it can see (the
error ``callback.state`` raises there, and ``trainer.callback_metrics``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import ModelCheckpoint
from pytorch_lightning.loggers import CSVLogger
from pytorch_lightning.strategies import DDPStrategy
from pytorch_lightning.strategies.ddp import _register_ddp_comm_hook
from torch.utils.data import DataLoader, TensorDataset

import tailq
from tailq.lightning import TailqCallback


def data() -> TensorDataset:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(512, 16, generator=g)
    w = torch.randn(16, 4, generator=g)
    y = (x @ w + 0.3 * torch.randn(512, 4, generator=g)).argmax(1)
    return TensorDataset(x, y)


class Net(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = torch.nn.Sequential(torch.nn.Linear(16, 256), torch.nn.ReLU(), torch.nn.Linear(256, 4))

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = torch.nn.functional.cross_entropy(self.net(x), y)
        self.log("train_loss", loss, on_step=True, on_epoch=False)
        return loss

    def configure_optimizers(self) -> Any:
        return torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9)

    def full_loss(self) -> float:
        x, y = data().tensors
        with torch.no_grad():
            return float(torch.nn.functional.cross_entropy(self.net(x), y))


class RegisteringDDP(DDPStrategy):
    """A DDPStrategy that registers its comm hook on CPU too (Lightning does so only on CUDA)."""

    def _register_ddp_hooks(self) -> None:
        _register_ddp_comm_hook(model=self.model, ddp_comm_state=self._ddp_comm_state,
                                ddp_comm_hook=self._ddp_comm_hook, ddp_comm_wrapper=self._ddp_comm_wrapper)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("mode", choices=["callback", "strategy", "strategy-registered"])
    ap.add_argument("out")
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--save")
    ap.add_argument("--resume")
    ap.add_argument("--hook", default="tnq")
    ap.add_argument("--opts", default="{}")
    ap.add_argument("--devices", type=int, default=2)
    ap.add_argument("--strategy", default="ddp")
    ap.add_argument("--ckpt-dir")
    a = ap.parse_args()
    torch.set_num_threads(1)
    model = Net()
    before = model.full_loss()
    callbacks: list[Any] = []
    state: Any = None
    if a.mode == "callback":
        opts: dict[str, Any] = {} if a.hook in tailq.hooks.BUILTINS else {
            "bits": 3, "error_feedback": True, "measure_every": 4, "min_bucket": 0, "route": "twophase"}
        cb = TailqCallback(a.hook, **{**opts, **json.loads(a.opts)})
        callbacks.append(cb)
        strategy: Any = a.strategy
        if a.ckpt_dir:
            callbacks.append(ModelCheckpoint(dirpath=a.ckpt_dir, every_n_epochs=1, save_top_k=1))
    else:
        # before the Trainer: no process group yet (route pinned: on loopback "auto" may rightly pick bf16)
        state, hook = tailq.ddp_hook("tnq", bits=3, min_bucket=0, route="twophase")
        cls = DDPStrategy if a.mode == "strategy" else RegisteringDDP
        strategy = cls(ddp_comm_state=state, ddp_comm_hook=hook)
    trainer = pl.Trainer(accelerator="cpu", devices=a.devices, strategy=strategy, max_epochs=a.epochs,
                         callbacks=callbacks, logger=CSVLogger(a.out, name="logs"),
                         enable_checkpointing=bool(a.ckpt_dir), enable_progress_bar=False,
                         enable_model_summary=False, num_sanity_val_steps=0, deterministic=True, log_every_n_steps=1)
    trainer.fit(model, DataLoader(data(), batch_size=32, shuffle=True), ckpt_path=a.resume)
    if a.save:
        trainer.save_checkpoint(a.save)  # on every rank: each writes its hook state file, rank 0 the checkpoint
    rank = trainer.global_rank
    if a.strategy == "ddp_spawn":  # the launching process: the hook ran in the workers
        try:
            _ = callbacks[0].state
            err = ""
        except RuntimeError as e:
            err = str(e)
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("tailq/")}
        os.makedirs(a.out, exist_ok=True)
        torch.save({"state_error": err, "metrics": metrics, "params": [p.detach().clone() for p in model.parameters()],
                    "before": before, "after": model.full_loss()}, os.path.join(a.out, "rank0.pt"))
        return
    if a.mode == "callback":
        state = callbacks[0].state
    if state is None:  # one process: no hook
        torch.save({"state": None, "global_step": trainer.global_step, "logged": sorted(trainer.logged_metrics)},
                   os.path.join(a.out, f"rank{rank}.pt"))
        return
    out = {"params": [p.detach().clone() for p in model.parameters()], "before": before, "after": model.full_loss(),
           "hook_step": state.step, "bits": state.metrics.wire.bits_per_coord(), "bound": state.bound,
           "global_step": trainer.global_step,
           "ef_keys": sorted(state.memory.rounding) if getattr(state, "memory", None) is not None else [],
           "logged": sorted(k for k in trainer.logged_metrics if k.startswith("tailq/")),
           "logged_bits": float(trainer.logged_metrics.get("tailq/bits_per_coord", float("nan")))}
    torch.save(out, os.path.join(a.out, f"rank{rank}.pt"))


if __name__ == "__main__":
    sys.exit(main())
