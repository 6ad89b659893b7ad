"""The harness's DiLoCo methods: parsing, validation, the baseline rule, and end-to-end runs (slow)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from tailq.errors import UsageError
from tailq.harness.compare import Method, parse_method
from tailq.harness.config import RunConfig, is_baseline


def test_diloco_methods_parse_into_the_outer_compressor_and_the_loop() -> None:
    m = parse_method("diloco:tnq:2:H=20,F=2,tau=1,route=allgather")
    assert m.hook == "tnq" and dict(m.options) == {"bits": 2, "route": "allgather"}
    assert dict(m.diloco) == {"sync_every": 20, "fragments": 2, "delay": 1}
    assert m.label == "diloco-tnq-2b(H=20,F=2,tau=1,route=allgather)" and not m.baseline
    assert parse_method("diloco:fp32:H=5").label == "diloco-fp32(H=5)"
    assert not parse_method("diloco:bf16:H=5").baseline and Method("bf16").baseline
    with pytest.raises(UsageError, match="DiLoCo needs H"):
        parse_method("diloco:tnq:2")
    with pytest.raises(UsageError, match="needs the outer mean's compressor"):
        parse_method("diloco")


@pytest.mark.parametrize("diloco, hook, message", [
    ({"sync_every": 4, "fragments": 5}, "tnq", r"F \(fragments\) must be an integer in \[1, 4\]"),
    ({"sync_every": 4, "delay": 4}, "tnq", r"tau \(delay\) must be an integer in \[0, 3\]"),
    ({"sync_every": 0}, "tnq", r"H \(sync_every\) must be an integer >= 1"),
    ({"sync_every": 4, "outer_lr": 0}, "tnq", r"olr \(outer_lr\) must be a finite number > 0"),
    ({"sync_every": 4, "outer_momentum": 1}, "tnq", r"omom \(outer_momentum\) must be a finite number in \[0, 1\)"),
    ({"sync_every": 4, "stride": 2}, "tnq", "unknown option"),
    ({"sync_every": 4}, "powersgd", "not powersgd"),
])
def test_diloco_options_are_validated_before_any_worker_starts(diloco: dict[str, object], hook: str,
                                                               message: str) -> None:
    with pytest.raises(UsageError, match=message):
        RunConfig(hook=hook, hook_options={"bits": 2} if hook == "tnq" else {}, diloco=diloco).validate()


def test_the_baseline_is_plain_bf16_ddp() -> None:
    assert is_baseline({"hook": "bf16", "hook_options": {}, "diloco": None})
    assert not is_baseline({"hook": "bf16", "hook_options": {}, "diloco": {"sync_every": 20}})
    assert not is_baseline({"hook": "bf16", "hook_options": {"reduce": "a2a"}})


@pytest.mark.slow
def test_a_diloco_run_records_its_outer_loop_and_resumes_exactly(tmp_path: Path) -> None:
    from tailq.harness.launch import launch_run

    def cfg(run_dir: Path) -> RunConfig:
        return RunConfig(workload="synthetic", hook="tnq", hook_options={"bits": 2, "route": "allgather"}, workers=2,
                         steps=12, eval_every=6, net="none", run_dir=str(run_dir), checkpoint_every=6,
                         diloco={"sync_every": 4}).validate()

    full = launch_run(cfg(tmp_path / "full"), timeout_s=300)
    d = full["diloco"]
    assert d["syncs"] == 3 and d["skipped"] == 0 and full["routes"] == ["allgather"]
    assert len(full["vnmse"]) == 3 and all(0 < v["vnmse"] < 1 for v in full["vnmse"])  # every sync measured
    assert all("outer_tail" in h and "tail" in h for h in full["history"])
    by_kind = full["wire"]["by_kind"]
    sent = sum(v["handed_bytes"] for k, v in by_kind.items() if k not in ("measure", "config", "plan"))
    assert full["bits_per_param_step"] == pytest.approx(8 * sent / (full["parameters"] * 12))
    # 2-bit codes on every 4th step: 0.5 bit per parameter and step, plus the statistics
    assert 0.5 <= full["bits_per_param_step"] < 1.0
    # resume from the step-6 checkpoint: the same global model at the end, bit for bit
    part = tmp_path / "part"
    shutil.copytree(tmp_path / "full", part)
    for f in (part / "ckpt").glob("step0000012-*"):
        f.unlink()
    (part / "result.json").unlink()
    resumed = launch_run(cfg(part), timeout_s=300)
    assert resumed["resumed_from"] == 6
    assert resumed["final_params_checksum"] == full["final_params_checksum"]


def test_tail_statistics_of_a_diverged_run_count_the_nonfinite_values() -> None:
    # QSGD-2 with error feedback diverges on digits under DiLoCo (issue 23's probe, and our run): the evaluation's
    # tail statistics must not fail the run
    import torch

    from tailq.harness.worker import _tail_stats

    assert _tail_stats(torch.full((1000,), float("nan"))) == {"n": 0, "nonfinite": 1000}
    x = torch.distributions.StudentT(3.0).sample((5000,))
    x[:10] = float("inf")
    out = _tail_stats(x)
    assert out["nonfinite"] == 10 and out["n"] == 4990 and out["excess_kurtosis"] > 0


def test_a_plan_keeps_diloco_methods_for_resume() -> None:
    # compare.json (one seed or several) must give --resume the same methods back: without the DiLoCo options
    # diloco:bf16:H=20 came back as the bf16 baseline, a duplicate
    for text in ("bf16", "tnq:3:redesign=10", "diloco:bf16:H=20", "diloco:tnq:2:H=20,F=2,tau=2:route=allgather"):
        m = parse_method(text)
        assert Method.from_plan(m.as_plan()) == m
    assert Method.from_plan(["tnq", [["bits", 3]]]) == parse_method("tnq:3")  # a plan from before DiLoCo
