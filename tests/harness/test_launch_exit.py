"""A rank that crashes in process teardown after rank 0 wrote the finished result costs nothing; before, it fails."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tailq.harness.config import RunConfig
from tailq.harness.launch import RunFailed, _wait


def _procs(tmp: Path) -> list[subprocess.Popen[bytes]]:
    for r in range(2):
        (tmp / f"rank{r}.log").write_text("terminate called without an active exception\n")
    return [subprocess.Popen([sys.executable, "-c", "pass"]),
            subprocess.Popen([sys.executable, "-c", "import os; os.abort()"])]  # SIGABRT, as Gloo's threads at exit


def test_a_crash_at_exit_after_the_result_is_written_keeps_the_result(tmp_path: Path) -> None:
    (tmp_path / "result.json").write_text("{}")
    notes = _wait(_procs(tmp_path), tmp_path, RunConfig(), None, timeout_s=60)
    assert len(notes) == 1 and "rank 1 exited with status -6 after rank 0 had written" in notes[0]


def test_a_crash_before_the_result_fails_the_run_with_that_ranks_output(tmp_path: Path) -> None:
    with pytest.raises(RunFailed, match=r"rank 1 exited with status -6(.|\n)*terminate called"):
        _wait(_procs(tmp_path), tmp_path, RunConfig(), None, timeout_s=60)
