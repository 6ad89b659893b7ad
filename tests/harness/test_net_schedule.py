"""``--net-schedule``: the network's rate changes at given training steps, mid-run (tailq.harness.net_schedule).

What is checked, and the arithmetic behind the margins:

* parsing and validation (one line naming the option and the accepted form; the CLI's cases are in
  ``tests/harness/test_harness_faults.py::test_bad_input_is_one_clear_line_and_exit_2``);
* the shaping lines of a change are the set-up's (same burst and queue rules at the new rate, ``change`` for
  ``replace``);
* the handshake: rank 0 asks the launcher, which changes the links and acknowledges; without a launcher, or when it
  does not answer, one line naming the option;
* emulated (slow): 2 workers, bf16, digits (301,066 parameters: one 602,132-byte bf16 bucket, which a 2-worker ring
  all-reduce sends whole over each uplink): at 1 Gbit/s that is 4.8 ms on the wire, at 20 Mbit/s 241 ms. The
  steps from the change on wait on their collective at least ~0.8 × 241 ms (the 16 KiB token bucket lends a few
  ms), those before and after it mostly CPU (ms to tens of ms on a loaded 2-core machine): the slow steps' median
  communication time must exceed the fast ones' by half the wire-time difference and by a factor of 2 (measured
  here: ~250 ms against ~5-15 ms, a factor of 20-50). The kernel's token buckets, read from inside the namespaces
  while the run goes, hold 20 Mbit/s on every node link in both directions, and 1 Gbit/s before and after;
* modeled (slow): each step's modeled communication is the cost model's at that step's rate, to 1e-9 relative;
  the hook's route planner is told the starting network only; the schedule is in the config, the results, the
  report's network line, and ``compare --resume`` keeps it.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from tailq.comm.network import Network
from tailq.errors import UsageError
from tailq.harness.config import RunConfig
from tailq.harness.net_schedule import ACK, REQUEST, NetSchedule, ScheduleApplier, _ask_launcher
from tailq.harness.netem import EmulatedNetwork, emulation_available

AVAILABLE, REASON = emulation_available()
needs_emulation = pytest.mark.skipif(not AVAILABLE, reason=f"network emulation unavailable: {REASON}")


# ------------------------------------------------------------------------------------------------- parsing
@pytest.mark.parametrize(("text", "changes", "canonical"), [
    ("40:20mbit,80:1gbit", ((40, 20e6), (80, 1e9)), "40:20mbit,80:1gbit"),
    (" 1 : 100kbit , 2:100gbit ", ((1, 1e5), (2, 1e11)), "1:100kbit,2:100gbit"),
    ("5:10mbps", ((5, 8e7),), "5:80mbit"),  # bytes per second, as --net reads it
    ("3:2.5GBit", ((3, 2.5e9),), "3:2.5gbit"),
])
def test_parse_accepts_and_round_trips(text: str, changes: tuple[tuple[int, float], ...], canonical: str) -> None:
    sched = NetSchedule.parse(text)
    assert sched.changes == changes
    assert sched.as_arg() == canonical and NetSchedule.parse(sched.as_arg()) == sched


@pytest.mark.parametrize(("text", "words"), [
    ("", "an entry is empty"),
    ("4:1gbit,", "an entry is empty"),
    ("40", "'40' is not STEP:RATE"),
    ("4:1gbit,1ms", "'1ms' is not STEP:RATE"),  # the delay does not change
    ("0:1gbit", "the step '0' is not a positive integer"),
    ("-3:1gbit", "the step '-3' is not a positive integer"),
    ("2.5:1gbit", "the step '2.5' is not a positive integer"),
    ("4:fast", "'fast' is not a RATE"),
    ("4:model:1gbit", "'model:1gbit' is not a RATE"),
    ("4:none", "'none' is not a RATE"),
    ("4:99kbit", "the rate '99kbit' is outside 100kbit..100gbit"),
    ("4:101gbit", "the rate '101gbit' is outside 100kbit..100gbit"),
    ("8:1gbit,4:20mbit", "the steps must increase (8, then 4)"),
    ("4:1gbit,4:20mbit", "the steps must increase (4, then 4)"),
])
def test_parse_refuses_with_one_line_naming_the_option_and_the_form(text: str, words: str) -> None:
    with pytest.raises(UsageError) as err:
        NetSchedule.parse(text)
    msg = str(err.value)
    assert msg.startswith("--net-schedule: cannot use ") and words in msg and "\n" not in msg
    assert "accepted: STEP:RATE[,STEP:RATE...]" in msg and "100kbit..100gbit" in msg


def test_the_run_configuration_checks_it_against_the_network_and_keeps_it(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match=r"^--net-schedule: --net none \(loopback\) cannot be shaped"):
        RunConfig(workers=2, steps=10, net="none", net_schedule="4:20mbit").validate()
    with pytest.raises(UsageError, match=r"step 10 is not below --steps \(10\): it would never happen"):
        RunConfig(workers=2, steps=10, net="model:1gbit", net_schedule="4:20mbit,10:1gbit").validate()
    cfg = RunConfig(workers=2, steps=10, net="model:1gbit", net_schedule="4:20mbit,8:1gbit").validate()
    cfg.save(tmp_path / "config.json")
    assert json.loads((tmp_path / "config.json").read_text())["net_schedule"] == "4:20mbit,8:1gbit"
    assert RunConfig.load(tmp_path / "config.json").net_schedule == cfg.net_schedule
    assert RunConfig().to_dict()["net_schedule"] is None  # results saved before the option compare equal


def test_the_rate_each_step_has() -> None:
    sched = NetSchedule.parse("4:20mbit,8:1gbit")
    net = Network.parse("model:100mbit,1ms,node=10gbit")
    assert [sched.change_at(s) for s in (0, 3, 4, 7, 8, 100)] == [0, 0, 1, 1, 2, 2]
    assert [sched.network_at(net, s).rate_bps for s in (3, 4, 8)] == [100e6, 20e6, 1e9]
    assert sched.network_at(net, 5) == Network.parse("model:20mbit,1ms,node=10gbit")  # only the rate changes
    assert sched.describe(net) == "modeled 100 Mbit/s, 1 ms; node link 10 Gbit/s; 20 Mbit/s from step 4, 1 Gbit/s " \
                                  "from step 8"


# ------------------------------------------------------------------------------------------------- shaping lines
@pytest.mark.parametrize("net", ["1gbit", "1gbit,2ms"])
def test_a_change_shapes_with_the_set_ups_rules_at_the_new_rate(net: str) -> None:
    """No namespaces needed: the lines a change runs are the set-up's at the new rate, with ``change``."""
    start = EmulatedNetwork(2, Network.parse(net))
    slow = Network.parse(net.replace("1gbit", "20mbit"))
    for dev in ("eth0", "p1"):
        changed = start.tc_commands(dev, 20e6, verb="change")
        assert changed == [line.replace("qdisc replace", "qdisc change", 1)
                           for line in EmulatedNetwork(2, slow).tc_commands(dev)]
        assert all(line.startswith(f"qdisc change dev {dev} ") for line in changed)
    assert start.tc_commands("eth0") == EmulatedNetwork(2, Network.parse(net)).tc_commands("eth0", 1e9)
    assert "burst 125000 limit 125000000" in start.tc_commands("eth0")[-1]  # 1 ms of tokens, 1 s of queue
    assert "tbf rate 20000000bit burst 16384 limit 33554432" in start.tc_commands("eth0", 20e6)[-1]  # the floors
    with pytest.raises(ValueError, match="verb"):
        start.tc_commands("eth0", verb="add")


# ------------------------------------------------------------------------------------------------- handshake
class _FakeNet:
    def __init__(self) -> None:
        self.spec = Network.parse("1gbit")
        self.rate_bps = 1e9
        self.calls: list[float] = []

    def set_rate(self, rate: float) -> None:
        self.calls.append(rate)
        self.rate_bps = rate

    def qdisc_rates(self) -> list[dict[str, float]]:
        return [{"uplink": self.rate_bps, "downlink": self.rate_bps}] * 2


def test_the_launcher_applies_what_rank_0_asks_once_and_acknowledges(tmp_path: Path) -> None:
    sched = NetSchedule.parse("4:20mbit,8:1gbit")
    fake = _FakeNet()
    (tmp_path / REQUEST).write_text('{"change": 1, "step": 4}')  # stale, from an earlier run in this directory
    applier = ScheduleApplier(tmp_path, sched, fake)
    assert not (tmp_path / REQUEST).exists() and json.loads((tmp_path / ACK).read_text())["change"] == 0
    applier.poll()
    assert fake.calls == []  # nothing asked
    (tmp_path / REQUEST).write_text('{"change": 1, "step": 4}')
    applier.poll()
    applier.poll()  # asked once, applied once
    assert fake.calls == [20e6] and json.loads((tmp_path / ACK).read_text())["change"] == 1
    (tmp_path / REQUEST).write_text('{"change": 2, "step": 8}')
    applier.poll()
    assert fake.calls == [20e6, 1e9]
    assert [(r["step"], r["rate"], r["tc_rates_bps"][1]["downlink"]) for r in applier.record] == [
        (4, "20mbit", 20e6), (8, "1gbit", 1e9)]


def test_rank_0_without_a_launcher_or_an_answer_gets_one_line(tmp_path: Path) -> None:
    sched, net = NetSchedule.parse("4:20mbit"), Network.parse("1gbit")
    why = _ask_launcher(tmp_path, sched, net, 1, 4, timeout_s=5)
    assert why.startswith("--net-schedule: the change to 20mbit at step 4 needs tailq's launcher") and ACK in why
    (tmp_path / ACK).write_text('{"change": 0}')  # a launcher that never answers
    t0 = time.monotonic()
    why = _ask_launcher(tmp_path, sched, net, 1, 4, timeout_s=0.3)
    assert 0.3 <= time.monotonic() - t0 < 5
    assert why.startswith("--net-schedule: the launcher did not change the rate to 20mbit at step 4 within 0.3 s")
    assert json.loads((tmp_path / REQUEST).read_text())["change"] == 1


# ------------------------------------------------------------------------------------------------- end to end
class _TcWatcher(threading.Thread):
    """Reads the tbf rate of every shaped link of this process's emulated networks from inside their namespaces
    (``tq-<pid>-<tag>-w<k>`` and ``-sw``), every 50 ms: ``seen`` maps ``device@node`` (``eth0@w0``, ``p0@sw``) to
    the rates observed, in order, without repeats."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.stop = threading.Event()
        self.seen: dict[str, list[float]] = {}

    def run(self) -> None:
        prefix = f"tq-{os.getpid()}-"
        while not self.stop.is_set():
            names = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout.split()
            for ns in [n for n in names if n.startswith(prefix) and not n.rsplit("-", 1)[-1].startswith("probe")]:
                proc = subprocess.run(["tc", "-j", "-n", ns, "qdisc", "show"], capture_output=True, text=True)
                try:
                    qdiscs = json.loads(proc.stdout)
                except ValueError:
                    continue  # the namespace went away
                for q in qdiscs:
                    if q.get("kind") == "tbf":
                        rates = self.seen.setdefault(f"{q['dev']}@{ns.rsplit('-', 1)[-1]}", [])
                        rate = 8.0 * q["options"]["rate"]
                        if not rates or rates[-1] != rate:
                            rates.append(rate)
            self.stop.wait(0.05)


@pytest.mark.slow
@needs_emulation
def test_an_emulated_link_slows_down_at_the_step_and_speeds_up_again(tmp_path: Path) -> None:
    from tailq.harness.launch import launch_run

    fast, slow = 1e9, 20e6
    cfg = RunConfig(workload="digits", hook="bf16", workers=2, steps=12, eval_every=12, measure_every=0,
                    net="1gbit", net_schedule="4:20mbit,8:1gbit", run_dir=str(tmp_path / "run"))
    watcher = _TcWatcher()
    watcher.start()
    try:
        res = launch_run(cfg, timeout_s=300)
    finally:
        watcher.stop.set()
        watcher.join()
    net = res["network"]
    assert net["describe"] == "emulated 1 Gbit/s; 20 Mbit/s from step 4, 1 Gbit/s from step 8"
    assert net["schedule_spec"] == "4:20mbit,8:1gbit" and res["config"]["net_schedule"] == "4:20mbit,8:1gbit"
    # the launcher's record: both changes, at their steps, every link's token bucket read back at the new rate
    applied = net["schedule_applied"]
    assert [(a["step"], a["rate_bps"]) for a in applied] == [(4, slow), (8, fast)]
    for a in applied:
        assert a["tc_rates_bps"] == [{"uplink": a["rate_bps"], "downlink": a["rate_bps"]}] * 2
    assert [w["step"] for w in net["schedule_waits"]] == [4, 8]
    # seen from inside the namespaces during the run: every node link, both directions, went 1g -> 20m -> 1g
    assert sorted(watcher.seen) == ["eth0@w0", "eth0@w1", "p0@sw", "p1@sw"], watcher.seen
    for link, rates in watcher.seen.items():
        assert rates == [fast, slow, fast], (link, rates)
    # per-step communication time: the bf16 bucket's bytes over each rate
    params = res["parameters"]
    wire_fast, wire_slow = 8 * 2 * params / fast, 8 * 2 * params / slow  # 4.8 ms, 241 ms
    comm = [s["comm_s"] for s in res["steps"]]
    before, during, after = (statistics.median(comm[a:b]) for a, b in ((0, 4), (4, 8), (8, 12)))
    print(f"\nmedian comm per step: {1e3 * before:.1f} ms at 1 Gbit/s, {1e3 * during:.1f} ms at 20 Mbit/s "
          f"(wire {1e3 * wire_slow:.1f} ms), {1e3 * after:.1f} ms at 1 Gbit/s again; waits "
          f"{[round(1e3 * w['wait_s'], 1) for w in net['schedule_waits']]} ms, tc changes "
          f"{[round(1e3 * a['apply_s'], 1) for a in applied]} ms")
    assert min(comm[4:8]) >= 0.8 * wire_slow  # no step from the change on ran at the old rate
    for fast_median in (before, after):
        assert during - fast_median >= 0.5 * (wire_slow - wire_fast)
        assert during >= 2 * fast_median


@pytest.mark.slow
def test_the_modeled_clock_changes_at_the_step_and_the_planner_is_told_only_the_start(tmp_path: Path) -> None:
    """bf16 and TUQ (route=auto) on a modeled 10 Gbit/s, 25 us network that drops to 10 Mbit/s from step 3; the
    comparison, its report and --resume."""
    from tailq.harness.compare import compare as run_compare
    from tailq.harness.compare import parse_method, resume

    start = Network.parse("model:10gbit,25us")
    sched = NetSchedule.parse("3:10mbit")
    root = run_compare(workload="synthetic", workers=2, net=start, methods=[parse_method(m) for m in ("bf16", "tuq:3")],
                       steps=6, eval_every=3, out_dir=str(tmp_path), run_id="c", quiet=True,
                       extra={"net_schedule": "3:10mbit", "measure_every": 0})
    bf16: dict[str, Any] = json.loads((root / "bf16" / "result.json").read_text())
    tuq: dict[str, Any] = json.loads((root / "tuq-3b" / "result.json").read_text())
    # every step's modeled communication is the cost model's at that step's rate: one bf16 all-reduce of the bucket
    handed = 2 * bf16["parameters"]
    for s in bf16["steps"]:
        modeled = s["step_s"] - max(s["wall_s"] - s["comm_s"], 0.0)
        expect = sched.network_at(start, s["step"]).time("all_reduce", handed, 2)
        assert modeled == pytest.approx(expect, rel=1e-9), s
    assert bf16["steps"][3]["step_s"] > 10 * bf16["steps"][2]["step_s"]  # 10 Mbit/s: 1000x 10 Gbit/s's wire time
    # the planner planned against the network the run started with, and nobody told it otherwise
    assert tuq["plan"]["network"]["spec"] == "model:10gbit,25us" and tuq["plan"]["network_source"] == "given"
    assert tuq["network"]["schedule_told_to_hook"] is False
    # recorded: the plan (for --resume), the results, the report's network line
    plan = json.loads((root / "compare.json").read_text())
    assert plan["extra"]["net_schedule"] == "3:10mbit"
    summary = json.loads((root / "results.json").read_text())
    assert summary["network"]["schedule_spec"] == "3:10mbit"
    report = (root / "report.md").read_text()
    line = next(x for x in report.splitlines() if x.startswith("- network:"))
    assert line.startswith("- network: **modeled 10 Gbit/s, 25 us; 10 Mbit/s from step 3** (MODELED")
    assert "`--net-schedule 3:10mbit`" in line and "told only the starting rate" in line
    # --resume keeps the option: the finished runs match their saved configuration and are kept
    resume(root, quiet=True)
    again = json.loads((root / "results.json").read_text())
    assert any("resumed: kept the finished runs of bf16, tuq-3b" in n for n in again["notes"])
    assert again["network"]["schedule_text"] == "10 Mbit/s from step 3"
