"""K nodes × L workers in the harness (``RunConfig.nodes``, ``--nodes``): the launcher gives every rank torchrun's
node environment (loopback too) and, emulated, one namespace per node; results record the nodes and each node's NIC
bytes; summaries and reports carry bits per coordinate leaving each node's NIC (issue 21, item 5).

Emulation tests need root, iproute2 and network namespaces; they are skipped (with the reason) elsewhere, as in
``test_netem.py``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import pytest

from tailq.errors import UsageError
from tailq.harness import launch
from tailq.harness.compare import _finished, compare, parse_method, summarize
from tailq.harness.config import RunConfig
from tailq.harness.netem import emulation_available
from tailq.harness.report import NODE_NIC, header, render, table_rows

AVAILABLE, REASON = emulation_available()
needs_emulation = pytest.mark.skipif(not AVAILABLE, reason=f"network emulation unavailable: {REASON}")
PLACE = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "GROUP_WORLD_SIZE")


class _FakeWorker:
    """Stands in for a worker process: records its command and environment; rank 0 writes a result at once."""

    started: list[_FakeWorker] = []

    def __init__(self, cmd: list[str], env: dict[str, str], **_: Any) -> None:
        self.args, self.env, self.returncode = cmd, env, 0
        _FakeWorker.started.append(self)
        if env["RANK"] == "0":
            run_dir = Path(cmd[-1]).parent  # --config RUN_DIR/config.json
            (run_dir / "result.json").write_text(json.dumps({"network": {"spec": "none"}}))

    def poll(self) -> int:
        return 0

    def wait(self, timeout: float | None = None) -> int:
        return 0


def _launch(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, **kw: Any) -> tuple[dict[str, Any], list[_FakeWorker]]:
    _FakeWorker.started = []
    real = launch.subprocess.Popen  # (the subprocess module itself: `ip` still runs for real)

    def popen(cmd: list[str], *args: Any, **kw: Any) -> Any:
        return _FakeWorker(cmd, **kw) if "tailq.harness.worker" in cmd else real(cmd, *args, **kw)

    monkeypatch.setattr(launch.subprocess, "Popen", popen)
    cfg = RunConfig(workload="synthetic", hook="bf16", steps=2, eval_every=1, run_dir=str(tmp_path / "run"), **kw)
    return launch.launch_run(cfg, timeout_s=30), _FakeWorker.started


@pytest.mark.parametrize(("workers", "nodes", "places"), [
    (4, 2, [("0", "4", "0", "2", "0", "2"), ("1", "4", "1", "2", "0", "2"), ("2", "4", "0", "2", "1", "2"),
            ("3", "4", "1", "2", "1", "2")]),
    (4, None, [(str(r), "4", "0", "1", str(r), "4") for r in range(4)]),  # the default: one worker per node
    (3, 1, [(str(r), "3", str(r), "3", "0", "1") for r in range(3)]),  # one node: torchrun --nproc-per-node 3
])
def test_the_launcher_gives_every_rank_torchruns_node_environment_on_loopback(
        workers: int, nodes: int | None, places: list[tuple[str, ...]], tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    result, procs = _launch(tmp_path, monkeypatch, workers=workers, nodes=nodes, net="none")
    assert [tuple(p.env[k] for k in PLACE) for p in procs] == places
    assert all(p.args[0] == sys.executable for p in procs)  # --net none: no namespaces
    k = workers if nodes is None else nodes
    assert result["network"] == {"spec": "none", "nodes": k, "node_size": workers // k}  # no NIC to count


@needs_emulation
@pytest.mark.parametrize("nodes", [2, None])
def test_an_emulated_run_has_one_namespace_per_node_and_counts_each_nodes_nic(
        nodes: int | None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    result, procs = _launch(tmp_path, monkeypatch, workers=4, nodes=nodes, net="100mbit")
    namespaces = [p.args[3] for p in procs]  # ip netns exec NS python -m tailq.harness.worker ...
    assert all(p.args[:3] == ["ip", "netns", "exec"] and p.env["GLOO_SOCKET_IFNAME"] == "eth0" for p in procs)
    L = 2 if nodes else 1
    assert [int(p.env["GROUP_RANK"]) for p in procs] == [r // L for r in range(4)]
    assert len(set(namespaces)) == 4 // L and namespaces == sorted(namespaces)  # ranks numbered node by node
    assert len({p.env["MASTER_ADDR"] for p in procs}) == 1
    net = result["network"]
    assert (net["nodes"], net["node_size"], len(net["tx_bytes_per_node"])) == (4 // L, L, 4 // L)
    if L == 1:  # a node is a worker: its interface is the worker's own, as before
        assert net["tx_bytes_per_rank"] == net["tx_bytes_per_node"]
    else:  # no per-worker interface to count
        assert "tx_bytes_per_rank" not in net


def test_nodes_is_validated_with_the_run() -> None:
    assert RunConfig(workers=8, nodes=2).validate().node_size == 4
    assert (RunConfig(workers=8).n_nodes, RunConfig(workers=8).node_size) == (8, 1)
    for bad in (0, 3, 16, True, 2.0, "2"):
        with pytest.raises(UsageError, match=r"--nodes must divide --workers \(8\) into nodes of equal size: "
                                             r"accepted 1, 2, 4, 8"):
            RunConfig(workers=8, nodes=bad).validate()  # type: ignore[arg-type]
    # a modeled network prices every collective on its link (the node's shared NIC, or the node link)
    RunConfig(workers=4, nodes=2, net="model:50mbit").validate()
    RunConfig(workers=4, nodes=4, net="model:50mbit").validate()


def test_the_modeled_clock_prices_the_shared_nic(tmp_path: Path) -> None:
    """--net model: with nodes: each step's clock is its compute plus the two-link model's price of the collectives
    the hook issued — for bf16 on 2 x 2 exactly link_seconds of its all-reduce, the world ring priced by what the
    node puts on its NIC."""
    from tailq.comm.network import Network
    from tailq.comm.topology import Shape, link_seconds
    from tailq.harness.launch import launch_run

    net = Network.parse("model:10mbit")
    cfg = RunConfig(workload="synthetic", workers=4, nodes=2, steps=3, eval_every=3, net="model:10mbit", hook="bf16",
                    run_dir=str(tmp_path / "run"))
    res = launch_run(cfg)
    params = res["parameters"]
    price = link_seconds(net, "world", "all_reduce", 2 * params, Shape(2, 2))
    for s in res["steps"]:
        # the modeled communication dominates (10 Mbit/s); the step's own compute adds a little on top
        assert price <= s["step_s"] <= price + s["wall_s"]


# -- summaries and reports --------------------------------------------------------------------------------
def _result(hook: str, network: dict[str, Any], wire_extra: dict[str, Any] | None = None,
            workers: int = 4) -> dict[str, Any]:
    hist = [{"step": 5, "clock": 1.0, "accuracy": 0.9, "test_loss": 0.3}]
    steps = [{"step": i, "clock": 0.2 * (i + 1), "step_s": 0.2, "codec_s": 0.0, "comm_s": 0.1} for i in range(5)]
    return {"name": hook, "config": {"hook": hook, "hook_options": {}, "workers": workers}, "history": hist,
            "steps": steps, "parameters": 1000, "network": {"spec": "100mbit", **network},
            "wire": {"bits_per_coord_handed": 16.0, "bits_per_coord_ring_traffic": 24.0, **(wire_extra or {})},
            "vnmse": []}


def test_summary_rows_carry_the_bits_leaving_each_nodes_nic() -> None:
    # 2 nodes x 2 workers, 5 steps of 1000 parameters: node NICs sent 15000 and 16000 bytes
    two_by_two = {"nodes": 2, "node_size": 2, "tx_bytes_per_node": [15000, 16000]}
    s = summarize([_result("bf16", two_by_two), _result("tnq", two_by_two, {"node_nic_bits_per_coord": 3.5})])
    assert (s["nodes"], s["node_size"]) == (2, 2)
    bf16, tnq = s["runs"]
    assert bf16["node_nic_bits_per_coord"] == pytest.approx(8 * 15500 / 5000)  # 8 · mean over nodes / (params·steps)
    assert bf16["nic_bits_per_coord"] is None  # the workers of a node share its interface: no per-worker count
    assert bf16["node_nic_bits_per_coord_model"] is None and tnq["node_nic_bits_per_coord_model"] == 3.5
    # one worker per node (and results written before nodes existed): the node is the worker
    flat = {"nodes": 4, "node_size": 1, "tx_bytes_per_node": [1000, 2000, 3000, 4000],
            "tx_bytes_per_rank": [1000, 2000, 3000, 4000]}
    for network in (flat, {"tx_bytes_per_rank": [1000, 2000, 3000, 4000]}):
        s = summarize([_result("bf16", network)])
        r = s["runs"][0]
        assert r["nic_bits_per_coord"] == r["node_nic_bits_per_coord"] == pytest.approx(8 * 2500 / 5000)
        assert (s["nodes"], s["node_size"]) == (4, 1)
    r = summarize([_result("bf16", {})])["runs"][0]  # loopback: nothing counted
    assert r["nic_bits_per_coord"] is None and r["node_nic_bits_per_coord"] is None


def test_reports_show_the_node_nic_column_beside_the_workers_when_nodes_are_shared(tmp_path: Path) -> None:
    two_by_two = {"nodes": 2, "node_size": 2, "tx_bytes_per_node": [15000, 16000]}
    s = summarize([_result("bf16", two_by_two), _result("tnq", two_by_two, {"node_nic_bits_per_coord": 3.5})])
    s.update(workload="synthetic", workers=4, steps=5)
    cols = header(s)
    assert cols[cols.index("bits/coord (NIC)") + 1] == NODE_NIC
    rows = table_rows(s)
    assert all(len(r) == len(cols) for r in rows)
    assert rows[0][cols.index(NODE_NIC)] == "24.80" and rows[1][cols.index(NODE_NIC)] == "24.80 (3.50)"
    s_flat = summarize([_result("bf16", {"tx_bytes_per_rank": [1000] * 4})])
    s_flat.update(workload="synthetic", workers=4, steps=5)
    assert NODE_NIC not in header(s_flat) and len(table_rows(s_flat)[0]) == len(header(s_flat))
    (tmp_path / "results.json").write_text(json.dumps({**s, "run_dirs": {}}))
    md = render(tmp_path).read_text()
    assert "4 workers on 2 nodes" in md and f"| {NODE_NIC} |" in md and "24.80 (3.50)" in md


def test_resume_keeps_runs_finished_before_nodes_existed(tmp_path: Path) -> None:
    cfg = RunConfig(workload="synthetic", hook="bf16", workers=2, steps=2, eval_every=1, run_dir=str(tmp_path))
    old = {k: v for k, v in cfg.to_dict().items() if k != "nodes"}  # a result.json written before the field
    (tmp_path / "result.json").write_text(json.dumps({"config": old, "history": [{}], "steps": [{}]}))
    assert _finished(cfg) is not None
    cfg.nodes = 1
    assert _finished(cfg) is None  # another layout is another run


# -- end to end --------------------------------------------------------------------------------------------
@pytest.mark.slow
@needs_emulation
def test_a_comparison_on_two_nodes_of_two_workers_counts_each_nodes_nic(tmp_path: Path) -> None:
    root = compare(workload="synthetic", workers=4, nodes=2, net="200mbit", methods=[parse_method("bf16")],
                   steps=4, eval_every=2, out_dir=str(tmp_path), run_id="c", quiet=True)
    summary = json.loads((root / "results.json").read_text())
    assert (summary["nodes"], summary["node_size"]) == (2, 2)
    bf16 = summary["runs"][0]
    print(f"\nbf16, synthetic, 2 nodes x 2 workers at 200 Mbit/s: {bf16['node_nic_bits_per_coord']:.2f} bits/coord "
          f"left each node's NIC (ring model 24), step {1e3 * bf16['step_s']:.0f} ms")
    # a bf16 ring all-reduce over 4 ranks numbered node by node: one ring edge leaves each node, 2·3/4·16 = 24 bits
    # per coordinate, plus headers, barriers, the evaluations' broadcasts and DDP's initial fp32 broadcast of the
    # parameters spread over only 4 steps (measured: 34.5 here, 32.2 per worker with one worker per node)
    assert 24 <= bf16["node_nic_bits_per_coord"] <= 48, bf16
    assert bf16["nic_bits_per_coord"] is None
    result = json.loads((root / "bf16" / "result.json").read_text())
    assert len(result["network"]["tx_bytes_per_node"]) == 2 and result["config"]["nodes"] == 2
    assert NODE_NIC in (root / "report.md").read_text()
    plan = json.loads((root / "compare.json").read_text())
    assert plan["extra"]["nodes"] == 2  # --resume keeps the layout
