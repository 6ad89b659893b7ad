"""Named network namespaces on this host: running ``ip``, the host-wide lock, creating, listing and sweeping.

Namespaces carry the PID of the process that owns them (``tq-<pid>-<tag>-w<rank>``, ``tq-<pid>-<tag>-sw``). A
process killed by SIGKILL cannot clean up: :func:`sweep_stale` deletes every ``tq-<pid>-…`` namespace whose
process is gone.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence

__all__ = ["EmulationError", "sweep_stale"]


class EmulationError(RuntimeError):
    """Setting up, using or tearing down an emulated network failed."""


_IP = "ip"
_TC = "tc"
_NAME = re.compile(r"^tq-(\d+)-")


def _run(args: Sequence[str], *, stdin: str | None = None, check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run one iproute2 command; raise :class:`EmulationError` with its stderr when ``check`` and it fails."""
    try:
        proc = subprocess.run(list(args), input=stdin, capture_output=True, text=True, timeout=60, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise EmulationError(f"`{' '.join(args)}` could not run: {exc}") from exc
    if check and proc.returncode != 0:
        detail = (proc.stderr or proc.stdout).strip().replace("\n", "; ")
        batch = f" (batch: {stdin.strip().replace(chr(10), '; ')})" if stdin else ""
        raise EmulationError(f"`{' '.join(args)}` failed with exit code {proc.returncode}: {detail}{batch}")
    return proc


# Creating and deleting named namespaces from several processes at once is not safe in every iproute2: the first
# `ip netns add` makes /run/netns a shared bind mount, and concurrent first calls can race (stacked mounts, "mount
# --make-shared failed"). All of tailq's namespace changes on a host are serialised through one advisory lock
# (released by the kernel if the holder dies), and `ip netns add` is retried on failure.
_host_lock_depth = 0
_host_lock_mutex = threading.RLock()
_host_lock_fd: int | None = None
_host_lock_waiting = False


def _lock_path() -> str:
    base = "/run/lock" if os.path.isdir("/run/lock") and os.access("/run/lock", os.W_OK) else tempfile.gettempdir()
    return os.path.join(base, "tailq-netns.lock")


@contextlib.contextmanager
def _host_lock() -> Iterator[None]:
    """Hold the host-wide namespace lock (re-entrant within a process, e.g. a signal handler during set-up)."""
    global _host_lock_depth, _host_lock_fd, _host_lock_waiting
    with _host_lock_mutex:
        # _host_lock_waiting: a signal handler interrupted this thread while it waited for the lock; a second flock
        # on a new descriptor would wait for ourselves, so the handler's teardown goes ahead unserialised
        if _host_lock_depth == 0 and not _host_lock_waiting:
            fd = -1
            try:
                fd = os.open(_lock_path(), os.O_RDWR | os.O_CREAT, 0o600)
                _host_lock_waiting = True
                fcntl.flock(fd, fcntl.LOCK_EX)
                _host_lock_fd, fd = fd, -1
            except OSError:
                _host_lock_fd = None  # no lock file possible: carry on unserialised (the retries still apply)
            finally:
                _host_lock_waiting = False
                if fd >= 0:
                    os.close(fd)
        _host_lock_depth += 1
        try:
            yield
        finally:
            _host_lock_depth -= 1
            if _host_lock_depth == 0 and _host_lock_fd is not None:
                os.close(_host_lock_fd)  # closing drops the flock
                _host_lock_fd = None


def _add_netns(name: str, *, attempts: int = 3) -> subprocess.CompletedProcess[str]:
    """``ip netns add NAME``, retried (after removing any half-made leftover) if it fails."""
    proc = _run([_IP, "netns", "add", name], check=False)
    for i in range(1, attempts):
        if proc.returncode == 0:
            break
        _run([_IP, "netns", "delete", name], check=False)
        time.sleep(0.25 * i)
        proc = _run([_IP, "netns", "add", name], check=False)
    return proc


def _list_netns() -> list[str]:
    """Names of all named network namespaces (``ip netns list``)."""
    proc = _run([_IP, "netns", "list"], check=False)
    if proc.returncode != 0:
        return []
    return [line.split()[0] for line in proc.stdout.splitlines() if line.strip()]


def _delete_netns(name: str) -> bool:
    """Delete a named namespace; True when it is gone afterwards."""
    proc = _run([_IP, "netns", "delete", name], check=False)
    return proc.returncode == 0 or name not in _list_netns()


def _pid_alive(pid: int) -> bool:
    """Whether a process exists and is not a zombie."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open(f"/proc/{pid}/stat") as fh:
            state = fh.read().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return True
    return state not in ("Z", "X")


def sweep_stale() -> list[str]:
    """Delete every ``tq-<pid>-…`` namespace whose owning process is no longer alive; return their names.

    Covers owners that died by SIGKILL (or anything else that skipped cleanup). Namespaces of live processes,
    this one included, are left alone.
    """
    me = os.getpid()
    removed: list[str] = []
    with _host_lock():
        for name in _list_netns():
            match = _NAME.match(name)
            if match is None:
                continue
            pid = int(match.group(1))
            if pid == me or _pid_alive(pid):
                continue
            if _delete_netns(name):
                removed.append(name)
    return removed
