"""`tailq bench scale` end to end on a 2-host emulated network: every route measured beside the cost model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tailq.comm.network import Network
from tailq.harness.netem import emulation_available

AVAILABLE, REASON = emulation_available()


@pytest.mark.slow
@pytest.mark.skipif(not AVAILABLE, reason=f"network emulation unavailable: {REASON}")
def test_scale_bench_counts_nic_bytes_near_the_cost_model(tmp_path: Path) -> None:
    from tailq.tools.scale import run_scale_bench

    out = tmp_path / "scale.json"
    assert run_scale_bench(Network.parse("200mbit"), [3], [1 << 16], steps=2, modeled=[64], json_out=str(out)) == 0
    rep = json.loads(out.read_text())
    measured = {r["route"]: r for r in rep["measured"]}
    model = {(r["N"], r["route"]): r for r in rep["modeled"]}
    assert set(measured) == {"bf16", "allreduce", "allgather", "twophase"}
    for route, r in measured.items():
        # NIC bytes = the ring traffic plus TCP/IP headers, acknowledgements and the per-step barriers
        assert model[(3, route)]["ring_bits"] <= r["nic_bits"] <= 1.3 * model[(3, route)]["ring_bits"] + 0.5, route
        assert r["ms"] > 0 and r["x_bf16"] > 0
    assert 0 < measured["twophase"]["vnmse_phase2"] < measured["twophase"]["vnmse_phase1"]
    assert {r["N"] for r in rep["modeled"]} == {3, 64}
