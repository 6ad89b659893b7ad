"""Nothing of tailq's is left for a background thread to finish once interpreter finalization begins.

Two aborts at exit ("terminate called without an active exception", SIGABRT after the script's last line) were
traced with core dumps of the README's snippets under load: a Gloo thread dropping the last reference to a
finished ``Work`` (its tensors' Python objects then need the GIL), and the hook's daemon worker thread still inside
``Future.set_result``. The fixes are checked here directly; the snippets themselves run in
``tests/integrations/test_readme_integrations.py``.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
import threading

import torch

from tailq.comm import worker as worker_mod
from tailq.comm.worker import OrderedWorker


def test_live_workers_are_joined_by_the_atexit_hook_after_their_queued_jobs() -> None:
    gate = threading.Event()
    done: list[int] = []
    workers = [OrderedWorker(name=f"t{i}") for i in range(2)]
    futs = []
    for i, w in enumerate(workers):
        futs.append(w.submit(lambda i=i: (gate.wait(5), done.append(i), torch.zeros(1))[2]))
    assert all(w._thread.is_alive() for w in workers)
    gate.set()
    worker_mod._close_live_workers()  # what atexit runs
    assert not any(w._thread.is_alive() for w in workers)
    assert sorted(done) == [0, 1] and all(f.done() for f in futs)


def test_comm_keeps_its_last_works_alive_so_the_backend_thread_never_frees_them() -> None:
    script = textwrap.dedent("""
        import os, torch, torch.distributed as dist
        from tailq.comm.wire import Comm, Tag, WireLog, _HELD_WORKS
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=os.environ["PORT"])
        dist.init_process_group("gloo", rank=0, world_size=1)
        comm = Comm(None, WireLog(), timeout_s=30)
        tag = Tag(0, 0, 8, "test")
        for i in range(_HELD_WORKS + 3):
            comm.all_to_all(torch.arange(8.0), tag, "codes")
            comm.all_gather(torch.arange(4.0), tag, "codes")
        works = list(comm._held)
        assert len(works) == _HELD_WORKS, len(works)
        assert all(type(w).__name__ == "Work" for w in works), [type(w) for w in works]
        assert len({id(w) for w in works}) == _HELD_WORKS
        print("held", len(works))
        dist.destroy_process_group()
    """)
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                          env={**__import__("os").environ, "PORT": str(port)})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "held 8" in proc.stdout
