"""Tearing every live emulated network down at interpreter exit and on SIGINT/SIGTERM (chained handlers)."""

from __future__ import annotations

import atexit
import os
import signal
import threading
from types import FrameType
from typing import Any, Protocol

__all__ = ["register", "unregister"]


class _Teardown(Protocol):
    def teardown(self) -> None:
        ...


_live: list[_Teardown] = []
_registry_lock = threading.RLock()
_prev_handlers: dict[int, Any] = {}
_atexit_registered = False
_HANDLED_SIGNALS = (signal.SIGINT, signal.SIGTERM)


def _in_main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


def _teardown_all() -> None:
    """Tear down every live network owned by this process (atexit hook and signal path)."""
    with _registry_lock:
        nets = list(_live)
    for net in nets:
        net.teardown()


def _on_signal(signum: int, frame: FrameType | None) -> None:
    """SIGINT/SIGTERM: tear everything down, restore the previous handler, then hand the signal to it."""
    prev = _prev_handlers.get(signum, signal.SIG_DFL)
    _teardown_all()  # restores the previous handlers once no network is left
    if callable(prev):
        prev(signum, frame)
    elif prev == signal.SIG_DFL:
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)


def _install_handlers() -> None:
    global _atexit_registered
    if not _atexit_registered:
        atexit.register(_teardown_all)
        _atexit_registered = True
    if not _in_main_thread():
        return  # signal handlers can only be set from the main thread; __exit__ and atexit still apply
    for sig in _HANDLED_SIGNALS:
        if sig in _prev_handlers:
            continue
        prev = signal.getsignal(sig)
        if prev is signal.SIG_IGN or prev is None:
            continue  # an ignored signal stays ignored; a handler set outside Python cannot be chained
        signal.signal(sig, _on_signal)
        _prev_handlers[sig] = prev


def _restore_handlers() -> None:
    if not _in_main_thread():
        return
    for sig, prev in list(_prev_handlers.items()):
        if signal.getsignal(sig) is _on_signal:
            signal.signal(sig, prev)
        del _prev_handlers[sig]


def register(net: _Teardown) -> None:
    """Protect ``net``: it is torn down at exit and on SIGINT/SIGTERM until :func:`unregister`."""
    with _registry_lock:
        _live.append(net)
        _install_handlers()


def unregister(net: _Teardown) -> None:
    """``net`` is closed; the previous signal handlers come back when no network is left."""
    with _registry_lock:
        if net in _live:
            _live.remove(net)
        if not _live:
            _restore_handlers()

