"""Hugging Face Accelerate 1.15 with the real library: examples/accelerate_train.py on 2 CPU processes.

Launched once through ``accelerate launch --multi_gpu --num_processes 2`` (on a CPU machine that is
``torch.distributed.run`` with Accelerate's environment; ``accelerate launch --cpu`` would start one process) and
otherwise through ``torchrun``. Checked: Accelerate set up multi-CPU DDP and the tailq hook ran on every step
(step counter, fewer bits per coordinate than bf16's 16); the loss fell; both launchers give the same model; a
run saved with ``accelerator.save_state`` after 20 steps and resumed with ``load_state`` + ``hook.prime`` ends
with exactly the parameters of the uninterrupted 40-step run (error feedback on, dropout in the model).
"""

from __future__ import annotations

import logging
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.slow

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "accelerate_train.py"
BIN = Path(sys.executable).parent


def _run(tmp: Path, launcher: list[str], name: str, *args: str) -> list[dict]:
    out = tmp / name
    proc = subprocess.run([*launcher, str(EXAMPLE), "--out", str(out), *args], capture_output=True, text=True,
                          timeout=300, cwd=tmp)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return [torch.load(f"{out}.{r}", weights_only=True) for r in (0, 1)]


def _same(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


def test_accelerate_trains_with_the_hook_and_resumes_exactly(tmp_path: Path) -> None:
    torchrun = [str(BIN / "torchrun"), "--nproc_per_node", "2"]
    accel = [str(BIN / "accelerate"), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
             "--mixed_precision", "no", "--dynamo_backend", "no"]
    full = _run(tmp_path, accel, "full", "--steps", "40")
    half = _run(tmp_path, torchrun, "half", "--steps", "20", "--save-state", str(tmp_path / "ck"))
    resumed = _run(tmp_path, torchrun, "resumed", "--first-step", "20", "--steps", "40", "--load-state",
                   str(tmp_path / "ck"))
    for r in full + half + resumed:
        assert r["distributed_type"] == "DistributedType.MULTI_CPU" and r["world"] == 2
        assert 3.0 < r["bits"] < 16.0
    assert full[0]["hook_step"] == 40 and half[0]["hook_step"] == 20 and resumed[0]["hook_step"] == 40
    assert full[0]["loss"] < 0.5 * full[0]["before"]
    for run in (full, half, resumed):
        assert _same(run[0]["params"], run[1]["params"])
    assert _same(resumed[0]["params"], full[0]["params"])  # exact resume (the launchers agree too)


def test_one_process_gets_a_no_op_with_a_warning(caplog: pytest.LogCaptureFixture) -> None:
    from accelerate import Accelerator

    from tailq.integrations.accelerate import register_hook

    acc = Accelerator(cpu=True)
    with caplog.at_level(logging.WARNING, logger="tailq"):
        hook = register_hook(acc, torch.nn.Linear(2, 2), "tnq", bits=3)
    assert hook.state is None and "nothing to average" in caplog.text
    hook.prime(lambda: None)  # harmless
    assert hook.state_dict() == {}
    with pytest.raises(TypeError, match="unknown option"):
        register_hook(acc, torch.nn.Linear(2, 2), "tnq", bitz=3)
