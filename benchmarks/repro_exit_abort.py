"""Reproduce the exit-time abort of Gloo workers with pending Python future callbacks (README "What happens when…").

    python benchmarks/repro_exit_abort.py MODE    # MODE: plain | held | released | osexit

Starts two Gloo ranks on loopback. Each attaches a Python ``.then`` callback to an all-reduce's future; the callback
runs on one of Gloo's worker threads. While it runs, the main thread exits:

* ``plain``: through interpreter finalization: rank(s) abort with "terminate called without an active exception"
  (SIGABRT): the Gloo thread needs the GIL after finalization began, CPython ``pthread_exit``s it, and the forced
  unwind meets a ``noexcept`` frame of the C++ future code;
* ``held``: ``destroy_process_group()`` first, while another reference holds the group (as DDP's reducer does):
  aborts too, in most runs (the threads outlive the destroy);
* ``released``: the reference dropped, then ``destroy_process_group()``: the group's destructor joins its threads
  (the callback finishes first): exit 0;
* ``osexit``: ``os._exit`` without finalization (what tailq's harness workers do): exit 0.

Prints each rank's exit status. Measured on torch 2.13 CPU: plain 2/2 ranks -6; held -6 in 1 of 2 tries;
released and osexit 0.
"""

from __future__ import annotations

import datetime
import os
import subprocess
import sys
import time


def rank_main(rank: int, mode: str, port: str) -> None:
    import torch
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
    dist.init_process_group("gloo", rank=rank, world_size=2, timeout=datetime.timedelta(seconds=30))
    fut = dist.all_reduce(torch.ones(1 << 16), async_op=True).get_future()

    def callback(f: torch.futures.Future) -> object:
        time.sleep(0.5)  # on a Gloo thread, the GIL released while sleeping
        return f.value()

    pending = fut.then(callback)  # noqa: F841 - kept alive on purpose
    time.sleep(0.1)  # the callback has started
    if mode in ("held", "released"):
        group = dist.distributed_c10d._get_default_group()
        if mode == "released":
            del group
        dist.destroy_process_group()
    if mode == "osexit":
        sys.stdout.flush()
        os._exit(0)
    sys.exit(0)


def main() -> None:
    mode = sys.argv[1] if len(sys.argv) > 1 else "plain"
    if mode not in ("plain", "held", "released", "osexit"):
        raise SystemExit(f"MODE must be plain, held, released or osexit; got {mode!r}")
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = str(s.getsockname()[1])
    procs = [subprocess.Popen([sys.executable, __file__, "--rank", str(r), mode, port], stderr=subprocess.PIPE,
                              text=True) for r in range(2)]
    for r, p in enumerate(procs):
        _, err = p.communicate(timeout=120)
        last = err.strip().splitlines()[-1] if err.strip() else ""
        print(f"{mode}: rank {r} exit status {p.returncode} {last}")


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--rank":
        rank_main(int(sys.argv[2]), sys.argv[3], sys.argv[4])
    else:
        main()
