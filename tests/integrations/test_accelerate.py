"""Hugging Face Accelerate 1.15 with the real library: examples/accelerate_train.py on 2 CPU processes.

Launched once through ``accelerate launch --multi_gpu --num_processes 2`` (on a CPU machine that is
``torch.distributed.run`` with Accelerate's environment; ``accelerate launch --cpu`` would start one process) and
otherwise through ``torchrun``. Checked: Accelerate set up multi-CPU DDP and the tailq hook ran on every step
(step counter, fewer bits per coordinate than bf16's 16); the loss fell; both launchers give the same model; a
run saved with ``accelerator.save_state`` after 20 steps and resumed with ``load_state`` + ``hook.prime`` ends
with exactly the parameters of the uninterrupted 40-step run (error feedback on, dropout in the model).

Checkpoints, on real Gloo ranks (``CKPT_SCRIPT`` under ``torchrun``): each rank writes ``tailq_hook_rank{r}.pt``
(its own state: the file does not grow with the number of ranks); nothing of tailq's is unpickled at ``load_state``
(a crafted ``custom_checkpoint_0.pkl`` — where tailq's state used to be — or a crafted rank file with a
``__reduce__`` payload runs nothing); ``save_state`` on the main process only returns at once, and the resume then
fails naming the missing rank's file; another world size is refused by name.
"""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from procs import run_tree

pytestmark = pytest.mark.slow

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "accelerate_train.py"
BIN = Path(sys.executable).parent


def _launch(cmd: list[str], cwd: Path, timeout: int) -> subprocess.CompletedProcess[str]:
    return run_tree(cmd, cwd, timeout, "still running (a rank waits in a collective?)")



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
    saved = sorted(p.name for p in (tmp_path / "ck").iterdir())
    assert "tailq_hook_rank0.pt" in saved and "tailq_hook_rank1.pt" in saved  # each rank's own file
    assert not [n for n in saved if n.startswith("custom_checkpoint")]  # nothing of tailq's pickled


# Trains 3 steps with the hook (error feedback on) on 2+ Gloo ranks, then does what MODE says; every rank writes
# OUT/rank{r}.json with what it saw (errors as text).
CKPT_SCRIPT = textwrap.dedent('''
    import json, os, sys, time
    import torch
    from accelerate import Accelerator
    from tailq.integrations.accelerate import register_hook

    mode, ck, out = sys.argv[1], sys.argv[2], sys.argv[3]
    torch.set_num_threads(1)
    acc = Accelerator(cpu=True)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(32, 256), torch.nn.ReLU(), torch.nn.Linear(256, 4))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    model, opt = acc.prepare(model, opt)
    hook = register_hook(acc, model, "tnq", bits=3, error_feedback=True, min_bucket=0, route="twophase")
    rank = acc.process_index
    torch.manual_seed(1 + rank)
    for _ in range(3):
        x = torch.randn(64, 32)
        opt.zero_grad()
        acc.backward(torch.nn.functional.cross_entropy(model(x), x[:, :4].argmax(1)))
        opt.step()
    rec = {"rank": rank, "world": acc.num_processes, "step": hook.state.step}

    def attempt(key):
        try:
            acc.load_state(ck)
            rec[key] = "loaded"
        except Exception as e:
            rec[key] = f"{type(e).__name__}: {e}"

    class Payload:
        def __reduce__(self):  # unpickling this creates the marker file
            return (open, (os.path.join(ck, f"EXECUTED_{rank}"), "w"))

    if mode == "save":
        acc.save_state(ck)
    elif mode == "load":
        attempt("load")
    elif mode == "crafted":
        acc.save_state(ck)
        acc.wait_for_everyone()
        if acc.is_main_process:  # where register_for_checkpointing's state goes: Accelerate unpickles it
            torch.save(Payload(), os.path.join(ck, "custom_checkpoint_0.pkl"))
        acc.wait_for_everyone()
        attempt("custom_pkl")
        rec["executed_custom_pkl"] = os.path.exists(os.path.join(ck, f"EXECUTED_{rank}"))
        acc.wait_for_everyone()
        if acc.is_main_process:
            os.remove(os.path.join(ck, "custom_checkpoint_0.pkl"))
        torch.save(Payload(), os.path.join(ck, f"tailq_hook_rank{rank}.pt"))  # a crafted rank file
        acc.wait_for_everyone()
        attempt("rank_file")
        rec["executed_rank_file"] = os.path.exists(os.path.join(ck, f"EXECUTED_{rank}"))
    elif mode == "main-only":
        t0 = time.perf_counter()
        if acc.is_main_process:  # plain Accelerate allows it; tailq must not wait for the other ranks
            acc.save_state(ck)
        rec["save_s"] = time.perf_counter() - t0
        acc.wait_for_everyone()
        attempt("load")
    acc.wait_for_everyone()
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
        json.dump(rec, f)
    hook.close()
''')


def _ckpt_run(tmp: Path, mode: str, ck: Path, name: str, ranks: int = 2, timeout: int = 180) -> list[dict]:
    script = tmp / "ckpt_script.py"
    script.write_text(CKPT_SCRIPT)
    cmd = [str(BIN / "torchrun"), "--nproc_per_node", str(ranks), str(script), mode, str(ck), str(tmp / name)]
    proc = _launch(cmd, tmp, timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return [json.loads((tmp / name / f"rank{r}.json").read_text()) for r in range(ranks)]


def test_a_crafted_pickle_in_the_checkpoint_runs_nothing_at_load_state(tmp_path: Path) -> None:
    ck = tmp_path / "ck"
    recs = _ckpt_run(tmp_path, "crafted", ck, "out")
    for r in recs:
        # custom_checkpoint_0.pkl is not tailq's: Accelerate refuses it (no registered object) before unpickling
        assert not r["executed_custom_pkl"], r
        assert "custom checkpoints" in r["custom_pkl"], r
        # a crafted tailq_hook_rank{r}.pt is read with weights_only=True: refused, nothing run
        assert not r["executed_rank_file"], r
        assert "is not a tailq hook state file" in r["rank_file"] and "nothing in it was run" in r["rank_file"], r
    assert not list(ck.glob("EXECUTED_*"))


def test_save_state_on_the_main_process_only_returns_at_once_and_the_resume_names_the_missing_file(
        tmp_path: Path) -> None:
    ck = tmp_path / "ck"
    recs = _ckpt_run(tmp_path, "main-only", ck, "out", timeout=120)
    assert recs[0]["save_s"] < 30  # no collective at save: it does not wait for rank 1 (nor time out)
    assert sorted(p.name for p in ck.glob("tailq_hook_rank*.pt")) == ["tailq_hook_rank0.pt"]
    assert recs[0]["load"] == "loaded"
    assert f"{ck / 'tailq_hook_rank1.pt'} is missing" in recs[1]["load"], recs[1]
    assert "every process" in recs[1]["load"]


def test_each_rank_file_holds_its_own_state_and_does_not_grow_with_the_world_size(tmp_path: Path) -> None:
    sizes = {}
    for ranks in (2, 4):
        ck = tmp_path / f"ck{ranks}"
        recs = _ckpt_run(tmp_path, "save", ck, f"out{ranks}", ranks=ranks)
        names = sorted(p.name for p in ck.iterdir() if p.name.startswith(("tailq", "custom")))
        assert names == [f"tailq_hook_rank{r}.pt" for r in range(ranks)]
        f0 = torch.load(ck / "tailq_hook_rank0.pt", weights_only=True)
        assert f0["rank"] == 0 and f0["world_size"] == ranks and f0["step"] == recs[0]["step"] == 3
        assert set(f0["state"]) >= {"config", "step", "error_feedback"}  # one hook state: rank 0's
        sizes[ranks] = (ck / "tailq_hook_rank0.pt").stat().st_size
    model_bytes = 4 * (32 * 256 + 256 + 256 * 4 + 4)
    assert sizes[4] <= 1.05 * sizes[2] and sizes[2] < 2.5 * model_bytes, sizes  # 2 residuals: truncation, rounding
    # the 4-rank checkpoint resumed with 2 ranks: refused by name, on every rank
    recs = _ckpt_run(tmp_path, "load", tmp_path / "ck4", "load2")
    for r in recs:
        assert "run of 4 processes; this run has 2" in r["load"] and "restore=False" in r["load"], r


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
