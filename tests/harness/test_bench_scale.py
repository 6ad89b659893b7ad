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


@pytest.mark.slow
@pytest.mark.skipif(not AVAILABLE, reason=f"network emulation unavailable: {REASON}")
def test_scale_bench_on_two_nodes_of_two_workers_counts_each_nodes_nic(tmp_path: Path) -> None:
    """A K x L case: 2 nodes of 2 workers sharing each node's link; NIC bytes are counted per node."""
    from tailq.tools.scale import HIER_ROUTES, ROUTES, run_scale_bench

    out = tmp_path / "scale.json"
    assert run_scale_bench(Network.parse("200mbit"), [], [1 << 16], steps=2, modeled=[], json_out=str(out),
                           grid=[(2, 2)]) == 0
    rep = json.loads(out.read_text())
    assert rep["cases"] == [[2, 2]]
    measured = {r["route"]: r for r in rep["measured"]}
    model = {r["route"]: r for r in rep["modeled"] if (r["K"], r["L"]) == (2, 2)}  # the two-link model
    assert set(measured) == {"bf16", *ROUTES, *HIER_ROUTES} == set(model)
    for route, r in measured.items():
        assert (r["N"], r["K"], r["L"]) == (4, 2, 2)
        assert r["nic_bits"] is None  # two workers share each interface: no per-worker count
        # the model counts the payload; the hook's wire log adds its statistics; the interface adds TCP/IP headers,
        # the ACKs of what the node receives and the per-step barriers (measured: up to 1.18x the wire log on the
        # two-phase route, whose messages are the smallest and most numerous, at 2^16 values)
        assert model[route]["ring_bits"] <= r["hook_node_nic_bits"] + 1e-9, route
        assert r["hook_node_nic_bits"] <= r["node_nic_bits"] <= 1.25 * r["hook_node_nic_bits"] + 0.5, route
        assert r["ms"] > 0 and r["x_bf16"] > 0
    # the hierarchical routes put less on each node's NIC than their flat counterparts
    for flat in ROUTES:
        assert measured[f"hier-{flat}"]["node_nic_bits"] < measured[flat]["node_nic_bits"], flat
    bf16 = measured["bf16"]  # PyTorch's bf16 hook: Gloo's ring all-reduce, 2·3/4·16 = 24 bits per node
    assert 24 <= bf16["node_nic_bits"] <= 1.3 * 24 + 0.5


def test_grid_cases_are_k_nodes_by_l_workers() -> None:
    from tailq.tools.scale import parse_grid

    assert parse_grid("2x4") == (2, 4) and parse_grid("4X2") == (4, 2) and parse_grid("1x2") == (1, 2)
    for bad in ("2by2", "1x1", "8x16", "0x4", "2x", "x2", "2x2x2", "-1x4", ""):
        with pytest.raises(ValueError, match=r"--grid must be KxL \(K nodes x L workers per node, e.g. 2x4\) with "
                                             r"2 <= K\*L <= 64"):
            parse_grid(bad)


@pytest.mark.skipif(not AVAILABLE, reason=f"network emulation unavailable: {REASON}")
@pytest.mark.parametrize(("argv", "workers", "grid"), [
    (["--grid", "2x2", "2x4"], None, [(2, 2), (2, 4)]),  # --grid alone: its cases only
    (["--workers", "3", "--grid", "4x2"], [3], [(4, 2)]),  # both: both sets
    ([], [2, 4, 8, 16], None),  # neither: the default worker counts, one per node
])
def test_bench_scale_takes_a_grid_beside_or_instead_of_worker_counts(
        argv: list[str], workers: list[int] | None, grid: list[tuple[int, int]] | None,
        monkeypatch: pytest.MonkeyPatch) -> None:
    import tailq.tools.scale
    from tailq.cli import main

    got: dict[str, object] = {}

    def fake(net: Network, workers: list[int] | None, numels: list[int], **kw: object) -> int:
        got.update(workers=workers, grid=kw["grid"])
        return 0

    monkeypatch.setattr(tailq.tools.scale, "run_scale_bench", fake)
    assert main(["bench", "scale", "--net", "200mbit", *argv]) == 0
    assert got == {"workers": workers, "grid": grid}
