"""Running a launcher (torchrun, Lightning's own) in the integration tests: on a timeout every process it started is
killed, not only the launcher (torchrun starts its workers in sessions of their own)."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
from pathlib import Path


def tree(pid: int) -> list[int]:
    """``pid`` and every process below it (from /proc)."""
    children: dict[int, list[int]] = {}
    for d in os.listdir("/proc"):
        with contextlib.suppress(OSError, ValueError, IndexError):
            ppid = int(Path(f"/proc/{d}/stat").read_text().rsplit(")", 1)[1].split()[1])
            children.setdefault(ppid, []).append(int(d))
    out, todo = [], [pid]
    while todo:
        out.append(todo.pop())
        todo.extend(children.get(out[-1], []))
    return out


def run_tree(cmd: list[str], cwd: Path, timeout: int, what: str) -> subprocess.CompletedProcess[str]:
    """``cmd``'s result; past ``timeout`` seconds its whole process tree is killed and the test fails naming
    ``what``, with the output's tail."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=cwd,
                            start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        for pid in tree(proc.pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        out, err = proc.communicate()
        raise AssertionError(f"{what}: still running after {timeout} s\n{out[-2000:]}{err[-3000:]}") from None
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)
