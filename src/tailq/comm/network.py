"""The network workers talk over, described once: what ``--net`` says, and the cost model that goes with it.

``--net`` text is parsed once (:meth:`Network.parse`) into a :class:`Network` value, which the harness hands to
the launcher, the emulation, the modeled clock and the hook's route planner alike. Three kinds:

* ``none`` — plain loopback, nothing emulated or modeled: the planner uses :data:`PLANNING_DEFAULT`;
* ``RATE[,DELAY]`` — an *emulated* network (network namespaces + ``tc``, :mod:`tailq.harness.netem`): every worker
  has a symmetric full-duplex link of RATE, DELAY added one-way on each link direction;
* ``model:RATE[,DELAY]`` — nothing emulated: communication time comes from the cost model below and every
  output is labelled *modeled*.

**Cost model** (SPEC §6): a ring all-reduce moves 2(N − 1)/N · bytes per worker, a ring all-gather (N − 1) · bytes,
an all-to-all (N − 1)/N · bytes (:func:`ring_traffic_bytes`), over a link of ``rate_bps``, plus one latency per
message hop (2(N − 1) hops for an all-reduce, N − 1 for an all-gather or for the N − 1 pairwise exchanges of an
all-to-all). A hop from worker a to worker b crosses a's uplink and b's downlink, each
with the added DELAY, so the hop latency is 2·DELAY — the same for emulated and modeled networks.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Sequence
from decimal import Decimal, InvalidOperation

__all__ = ["Network", "PLANNING_DEFAULT", "fit_network", "ring_traffic_bytes"]

MAX_RATE_BPS = 100e9
"""Largest accepted link rate, bits/s (100 gbit)."""
MAX_NODE_RATE_BPS = 10e12
"""Largest accepted node-link rate, bits/s (10000 gbit: NVLink-class)."""
MAX_DELAY_S = 10.0
"""Largest accepted one-way delay per link, seconds."""

_RATE_UNITS: dict[str, Decimal] = {
    "bit": Decimal(1),
    "kbit": Decimal(10) ** 3,
    "mbit": Decimal(10) ** 6,
    "gbit": Decimal(10) ** 9,
    "bps": Decimal(8),
    "kbps": 8 * Decimal(10) ** 3,
    "mbps": 8 * Decimal(10) ** 6,
    "gbps": 8 * Decimal(10) ** 9,
}
_DELAY_UNITS: dict[str, Decimal] = {"s": Decimal(1), "ms": Decimal(10) ** -3, "us": Decimal(10) ** -6}
_QUANTITY = re.compile(r"^(\d+(?:\.\d*)?|\.\d+)\s*([a-z]+)$")
_KINDS = ("none", "emulated", "model")

_ACCEPTED = (
    "accepted forms: 'none' (plain loopback); 'RATE[,DELAY]' (emulated network, e.g. '100mbit,1ms'); "
    "'model:RATE[,DELAY]' (cost model, no emulation, e.g. 'model:1gbit'). RATE is a number with a unit: "
    "bit, kbit, mbit, gbit (bits/s) or bps, kbps, mbps, gbps (bytes/s), 0 < RATE <= 100gbit; DELAY is a number "
    "with a unit s, ms or us, 0 <= DELAY <= 10s (one-way, added on every link); optional ',node=RATE' and "
    "',node_delay=DELAY' price the link between workers of one node (e.g. 'model:50mbit,node=10gbit')"
)


def ring_traffic_bytes(collective: str, handed_bytes: int, n_workers: int) -> float:
    """Bytes each worker sends (= receives) in a ring implementation of the collective."""
    if n_workers <= 1:
        return 0.0
    if collective == "all_reduce":
        return 2.0 * (n_workers - 1) / n_workers * handed_bytes
    if collective == "all_gather":
        return float((n_workers - 1) * handed_bytes)
    if collective == "all_to_all":  # handed: all N shards; each worker keeps its own and sends the other N - 1
        return (n_workers - 1) / n_workers * handed_bytes
    raise ValueError(f"unknown collective {collective!r}")


@dataclasses.dataclass(frozen=True)
class Network:
    """The network the workers talk over (see the module docstring).

    Attributes:
        kind: ``"none"`` (plain loopback), ``"emulated"`` (namespaces + tc) or ``"model"`` (no emulation; the cost
            model gives communication time and outputs are labelled modeled).
        rate_bps: link rate of each worker in bits/s (``None`` for ``"none"``).
        delay_s: one-way delay added on each link direction, seconds (0 if not given).
    """

    kind: str
    rate_bps: float | None
    delay_s: float = 0.0
    node_rate_bps: float | None = None
    """The link between workers of one node (NVLink, shared memory, loopback), bits/s; ``None``: not given (the
    planner fits it from the warm-up, else assumes :data:`NODE_LINK_DEFAULT`). Only priced with several workers per
    node; never emulated (workers of an emulated node talk over its namespace's loopback)."""
    node_delay_s: float = 0.0
    """One-way delay on the node link, seconds."""

    def __post_init__(self) -> None:
        if self.kind not in _KINDS:
            raise ValueError(f"--net: unknown kind {self.kind!r}; expected one of {', '.join(_KINDS)}")
        if self.kind == "none":
            if self.rate_bps is not None or self.delay_s != 0:
                raise ValueError("--net: 'none' (loopback) takes no rate or delay")
            return
        # a modeled link may be as fast as a node's (the node link is priced as a network of its own); --net text
        # takes at most 100gbit for the network itself (parse)
        limit = MAX_NODE_RATE_BPS if self.kind == "model" else MAX_RATE_BPS
        if self.rate_bps is None or not 0 < self.rate_bps <= limit:
            raise ValueError(f"--net: rate must be > 0 and <= 100gbit, got {self.rate_bps!r} bit/s")
        if not 0 <= self.delay_s <= MAX_DELAY_S:
            raise ValueError(f"--net: delay must be >= 0 and <= 10s, got {self.delay_s!r} s")
        if self.node_rate_bps is not None and not 0 < self.node_rate_bps <= MAX_NODE_RATE_BPS:
            raise ValueError(f"--net: node rate must be > 0 and <= 10000gbit, got {self.node_rate_bps!r} bit/s")
        if not 0 <= self.node_delay_s <= MAX_DELAY_S:
            raise ValueError(f"--net: node_delay must be >= 0 and <= 10s, got {self.node_delay_s!r} s")

    # -- text ------------------------------------------------------------------------------------------------
    @classmethod
    def parse(cls, text: str) -> Network:
        """Parse a ``--net`` value: ``none``, ``RATE[,DELAY]`` (emulated) or ``model:RATE[,DELAY]`` (modeled).

        RATE uses tc's units, case-insensitive: ``bit``, ``kbit``, ``mbit``, ``gbit`` are bits per second and
        ``bps``, ``kbps``, ``mbps``, ``gbps`` are **bytes** per second (``10mbps`` = 80 Mbit/s). DELAY is ``s``,
        ``ms`` or ``us``. Raises ``ValueError`` naming ``--net`` for anything else, or for a rate outside
        (0, 100gbit] or a delay outside [0, 10s].
        """
        if not isinstance(text, str):
            raise _net_error(repr(text), "expected a string")
        body = text.strip().lower()
        if body == "none":
            return cls("none", None, 0.0)
        kind = "emulated"
        if body.startswith("model:"):
            kind, body = "model", body[len("model:") :].strip()
        parts = [p.strip() for p in body.split(",")]
        node_rate, node_delay = None, Decimal(0)
        for part in [p for p in parts if "=" in p]:
            name, _, value = (v.strip() for v in part.partition("="))
            if name == "node":
                node_rate = _parse_quantity(text, value, _RATE_UNITS, "node rate")
                if not 0 < node_rate <= Decimal(int(MAX_NODE_RATE_BPS)):
                    raise _net_error(text, f"node rate {value!r} is outside (0, 10000gbit]")
            elif name == "node_delay":
                node_delay = _parse_quantity(text, value, _DELAY_UNITS, "node delay")
                if not 0 <= node_delay <= Decimal(int(MAX_DELAY_S)):
                    raise _net_error(text, f"node delay {value!r} is outside [0, 10s]")
            else:
                raise _net_error(text, f"unknown setting {name!r} (node=RATE, node_delay=DELAY)")
        parts = [p for p in parts if "=" not in p]
        body = ",".join(parts)
        if not body or len(parts) > 2:
            raise _net_error(text, "expected RATE or RATE,DELAY")
        rate = _parse_quantity(text, parts[0], _RATE_UNITS, "rate")
        delay = _parse_quantity(text, parts[1], _DELAY_UNITS, "delay") if len(parts) == 2 else Decimal(0)
        if not 0 < rate <= Decimal(int(MAX_RATE_BPS)):
            raise _net_error(text, f"rate {parts[0]!r} is outside (0, 100gbit]")
        if not 0 <= delay <= Decimal(int(MAX_DELAY_S)):
            raise _net_error(text, f"delay {parts[1]!r} is outside [0, 10s]")
        return cls(kind, float(rate), float(delay), None if node_rate is None else float(node_rate), float(node_delay))

    def describe(self) -> str:
        """Human description, e.g. ``"emulated 100 Mbit/s, 1 ms"``, ``"modeled 1 Gbit/s"``, ``"loopback"``."""
        if self.kind == "none" or self.rate_bps is None:
            return "loopback"
        text = f"{'emulated' if self.kind == 'emulated' else 'modeled'} {_format_rate(self.rate_bps)}"
        if self.delay_s > 0:
            text += f", {format_delay(self.delay_s)}"
        if self.node_rate_bps is not None:
            text += f"; node link {_format_rate(self.node_rate_bps)}"
            if self.node_delay_s > 0:
                text += f", {format_delay(self.node_delay_s)}"
        return text

    def as_arg(self) -> str:
        """The canonical ``--net`` text for this network (``Network.parse(net.as_arg()) == net``)."""
        if self.kind == "none" or self.rate_bps is None:
            return "none"
        text = ("model:" if self.kind == "model" else "") + rate_arg(self.rate_bps)
        if self.delay_s > 0:
            text += f",{_delay_arg(self.delay_s)}"
        if self.node_rate_bps is not None:
            text += f",node={rate_arg(self.node_rate_bps)}"
        if self.node_delay_s > 0:
            text += f",node_delay={_delay_arg(self.node_delay_s)}"
        return text

    def __str__(self) -> str:
        return self.as_arg()

    def summary(self) -> dict[str, object]:
        """What results and reports record about the network (no re-parsing needed to read them)."""
        return {"spec": self.as_arg(), "kind": self.kind, "describe": self.describe(), "rate_bps": self.rate_bps,
                "delay_s": self.delay_s, "node_rate_bps": self.node_rate_bps,
                "node_delay_s": self.node_delay_s, "emulated": self.kind == "emulated", "modeled": self.kind == "model"}

    # -- the cost model ----------------------------------------------------------------------------------------
    @property
    def known(self) -> bool:
        """Whether this network has a rate the cost model can use (not plain loopback)."""
        return self.rate_bps is not None

    @property
    def hop_latency_s(self) -> float:
        """Latency of one message hop: the sender's uplink delay plus the receiver's downlink delay."""
        return 2.0 * self.delay_s

    def node_link(self) -> Network:
        """The link between workers of one node as a network of its own (:data:`NODE_LINK_DEFAULT` if not given)."""
        if self.node_rate_bps is None:
            return NODE_LINK_DEFAULT
        return Network("model", self.node_rate_bps, self.node_delay_s)

    def time(self, collective: str, handed_bytes: int, n_workers: int) -> float:
        """Seconds a ``collective`` (ring ``all_reduce`` | ``all_gather``, pairwise ``all_to_all``) of
        ``handed_bytes`` per worker takes."""
        if self.rate_bps is None:
            raise ValueError("the loopback network ('none') has no cost model; use PLANNING_DEFAULT or a rate")
        if n_workers <= 1:
            return 0.0
        hops = 2 * (n_workers - 1) if collective == "all_reduce" else n_workers - 1  # all_to_all: N - 1 exchanges
        return 8 * ring_traffic_bytes(collective, handed_bytes, n_workers) / self.rate_bps + hops * self.hop_latency_s


def fit_network(latencies_s: Sequence[float], timings: Sequence[tuple[float, float]], n_workers: int) -> Network | None:
    """A modeled network from timed all-reduces: ``latencies_s`` of one-element ones, ``timings`` of
    (ring traffic bytes, seconds) of real buckets (``None`` without both).

    Latency = the median one-element time, spread over its 2(N − 1) hops; seconds per byte = the median over the
    buckets of (t − latency) / traffic. Rates above 100 Gbit/s (or a bucket no slower than the latency) are
    clipped to 100 Gbit/s.
    """
    import statistics

    if not latencies_s or not timings or n_workers < 2:
        return None
    latency = statistics.median(latencies_s)
    per_byte = statistics.median(max(t - latency, 0.0) / max(b, 1.0) for b, t in timings)
    rate = min(MAX_RATE_BPS, 8.0 / per_byte) if per_byte > 0 else MAX_RATE_BPS
    return Network("model", rate, min(MAX_DELAY_S, latency / (2 * 2 * (n_workers - 1))))


PLANNING_DEFAULT = Network("model", 10e9, 25e-6)
"""What the route planner assumes when the caller knows nothing about the network: 10 Gbit/s, 50 µs per hop."""
NODE_LINK_DEFAULT = Network("model", 100e9, 2.5e-6)
"""What the planner assumes of the link inside a node when nothing says otherwise and the warm-up could not time
it: 100 Gbit/s, 5 µs per hop (PCIe/shared-memory class; NVLink is faster, a 2-core loopback much slower)."""


def _plain(x: float) -> str:
    """``x`` as a plain decimal without exponent or trailing zeros."""
    text = f"{x:.6f}".rstrip("0").rstrip(".")
    return text or "0"


def _compact(value: float, units: Sequence[tuple[str, float]]) -> str:
    """``value`` in the largest unit that writes it exactly (to 1e-9), e.g. ``2.5gbit`` or ``500us``."""
    for unit, scale in units:
        text = _plain(value / scale)
        if value >= scale and abs(float(text) * scale - value) <= 1e-9 * value:
            return text + unit
    return _plain(value / units[-1][1]) + units[-1][0]


def rate_arg(bps: float) -> str:
    """A rate as ``--net`` text, e.g. ``50mbit``."""
    return _compact(bps, (("gbit", 1e9), ("mbit", 1e6), ("kbit", 1e3), ("bit", 1.0)))


def _delay_arg(seconds: float) -> str:
    return _compact(seconds, (("s", 1.0), ("ms", 1e-3), ("us", 1e-6)))


def plain_number(x: float) -> str:
    """``x`` as a plain decimal (for ``tc`` arguments)."""
    return _plain(x)


def _format_rate(bps: float) -> str:
    for unit, scale in (("Gbit/s", 1e9), ("Mbit/s", 1e6), ("kbit/s", 1e3)):
        if bps >= scale:
            return f"{bps / scale:.4g} {unit}"
    return f"{bps:.4g} bit/s"


def format_delay(seconds: float) -> str:
    """A delay for people, e.g. ``"500 us"``, ``"1 ms"``."""
    if seconds >= 1:
        return f"{seconds:.4g} s"
    if seconds >= 1e-3:
        return f"{seconds * 1e3:.4g} ms"
    return f"{seconds * 1e6:.4g} us"


def _net_error(text: str, why: str) -> ValueError:
    return ValueError(f"--net: cannot use {text!r}: {why}; {_ACCEPTED}")


def _parse_quantity(text: str, part: str, units: dict[str, Decimal], what: str) -> Decimal:
    match = _QUANTITY.match(part)
    if match is None or match.group(2) not in units:
        raise _net_error(text, f"{part!r} is not a {what} with a unit ({', '.join(units)})")
    try:
        return Decimal(match.group(1)) * units[match.group(2)]
    except InvalidOperation as exc:  # pragma: no cover - the regex admits only valid decimals
        raise _net_error(text, f"{part!r} is not a number") from exc
