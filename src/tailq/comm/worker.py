"""One ordered communication thread per hook state: the fix for collective-order mismatches.

DDP calls a communication hook once per bucket, in the same bucket order on every rank. A hook that launches
further collectives from ``Future.then`` callbacks (PyTorch's ``powerSGD_hook`` does) lets those callbacks fire
in whatever order the previous collectives complete, which can differ between ranks: on Gloo the ranks then
exchange mismatched messages and abort (pytorch/pytorch#58467). Here every bucket's job runs on one thread,
strictly one after another, and the next job starts only when the previous bucket's result is complete, so
every rank issues the same collectives in the same order. Backward keeps computing meanwhile: the worker is not
the autograd thread. (DDP's own collectives come from the autograd thread, so a hook's collectives go on a group
of their own: :func:`tailq.comm.wire.own_group`.)

:class:`Handoff` turns the worker's futures into the futures a hook returns to DDP, so that a failure reaches the
user as the hook's own exception.
"""

from __future__ import annotations

import atexit
import queue
import threading
import weakref
from collections.abc import Callable
from typing import Any

import torch
from torch.autograd import Variable

__all__ = ["Handoff", "OrderedWorker"]

_STOP = object()
_LIVE: weakref.WeakSet[OrderedWorker] = weakref.WeakSet()


@atexit.register
def _close_live_workers() -> None:
    """Join every worker before interpreter finalization begins (atexit runs before it).

    A daemon thread still inside ``Future.set_result`` when finalization starts (it releases the GIL to run the
    future's callbacks) is ended by CPython with ``pthread_exit``, whose unwind meets a ``noexcept`` C++ frame:
    ``std::terminate``. Measured: 3 in 10 runs of the README's Accelerate snippet without its teardown lines,
    under load, aborted so; the stack ended in ``PythonFutureWrapper::markCompleted → take_gil``.
    """
    for worker in list(_LIVE):
        worker.close()


class OrderedWorker:
    """Runs submitted jobs one at a time, in submission order, on a daemon thread.

    A job returns a tensor or a ``torch.futures.Future``; the worker waits for the future before starting the
    next job. After a job fails, every later job fails with the same error: the collective sequence of this
    rank is broken and continuing could pair mismatched collectives across ranks.
    """

    def __init__(self, name: str = "tailq-comm") -> None:
        self._q: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._error: BaseException | None = None
        self._lock = threading.Lock()
        self._pending = 0  # jobs submitted and not yet finished (their collectives not all issued and complete)
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()
        _LIVE.add(self)

    def submit(self, fn: Callable[..., Any], *args: Any) -> torch.futures.Future[torch.Tensor]:
        fut: torch.futures.Future[torch.Tensor] = torch.futures.Future()
        with self._lock:
            self._pending += 1
        self._q.put((fn, args, fut))
        return fut

    def idle(self) -> bool:
        """No job queued or running, and none failed: every collective submitted so far was issued and completed,
        so a caller on the submitting thread may issue one itself without changing this rank's collective order
        (nothing else submits while it does; a job that submits another is not idle)."""
        with self._lock:
            return self._pending == 0 and self._error is None

    def fail(self, err: BaseException) -> None:
        """Record a failure that happened outside the worker (a collective the submitting thread issued): every
        later job fails with it."""
        with self._lock:
            if self._error is None:
                self._error = err

    def _run(self) -> None:
        while True:
            item = self._q.get()
            if item is _STOP:
                return
            fn, args, fut = item
            if self._error is not None:
                self._done()
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
            except BaseException as err:  # noqa: BLE001 - handed to DDP through the future
                self.fail(err)
                self._done()
                fut.set_exception(err)
                continue
            self._done()
            fut.set_result(out)

    def _done(self) -> None:
        with self._lock:
            self._pending -= 1

    def on_worker(self) -> bool:
        """Whether the caller runs on this worker's thread (inside a job)."""
        return threading.current_thread() is self._thread

    @property
    def failed(self) -> BaseException | None:
        return self._error

    def close(self, timeout: float = 5.0) -> None:
        if self._thread.is_alive():
            self._q.put(_STOP)
            self._thread.join(timeout)


class Handoff:
    """What a hook returns to DDP for one bucket: a future of the averaged tensor, and the error raised cleanly.

    A hook's future that fails cannot hand DDP its exception: DDP's reducer reads the value of a Python future set
    with ``set_exception`` as a tensor and reports ``Unable to cast <message> to Tensor``, and a ``then`` callback
    that raises becomes ``Got the following error when running the callback: …`` with a traceback inside the
    message. So inside a backward the first bucket of each backward queues an autograd final callback (it runs
    before DDP's own, which DDP queues at the last bucket) that waits for this backward's buckets in order and
    re-raises the first failure itself: ``loss.backward()`` raises the hook's exception, type and message
    unchanged. The future DDP gets completes with the bucket's tensor either way (with ``static_graph=True`` DDP
    reads the first iteration's buckets inside a callback of its own, before ours runs). Outside a backward (a
    hook called directly) the returned future carries the exception, which ``wait()`` raises.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        # autograd graph task -> its buckets' (future, limit), in hook order
        self._pending: dict[int, list[tuple[Any, Any]]] = {}

    def __call__(self, src: Any, bucket: Any, on_done: Callable[[], None] | None = None,
                 limit: tuple[float, Callable[[], BaseException]] | None = None
                 ) -> torch.futures.Future[torch.Tensor]:
        """The future for DDP of the bucket whose result ``src`` (a future) will hold; ``on_done`` runs when
        ``src`` completes (on the thread that completes it). ``limit``: (seconds, error) — inside a backward, the
        final callback waits at most that long for ``src`` and then raises the error (for a collective issued
        outside the worker, whose waits have the hook's timeout)."""
        in_backward = self._watch(src, limit)
        out: torch.futures.Future[torch.Tensor] = torch.futures.Future()

        def finish(f: Any) -> None:
            try:
                if on_done is not None:
                    on_done()
                value = f.value()
            except BaseException as err:  # noqa: BLE001 - re-raised by the final callback, or by out.wait()
                if in_backward:
                    out.set_result(bucket.buffer())
                else:
                    out.set_exception(err if isinstance(err, Exception) else RuntimeError(repr(err)))  # type: ignore[arg-type]
                return
            out.set_result(value[0] if isinstance(value, list) else value)

        src.add_done_callback(finish)
        return out

    def _watch(self, src: Any, limit: tuple[float, Callable[[], BaseException]] | None = None) -> bool:
        task = int(torch._C._current_graph_task_id())
        if task < 0:
            return False
        with self._lock:
            first = task not in self._pending
            self._pending.setdefault(task, []).append((src, limit))
        if first:
            Variable._execution_engine.queue_callback(lambda: self._raise_first(task))
        return True

    def _raise_first(self, task: int) -> None:
        """The autograd final callback: wait for the backward's buckets in order; raise the first failure."""
        with self._lock:
            futs = self._pending.pop(task, [])
        for f, limit in futs:
            if limit is not None and not f.done():
                ready = threading.Event()
                f.add_done_callback(lambda _f, ready=ready: ready.set())
                if not ready.wait(limit[0]):
                    raise limit[1]()
            f.wait()  # a Python future set with an exception raises that exception itself
