"""Loss targets (``--target-metric loss``): the target's rule, crossing downwards, extension, the summary."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from tailq.cli import main
from tailq.errors import UsageError
from tailq.harness.compare import summarize
from tailq.harness.config import RunConfig
from tailq.harness.stats import crossing, reached, target_from


def _hist(losses: list[float], every: float = 2.0) -> list[dict[str, Any]]:
    return [{"step": 10 * (i + 1), "clock": every * (i + 1), "accuracy": 0.5, "test_loss": v}
            for i, v in enumerate(losses)]


def test_target_rule_for_accuracy_and_loss() -> None:
    h = [{"step": 10, "clock": 1.0, "accuracy": 0.8, "test_loss": 2.0},
         {"step": 20, "clock": 2.0, "accuracy": 0.9, "test_loss": 1.0},
         {"step": 30, "clock": 3.0, "accuracy": 0.85, "test_loss": 1.2}]
    assert target_from(h, 0.99) == pytest.approx(0.891)  # 0.99 x best accuracy
    assert target_from(h, 0.99, "loss") == pytest.approx(1.01)  # within 1% of the best loss
    assert target_from(h, 0.9, "loss") == pytest.approx(1.1)
    with pytest.raises(ValueError, match="accuracy, loss"):
        target_from(h, 0.99, "perplexity")
    with pytest.raises(ValueError, match="test_loss"):
        target_from([{"step": 1, "clock": 1.0, "accuracy": 0.3}], 0.99, "loss")


def test_loss_crossing_goes_downwards_and_interpolates() -> None:
    h = _hist([3.0, 2.0, 1.5, 1.0])
    c = crossing(h, 1.75, "test_loss", higher=False)
    assert c is not None and c["interpolated"]
    assert c["step"] == pytest.approx(25.0) and c["clock"] == pytest.approx(5.0)  # halfway from 2.0 to 1.5
    first = crossing(h, 3.5, "test_loss", higher=False)
    assert first == {"step": 10.0, "clock": 2.0, "interpolated": False}
    assert crossing(h, 0.5, "test_loss", higher=False) is None
    assert reached(h, 1.0, "loss") and not reached(h, 0.99, "loss") and not reached(h, None, "loss")
    # evaluations without a loss (older results) are skipped, not taken as reaching
    assert crossing([{"step": 5, "clock": 1.0, "accuracy": 0.1}, *h], 2.5, "test_loss", higher=False) == pytest.approx(
        {"step": 15.0, "clock": 3.0, "interpolated": True})


def _result(hook: str, losses: list[float], every: float) -> dict[str, Any]:
    steps = [{"step": i, "clock": every * (i + 1) / 10, "step_s": every / 10, "codec_s": 0.0, "comm_s": 0.0}
             for i in range(10 * len(losses))]
    return {"name": hook, "config": {"hook": hook, "hook_options": {}}, "history": _hist(losses, every),
            "steps": steps, "parameters": 1000, "network": {"spec": "model:100mbit"},
            "wire": {"bits_per_coord_handed": 3.0, "bits_per_coord_ring_traffic": 4.0}, "vnmse": []}


def test_summary_on_a_loss_target() -> None:
    bf16 = _result("bf16", [2.0, 1.5, 1.2, 1.0], 2.0)
    fast = _result("tnq", [1.8, 1.3, 1.005, 0.99], 1.0)  # reaches 1.01 between its 2nd and 3rd evaluation
    never = _result("qsgd", [2.0, 1.8, 1.6, 1.5], 0.5)
    s = summarize([bf16, fast, never], 0.99, "loss")
    assert s["target_metric"] == "loss" and s["target"] == pytest.approx(1.01) and s["target_accuracy"] is None
    runs = {r["compressor"]: r for r in s["runs"]}
    assert runs["bf16"]["tta_s"] == pytest.approx(8.0)  # its best (1.0) is the only evaluation within 1%
    assert runs["bf16"]["tta_step_interp"] == pytest.approx(30 + 10 * (1.2 - 1.01) / (1.2 - 1.0))
    assert runs["tnq"]["tta_s"] == pytest.approx(3.0) and runs["tnq"]["tta_step"] == 30
    assert runs["tnq"]["tta_s_interp"] == pytest.approx(2.0 + (1.3 - 1.01) / (1.3 - 1.005))
    assert runs["tnq"]["speedup_vs_bf16"] == pytest.approx(8.0 / 3.0)
    assert runs["qsgd"]["tta_s"] is None and runs["qsgd"]["speedup_vs_bf16"] is None
    assert runs["tnq"]["final_test_loss"] == 0.99 and runs["tnq"]["best_test_loss"] == 0.99


def test_run_config_checks_the_metric_and_its_target() -> None:
    RunConfig(extend_to_target=1.7, target_metric="loss", max_steps=600).validate()  # a loss above 1 is fine
    with pytest.raises(UsageError, match="accuracy in"):
        RunConfig(extend_to_target=1.7, max_steps=600).validate()
    with pytest.raises(UsageError, match="test loss > 0"):
        RunConfig(extend_to_target=0.0, target_metric="loss", max_steps=600).validate()
    with pytest.raises(UsageError, match="--target-metric must be accuracy or loss"):
        RunConfig(target_metric="perplexity").validate()


def _captured_compare(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> dict[str, Any]:
    import tailq.harness.compare as cmp

    seen: dict[str, Any] = {}

    def fake(**kw: Any) -> Path:  # stands in for the comparison: records its arguments, writes a summary
        seen.update(kw)
        root = tmp_path / "fake"
        root.mkdir(exist_ok=True)
        (root / "results.json").write_text(json.dumps({"runs": []}))
        return root

    monkeypatch.setattr(cmp, "compare", fake)
    monkeypatch.setattr("tailq.harness.report.print_table", lambda s: None)
    return seen


def test_y1_preset_is_the_bits_sweep_on_charlm_with_a_loss_target(monkeypatch: pytest.MonkeyPatch,
                                                                   tmp_path: Path) -> None:
    seen = _captured_compare(monkeypatch, tmp_path)
    assert main(["compare", "--preset", "y1", "--net", "none"]) == 0
    assert (seen["workload"], seen["workers"], seen["steps"], seen["eval_every"], seen["target_metric"]) == (
        "charlm", 8, 100, 10, "loss")
    labels = [m.label for m in seen["methods"]]
    assert labels[0] == "bf16" and len(labels) == 1 + 5 * 3
    for b in (2, 3, 4):  # every family at every width, each pinned to a compressed route (auto may pass through)
        assert {f"qsgd-{b}b(route=allgather)", f"nuqsgd-{b}b(route=allgather)", f"tuq-{b}b(redesign=10,route=twophase)",
                f"tnq-{b}b(redesign=10,route=twophase)", f"tbq-{b}b(redesign=10,route=twophase)"} <= set(labels), labels
    # what the user gives wins: a workload keeps its own defaults and the accuracy target
    assert main(["compare", "--preset", "y1", "--net", "none", "--workload", "digits", "--workers", "3"]) == 0
    assert (seen["workload"], seen["workers"], seen["steps"], seen["target_metric"]) == ("digits", 3, 300, "accuracy")
    assert main(["compare", "--preset", "y1", "--net", "none", "--target-metric", "accuracy"]) == 0
    assert (seen["workload"], seen["target_metric"]) == ("charlm", "accuracy")
    assert main(["compare", "--net", "none", "--target-metric", "loss"]) == 0  # no preset: digits, as before
    assert (seen["workload"], seen["workers"], seen["steps"], seen["target_metric"]) == ("digits", 4, 300, "loss")


def test_warmup_samples_are_marked_and_left_out_of_the_methods_vnmse() -> None:
    import torch

    from tailq.hooks.metrics import HookMetrics

    m = HookMetrics()
    exact = torch.ones(8)
    m.record_vnmse(0, 0, exact.clone(), exact, warmup=True)  # the warm-up: sent as bf16, no error
    m.record_vnmse(10, 0, exact * 1.5, exact)  # 0.25
    m.record_vnmse(20, 0, exact * 0.5, exact)  # 0.25
    assert m.vnmse[0]["warmup"] is True and "warmup" not in m.vnmse[1]
    res = _result("tnq", [1.0], 1.0)
    res["vnmse"] = m.vnmse
    bf16 = _result("bf16", [1.0], 1.0)
    assert summarize([bf16, res], 0.99, "loss")["runs"][1]["vnmse"] == pytest.approx(0.25)
    # results written before the mark: the hook's warm-up steps (warmup_steps, default 1) are left out as well
    res["vnmse"] = [{k: v for k, v in rec.items() if k != "warmup"} for rec in m.vnmse]
    assert summarize([bf16, res], 0.99, "loss")["runs"][1]["vnmse"] == pytest.approx(0.25)
    res["config"]["hook_options"] = {"warmup_steps": 15}
    assert summarize([bf16, res], 0.99, "loss")["runs"][1]["vnmse"] == pytest.approx(0.25)
    res["config"]["hook_options"] = {"warmup_steps": 0}
    assert summarize([bf16, res], 0.99, "loss")["runs"][1]["vnmse"] == pytest.approx(0.5 / 3)


def test_fsdp_runs_have_no_warmup_to_leave_out() -> None:
    bf16 = _result("bf16", [1.0], 1.0)
    res = _result("tnq", [1.0], 1.0)
    res["config"]["fsdp"] = True
    res["vnmse"] = [{"step": 0, "bucket": 0, "vnmse": 0.2}]  # tailq.fsdp compresses from step 0
    assert summarize([bf16, res], 0.99)["runs"][1]["vnmse"] == pytest.approx(0.2)
