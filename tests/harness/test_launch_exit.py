"""A rank that crashes in process teardown after its last collective (``rank{r}.done``) or after rank 0 wrote the
finished result costs nothing; a crash before either fails the run with that rank's output."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tailq.harness.config import RunConfig
from tailq.harness.launch import RunFailed, _wait, done_marker


def _procs(tmp: Path, rank0: str = "pass") -> list[subprocess.Popen[bytes]]:
    for r in range(2):
        (tmp / f"rank{r}.log").write_text("terminate called without an active exception\n")
    return [subprocess.Popen([sys.executable, "-c", rank0]),
            subprocess.Popen([sys.executable, "-c", "import os; os.abort()"])]  # SIGABRT, as Gloo's threads at exit


def test_a_crash_at_exit_after_the_result_is_written_keeps_the_result(tmp_path: Path) -> None:
    (tmp_path / "result.json").write_text("{}")
    notes = _wait(_procs(tmp_path), tmp_path, RunConfig(), None, timeout_s=60)
    assert len(notes) == 1 and "rank 1 exited with status -6 after its last collective" in notes[0]


def test_a_crash_at_exit_before_rank0_writes_the_result_waits_for_it(tmp_path: Path) -> None:
    """The race of the fresh-clone `make demo` failure: rank 1 finished every collective and died at exit while
    rank 0 was still evaluating; with its done marker the run waits for rank 0's result."""
    done_marker(tmp_path, 1).write_text("done\n")
    result = str(tmp_path / "result.json")
    slow_rank0 = f"import time, pathlib; time.sleep(1.5); pathlib.Path({result!r}).write_text('{{}}')"
    notes = _wait(_procs(tmp_path, slow_rank0), tmp_path, RunConfig(), None, timeout_s=60)
    assert (tmp_path / "result.json").is_file()
    assert len(notes) == 1 and "rank 1 exited with status -6" in notes[0]


def test_a_crash_before_the_result_fails_the_run_with_that_ranks_output(tmp_path: Path) -> None:
    with pytest.raises(RunFailed, match=r"rank 1 exited with status -6(.|\n)*terminate called"):
        _wait(_procs(tmp_path), tmp_path, RunConfig(), None, timeout_s=60)
