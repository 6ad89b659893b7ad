"""The hook's overlap with backward (tailq.harness.overlap): the compute-only calibration, the per-step and per-run
figures, DDP's buckets, and that the calibration changes nothing of the training."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from tailq.cli import main
from tailq.harness.compare import overlap_row
from tailq.harness.config import RunConfig
from tailq.harness.overlap import run_overlap, step_overlap
from tailq.harness.report import buckets_text, overlap_rows


def test_step_overlap_follows_the_definition() -> None:
    # step 10 ms = compute 4 + opt 1 + 5 ms exposed, of a hook that ran 8 ms: 3 of its 8 ms hidden
    o = step_overlap({"wall_s": 0.010, "codec_s": 0.002, "comm_s": 0.006, "opt_s": 0.001}, compute_s=0.004)
    assert o["hook_s"] == pytest.approx(0.008) and o["exposed_s"] == pytest.approx(0.005)
    assert o["overlap"] == pytest.approx(3 / 8) and o["step_over_parts"] == pytest.approx(10 / 13)
    # a step longer than compute + opt + hook (noise, DDP's own work): clipped, overlap 0, never negative
    assert step_overlap({"wall_s": 0.030, "codec_s": 0.0, "comm_s": 0.008, "opt_s": 0.001}, 0.004)["overlap"] == 0
    # a step shorter than compute + opt (the calibration ran slow): nothing exposed, overlap 1
    assert step_overlap({"wall_s": 0.003, "codec_s": 0.0, "comm_s": 0.008, "opt_s": 0.001}, 0.004)["overlap"] == 1
    assert step_overlap({"wall_s": 0.003, "codec_s": 0.0, "comm_s": 0.0}, 0.004)["overlap"] is None
    steps = [{"step": i, "wall_s": 0.010, "codec_s": 0.0, "comm_s": 0.008, "opt_s": 0.001} for i in range(4)]
    run = run_overlap(steps, [0.004, 0.005, 0.003], start=2, calibrated_at=2, modeled=False)
    assert run["compute_s"] == 0.004 and run["steps"] == 2 and "overlap" in steps[2] and "overlap" not in steps[1]
    assert run_overlap(steps, [], start=9, calibrated_at=None, modeled=True)["skipped"].startswith("the run ended")


def test_calibration_leaves_parameters_buffers_gradients_and_rng_as_they_were(tmp_path: Path) -> None:
    """BatchNorm statistics, dropout's RNG draws, the gradients and DDP's forward-sync flag: all restored (one
    Gloo rank, in this process)."""
    import torch.distributed as dist
    from torch import nn
    from torch.nn.parallel import DistributedDataParallel as DDP

    from tailq.harness.overlap import calibrate_compute

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'init'}", rank=0, world_size=1)
    try:
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.Dropout(0.5), nn.Linear(16, 3))
        ddp = DDP(model)
        opt = torch.optim.SGD(ddp.parameters(), lr=0.1, momentum=0.9)
        x, y = torch.randn(32, 8), torch.randint(0, 3, (32,))
        for _ in range(2):  # a synchronised step or two first, as in training
            opt.zero_grad(set_to_none=True)
            nn.functional.cross_entropy(ddp(x), y).backward()
            opt.step()
        before = {k: v.clone() for k, v in model.state_dict().items()}
        opt_before = json.dumps(str(opt.state_dict()))
        rng, sync = torch.get_rng_state(), ddp.require_forward_param_sync
        times = calibrate_compute(ddp, model, opt, nn.functional.cross_entropy, x, y, passes=3)
        assert len(times) == 3 and all(t > 0 for t in times)
        after = model.state_dict()
        assert all(torch.equal(before[k], after[k]) for k in before)  # weights and BatchNorm statistics
        assert all(p.grad is None for p in model.parameters())
        assert torch.equal(torch.get_rng_state(), rng) and ddp.require_forward_param_sync == sync
        assert json.dumps(str(opt.state_dict())) == opt_before
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_train_records_overlap_and_buckets_and_the_calibration_changes_nothing(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # digits at --bucket-cap-mb 0.01: DDP rebuilds its 6 parameters into 3 buckets (5,130, 262,656, 33,280 values)
    run_dir = tmp_path / "calibrated"
    rc = main(["train", "--workload", "digits", "--workers", "2", "--net", "none", "--steps", "6", "--eval-every",
               "3", "--compressor", "bf16", "--bucket-cap-mb", "0.01", "--run-dir", str(run_dir)])
    assert rc == 0
    out = capsys.readouterr().out
    res = json.loads((run_dir / "result.json").read_text())
    o = res["overlap"]
    assert res["compute_s"] > 0 and o["compute_s"] == res["compute_s"] and len(o["compute_samples_s"]) == 5
    assert o["calibrated_at_step"] == o["from_step"] == 2 and o["steps"] == 4
    for key in ("opt_s", "hook_s", "step_s", "exposed_s", "step_over_parts"):
        assert math.isfinite(o[key]) and o[key] >= 0, key
    # overlap = 1 - min(exposed, hook) / hook: exposed is clipped to [0, hook_s] (the step cannot have waited for
    # the hook longer than the hook ran, nor less than not at all), so the share hidden lies in [0, 1]
    assert 0 <= o["overlap"] <= 1
    after = [s for s in res["steps"] if s["step"] >= 2]
    assert all(0 <= s["overlap"] <= 1 and s["hook_s"] == s["codec_s"] + s["comm_s"] for s in after)
    # DDP's buckets (its logging data) are the buckets the hook handled in the last step
    b = res["buckets"]
    assert b["rebuilt"] and b["count"] >= 2 and b["count"] == len(b["hook_seen"])
    assert b["sizes"] == [b["hook_seen"][str(i)] for i in range(b["count"])] and len(set(b["sizes"])) > 1
    assert f"DDP buckets: {b['count']} " in out and "overlap with backward" in out
    row = overlap_row(res)
    assert row["buckets"]["count"] == b["count"] and overlap_rows({"runs": [{"name": "bf16", **row}]})
    assert (buckets_text(b) or "").startswith(f"{b['count']} (sizes ")
    # the same run without the calibration: the training is the same to the last bit
    cfg = RunConfig(**{**res["config"], "compute_calibration": 0, "run_dir": str(tmp_path / "plain")})
    from tailq.harness.launch import launch_run

    plain = launch_run(cfg, timeout_s=300)
    assert plain["overlap"]["skipped"] and plain["compute_s"] is None
    assert [s["loss"] for s in plain["steps"]] == [s["loss"] for s in res["steps"]]
    assert plain["final_params_checksum"] == res["final_params_checksum"]
    a = torch.load(run_dir / "final_model.pt", weights_only=True)
    p = torch.load(tmp_path / "plain" / "final_model.pt", weights_only=True)
    assert a.keys() == p.keys() and all(torch.equal(a[k], p[k]) for k in a)
