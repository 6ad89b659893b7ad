"""PyTorch Lightning 2.6 with the real library: ``Trainer(accelerator="cpu", devices=2, strategy="ddp")``.

Each run is ``lightning_script.py`` in a subprocess (Lightning's ``ddp`` strategy re-launches the script for rank 1,
which it could not do from inside pytest). Checked: the callback's hook ran on CPU/Gloo (its step counter equals
the Trainer's, its wire log counted fewer bits per coordinate than bf16's 16) and logged through Lightning; the loss
fell; a run stopped after 2 epochs and resumed from its Lightning checkpoint ends with exactly the parameters of
an uninterrupted 4-epoch run (error feedback on, so the per-rank residuals must travel in the checkpoint); the
documented ``DDPStrategy(ddp_comm_state=…, ddp_comm_hook=…)`` path, with the state created before the Trainer, is
dropped by Lightning on CPU — the reason for the callback — and works where Lightning registers hooks.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

pytestmark = pytest.mark.slow

SCRIPT = Path(__file__).with_name("lightning_script.py")


def _run(tmp: Path, mode: str, name: str, *args: str) -> list[dict[str, Any]]:
    out = tmp / name
    proc = subprocess.run([sys.executable, str(SCRIPT), mode, str(out), *args], capture_output=True, text=True,
                          timeout=300, cwd=tmp)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return [torch.load(out / f"rank{r}.pt", weights_only=True) for r in (0, 1)]


def _same(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


def test_callback_trains_logs_and_resumes_exactly(tmp_path: Path) -> None:
    ckpt = tmp_path / "half.ckpt"
    half = _run(tmp_path, "callback", "half", "--epochs", "2", "--save", str(ckpt))
    full = _run(tmp_path, "callback", "full", "--epochs", "4")
    resumed = _run(tmp_path, "callback", "resumed", "--epochs", "4", "--resume", str(ckpt))
    for r in half + full:
        assert r["hook_step"] == r["global_step"] > 0  # the hook ran on every step, on CPU
        assert 3.0 < r["bits"] < 16.0  # 3-bit codes plus statistics and headers; bf16 is 16
        assert r["after"] < 0.6 * r["before"]
        assert {"tailq/bits_per_coord", "tailq/step", "tailq/vnmse", "tailq/route/twophase"} <= set(r["logged"])
        assert 3.0 < r["logged_bits"] < 16.0
    for run in (half, full, resumed):
        assert _same(run[0]["params"], run[1]["params"])  # every rank holds the same model
    # resumed from the 2-epoch checkpoint: bit for bit the uninterrupted run (buckets primed, residuals restored)
    assert resumed[0]["hook_step"] == full[0]["hook_step"] == 2 * half[0]["hook_step"]
    assert _same(resumed[0]["params"], full[0]["params"])
    assert resumed[0]["ef_keys"] == full[0]["ef_keys"]  # no residual was keyed to DDP's first-iteration buckets
    # the checkpoint's entry is plain data: every rank's hook state
    entry = next(iter(torch.load(ckpt, weights_only=True)["callbacks"].values()))
    assert entry["world_size"] == 2 and len(entry["ranks"]) == 2
    assert entry["ranks"][0]["step"] == half[0]["hook_step"]


def test_ddp_strategy_comm_hook_is_dropped_on_cpu_and_works_where_lightning_registers_it(tmp_path: Path) -> None:
    dropped = _run(tmp_path, "strategy", "dropped", "--epochs", "1")
    for r in dropped:  # Lightning 2.6 registers comm hooks on CUDA only: on CPU the hook never runs
        assert r["hook_step"] == 0 and not r["bound"] and r["global_step"] > 0
    registered = _run(tmp_path, "strategy-registered", "registered", "--epochs", "1")
    for r in registered:  # created before the Trainer (no process group yet), bound on the first bucket
        assert r["bound"] and r["hook_step"] == r["global_step"] > 0 and 3.0 < r["bits"] < 16.0
        assert r["after"] < r["before"]


def test_import_tailq_without_lightning_and_a_clear_error_for_tailq_lightning() -> None:
    code = ("import sys; sys.modules['pytorch_lightning'] = None; sys.modules['lightning'] = None\n"
            "import tailq, tailq.hooks, tailq.integrations\n"
            "try:\n    import tailq.lightning\nexcept ImportError as e:\n    print('ERR', e)\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "ERR tailq.lightning needs pytorch-lightning" in proc.stdout


def test_callback_validates_options_before_the_trainer_starts() -> None:
    from tailq.lightning import TailqCallback

    with pytest.raises(TypeError, match="unknown option"):
        TailqCallback("tnq", bitz=3)
    with pytest.raises(ValueError, match="log_every_n_steps"):
        TailqCallback("tnq", log_every_n_steps=0)
    with pytest.raises(TypeError, match="process_group"):
        TailqCallback("bf16", process_group=None)
    import pickle

    cb = pickle.loads(pickle.dumps(TailqCallback("tnq", bits=3)))  # ddp_spawn pickles callbacks
    assert cb.name == "tnq" and cb.state is None
