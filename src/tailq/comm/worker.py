"""One ordered communication thread per hook state: the fix for collective-order mismatches.

DDP calls a communication hook once per bucket, in the same bucket order on every rank. A hook that launches
further collectives from ``Future.then`` callbacks (PyTorch's ``powerSGD_hook`` does) lets those callbacks fire
in whatever order the previous collectives complete, which can differ between ranks: on Gloo the ranks then
exchange mismatched messages and abort (pytorch/pytorch#58467). Here every bucket's job runs on one thread,
strictly one after another, and the next job starts only when the previous bucket's result is complete, so
every rank issues the same collectives in the same order. Backward keeps computing meanwhile: the worker is not
the autograd thread.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from typing import Any

import torch

__all__ = ["OrderedWorker"]

_STOP = object()


class OrderedWorker:
    """Runs submitted jobs one at a time, in submission order, on a daemon thread.

    A job returns a tensor or a ``torch.futures.Future``; the worker waits for the future before starting the
    next job. After a job fails, every later job fails with the same error: the collective sequence of this
    rank is broken and continuing could pair mismatched collectives across ranks.
    """

    def __init__(self, name: str = "tailq-comm") -> None:
        self._q: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def submit(self, fn: Callable[..., Any], *args: Any) -> torch.futures.Future[torch.Tensor]:
        fut: torch.futures.Future[torch.Tensor] = torch.futures.Future()
        self._q.put((fn, args, fut))
        return fut

    def _run(self) -> None:
        while True:
            item = self._q.get()
            if item is _STOP:
                return
            fn, args, fut = item
            if self._error is not None:
                fut.set_exception(
                    RuntimeError(f"tailq: an earlier bucket failed on this rank: {self._error}")
                )
                continue
            try:
                out = fn(*args)
                if isinstance(out, torch._C.Future):  # c10d futures are the C base class
                    out = out.wait()
                    if isinstance(out, list):  # futures of c10d Work resolve to a list of tensors
                        out = out[0]
                fut.set_result(out)
            except BaseException as err:  # noqa: BLE001 - handed to DDP through the future
                self._error = err
                fut.set_exception(err)

    @property
    def failed(self) -> BaseException | None:
        return self._error

    def close(self, timeout: float = 5.0) -> None:
        if self._thread.is_alive():
            self._q.put(_STOP)
            self._thread.join(timeout)
