"""``--net-schedule STEP:RATE[,STEP:RATE...]``: the network's rate changes at given training steps, mid-run.

``--net 1gbit --net-schedule 40:20mbit,80:1gbit`` trains steps 0..39 at 1 Gbit/s, 40..79 at 20 Mbit/s and 80 on at
1 Gbit/s again (steps counted from 0, as in the result's per-step log ``steps``; "from step S" = the first
training step whose index is >= S, so a run resumed from a checkpoint past S gets the rate that step has). It is
there to test that a route planner notices a link getting slower (and faster again) by measuring: the hook is
told only the network the run starts with (the harness's ``network=``), never the changes.

* **modeled** (``--net model:RATE``): the modeled clock prices each step's collectives at the rate that step has.
* **emulated** (``--net RATE``): the rate of every node link, both directions (what
  :class:`~tailq.harness.netem.EmulatedNetwork` shapes), becomes the scheduled one, by ``tc qdisc change`` with the
  burst and queue rules of the set-up (:meth:`EmulatedNetwork.set_rate`).
* **loopback** (``--net none``): nothing to shape; refused.

Who changes an emulated rate, and when. The launcher owns the namespaces (it is root on the host, and the switch
side of every link lives in a namespace no worker is in), so the launcher runs ``tc``; the workers decide *when*,
because only they know the step. Before step S, and before its clock starts, rank 0 writes
``net-schedule-request.json`` (the change's index and step) into the run directory and waits for the launcher's
``net-schedule-ack.json`` naming the same change (the launcher's poll loop, which follows the workers anyway, sees
the request within 50 ms, changes every link and reads the rates back from the kernel before acknowledging);
then rank 0 broadcasts "applied" to every rank. Every rank therefore starts step S on the new rate and no rank
runs a step of S at the old one: the change happens at the same step on every rank, whatever the timing, and the
wait (milliseconds) is outside the training clock. Rank 0 gives up after :data:`ACK_TIMEOUT_S` with one line
naming the option, the step and the file it waited for, and every rank stops with it (no rank trains on at a
rate the schedule does not say). A worker not started by tailq's launcher (``torchrun`` directly) has nobody to
change the rate: it stops at the first change instead of measuring the wrong network.

The alternatives were worse: each worker changing its own node's side cannot reach the switch side (the
downlinks) and would need the ranks to agree anyway; the launcher following ``progress.json`` (written at
evaluations only, and never waited for) would change the rate at whatever step the workers had reached by then.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import time
from pathlib import Path
from typing import Any

from tailq.comm.network import MAX_RATE_BPS, Network, _format_rate, rate_arg
from tailq.errors import UsageError

__all__ = ["ACK", "ACK_TIMEOUT_S", "REQUEST", "NetSchedule", "ScheduleApplier", "wait_for_change"]

REQUEST = "net-schedule-request.json"
"""Written by rank 0 in the run directory: ``{"change": i, "step": S}`` (i = 1 for the first entry)."""
ACK = "net-schedule-ack.json"
"""Written by the launcher: ``{"change": i, ...}`` once the i-th change is in place (0 at start: the --net rate)."""
ACK_TIMEOUT_S = 60.0
"""How long rank 0 waits at a scheduled step for the launcher to change the rate."""
_QUANTITY = re.compile(r"^(\d+(\.\d*)?|\.\d+)\s*(bit|kbit|mbit|gbit|bps|kbps|mbps|gbps)$")
MIN_RATE_BPS = 100e3  # the emulated range (tailq.harness.netem.MIN_EMULATED_RATE_BPS; not imported: no netem here)

FORM = ("accepted: STEP:RATE[,STEP:RATE...], e.g. 40:20mbit,80:1gbit — the rate from training step STEP on (counted "
        "from 0, as in the result's per-step log), STEP a positive integer below --steps, increasing; RATE as in "
        "--net (bit, kbit, mbit, gbit or bps, kbps, mbps, gbps), 100kbit..100gbit")


def _error(text: str, why: str) -> UsageError:
    return UsageError(f"--net-schedule: cannot use {text!r}: {why}; {FORM}")


@dataclasses.dataclass(frozen=True)
class NetSchedule:
    """The rate changes of a run: ``(step, rate_bps)`` pairs, steps increasing (:meth:`parse` the option's text)."""

    changes: tuple[tuple[int, float], ...]

    @classmethod
    def parse(cls, text: Any) -> NetSchedule:
        """``STEP:RATE[,STEP:RATE...]``; each RATE by the ``--net`` parser (:meth:`Network.parse`), 100kbit..100gbit.
        Raises :class:`UsageError` naming ``--net-schedule`` and the accepted form."""
        if not isinstance(text, str):
            raise _error(repr(text), "expected a string")
        changes: list[tuple[int, float]] = []
        entries = [e.strip() for e in text.split(",")]
        if not text.strip() or not all(entries):
            raise _error(text, "an entry is empty")
        for entry in entries:
            step_text, sep, rate_text = (p.strip() for p in entry.partition(":"))
            if not sep:
                raise _error(text, f"{entry!r} is not STEP:RATE")
            if not step_text.isdigit() or int(step_text) < 1:
                raise _error(text, f"the step {step_text!r} is not a positive integer")
            step = int(step_text)
            try:
                net = Network.parse(rate_text)
            except ValueError:
                net = None
            if net is None or net.kind != "emulated" or net.delay_s or net.node_rate_bps is not None:
                shaped = _QUANTITY.match(rate_text.lower()) is not None  # a number and a unit: out of range
                raise _error(text, f"the rate {rate_text!r} is outside 100kbit..100gbit" if shaped
                             else f"{rate_text!r} is not a RATE")
            assert net.rate_bps is not None
            if not MIN_RATE_BPS <= net.rate_bps <= MAX_RATE_BPS:
                raise _error(text, f"the rate {rate_text!r} is outside 100kbit..100gbit")
            if changes and step <= changes[-1][0]:
                raise _error(text, f"the steps must increase ({changes[-1][0]}, then {step})")
            changes.append((step, net.rate_bps))
        return cls(tuple(changes))

    def check(self, net: Network, steps: int) -> None:
        """The schedule fits the run: a network with a rate (not loopback), every change before the last step."""
        if net.kind == "none":
            raise UsageError("--net-schedule: --net none (loopback) cannot be shaped, it has no rate to change; "
                             "give --net RATE[,DELAY] (emulated) or --net model:RATE[,DELAY]")
        late = [s for s, _ in self.changes if s >= steps]
        if late:
            raise _error(self.as_arg(), f"step {late[0]} is not below --steps ({steps}): it would never happen")

    def as_arg(self) -> str:
        """The canonical option text (``NetSchedule.parse(s.as_arg()) == s``)."""
        return ",".join(f"{step}:{rate_arg(rate)}" for step, rate in self.changes)

    def change_at(self, step: int) -> int:
        """How many changes have happened by ``step``: 0 before the first, i from the i-th entry's step on."""
        return sum(1 for s, _ in self.changes if s <= step)

    def rate(self, net: Network, change: int) -> float:
        """The rate after ``change`` changes (0: ``net``'s own)."""
        if change == 0:
            assert net.rate_bps is not None
            return net.rate_bps
        return self.changes[change - 1][1]

    def network_at(self, net: Network, step: int) -> Network:
        """``net`` with the rate it has at ``step`` (delay and node link unchanged)."""
        change = self.change_at(step)
        return net if change == 0 else dataclasses.replace(net, rate_bps=self.rate(net, change))

    def text(self) -> str:
        """``20 Mbit/s from step 40, 1 Gbit/s from step 80``."""
        return ", ".join(f"{_format_rate(rate)} from step {step}" for step, rate in self.changes)

    def describe(self, net: Network) -> str:
        """``emulated 1 Gbit/s; 20 Mbit/s from step 40, 1 Gbit/s from step 80``."""
        return f"{net.describe()}; {self.text()}"

    def summary(self, net: Network) -> dict[str, Any]:
        """What a result's ``network`` records about the schedule (its ``describe`` includes the changes)."""
        return {"schedule_spec": self.as_arg(), "schedule_text": self.text(), "describe": self.describe(net),
                "schedule": [{"step": step, "rate_bps": rate, "rate": rate_arg(rate)} for step, rate in self.changes],
                "schedule_told_to_hook": False}


def _write_json(path: Path, obj: dict[str, Any]) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(obj))
    os.replace(tmp, path)  # atomic: the reader never sees half a file


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        obj = json.loads(path.read_text())
    except (FileNotFoundError, ValueError):
        return None
    return obj if isinstance(obj, dict) else None


def wait_for_change(run_dir: Path, rank: int, schedule: NetSchedule, net: Network, change: int, step: int,
                    timeout_s: float = ACK_TIMEOUT_S) -> float:
    """Called by every rank before ``step`` (outside the training clock) on an emulated network: rank 0 asks the
    launcher for the ``change``-th rate and waits for it, then tells every rank; returns the seconds waited.
    Raises ``RuntimeError`` on every rank when the change did not happen."""
    import torch
    import torch.distributed as dist

    t0 = time.monotonic()
    why = ""
    if rank == 0:
        why = _ask_launcher(run_dir, schedule, net, change, step, timeout_s)
    flag = torch.tensor([0.0 if why else 1.0])
    dist.broadcast(flag, 0)  # every rank starts step S on the new rate, or none does
    if flag[0] < 1:
        raise RuntimeError(why or f"--net-schedule: the change to {rate_arg(schedule.rate(net, change))} at step "
                           f"{step} did not happen (rank 0's log says why); stopped")
    return time.monotonic() - t0


def _ask_launcher(run_dir: Path, schedule: NetSchedule, net: Network, change: int, step: int,
                  timeout_s: float) -> str:
    """Rank 0's side: request the change and wait for its acknowledgement; returns why it failed, or ''."""
    rate = rate_arg(schedule.rate(net, change))
    ack = run_dir / ACK
    if _read_json(ack) is None:
        return (f"--net-schedule: the change to {rate} at step {step} needs tailq's launcher (tailq train / compare) "
                f"to change the emulated links, and none answers in {run_dir} (no {ACK}); stopped")
    _write_json(run_dir / REQUEST, {"change": change, "step": step, "rate_bps": schedule.rate(net, change)})
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        got = _read_json(ack)
        if got is not None and got.get("change") == change:
            return ""
        time.sleep(0.005)
    return (f"--net-schedule: the launcher did not change the rate to {rate} at step {step} within {timeout_s:g} s "
            f"(no acknowledgement in {ack}); stopped")


class ScheduleApplier:
    """The launcher's side on an emulated network: :meth:`poll` (from its wait loop) applies a requested change to
    every node link and acknowledges it; :attr:`record` lists what was applied, with the rates read back from tc."""

    def __init__(self, run_dir: Path, schedule: NetSchedule, net: Any) -> None:
        self.run_dir, self.schedule, self.net = run_dir, schedule, net
        self.change = 0
        self.record: list[dict[str, Any]] = []
        (run_dir / REQUEST).unlink(missing_ok=True)
        _write_json(run_dir / ACK, {"change": 0, "rate_bps": net.rate_bps})  # the --net rate is in place

    def poll(self) -> None:
        """Apply a pending request (raises ``EmulationError`` when tc fails)."""
        req = _read_json(self.run_dir / REQUEST)
        if req is None or req.get("change") == self.change:
            return
        change, step = int(req["change"]), int(req["step"])
        rate = self.schedule.rate(self.net.spec, change)
        t0 = time.monotonic()
        self.net.set_rate(rate)
        applied_s = time.monotonic() - t0
        links = self.net.qdisc_rates()
        self.change = change
        self.record.append({"change": change, "step": step, "rate_bps": rate, "rate": rate_arg(rate),
                            "apply_s": applied_s, "tc_rates_bps": links})
        _write_json(self.run_dir / ACK, {"change": change, "step": step, "rate_bps": rate})
