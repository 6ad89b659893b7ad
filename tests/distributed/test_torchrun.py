"""The README's example, launched by torchrun (real Gloo, 2 and 3 ranks)."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "ddp_train.py"


@pytest.mark.slow
@pytest.mark.parametrize("hook, nproc, route", [("tnq", 3, "twophase"), ("tnq", 2, "auto"), ("powersgd", 2, None),
                                               ("bf16", 2, None)])
def test_example_under_torchrun(hook: str, nproc: int, route: str | None) -> None:
    """The route is pinned where the test needs compression: on loopback, route="auto" may rightly measure bf16
    cheaper (and under load it may decide either way); what auto promises is asserted instead: it trains, and
    never hands more than bf16's 16 bits per coordinate."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           str(EXAMPLE), "--hook", hook, "--steps", "150", *(["--route", route] if route else [])]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    m = re.search(r"final loss ([0-9.]+), accuracy ([0-9.]+), ([0-9.]+) bits", r.stdout)
    assert m, r.stdout
    loss, acc, bits = map(float, m.groups())
    assert acc > 0.8  # chance is 0.1; fp32 reaches ~0.95 on this task in 150 steps
    # auto: at most bf16's 16 bits plus the closed loop's own agreement (a 132-float64 vector every 4 steps over
    # the example's 38,922 coordinates: 0.054 bits) and the one-time planning exchanges
    expected_bits = {"tnq": (3.0, 8.0) if route != "auto" else (3.0, 16.1), "powersgd": (0.5, 32.0),
                     "bf16": (16.0, 16.0)}[hook]
    assert expected_bits[0] <= bits <= expected_bits[1]
