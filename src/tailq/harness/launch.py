"""Launch one training run: N worker processes on this machine, over loopback or an emulated network.

Each rank is ``python -m tailq.harness.worker --config RUN.json`` with RANK / WORLD_SIZE / MASTER_ADDR /
MASTER_PORT set, and the node structure as ``torchrun --nnodes K --nproc-per-node L`` would set it (LOCAL_RANK,
LOCAL_WORLD_SIZE, GROUP_RANK, GROUP_WORLD_SIZE; ``RunConfig.nodes``, one worker per node by default, ranks numbered
node by node), on loopback too. With an emulated network each node is one network namespace (``ip netns exec``),
its L ranks share its shaped link, and Gloo is pinned to that namespace's interface (``GLOO_SOCKET_IFNAME``). The
result's ``network`` gains ``nodes``, ``node_size`` and, emulated, ``tx_bytes_per_node`` (each node's interface
during the run; ``tx_bytes_per_rank`` too where every node is one rank). The network is
torn down when the run ends, fails or is interrupted. If any rank fails, the others are stopped and the error
names the rank and shows the end of its output.

A launcher stopped by SIGTERM or SIGHUP (what Slurm and Kubernetes send) stops its workers and removes its
network before it exits (:class:`Stopped`); the workers also die with the launcher if it is killed outright
(``PR_SET_PDEATHSIG``). A rank marks the end of its last collective with ``rank{r}.done``: a rank that fails
after that (a crash in process teardown) costs nothing, the run's result stands with a note.

With ``--net-schedule`` on an emulated network the launcher changes the links' rate when rank 0 asks at a scheduled
step (:mod:`tailq.harness.net_schedule`); the result's ``network.schedule_applied`` lists the changes, with the
rates read back from tc.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from types import FrameType
from typing import Any

from tailq.comm.network import Network

from .config import RunConfig
from .net_schedule import ScheduleApplier
from .netem import EmulatedNetwork, EmulationError, node_env

__all__ = ["launch_run", "reap", "RunFailed", "Stopped", "stop_on_signals", "done_marker"]

STOP_SIGNALS = (signal.SIGTERM, signal.SIGHUP)


class RunFailed(RuntimeError):
    pass


class Stopped(KeyboardInterrupt):
    """The launcher received SIGTERM or SIGHUP: the run's workers are stopped and its network removed."""

    def __init__(self, signum: int) -> None:
        self.signum = signum
        super().__init__(f"stopped by {signal.Signals(signum).name}")


class _held:  # noqa: N801 - used as ``with _held():``
    """Inside, in the main thread, a stop signal (SIGTERM, SIGHUP; SIGINT while :func:`stop_on_signals` holds it)
    is held and raised when the outermost ``with _held()`` ends. Every call into :mod:`subprocess` on the workers
    (start, poll, kill, wait) is inside: raised at an arbitrary point of ``Popen.poll()`` — between its
    ``_waitpid_lock.acquire(False)`` and the ``try`` that releases it — the exception left that lock held, and
    :func:`reap`'s ``wait()`` then blocked on it forever (a launcher that never exited after SIGHUP)."""

    depth = 0
    pending: int | None = None

    def __enter__(self) -> None:
        self.counted = threading.current_thread() is threading.main_thread()  # signal handlers run only there
        if self.counted:
            _held.depth += 1

    def __exit__(self, *exc: object) -> None:
        if not self.counted:
            return
        _held.depth -= 1
        if _held.depth == 0 and _held.pending is not None:
            signum, _held.pending = _held.pending, None
            raise KeyboardInterrupt if signum == signal.SIGINT else Stopped(signum)


def _raise_stopped(signum: int, frame: FrameType | None) -> None:
    if _held.depth:
        _held.pending = signum  # raised when the subprocess call under way has returned
        return
    raise KeyboardInterrupt if signum == signal.SIGINT else Stopped(signum)


@contextlib.contextmanager
def stop_on_signals() -> Iterator[None]:
    """SIGTERM and SIGHUP raise :class:`Stopped` in the main thread while inside (so every ``finally`` runs:
    workers reaped, networks removed), SIGINT ``KeyboardInterrupt`` as it does anyway; a signal that arrives while
    the launcher is inside a call into :mod:`subprocess` on its workers is raised when that call returns
    (:class:`_held`). The previous handlers come back after. A no-op off the main thread. An ignored signal stays
    ignored (``nohup``: a launcher started with SIGHUP ignored is not stopped by it)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    prev = {sig: signal.getsignal(sig) for sig in (*STOP_SIGNALS, signal.SIGINT)}
    for sig, old in prev.items():
        if sig == signal.SIGINT and old is not signal.default_int_handler:
            continue  # SIGINT is held only where it would raise KeyboardInterrupt anyway
        if old is not signal.SIG_IGN and old is not _raise_stopped:
            signal.signal(sig, _raise_stopped)
    _held.pending = None
    try:
        yield
    finally:
        for sig, old in prev.items():
            if old is not None:
                signal.signal(sig, old)
        _held.pending = None


def done_marker(run_dir: Path, rank: int) -> Path:
    """The file a rank writes once its last collective of the run has completed."""
    return run_dir / f"rank{rank}.done"


def _die_with_parent() -> None:
    """Worker pre-exec: SIGKILL when the launcher's thread dies (``ip netns exec`` execs, keeping it)."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG = 1
    except OSError:
        pass


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def _network(net: Network, workers: int, node_size: int = 1) -> Iterator[EmulatedNetwork | None]:
    """The emulated network of a run (``EmulationError`` when it cannot be emulated here), or nothing."""
    if net.kind != "emulated":
        yield None
        return
    with EmulatedNetwork(workers, net, node_size=node_size) as emulated:
        yield emulated


def reap(procs: list[subprocess.Popen[bytes]], logs: list[Any]) -> None:
    """Kill the workers still running and close their logs (after a run, or when it failed). A stop signal that
    arrives meanwhile is raised once they are reaped (:class:`_held`)."""
    with _held():
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
        for log in logs:
            log.close()


def launch_run(cfg: RunConfig, *, progress: Any = None, timeout_s: float = 3600.0) -> dict[str, Any]:
    """Run ``cfg`` to completion; returns rank 0's result (also in ``cfg.run_dir/result.json``)."""
    cfg.validate()
    run_dir = Path(cfg.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "result.json").unlink(missing_ok=True)
    (run_dir / "progress.json").unlink(missing_ok=True)
    for rank in range(cfg.workers):
        done_marker(run_dir, rank).unlink(missing_ok=True)
    config_path = run_dir / "config.json"
    cfg.save(config_path)
    with stop_on_signals(), _network(cfg.net, cfg.workers, cfg.node_size) as net:
        tx0 = net.tx_bytes() if net is not None else None
        # --net-schedule on an emulated network: this process changes the links when rank 0 asks (net_schedule)
        applier = ScheduleApplier(run_dir, cfg.net_schedule, net) if net is not None and cfg.net_schedule else None
        procs: list[subprocess.Popen[bytes]] = []
        logs: list[Any] = []
        port = 29500 if net is not None else _free_port()
        try:  # the workers started so far are reaped however the start or the run ends
            for rank in range(cfg.workers):
                env = {**os.environ, **node_env(rank, cfg.workers, cfg.node_size),
                       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "OMP_NUM_THREADS": str(cfg.threads),
                       "PYTHONUNBUFFERED": "1"}
                prefix: list[str] = []
                if net is not None:
                    env.update(net.env(rank))
                    prefix = net.command_prefix(rank)
                log = open(run_dir / f"rank{rank}.log", "w")  # noqa: SIM115 - closed by reap
                logs.append(log)
                cmd = [*prefix, sys.executable, "-m", "tailq.harness.worker", "--config", str(config_path)]
                with _held():  # a worker started is in procs before a stop signal is raised, so it is reaped
                    procs.append(subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT,
                                                  preexec_fn=_die_with_parent if sys.platform == "linux" else None))
            exit_notes = _wait(procs, run_dir, cfg, progress, timeout_s, applier)
        finally:
            reap(procs, logs)
        tx = [b - a for a, b in zip(tx0, net.tx_bytes(), strict=True)] if net is not None and tx0 is not None else None
    result_path = run_dir / "result.json"
    if not result_path.is_file():
        raise RunFailed(f"run {cfg.name}: rank 0 finished without writing {result_path}")
    result: dict[str, Any] = json.loads(result_path.read_text())
    result["network"]["nodes"], result["network"]["node_size"] = cfg.n_nodes, cfg.node_size
    if tx is not None:
        result["network"]["tx_bytes_per_node"] = tx
        if cfg.node_size == 1:  # a node is a rank: its interface is the rank's own
            result["network"]["tx_bytes_per_rank"] = tx
    if applier is not None:
        result["network"]["schedule_applied"] = applier.record
    if exit_notes:
        result["exit_notes"] = exit_notes
    result_path.write_text(json.dumps(result, indent=1))
    return result


def _wait(procs: list[subprocess.Popen[bytes]], run_dir: Path, cfg: RunConfig, progress: Any,
          timeout_s: float, applier: ScheduleApplier | None = None) -> list[str]:
    """Wait for every rank; returns notes on ranks that failed only after their last collective (``rank{r}.done``)
    or after rank 0 had written the finished result: a crash in process teardown (Gloo's threads at exit) costs
    nothing, every collective had completed. ``applier``: changes the emulated links when rank 0 asks
    (``--net-schedule``; polled every 50 ms)."""
    deadline = time.monotonic() + timeout_s
    last_step = 0
    notes: list[str] = []
    while True:
        if applier is not None:
            try:
                applier.poll()
            except (EmulationError, ValueError) as err:
                raise RunFailed(f"run {cfg.name}: --net-schedule: could not change the network's rate: {err}") from err
        with _held():  # a stop signal is raised after the polls, never inside one (see _held)
            codes = [p.poll() for p in procs]
        failed = [(r, c) for r, c in enumerate(codes) if c not in (None, 0)]
        written = (run_dir / "result.json").is_file()
        late = [(r, c) for r, c in failed if written or done_marker(run_dir, r).is_file()]
        for rank, code in late:
            note = (f"rank {rank} exited with status {code} after its last collective of the run (a crash at "
                    "process exit); the result stands")
            if note not in notes:
                notes.append(note)
                deadline = min(deadline, time.monotonic() + 120)  # the others are finishing too
        failed = [f for f in failed if f not in late]
        if failed:
            # the rank that failed first is the cause; peers that lost it fail moments later (status 1, a Python
            # error about the closed connection): among ranks seen failing in the same poll, a crash or an exit
            # status other than 1 is named first
            rank, code = min(failed, key=lambda rc: (rc[1] == 1, rc[0]))
            time.sleep(0.5)  # let the other ranks notice and print their side
            tail = (run_dir / f"rank{rank}.log").read_text(errors="replace")[-4000:]
            raise RunFailed(f"run {cfg.name}: rank {rank} exited with status {code}. Its output ends with:\n{tail}")
        if all(c is not None for c in codes):
            if not written and not (run_dir / "result.json").is_file():
                return notes  # the caller reports the missing result
            if progress is not None:
                progress(cfg.steps, cfg.steps, None)
            return notes
        if time.monotonic() > deadline:
            if notes and (run_dir / "result.json").is_file():  # ranks still tearing down are killed by the caller
                return [*notes, "ranks still running 120 s after the others had finished were killed"]
            raise RunFailed(f"run {cfg.name}: did not finish within {timeout_s:.0f} s" if not notes else
                            f"run {cfg.name}: {'; '.join(notes)}, but rank 0 did not write its result within 120 s")
        if progress is not None:
            try:
                info = json.loads((run_dir / "progress.json").read_text())
                if info["step"] != last_step:
                    last_step = info["step"]
                    progress(info["step"], info["total"], info)
            except (FileNotFoundError, json.JSONDecodeError, KeyError):
                pass
        time.sleep(0.2 if applier is None else 0.05)
