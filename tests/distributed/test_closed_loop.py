"""The closed loop of route="auto" on real Gloo ranks (tailq.comm.adapt through the hook).

The hook is told a 50 Mbit/s network while it runs on loopback, and one rank is made slow on every compressed
bucket: the model's plan (compress) is wrong, and the ranks disagree about by how much.
"""

from __future__ import annotations

import pytest
from workers import launch, w_closed_loop

pytestmark = pytest.mark.slow
STEPS = 40


def test_ranks_that_measure_different_costs_agree_and_leave_a_route_measured_slower() -> None:
    """Rank 1 spends 30 ms more on each compressed bucket, rank 0 does not: the MAX over ranks decides, so both ranks
    take the same route for every bucket at every step (no mismatched collectives, or the run would hang or fail),
    every bucket moves to passthrough within two decisions (two and six steps after the warm-up) and stays there but for
    re-probes within the budget; the report names each switch with the measured costs."""
    res = launch(w_closed_loop, 2, "auto", 1, STEPS)
    assert res[0]["routes"] == res[1]["routes"]
    assert res[0]["loop"] == res[1]["loop"]
    loop = res[0]["loop"]
    for b, rep in loop.items():
        planned = rep["planned"]
        assert planned in ("allgather", "twophase", "allreduce"), rep  # 50 Mbit/s: the model compresses
        first = rep["switches"][0]
        # the first decision (end of step 2) switches when passthrough's modeled cost is already lower; where the
        # model prices it above the measured route (the largest bucket), a probe at step 3 measures it and the next
        # decision (end of step 6) switches
        assert first["step"] in (3, 7) and first["from"] == planned and first["to"] == "passthrough", rep
        assert first["from_measured"] and first["from_s"] >= 0.03  # rank 1's 30 ms, through the MAX
        assert rep["probes"] <= 1 + 0.02 * (STEPS - rep["start"]), rep
        col = [row[int(b)] for row in res[0]["routes"]]
        assert col[1:3] == [planned, planned] and col[first["step"]] == "passthrough"
        assert col[first["step"]:].count(planned) <= rep["probes"]
    assert res[0]["plan_loop"] == loop  # what the harness reads: state.metrics.plan["loop"]


def test_a_forced_route_is_never_overridden() -> None:
    """The same conditions with route="twophase": no loop, every compressed step on the route asked for."""
    res = launch(w_closed_loop, 2, "twophase", 1, 12)
    for r in res:
        assert r["loop"] is None and r["plan_loop"] is None
        assert r["routes"][0] == ["warm-up"] * 3  # bf16, uncounted by the loop
        assert all(row == ["twophase"] * 3 for row in r["routes"][1:])
