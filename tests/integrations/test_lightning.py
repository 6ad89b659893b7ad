"""PyTorch Lightning 2.6 with the real library: ``Trainer(accelerator="cpu", devices=2, strategy="ddp")``.

Each run is ``lightning_script.py`` in a subprocess (Lightning's ``ddp`` strategy re-launches the script for rank 1,
which it could not do from inside pytest). Checked: the callback's hook ran on CPU/Gloo (its step counter equals
the Trainer's, its wire log counted fewer bits per coordinate than bf16's 16) and logged through Lightning; the loss
fell; a run stopped after 2 epochs and resumed from its Lightning checkpoint ends with exactly the parameters of
an uninterrupted 4-epoch run (error feedback on, so the per-rank residuals must travel in the checkpoint); the
documented ``DDPStrategy(ddp_comm_state=…, ddp_comm_hook=…)`` path, with the state created before the Trainer, is
dropped by Lightning on CPU — the reason for the callback — and works where Lightning registers hooks.

Checkpoints: every rank writes its own hook state beside the checkpoint (``<ckpt>.tailq_hook_rank{r}.pt``, plain
data, read with ``weights_only=True``); the checkpoint's entry is small metadata. A resume with harmless option
changes (``timeout_s``, ``error_feedback="all"`` for ``True``) continues exactly; one that changes the arithmetic
(``bits``) or misses a rank's file fails on every rank, naming it. ``devices=1`` with ``strategy="ddp"`` is a
no-op; under ``ddp_spawn`` the launching process gets the run's totals and a clear error from ``callback.state``.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from procs import run_tree

pytestmark = pytest.mark.slow

SCRIPT = Path(__file__).with_name("lightning_script.py")


def _launch(tmp: Path, mode: str, name: str, *args: str, timeout: int = 300) -> subprocess.CompletedProcess[str]:
    return run_tree([sys.executable, str(SCRIPT), mode, str(tmp / name), *args], tmp, timeout, name)



def _run(tmp: Path, mode: str, name: str, *args: str, ranks: int = 2) -> list[dict[str, Any]]:
    proc = _launch(tmp, mode, name, *args)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return [torch.load(tmp / name / f"rank{r}.pt", weights_only=True) for r in range(ranks)]


def _same(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A 2-epoch run saved with ``trainer.save_checkpoint`` (and a ModelCheckpoint) and the uninterrupted 4-epoch
    run, shared by the resume tests."""
    tmp = tmp_path_factory.mktemp("lightning")
    ckpt = tmp / "half.ckpt"
    half = _run(tmp, "callback", "half", "--epochs", "2", "--save", str(ckpt), "--ckpt-dir", str(tmp / "mc"))
    full = _run(tmp, "callback", "full", "--epochs", "4")
    return {"tmp": tmp, "ckpt": ckpt, "half": half, "full": full}


def test_callback_trains_logs_and_resumes_exactly(saved: dict[str, Any]) -> None:
    tmp, ckpt, half, full = saved["tmp"], saved["ckpt"], saved["half"], saved["full"]
    resumed = _run(tmp, "callback", "resumed", "--epochs", "4", "--resume", str(ckpt))
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


def test_checkpoint_entry_is_metadata_and_each_rank_file_holds_only_its_own_state(saved: dict[str, Any]) -> None:
    ckpt, half = saved["ckpt"], saved["half"]
    entry = torch.load(ckpt, weights_only=True)["callbacks"]["TailqCallback"]
    assert entry["world_size"] == 2 and entry["step"] == half[0]["hook_step"] and "ranks" not in entry
    assert entry["files"] == [f"half.ckpt.tailq_hook_rank{r}.pt" for r in (0, 1)]
    assert not any(isinstance(v, torch.Tensor) for v in entry.values())  # no rank's residuals in the checkpoint
    files = [torch.load(ckpt.parent / f, weights_only=True) for f in entry["files"]]
    model_bytes = sum(p.numel() * p.element_size() for p in half[0]["params"])
    for r, f in enumerate(files):
        assert f["rank"] == r and f["world_size"] == 2 and f["state"]["step"] == half[0]["hook_step"]
        residuals = f["state"]["error_feedback"]["rounding"]
        assert sum(t.numel() for t in residuals.values()) == model_bytes // 4  # one rank's residual, one model
        # the file's size is one rank's state (2 residuals of the model's size: truncation and rounding), whatever
        # the number of ranks; the gathered entry it replaces held every rank's (5x the model at 2 ranks)
        assert (ckpt.parent / entry["files"][r]).stat().st_size < 2.5 * model_bytes
    assert not all(torch.equal(files[0]["state"]["error_feedback"]["rounding"][k], v)
                   for k, v in files[1]["state"]["error_feedback"]["rounding"].items())  # the ranks' own residuals
    # ModelCheckpoint(save_top_k=1) kept the last epoch's checkpoint; removing the first removed its files too
    kept = sorted(p.name for p in (saved["tmp"] / "mc").iterdir())
    assert kept == ["epoch=1-step=16.ckpt", *(f"epoch=1-step=16.ckpt.tailq_hook_rank{r}.pt" for r in (0, 1))], kept


def test_resume_with_timeout_s_changed_and_error_feedback_spelled_all_continues_exactly(saved: dict[str, Any]) -> None:
    """Options that do not change the arithmetic may differ on resume: the hook state is kept (no restart)."""
    tmp, ckpt, full = saved["tmp"], saved["ckpt"], saved["full"]
    opts = json.dumps({"timeout_s": 600, "error_feedback": "all"})
    resumed = _run(tmp, "callback", "resumed-opts", "--epochs", "4", "--resume", str(ckpt), "--opts", opts)
    assert resumed[0]["hook_step"] == full[0]["hook_step"]  # the step continued from the checkpoint's
    assert _same(resumed[0]["params"], full[0]["params"]) and _same(resumed[1]["params"], full[1]["params"])


def test_resume_with_other_bits_fails_on_every_rank_naming_bits(saved: dict[str, Any]) -> None:
    proc = _launch(saved["tmp"], "callback", "resumed-bits", "--epochs", "4", "--resume", str(saved["ckpt"]),
                   "--opts", json.dumps({"bits": 4}), timeout=180)
    assert proc.returncode != 0
    assert "bits: saved 3, now 4" in proc.stderr and "restore=False" in proc.stderr, proc.stderr[-3000:]


def test_resume_with_a_missing_rank_file_fails_naming_it_and_restore_false_starts_afresh(
        saved: dict[str, Any]) -> None:
    tmp = saved["tmp"]
    moved = tmp / "moved"
    moved.mkdir()
    for name in ("half.ckpt", "half.ckpt.tailq_hook_rank0.pt"):  # copied without rank 1's file
        shutil.copy(tmp / name, moved / name)
    proc = _launch(tmp, "callback", "resumed-missing", "--epochs", "4", "--resume", str(moved / "half.ckpt"),
                   timeout=180)
    assert proc.returncode != 0
    assert f"{moved / 'half.ckpt.tailq_hook_rank1.pt'} missing" in proc.stderr, proc.stderr[-3000:]
    fresh = _run(tmp, "callback", "resumed-fresh", "--epochs", "4", "--resume", str(moved / "half.ckpt"), "--opts",
                 json.dumps({"restore": False}))
    assert fresh[0]["hook_step"] == fresh[0]["global_step"] - saved["half"][0]["global_step"]  # started afresh


def test_one_process_with_the_ddp_strategy_is_a_no_op(tmp_path: Path) -> None:
    proc = _launch(tmp_path, "callback", "one", "--epochs", "1", "--devices", "1")
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = torch.load(tmp_path / "one" / "rank0.pt", weights_only=True)
    assert out["state"] is None and out["global_step"] > 0
    assert not [k for k in out["logged"] if k.startswith("tailq/")]
    assert proc.stderr.count("nothing to average") == 1


def test_ddp_spawn_gives_the_launching_process_the_totals_and_a_clear_state_error(tmp_path: Path) -> None:
    [out] = _run(tmp_path, "callback", "spawn", "--epochs", "1", "--strategy", "ddp_spawn", ranks=1)
    assert "ddp_spawn" in out["state_error"] and "tailq/run_bits_per_coord" in out["state_error"]
    m = out["metrics"]
    assert m["tailq/run_steps"] == 8 and 3.0 < m["tailq/run_bits_per_coord"] < 16.0 and m["tailq/run_fallbacks"] == 0
    assert out["after"] < out["before"]  # the weights came back trained


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
    assert TailqCallback("tnq", bits=3, timeout_s=600).state_key == TailqCallback("tnq", bits=4).state_key
    with pytest.raises(TypeError, match="restore"):
        TailqCallback("tnq", restore="no")
