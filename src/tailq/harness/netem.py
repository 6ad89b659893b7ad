"""Network emulation: make the workers' Gloo TCP connections cross a real, rate-limited network.

``--net`` selects one of three networks (:func:`parse_net` turns the text into a :class:`NetSpec`):

* ``none`` — plain loopback, no emulation;
* ``RATE[,DELAY]`` — an *emulated* network (:class:`EmulatedNetwork`): one Linux network namespace per worker,
  all plugged into a bridge that lives in its own "switch" namespace, each link shaped with ``tc`` in both
  directions, so every worker has a symmetric full-duplex NIC of ``RATE`` and the traffic is real TCP;
* ``model:RATE[,DELAY]`` — no emulation: the harness computes communication time from a cost model and labels
  the outputs *modeled*.

Topology of an emulated network with tag ``T`` owned by process ``P`` (``N`` workers, subnet ``10.213.X.0/24``
with ``X`` derived from the tag)::

    tq-P-T-w0: lo, eth0 10.213.X.1/24 ─veth─ p0 ┐
    tq-P-T-w1: lo, eth0 10.213.X.2/24 ─veth─ p1 ┼─ br0   (namespace tq-P-T-sw)
    ...                                          ┘

Shaping, on each worker link, both directions (worker ``eth0`` egress = uplink, switch ``pR`` egress = downlink)::

    tc qdisc replace dev IF root handle 1: tbf rate RATEbit burst BURST limit LIMIT          # DELAY == 0
    tc qdisc replace dev IF root handle 1: netem delay DELAYus limit PACKETS                 # DELAY > 0
    tc qdisc replace dev IF parent 1:1 handle 10: tbf rate RATEbit burst BURST limit LIMIT   #   (netem, then tbf)

``DELAY`` is added on every link direction a packet crosses: worker ``a`` → worker ``b`` crosses ``a``'s uplink and
``b``'s downlink, so the one-way latency between two workers is ``2·DELAY`` and a round trip ``4·DELAY``.
``BURST`` is max(16 KiB, 1 ms of traffic). The tbf queue, ``LIMIT`` = max(32 MiB, 1 s of traffic) bytes (at most
1 GiB), is deliberately deep so that TCP bulk transfers and incast do not see tc drops (they make timings erratic;
the price is queueing delay under incast); :meth:`EmulatedNetwork.qdisc_drops` reports any that happen. Emulated
rates go from 100 kbit to 100 gbit. Delay needs the kernel's ``netem`` qdisc (``CONFIG_NET_SCH_NETEM``); kernels
without it can still emulate the rate, and :func:`emulation_available` says so for a spec with a delay.

Namespaces carry the PID of the process that owns them (``tq-<pid>-<tag>-w<rank>``, ``tq-<pid>-<tag>-sw``). They
are deleted by ``__exit__``, :meth:`EmulatedNetwork.teardown`, an ``atexit`` hook and SIGINT/SIGTERM handlers
(chained to the previous handlers and restored when the last network closes). A process killed by SIGKILL
cannot clean up: :func:`sweep_stale` deletes every ``tq-<pid>-…`` namespace whose process is gone, and every
``EmulatedNetwork.__enter__`` calls it first.

A worker process is launched inside its namespace with ``command_prefix(rank) + argv`` and ``env(rank)`` added
to its environment: ``GLOO_SOCKET_IFNAME`` makes Gloo use the emulated interface (otherwise it binds to the
address of the host name, typically loopback), and ``MASTER_ADDR``/``MASTER_PORT`` put the TCPStore of
``torch.distributed`` on rank 0's emulated address. Only traffic between the namespaces is emulated: GPU
transports (NCCL over NVLink or shared memory) bypass it, so use this with Gloo.
"""

from __future__ import annotations

import atexit
import contextlib
import fcntl
import itertools
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import warnings
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from types import FrameType, TracebackType
from typing import Any

__all__ = [
    "EmulatedNetwork",
    "EmulationError",
    "Host",
    "NetSpec",
    "emulation_available",
    "parse_net",
    "sweep_stale",
]

MAX_RATE_BPS = 100e9
"""Largest accepted link rate, bits/s (100 gbit)."""
MAX_DELAY_S = 10.0
"""Largest accepted one-way delay per link, seconds."""
MIN_EMULATED_RATE_BPS = 100e3
"""Slowest link :class:`EmulatedNetwork` shapes, bits/s (100 kbit); ``model:`` takes any rate > 0."""

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
    "with a unit s, ms or us, 0 <= DELAY <= 10s (one-way, added on every link)"
)


class EmulationError(RuntimeError):
    """Setting up, using or tearing down an emulated network failed."""


# --------------------------------------------------------------------------------------------------- NetSpec


@dataclass(frozen=True)
class NetSpec:
    """The network the workers talk over.

    Attributes:
        kind: ``"none"`` (plain loopback), ``"emulated"`` (namespaces + tc) or ``"model"`` (no emulation; the cost
            model gives communication time and outputs are labelled modeled).
        rate_bps: link rate of each worker in bits/s (``None`` for ``"none"``).
        delay_s: one-way delay added on each link direction, seconds (0 if not given).
    """

    kind: str
    rate_bps: float | None
    delay_s: float = 0.0

    def __post_init__(self) -> None:
        if self.kind not in _KINDS:
            raise ValueError(f"--net: unknown kind {self.kind!r}; expected one of {', '.join(_KINDS)}")
        if self.kind == "none":
            if self.rate_bps is not None or self.delay_s != 0:
                raise ValueError("--net: 'none' (loopback) takes no rate or delay")
            return
        if self.rate_bps is None or not 0 < self.rate_bps <= MAX_RATE_BPS:
            raise ValueError(f"--net: rate must be > 0 and <= 100gbit, got {self.rate_bps!r} bit/s")
        if not 0 <= self.delay_s <= MAX_DELAY_S:
            raise ValueError(f"--net: delay must be >= 0 and <= 10s, got {self.delay_s!r} s")

    def describe(self) -> str:
        """Human description, e.g. ``"emulated 100 Mbit/s, 1 ms"``, ``"modeled 1 Gbit/s"``, ``"loopback"``."""
        if self.kind == "none" or self.rate_bps is None:
            return "loopback"
        text = f"{'emulated' if self.kind == 'emulated' else 'modeled'} {_format_rate(self.rate_bps)}"
        if self.delay_s > 0:
            text += f", {_format_delay(self.delay_s)}"
        return text

    def as_arg(self) -> str:
        """The canonical ``--net`` text for this spec (``parse_net(spec.as_arg()) == spec``)."""
        if self.kind == "none" or self.rate_bps is None:
            return "none"
        text = ("model:" if self.kind == "model" else "") + _rate_arg(self.rate_bps)
        if self.delay_s > 0:
            text += f",{_delay_arg(self.delay_s)}"
        return text


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


def _rate_arg(bps: float) -> str:
    return _compact(bps, (("gbit", 1e9), ("mbit", 1e6), ("kbit", 1e3), ("bit", 1.0)))


def _delay_arg(seconds: float) -> str:
    return _compact(seconds, (("s", 1.0), ("ms", 1e-3), ("us", 1e-6)))


def _format_rate(bps: float) -> str:
    for unit, scale in (("Gbit/s", 1e9), ("Mbit/s", 1e6), ("kbit/s", 1e3)):
        if bps >= scale:
            return f"{bps / scale:.4g} {unit}"
    return f"{bps:.4g} bit/s"


def _format_delay(seconds: float) -> str:
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


def parse_net(text: str) -> NetSpec:
    """Parse a ``--net`` value: ``none``, ``RATE[,DELAY]`` (emulated) or ``model:RATE[,DELAY]`` (modeled).

    RATE uses tc's units, case-insensitive: ``bit``, ``kbit``, ``mbit``, ``gbit`` are bits per second and
    ``bps``, ``kbps``, ``mbps``, ``gbps`` are **bytes** per second (``10mbps`` = 80 Mbit/s). DELAY is ``s``, ``ms``
    or ``us``. Raises ``ValueError`` naming ``--net`` for anything else, or for a rate outside (0, 100gbit] or a
    delay outside [0, 10s].
    """
    if not isinstance(text, str):
        raise _net_error(repr(text), "expected a string")
    body = text.strip().lower()
    if body == "none":
        return NetSpec("none", None, 0.0)
    kind = "emulated"
    if body.startswith("model:"):
        kind, body = "model", body[len("model:") :].strip()
    parts = [p.strip() for p in body.split(",")]
    if not body or len(parts) > 2:
        raise _net_error(text, "expected RATE or RATE,DELAY")
    rate = _parse_quantity(text, parts[0], _RATE_UNITS, "rate")
    delay = _parse_quantity(text, parts[1], _DELAY_UNITS, "delay") if len(parts) == 2 else Decimal(0)
    if not 0 < rate <= Decimal(int(MAX_RATE_BPS)):
        raise _net_error(text, f"rate {parts[0]!r} is outside (0, 100gbit]")
    if not 0 <= delay <= Decimal(int(MAX_DELAY_S)):
        raise _net_error(text, f"delay {parts[1]!r} is outside [0, 10s]")
    return NetSpec(kind, float(rate), float(delay))


# ----------------------------------------------------------------------------------------- command helpers

_IP = "ip"
_TC = "tc"
_NAME = re.compile(r"^tq-(\d+)-")
_TAG = re.compile(r"^[A-Za-z0-9_]{1,24}$")


def _run(args: Sequence[str], *, stdin: str | None = None, check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run one iproute2 command; raise :class:`EmulationError` with its stderr when ``check`` and it fails."""
    try:
        proc = subprocess.run(list(args), input=stdin, capture_output=True, text=True, timeout=60, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise EmulationError(f"`{' '.join(args)}` could not run: {exc}") from exc
    if check and proc.returncode != 0:
        detail = (proc.stderr or proc.stdout).strip().replace("\n", "; ")
        batch = f" (batch: {stdin.strip().replace(chr(10), '; ')})" if stdin else ""
        raise EmulationError(f"`{' '.join(args)}` failed with exit code {proc.returncode}: {detail}{batch}")
    return proc


# Creating and deleting named namespaces from several processes at once is not safe in every iproute2: the first
# `ip netns add` makes /run/netns a shared bind mount, and concurrent first calls can race (stacked mounts, "mount
# --make-shared failed"). All of tailq's namespace changes on a host are serialised through one advisory lock
# (released by the kernel if the holder dies), and `ip netns add` is retried on failure.
_host_lock_depth = 0
_host_lock_mutex = threading.RLock()
_host_lock_fd: int | None = None
_host_lock_waiting = False


def _lock_path() -> str:
    base = "/run/lock" if os.path.isdir("/run/lock") and os.access("/run/lock", os.W_OK) else tempfile.gettempdir()
    return os.path.join(base, "tailq-netns.lock")


@contextlib.contextmanager
def _host_lock() -> Iterator[None]:
    """Hold the host-wide namespace lock (re-entrant within a process, e.g. a signal handler during set-up)."""
    global _host_lock_depth, _host_lock_fd, _host_lock_waiting
    with _host_lock_mutex:
        # _host_lock_waiting: a signal handler interrupted this thread while it waited for the lock; a second flock
        # on a new descriptor would wait for ourselves, so the handler's teardown goes ahead unserialised
        if _host_lock_depth == 0 and not _host_lock_waiting:
            fd = -1
            try:
                fd = os.open(_lock_path(), os.O_RDWR | os.O_CREAT, 0o600)
                _host_lock_waiting = True
                fcntl.flock(fd, fcntl.LOCK_EX)
                _host_lock_fd, fd = fd, -1
            except OSError:
                _host_lock_fd = None  # no lock file possible: carry on unserialised (the retries still apply)
            finally:
                _host_lock_waiting = False
                if fd >= 0:
                    os.close(fd)
        _host_lock_depth += 1
        try:
            yield
        finally:
            _host_lock_depth -= 1
            if _host_lock_depth == 0 and _host_lock_fd is not None:
                os.close(_host_lock_fd)  # closing drops the flock
                _host_lock_fd = None


def _add_netns(name: str, *, attempts: int = 3) -> subprocess.CompletedProcess[str]:
    """``ip netns add NAME``, retried (after removing any half-made leftover) if it fails."""
    proc = _run([_IP, "netns", "add", name], check=False)
    for i in range(1, attempts):
        if proc.returncode == 0:
            break
        _run([_IP, "netns", "delete", name], check=False)
        time.sleep(0.25 * i)
        proc = _run([_IP, "netns", "add", name], check=False)
    return proc


def _list_netns() -> list[str]:
    """Names of all named network namespaces (``ip netns list``)."""
    proc = _run([_IP, "netns", "list"], check=False)
    if proc.returncode != 0:
        return []
    return [line.split()[0] for line in proc.stdout.splitlines() if line.strip()]


def _delete_netns(name: str) -> bool:
    """Delete a named namespace; True when it is gone afterwards."""
    proc = _run([_IP, "netns", "delete", name], check=False)
    return proc.returncode == 0 or name not in _list_netns()


def _pid_alive(pid: int) -> bool:
    """Whether a process exists and is not a zombie."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open(f"/proc/{pid}/stat") as fh:
            state = fh.read().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return True
    return state not in ("Z", "X")


def sweep_stale() -> list[str]:
    """Delete every ``tq-<pid>-…`` namespace whose owning process is no longer alive; return their names.

    Covers owners that died by SIGKILL (or anything else that skipped cleanup). Namespaces of live processes,
    this one included, are left alone.
    """
    me = os.getpid()
    removed: list[str] = []
    with _host_lock():
        for name in _list_netns():
            match = _NAME.match(name)
            if match is None:
                continue
            pid = int(match.group(1))
            if pid == me or _pid_alive(pid):
                continue
            if _delete_netns(name):
                removed.append(name)
    return removed


# ------------------------------------------------------------------------------------------- availability


@dataclass(frozen=True)
class _Capabilities:
    ok: bool
    netem: bool
    reason: str


_caps: _Capabilities | None = None
_caps_lock = threading.Lock()
_probe_counter = itertools.count()


def _probe() -> _Capabilities:
    """Check by doing: create a throwaway namespace with a veth pair, a bridge and a tbf (and netem) qdisc."""
    if not sys.platform.startswith("linux"):
        return _Capabilities(False, False, f"network emulation needs Linux network namespaces (this is {sys.platform})")
    if os.geteuid() != 0:
        return _Capabilities(
            False,
            False,
            f"network emulation needs root (network namespaces and tc need CAP_SYS_ADMIN and CAP_NET_ADMIN); "
            f"this process runs as uid {os.geteuid()}",
        )
    for tool, package in ((_IP, "iproute2"), (_TC, "iproute2")):
        if shutil.which(tool) is None:
            return _Capabilities(False, False, f"network emulation needs the `{tool}` command ({package})")
    name = f"tq-{os.getpid()}-probe{next(_probe_counter)}"
    with _host_lock():
        return _probe_in(name)


def _probe_in(name: str) -> _Capabilities:
    try:
        proc = _add_netns(name)
        if proc.returncode != 0:
            return _Capabilities(False, False, f"creating a network namespace failed: {proc.stderr.strip()}")
        steps = [
            ([_IP, "-n", name, "link", "add", "tqa", "type", "veth", "peer", "name", "tqb"], "a veth pair"),
            ([_IP, "-n", name, "link", "add", "tqbr", "type", "bridge"], "a bridge"),
            ([_TC, "-n", name, "qdisc", "add", "dev", "tqa", "root", "tbf", "rate", "1mbit", "burst", "16384",
              "limit", "65536"], "a tbf qdisc"),
        ]  # fmt: skip
        for args, what in steps:
            proc = _run(args, check=False)
            if proc.returncode != 0:
                return _Capabilities(False, False, f"creating {what} in a network namespace failed: "
                                     f"{proc.stderr.strip()}")  # fmt: skip
        netem = _run([_TC, "-n", name, "qdisc", "add", "dev", "tqb", "root", "netem", "delay", "1ms"], check=False)
        has_netem = netem.returncode == 0
        return _Capabilities(
            True,
            has_netem,
            "network namespaces, veth pairs, bridges and tc tbf work"
            + ("" if has_netem else " (no netem qdisc: rate only, no added delay)"),
        )
    except EmulationError as exc:
        return _Capabilities(False, False, str(exc))
    finally:
        _delete_netns(name)


def emulation_available(spec: NetSpec | None = None) -> tuple[bool, str]:
    """Whether emulated networks can be created here, and a human sentence saying why (not).

    Checks root, the ``ip`` and ``tc`` commands, and actually creates and deletes a throwaway namespace with a veth
    pair, a bridge and a tbf qdisc (once per process; the answer is cached). With a ``spec`` that has a delay, the
    kernel's netem qdisc is required too. When the answer is no, the caller should suggest
    ``--net model:RATE[,DELAY]`` instead.
    """
    global _caps
    with _caps_lock:
        if _caps is None:
            _caps = _probe()
        caps = _caps
    if not caps.ok:
        return False, caps.reason
    if spec is not None and spec.kind == "emulated" and spec.delay_s > 0 and not caps.netem:
        rate = _rate_arg(spec.rate_bps or 1.0)
        return False, (
            f"this kernel has no netem qdisc (CONFIG_NET_SCH_NETEM), so the added delay of "
            f"{_format_delay(spec.delay_s)} cannot be emulated (the rate alone can: --net {rate})"
        )
    return True, caps.reason


# ------------------------------------------------------------------------ teardown on exit and on signals

_live: list[EmulatedNetwork] = []
_registry_lock = threading.RLock()
_prev_handlers: dict[int, Any] = {}
_atexit_registered = False
_HANDLED_SIGNALS = (signal.SIGINT, signal.SIGTERM)


def _in_main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


def _teardown_all() -> None:
    """Tear down every live network owned by this process (atexit hook and signal path)."""
    with _registry_lock:
        nets = list(_live)
    for net in nets:
        net.teardown()


def _on_signal(signum: int, frame: FrameType | None) -> None:
    """SIGINT/SIGTERM: tear everything down, restore the previous handler, then hand the signal to it."""
    prev = _prev_handlers.get(signum, signal.SIG_DFL)
    _teardown_all()  # restores the previous handlers once no network is left
    if callable(prev):
        prev(signum, frame)
    elif prev == signal.SIG_DFL:
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)


def _install_handlers() -> None:
    global _atexit_registered
    if not _atexit_registered:
        atexit.register(_teardown_all)
        _atexit_registered = True
    if not _in_main_thread():
        return  # signal handlers can only be set from the main thread; __exit__ and atexit still apply
    for sig in _HANDLED_SIGNALS:
        if sig in _prev_handlers:
            continue
        prev = signal.getsignal(sig)
        if prev is signal.SIG_IGN or prev is None:
            continue  # an ignored signal stays ignored; a handler set outside Python cannot be chained
        signal.signal(sig, _on_signal)
        _prev_handlers[sig] = prev


def _restore_handlers() -> None:
    if not _in_main_thread():
        return
    for sig, prev in list(_prev_handlers.items()):
        if signal.getsignal(sig) is _on_signal:
            signal.signal(sig, prev)
        del _prev_handlers[sig]


# ----------------------------------------------------------------------------------------- the network


@dataclass(frozen=True)
class Host:
    """One emulated host: the namespace a rank runs in, its interface and its IPv4 address."""

    namespace: str
    ifname: str
    address: str


_tag_counter = itertools.count()
_SUBNET_PREFIX = "10.213"


class EmulatedNetwork:
    """``n_workers`` hosts on a switch, each with a symmetric link of ``spec.rate_bps`` (+ ``spec.delay_s``).

    Use as a context manager; the namespaces exist between ``__enter__`` and ``__exit__`` (teardown happens even
    on exceptions, SIGINT/SIGTERM and normal interpreter exit; see :func:`sweep_stale` for SIGKILL)::

        with EmulatedNetwork(4, parse_net("100mbit")) as net:
            procs = [subprocess.Popen(net.command_prefix(r) + argv, env={**os.environ, **net.env(r)})
                     for r in range(4)]
            ...
            wire = net.tx_bytes()

    Args:
        n_workers: number of hosts (ranks), 1..250.
        spec: an ``"emulated"`` :class:`NetSpec`.
        tag: short name ([A-Za-z0-9_], up to 24 characters) in the namespace names; unique per process.
            Default: ``n<counter>``.
        master_port: ``MASTER_PORT`` put in :meth:`env` (each network is its own set of hosts, so any port is free).
    """

    IFNAME = "eth0"
    BRIDGE = "br0"

    def __init__(self, n_workers: int, spec: NetSpec, *, tag: str | None = None, master_port: int = 29500) -> None:
        if isinstance(n_workers, bool) or not isinstance(n_workers, int) or not 1 <= n_workers <= 250:
            raise ValueError(f"n_workers must be an integer in [1, 250], got {n_workers!r}")
        if not isinstance(spec, NetSpec) or spec.kind != "emulated" or spec.rate_bps is None:
            shown = spec.describe() if isinstance(spec, NetSpec) else repr(spec)
            raise ValueError(f"--net: EmulatedNetwork needs an emulated network (RATE[,DELAY]), got {shown}")
        if spec.rate_bps < MIN_EMULATED_RATE_BPS:
            raise ValueError(
                f"--net {spec.as_arg()}: an emulated link needs at least 100kbit (tc's token bucket "
                f"cannot hold a 16 KiB burst at lower rates); use --net model:{spec.as_arg()}"
            )
        if tag is None:
            tag = f"n{next(_tag_counter)}"
        if not _TAG.match(tag):
            raise ValueError(f"tag must match [A-Za-z0-9_]{{1,24}}, got {tag!r}")
        if not 1 <= master_port <= 65535:
            raise ValueError(f"master_port must be in [1, 65535], got {master_port!r}")
        self.n_workers = n_workers
        self.spec = spec
        self.tag = tag
        self.master_port = master_port
        self.subnet_id = 1 + zlib.crc32(tag.encode()) % 254
        self.subnet = f"{_SUBNET_PREFIX}.{self.subnet_id}.0/24"
        self.workers: list[Host] = []
        self.switch_namespace = ""
        self._owner_pid = 0
        self._state = "new"  # new -> up -> closed

    # --- naming ------------------------------------------------------------------------------------------

    @property
    def namespaces(self) -> list[str]:
        """All namespace names of this network (workers, then the switch); empty before ``__enter__``."""
        return [h.namespace for h in self.workers] + ([self.switch_namespace] if self.switch_namespace else [])

    def _plan(self) -> None:
        self._owner_pid = os.getpid()
        base = f"tq-{self._owner_pid}-{self.tag}"
        self.switch_namespace = f"{base}-sw"
        self.workers = [
            Host(f"{base}-w{r}", self.IFNAME, f"{_SUBNET_PREFIX}.{self.subnet_id}.{r + 1}")
            for r in range(self.n_workers)
        ]

    # --- shaping parameters --------------------------------------------------------------------------------

    def tc_commands(self, dev: str) -> list[str]:
        """The ``tc`` batch lines (without the leading ``tc``) that shape ``dev``'s egress for this spec."""
        rate = self.spec.rate_bps or 0.0
        rate_bytes = rate / 8
        burst = int(max(16 * 1024, rate_bytes * 1e-3))  # ≥ 1 ms of tokens, ≥ 10 full-size frames
        limit = int(min(max(32 * 2**20, rate_bytes * 1.0), 2**30))  # deep queue: no drops under bulk or incast
        tbf = f"tbf rate {int(round(rate))}bit burst {burst} limit {limit}"
        if self.spec.delay_s <= 0:
            return [f"qdisc replace dev {dev} root handle 1: {tbf}"]
        # netem holds every packet in flight for the delay: room for one second plus the delay of full-rate
        # traffic counted in full-size frames (GSO skbs are larger, ACKs are few)
        packets = int(max(10_000, rate_bytes * (self.spec.delay_s + 1.0) / 1500))
        delay_us = _plain(self.spec.delay_s * 1e6)
        return [
            f"qdisc replace dev {dev} root handle 1: netem delay {delay_us}us limit {packets}",
            f"qdisc replace dev {dev} parent 1:1 handle 10: {tbf}",
        ]

    # --- lifecycle -----------------------------------------------------------------------------------------

    def __enter__(self) -> EmulatedNetwork:
        if self._state != "new":
            raise EmulationError("an EmulatedNetwork can be entered once; create a new one")
        sweep_stale()
        ok, reason = emulation_available(self.spec)
        if not ok:
            raise EmulationError(
                f"--net {self.spec.as_arg()}: cannot emulate the network: {reason}. "
                f"Use --net model:{self.spec.as_arg()} to model the network instead."
            )
        self._plan()
        with _registry_lock:
            _live.append(self)
            _install_handlers()
        self._state = "up"
        try:
            with _host_lock():
                self._build()
        except BaseException:
            self.teardown()
            raise
        return self

    def _step(self, args: Sequence[str], lines: Sequence[str] | None = None) -> None:
        if self._state != "up":
            raise EmulationError(f"network {self.tag} was torn down while it was being set up")
        _run(args, stdin=None if lines is None else "\n".join(lines) + "\n")

    def _add(self, namespace: str) -> None:
        if self._state != "up":
            raise EmulationError(f"network {self.tag} was torn down while it was being set up")
        proc = _add_netns(namespace)
        if proc.returncode != 0:
            raise EmulationError(f"`ip netns add {namespace}` failed with exit code {proc.returncode}: "
                                 f"{(proc.stderr or proc.stdout).strip()}")

    def _build(self) -> None:
        sw, br, ifname = self.switch_namespace, self.BRIDGE, self.IFNAME
        self._add(sw)
        # addrgenmode none: no IPv6 link-local addresses, so no IPv6 chatter and Gloo picks the IPv4 address
        self._step([_IP, "-n", sw, "-b", "-"],
                   ["link set lo up", f"link add {br} type bridge", f"link set {br} addrgenmode none"])  # fmt: skip
        sw_ip: list[str] = []
        sw_tc: list[str] = []
        for rank, host in enumerate(self.workers):
            port = f"p{rank}"
            self._add(host.namespace)
            self._step([_IP, "-n", host.namespace, "-b", "-"], [
                "link set lo up",
                f"link add {ifname} type veth peer name {port} netns {sw}",
                f"link set {ifname} addrgenmode none",
                f"addr add {host.address}/24 dev {ifname}",
            ])  # fmt: skip
            self._step([_TC, "-n", host.namespace, "-b", "-"], self.tc_commands(ifname))
            self._step([_IP, "-n", host.namespace, "link", "set", ifname, "up"])
            sw_ip += [f"link set {port} addrgenmode none", f"link set {port} master {br}", f"link set {port} up"]
            sw_tc += self.tc_commands(port)
        self._step([_TC, "-n", sw, "-b", "-"], sw_tc)
        self._step([_IP, "-n", sw, "-b", "-"], sw_ip + [f"link set {br} up"])

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.teardown()

    def teardown(self) -> None:
        """Delete this network's namespaces (idempotent; a no-op in a forked child of the owner).

        Processes still running inside a namespace keep it alive (unnamed) until they exit; stop them first.
        """
        if self._owner_pid and os.getpid() != self._owner_pid:
            return  # a forked child must not destroy its parent's network
        with _registry_lock:
            self._state = "closed"
            if self in _live:
                _live.remove(self)
            if not _live:
                _restore_handlers()
        if not self.workers:
            return  # never entered
        # look every time: a command interrupted by a signal during set-up may have created a namespace after
        # the first pass
        with _host_lock():
            existing = set(_list_netns())
            failed = [name for name in self.namespaces if name in existing and not _delete_netns(name)]
        if failed:
            warnings.warn(f"could not delete network namespaces {failed}; `ip netns delete` them by hand",
                          RuntimeWarning, stacklevel=2)  # fmt: skip

    # --- using it ------------------------------------------------------------------------------------------

    def _check_up(self, rank: int | None = None) -> None:
        if self._state != "up":
            raise EmulationError(f"network {self.tag} is not up (state: {self._state})")
        if rank is not None and not 0 <= rank < self.n_workers:
            raise ValueError(f"rank must be in [0, {self.n_workers}), got {rank}")

    def command_prefix(self, rank: int) -> list[str]:
        """Argv prefix that runs a command inside ``rank``'s namespace: ``["ip", "netns", "exec", ns]``."""
        self._check_up(rank)
        return [_IP, "netns", "exec", self.workers[rank].namespace]

    def env(self, rank: int) -> dict[str, str]:
        """Variables to add to ``rank``'s environment.

        ``GLOO_SOCKET_IFNAME`` (Gloo otherwise binds to the address the host name resolves to, usually loopback,
        which inside a namespace reaches nobody), ``MASTER_ADDR``/``MASTER_PORT`` (the TCPStore listens on rank
        0's emulated address), ``RANK`` and ``WORLD_SIZE``.
        """
        self._check_up(rank)
        return {
            "GLOO_SOCKET_IFNAME": self.workers[rank].ifname,
            "MASTER_ADDR": self.workers[0].address,
            "MASTER_PORT": str(self.master_port),
            "RANK": str(rank),
            "WORLD_SIZE": str(self.n_workers),
        }

    def _link_stats(self, namespace: str, dev: str) -> dict[str, Any]:
        proc = _run([_IP, "-j", "-s", "-n", namespace, "link", "show", "dev", dev])
        data: dict[str, Any] = json.loads(proc.stdout)[0]
        return data

    def tx_bytes(self) -> list[int]:
        """Bytes each rank has sent on its interface so far (the kernel's ``tx_bytes`` counter, as in sysfs).

        Counts Ethernet frames as handed to the interface (with GSO, one set of headers per super-packet), so it
        is the payload plus a few percent of headers.
        """
        self._check_up()
        return [int(self._link_stats(h.namespace, h.ifname)["stats64"]["tx"]["bytes"]) for h in self.workers]

    def qdisc_drops(self) -> list[int]:
        """Packets dropped by the shaping qdiscs of each rank's link (uplink + downlink); should stay 0."""
        self._check_up()
        drops = [0] * self.n_workers
        sides = [(h.namespace, h.ifname, r) for r, h in enumerate(self.workers)]
        sides += [(self.switch_namespace, f"p{r}", r) for r in range(self.n_workers)]
        for namespace, dev, rank in sides:
            proc = _run([_TC, "-j", "-s", "-n", namespace, "qdisc", "show", "dev", dev])
            drops[rank] += sum(int(q.get("drops", 0)) for q in json.loads(proc.stdout))
        return drops

    def __repr__(self) -> str:
        return f"EmulatedNetwork({self.n_workers}, {self.spec.describe()!r}, tag={self.tag!r}, state={self._state})"
