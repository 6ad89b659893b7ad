"""Resume and bucket-layout faults on real Gloo ranks (issue 24: items 4, 5 and 10)."""

from __future__ import annotations

from typing import Any

import torch
from resume_workers import (
    w_checkpoint_after_warmup,
    w_residuals_across_regrouping,
    w_resume_with_other_options,
    w_unused_loaded_residuals,
    w_world_of_one,
)
from workers import launch, w_checkpoint


def test_static_graph_resume_is_exact(tmp_path: Any) -> None:
    # static_graph=True regroups DDP's buckets after the *second* iteration: priming once left the first resumed
    # steps on another layout than the uninterrupted run's
    opts = {"bits": 3, "min_bucket": 0, "error_feedback": True, "stale_stats": True, "route": "allreduce"}
    path = str(tmp_path / "ck")
    static = {"static_graph": True}
    full = launch(w_checkpoint, 2, "tnq", opts, "full", path, static)
    launch(w_checkpoint, 2, "tnq", opts, "first", path, static)
    resumed = launch(w_checkpoint, 2, "tnq", opts, "resume", path, static)
    for a, b in zip(full[0], resumed[0], strict=True):
        assert torch.equal(a, b)


def test_residuals_follow_their_parameters_when_ddp_regroups_its_buckets() -> None:
    for r in launch(w_residuals_across_regrouping, 2):
        # the layout does change between step 1 and step 2 (one bucket, then two) ...
        assert len(r["keys"][1]) == 1 and len(r["keys"][2]) == 2 and r["keys"][1][0] not in r["keys"][2]
        # ... and every parameter's step-1 residual is what step 2 adds to its gradient, bit for bit (before: 0)
        assert len(r["params"]) == 6 and r["norm"] > 0 and r["same"]


def test_a_checkpoint_at_the_end_of_the_warm_up_resumes_with_the_fitted_network() -> None:
    for r in launch(w_checkpoint_after_warmup, 2):
        went_on, resumed = r["went_on"], r["resumed"]
        assert r["saved"] is not None and len(r["saved"]["allreduces"]) == 4  # 2 steps x 2 buckets, timed
        assert went_on["network_source"] == resumed["network_source"] == "fitted"  # before: "default"
        assert resumed["timed_warmup_allreduces"] == 4
        assert resumed["network"] == went_on["network"]  # the same timings: the same fitted network


def test_world_size_one_leaves_gradients_exact() -> None:
    for name, route, exact, took in launch(w_world_of_one, 1)[0]:
        assert exact, (name, route)  # before: bf16-rounded (auto) or quantized (the routes)
        assert took == "local"


def test_loaded_residuals_that_go_unused_are_named_in_a_warning() -> None:
    for seen in launch(w_unused_loaded_residuals, 2):
        assert len(seen) == 1  # after the first step only
        assert "0:4096:" in seen[0] and "prime_buckets" in seen[0]


def test_a_resume_may_change_what_measures_but_not_what_computes() -> None:
    for r in launch(w_resume_with_other_options, 2):
        assert r["measure_every"] == "ok" and r["timeout_s"] == "ok"  # before: measure_every was refused
        assert "compressor" in r["bits"] and "differ" in r["bits"]
