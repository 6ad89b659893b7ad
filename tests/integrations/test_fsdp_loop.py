"""``tailq.fsdp``'s ``route="auto"``: the closed loop (tailq.comm.adapt) per FSDP2 module, on real Gloo ranks.

Each module's reduce-scatter is the compressed call (phase 1 of the two-phase route) or a bf16 all-to-all, chosen by
the loop; the ranks agree the measured seconds at the end of the step (the autograd final callback that closes it,
after FSDP's own). The comm is told a 10 Mbit/s network it does not have (loopback), so the model's prior picks
compression for every module, and rank 1 is made slow on every compressed call: the model is wrong, and the ranks
disagree about by how much. FSDP reshards after forward (its default), so its parameter all-gathers run inside the
backward between the reduce-scatters: a decision issued at another point on one rank would mismatch them.

Decision points: the loop starts at step 0, decides at the end of steps 1, 5, 9, 13, ... (first after 2 steps, then
every ``adapt_every`` = 4).
"""

from __future__ import annotations

import io
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "distributed"))  # the project's Gloo launcher
from workers import heavy, launch  # noqa: E402

SEED = 7
SLOW_S = 0.03  # rank 1's extra seconds on every compressed call
MODULES = ["0", "2", "<root>"]  # compress()'s names of _model's FSDP units: 16,640, 65,792 and 2,570 elements


def _model() -> torch.nn.Module:
    """Linear 64→256→256→10: the first two their own FSDP units, the last one the root's (reduced in FSDP's final
    callback): three reduce-scatters per backward."""
    from torch.distributed.fsdp import fully_shard

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.ReLU(), torch.nn.Linear(256, 256),
                                torch.nn.ReLU(), torch.nn.Linear(256, 10))
    fully_shard(model[0])
    fully_shard(model[2])
    fully_shard(model)
    return model


def _comm(model: torch.nn.Module, rank: int, slow_rank: int, bf16_s: float = 0.0, **options: Any) -> Any:
    """``compress(model, "tnq", bits=3)`` priced on 10 Mbit/s; rank ``slow_rank`` spends ``SLOW_S`` more on every
    compressed call (a busy rank), every rank ``bf16_s`` more on every bf16 call (a steadier measurement)."""
    import tailq.fsdp
    from tailq.comm.network import Network

    comm = tailq.fsdp.compress(model, "tnq", bits=3, min_bucket=0, seed=SEED, network=Network.parse("model:10mbit"),
                               **options)
    compressed, bf16 = comm._compressed, comm._bf16

    def slow_compressed(*args: Any) -> Any:
        time.sleep(SLOW_S)
        return compressed(*args)

    def slow_bf16(*args: Any) -> Any:
        time.sleep(bf16_s)
        return bf16(*args)

    if rank == slow_rank:
        comm._compressed = slow_compressed
    if bf16_s:
        comm._bf16 = slow_bf16
    return comm


def _train(model: torch.nn.Module, comm: Any, rank: int, steps: range) -> list[dict[str, str]]:
    """SGD steps on random data (each rank its own); per step every module's route."""
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    routes = []
    for step in steps:
        gen = torch.Generator().manual_seed(1000 * step + rank)
        x, y = torch.randn(32, 64, generator=gen), torch.randint(0, 10, (32,), generator=gen)
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        assert comm.step == step + 1 and comm.calls_per_step == 3
        routes.append({v["module"]: v["route"] for v in comm.metrics.last.values()})
    return routes


# ------------------------------------------------------------------------------------------------ workers
def w_auto(rank: int, world: int, steps: int) -> dict[str, Any]:
    model = _model()
    comm = _comm(model, rank, slow_rank=1, route="auto")
    routes = _train(model, comm, rank, range(steps))
    plan_steps = sorted({r.step for r in comm.metrics.wire.records if r.kind == "plan"})
    return {"routes": routes, "loop": comm.loop.report(), "plan": comm.metrics.plan, "plan_steps": plan_steps,
            "state_loop": comm.state_dict()["loop"] is not None}


def w_forced(rank: int, world: int, steps: int) -> dict[str, Any]:
    out = {}
    for name, opts in (("default", {}), ("twophase", {"route": "twophase"})):
        model = _model()
        comm = _comm(model, rank, slow_rank=1, **opts)
        routes = _train(model, comm, rank, range(steps))
        out[name] = {"routes": routes, "loop": comm.loop is None, "plan": comm.metrics.plan,
                     "state": {k: v for k, v in comm.state_dict().items() if k in ("loop", "loop_modules", "prior")},
                     "route": comm.state_dict()["config"]["route"]}
    return out


def w_resume(rank: int, world: int, save_at: int, steps: int) -> dict[str, Any]:
    """Run A to ``save_at`` steps, save its state (through torch.save / torch.load), go on to ``steps``; load the state
    into a fresh comm B (a fresh model) and run B from ``save_at`` to ``steps``."""
    opts = {"route": "auto", "explore": 0.5}  # routine re-probes every 4 steps, doubling after each that confirms
    model = _model()
    a = _comm(model, rank, slow_rank=1, bf16_s=0.01, **opts)
    head = _train(model, a, rank, range(save_at))
    buf = io.BytesIO()
    torch.save(a.state_dict(), buf)
    saved_report = a.loop.report()
    tail_a = _train(model, a, rank, range(save_at, steps))
    model_b = _model()
    b = _comm(model_b, rank, slow_rank=1, bf16_s=0.01, **opts)
    state = torch.load(io.BytesIO(buf.getvalue()), weights_only=True)
    b.load_state_dict(state)
    loaded_report, loaded_step = b.loop.report(), b.step
    tail_b = _train(model_b, b, rank, range(save_at, steps))
    return {"head": head, "tail_a": tail_a, "tail_b": tail_b, "saved": saved_report, "loaded": loaded_report,
            "loaded_step": loaded_step, "samples": [len(s) for bl in state["loop"]["buckets"].values()
                                                    for s in bl["samples"]],
            "a": a.loop.report(), "b": b.loop.report(), "b_plan": b.metrics.plan}


def w_hier(rank: int, world: int, steps: int) -> dict[str, Any]:
    """Direct calls (each one a step) on 2 nodes of 2 workers, route="auto", deciding every step: the arms are the
    hierarchical compressed call and the flat bf16 all-to-all; per step the route and, on bf16, whether the output is
    bit for bit the fp32 sum in rank order of the bf16 chunks (what the ``bf16`` passthrough computes), over N."""
    import torch.distributed as dist

    import tailq.fsdp
    from tailq.comm.network import Network

    comm = tailq.fsdp.reduce_scatter("tnq", bits=3, min_bucket=0, seed=SEED, node_size=2, route="auto",
                                     adapt_every=1, network=Network.parse("model:1gbit"))
    view = comm.for_module("m")
    out = []
    for step in range(steps):
        x = heavy(world * 2048, seed=100 * step + rank)
        got = torch.empty(2048)
        view(got, x, dist.group.WORLD, dist.ReduceOp.AVG)
        rows = [torch.empty(world * 2048, dtype=torch.bfloat16) for _ in range(world)]
        dist.all_gather(rows, x.to(torch.bfloat16))
        total = rows[0].view(world, -1)[rank].float().clone()
        for row in rows[1:]:
            total += row.view(world, -1)[rank].float()
        out.append({"route": comm.metrics.last[0]["route"], "bf16_equal": bool(torch.equal(got, total / world))})
    return {"steps": out, "loop": comm.loop.report(), "nodes": comm.metrics.topology["nodes"]}


def w_shard(rank: int, world: int) -> dict[str, Any]:
    """The harness's ``shard`` with the options a ``--fsdp`` worker hands it for ``tnq:3:route=auto`` on 20mbit."""
    from tailq.comm.network import Network
    from tailq.harness.fsdp import shard

    model = torch.nn.Sequential(torch.nn.TransformerEncoderLayer(8, 2, 16), torch.nn.Linear(8, 2))
    comm = shard(model, "tnq", {"bits": 3, "route": "auto", "network": Network.parse("20mbit"), "measure_every": 0,
                                "seed": 1})
    return {"route": comm.route, "loop": comm.loop is not None, "network": comm.network.as_arg()}


# ------------------------------------------------------------------------------------------------ checks
def _decisions(report: dict[str, Any]) -> dict[str, Any]:
    """What the loop decided per module (the measured costs aside): the route, probes and switches."""
    return {i: (b["route"], b["probes"], b["probe_steps"], [(w["step"], w["from"], w["to"]) for w in b["switches"]])
            for i, b in report.items()}


@pytest.mark.slow
def test_ranks_that_measure_different_costs_take_the_same_routes_and_leave_compression() -> None:
    """Rank 1 spends 30 ms more on each compressed call, rank 0 does not: the MAX over ranks decides, so both ranks
    take the same route for every module at every step (else their collectives mismatch and the run fails), and
    every module moves to bf16 within two decisions and stays there but for probes within the budget."""
    steps = 14
    res = launch(w_auto, 2, steps)
    assert res[0]["routes"] == res[1]["routes"]
    assert res[0]["loop"] == res[1]["loop"]
    loop, plan = res[0]["loop"], res[0]["plan"]
    assert plan["loop"] == loop  # what the harness reports (metrics.plan["loop"], written at each decision)
    names = plan["loop_modules"]
    assert sorted(names.values()) == sorted(MODULES) and sorted(loop) == sorted(names)
    assert plan["network"]["describe"] and plan["codec_ns_per_elem_pass"] > 0  # the prior's inputs
    # the codec's cost agreed at the first call (step 0), then decisions at the end of steps 1, 5, 9 and 13 only
    assert res[0]["plan_steps"] == [0, 1, 5, 9, 13] and res[0]["state_loop"]
    for i, rep in loop.items():
        name = names[i]
        assert rep["planned"] == "reduce_scatter", rep  # 10 Mbit/s: the model compresses every module
        assert rep["route"] == "passthrough", rep
        first = rep["switches"][0]
        # the first decision (end of step 1) switches where bf16's modeled cost is already below the measured
        # compressed one; where the model prices bf16 above it (the 65,792-element module: 52 ms at 10 Mbit/s), step 2
        # probes bf16 and the decision at the end of step 5 switches
        assert first["step"] in (2, 6) and (first["from"], first["to"]) == ("reduce_scatter", "passthrough"), rep
        assert first["from_measured"] and first["from_s"] >= SLOW_S  # rank 1's 30 ms, through the MAX
        assert rep["probes"] <= 1 + 0.02 * (steps - rep["start"]), rep
        col = [row[name] for row in res[0]["routes"]]
        assert col[:2] == ["reduce_scatter"] * 2 and col[first["step"]] == "passthrough", col
        assert col[first["step"]:].count("reduce_scatter") <= rep["probes"], col


@pytest.mark.slow
def test_a_forced_route_is_never_overridden() -> None:
    """The same conditions without the loop: the default and route="twophase" compress every call of every step."""
    steps = 7
    for r in launch(w_forced, 2, steps):
        for name in ("default", "twophase"):
            got = r[name]
            assert got["route"] == "twophase" and got["loop"], name
            assert got["routes"] == [dict.fromkeys(MODULES, "reduce_scatter")] * steps, name
            assert "loop" not in got["plan"] and got["state"] == {"loop": None, "loop_modules": {}, "prior": None}


@pytest.mark.slow
def test_a_state_saved_mid_run_continues_with_the_same_decisions() -> None:
    """Saved after 8 steps — after two decisions, with the window of steps 6 and 7 unfinished, a probe's sample in
    it — and loaded into a fresh comm: the next 14 steps take the same route for every module at every step as the run
    that went on, and the loop ends with the same switches and probes. The sample matters: without it the decision
    at the end of step 9 would not see the probe and would probe again at step 10."""
    save_at, steps = 8, 22
    res = launch(w_resume, 2, save_at, steps)
    assert res[0]["tail_a"] == res[1]["tail_a"] and res[0]["tail_b"] == res[1]["tail_b"]
    for r in res:
        assert r["loaded_step"] == save_at and r["loaded"] == r["saved"]
        assert sum(r["samples"]) > 0  # the unfinished window travels with the state
        assert r["tail_b"] == r["tail_a"], (r["tail_a"], r["tail_b"])
        assert _decisions(r["b"]) == _decisions(r["a"])
        assert r["b_plan"]["loop_modules"] and r["b_plan"]["loop"]
        # the run did switch and probe: the continuation has something to agree with
        assert all(b["route"] == "passthrough" and b["switches"] for b in r["a"].values())
        assert any(row[m] == "reduce_scatter" for row in r["tail_a"] for m in MODULES)  # a routine re-probe


@pytest.mark.slow
def test_on_nodes_of_several_workers_the_arms_are_the_hierarchical_call_and_flat_bf16() -> None:
    """2 nodes × 2 workers: the loop's compressed arm is the hierarchical call (priced by its node stage and the
    cross-node all-to-all), its bf16 arm the flat all-to-all; the ranks agree on every step's route, and a bf16 step
    gives exactly the bf16 passthrough's result."""
    steps = 6
    res = launch(w_hier, 4, steps)
    assert all(r["steps"] == res[0]["steps"] and r["loop"] == res[0]["loop"] for r in res)
    (rep,) = res[0]["loop"].values()
    assert set(rep["costs_ms"]) == {"hier-reduce_scatter", "passthrough"} and res[0]["nodes"] == 2
    assert all(v > 0 for v in rep["costs_ms"].values())
    for r in res:
        routes = [s["route"] for s in r["steps"]]
        assert set(routes) <= {"hier-reduce_scatter", "passthrough"} and "passthrough" in routes, routes
        assert all(s["bf16_equal"] for s in r["steps"] if s["route"] == "passthrough"), r["steps"]


class _Event:
    """A stand-in for ``torch.cuda.Event`` on a CPU-only machine: each record() is 5 ms after the last."""

    now = 0.0

    def __init__(self, enable_timing: bool = False) -> None:
        assert enable_timing
        self.at: float | None = None
        self.synced = False

    def record(self) -> None:
        _Event.now += 5.0
        self.at = _Event.now

    def synchronize(self) -> None:
        self.synced = True

    def elapsed_time(self, end: _Event) -> float:
        assert end.synced and self.at is not None and end.at is not None
        return end.at - self.at


def test_gpu_measurements_are_read_when_the_step_closes_into_the_arm_that_ran() -> None:
    """On a GPU a call's seconds come from events on the stream, read at the step's end (not during the backward),
    and go to the arm that ran in that step: checked with a stand-in event (this machine has no GPU)."""
    import tailq.fsdp
    from tailq.comm.adapt import ClosedLoop, LoopConfig

    comm = tailq.fsdp.reduce_scatter("tnq", bits=3, route="auto")
    comm.loop = loop = ClosedLoop(LoopConfig(), lambda n: ("reduce_scatter", "passthrough", 1.0, 2.0))
    assert loop.route(0, "m:64", 64, 0) == "reduce_scatter"
    start = _Event(enable_timing=True)
    start.record()
    comm._stop_clock(0, start)
    assert loop.buckets[0].samples == [[], []] and len(comm._clocks) == 1  # nothing read during the step
    comm._task = -1  # the open step of a direct call
    comm._end_step(-1)
    assert comm.step == 1 and comm._clocks == []
    assert loop.buckets[0].samples == [[(0.005, True)], []]  # 5 ms, the arm's first sample (cold)
    comm._stop_clock(0, time.perf_counter())  # on the CPU: recorded at once
    assert len(loop.buckets[0].samples[0]) == 2


def test_the_harness_passes_route_auto_and_names_modules_in_the_loop_report() -> None:
    """``--fsdp --methods tnq:3:route=auto``: the run's configuration accepts it (the comm is built unbound to check,
    as for every method), ``shard`` hands the FSDP comm ``route`` and the run's network, and the report's closed-loop
    section names each module."""
    from tailq.harness.config import RunConfig
    from tailq.harness.report import _loop_section

    RunConfig(workload="charlm", hook="tnq", hook_options={"bits": 3, "route": "auto"}, fsdp=True).validate()
    with pytest.raises(Exception, match="route must be 'twophase'"):
        RunConfig(workload="charlm", hook="tnq", hook_options={"bits": 3, "route": "allgather"}, fsdp=True).validate()
    assert launch(w_shard, 1) == [{"route": "auto", "loop": True, "network": "20mbit"}]
    rep = {"numel": 4096, "planned": "reduce_scatter", "route": "passthrough",
           "costs_ms": {"reduce_scatter": 9.0, "passthrough": 2.0}, "measured": {"reduce_scatter": True,
                                                                                  "passthrough": False},
           "probes": 0, "probe_steps": [], "start": 0,
           "switches": [{"step": 2, "from": "reduce_scatter", "to": "passthrough", "why": "cheaper"}]}
    lines = _loop_section({"tnq": {"plan": {"loop": {"0": rep}, "loop_modules": {"0": "blocks.layers.1"}}}})
    assert "| tnq | 0 (blocks.layers.1) | 4,096 | reduce_scatter | **passthrough** | reduce_scatter 9, passthrough 2 " \
           "(modeled) | 0 | 1 |" in lines
    assert "- tnq, module 0 (blocks.layers.1), step 2: reduce_scatter → **passthrough** (cheaper)" in lines
    ddp = _loop_section({"tnq": {"plan": {"loop": {"0": rep}}, "direct_buckets": 1234}})  # DDP's: buckets, unnamed
    assert "- tnq, bucket 0, step 2: reduce_scatter → **passthrough** (cheaper)" in ddp
    assert "- tnq: 1,234 bucket-steps went as bf16 straight from DDP's thread (no worker hop; rank 0)" in ddp
    assert not any("DDP's thread" in line for line in lines)  # none counted (FSDP has no such path)


@pytest.mark.slow
def test_compare_fsdp_with_route_auto(tmp_path: Path) -> None:
    """``tailq compare --fsdp --methods bf16 tnq:3:route=auto`` runs, and its report has the loop's section."""
    import json

    from tailq.cli import main

    rc = main(["compare", "--fsdp", "--workload", "charlm", "--workers", "2", "--steps", "6", "--eval-every", "3",
               "--net", "none", "--methods", "bf16", "tnq:3:route=auto", "--out", str(tmp_path), "--id", "auto"])
    assert rc == 0
    res = json.loads((tmp_path / "auto" / "tnq-3b(route=auto)" / "result.json").read_text())
    loop, names = res["plan"]["loop"], res["plan"]["loop_modules"]
    assert sorted(loop) == sorted(names) and "<root>" in names.values()
    assert set(res["routes"]) <= {"reduce_scatter", "passthrough"}
    assert all(b["route"] in ("reduce_scatter", "passthrough") for b in loop.values())
    report = (tmp_path / "auto" / "report.md").read_text()
    assert "what the closed loop measured and switched" in report and "(<root>)" in report
