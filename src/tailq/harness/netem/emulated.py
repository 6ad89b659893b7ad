"""An emulated network: one namespace per node (its L workers share it) on a bridge, each node's link shaped
with ``tc`` in both directions."""

from __future__ import annotations

import itertools
import json
import os
import re
import warnings
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any

from tailq.comm.network import MAX_RATE_BPS, Network, plain_number
from tailq.options import check_int

from . import cleanup
from .namespaces import _IP, _TC, EmulationError, _add_netns, _delete_netns, _host_lock, _list_netns, _run, sweep_stale
from .probe import require_emulation

__all__ = ["MIN_EMULATED_RATE_BPS", "EmulatedNetwork", "Host", "node_env"]

MIN_EMULATED_RATE_BPS = 100e3
"""Slowest link :class:`EmulatedNetwork` shapes, bits/s (100 kbit); ``model:`` takes any rate > 0."""
_TAG = re.compile(r"^[A-Za-z0-9_]{1,24}$")


@dataclass(frozen=True)
class Host:
    """One emulated host (a node): the namespace its ranks run in, its interface (the NIC) and its IPv4 address."""

    namespace: str
    ifname: str
    address: str


_tag_counter = itertools.count()
_SUBNET_PREFIX = "10.213"


class EmulatedNetwork:
    """``n_workers`` ranks on ``K = n_workers / node_size`` hosts (nodes) on a switch, each node with a symmetric
    link of ``spec.rate_bps`` (+ ``spec.delay_s``) that its ``L = node_size`` ranks share.

    Ranks are numbered node by node, as ``torchrun --nnodes K --nproc-per-node L`` numbers them: ranks
    ``k·L .. k·L + L − 1`` run in node ``k``'s namespace. They bind Gloo to the node's ``eth0`` address, so two
    ranks of one node reach each other over the kernel's local route (loopback: unlimited, never on the veth),
    while traffic to other nodes leaves through the node's shaped veth, the NIC its ranks share. With
    ``node_size=1`` (the default) every rank is a node of its own.

    Use as a context manager; the namespaces exist between ``__enter__`` and ``__exit__`` (teardown happens even
    on exceptions, SIGINT/SIGTERM and normal interpreter exit; see :func:`sweep_stale` for SIGKILL)::

        with EmulatedNetwork(4, Network.parse("100mbit"), node_size=2) as net:   # 2 nodes x 2 workers
            procs = [subprocess.Popen(net.command_prefix(r) + argv, env={**os.environ, **net.env(r)})
                     for r in range(4)]
            ...
            wire = net.tx_bytes()   # one entry per node

    Args:
        n_workers: number of ranks, 1..250.
        spec: an ``"emulated"`` :class:`~tailq.comm.network.Network`.
        node_size: ranks per node (``L``), a divisor of ``n_workers``; default 1 (one namespace per rank).
        tag: short name ([A-Za-z0-9_], up to 24 characters) in the namespace names; unique per process.
            Default: ``n<counter>``.
        master_port: ``MASTER_PORT`` put in :meth:`env` (each network is its own set of hosts, so any port is free).
    """

    IFNAME = "eth0"
    BRIDGE = "br0"

    def __init__(self, n_workers: int, spec: Network, *, node_size: int = 1, tag: str | None = None,
                 master_port: int = 29500) -> None:
        check_int("n_workers", n_workers, 1, 250)
        divisors = [d for d in range(1, n_workers + 1) if n_workers % d == 0]
        if isinstance(node_size, bool) or not isinstance(node_size, int) or node_size not in divisors:
            raise ValueError(f"node_size must be a divisor of n_workers ({n_workers}) so that every node has as many "
                             f"workers: accepted {', '.join(map(str, divisors))}; got {node_size!r}")
        if not isinstance(spec, Network) or spec.kind != "emulated" or spec.rate_bps is None:
            shown = spec.describe() if isinstance(spec, Network) else repr(spec)
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
        self.node_size = node_size
        self.n_nodes = n_workers // node_size
        self.spec = spec
        self.rate_bps: float = spec.rate_bps
        """The links' current rate, bits/s: ``spec.rate_bps`` until :meth:`set_rate` changes it."""
        self.tag = tag
        self.master_port = master_port
        self.subnet_id = 1 + zlib.crc32(tag.encode()) % 254
        self.subnet = f"{_SUBNET_PREFIX}.{self.subnet_id}.0/24"
        self.hosts: list[Host] = []  # one per node
        self.switch_namespace = ""
        self._owner_pid = 0
        self._state = "new"  # new -> up -> closed

    # --- naming ------------------------------------------------------------------------------------------

    @property
    def namespaces(self) -> list[str]:
        """All namespace names of this network (nodes, then the switch); empty before ``__enter__``."""
        return [h.namespace for h in self.hosts] + ([self.switch_namespace] if self.switch_namespace else [])

    @property
    def workers(self) -> list[Host]:
        """Each rank's host (its node's; with ``node_size=1`` one host per rank); empty before ``__enter__``."""
        return [self.hosts[self.node_of(r)] for r in range(self.n_workers)] if self.hosts else []

    def node_of(self, rank: int) -> int:
        """The node ``rank`` runs on (``rank // node_size``: ranks are numbered node by node)."""
        if isinstance(rank, bool) or not isinstance(rank, int) or not 0 <= rank < self.n_workers:
            raise ValueError(f"rank must be in [0, {self.n_workers}), got {rank!r}")
        return rank // self.node_size

    def _plan(self) -> None:
        self._owner_pid = os.getpid()
        base = f"tq-{self._owner_pid}-{self.tag}"
        self.switch_namespace = f"{base}-sw"
        self.hosts = [
            Host(f"{base}-w{k}", self.IFNAME, f"{_SUBNET_PREFIX}.{self.subnet_id}.{k + 1}")
            for k in range(self.n_nodes)
        ]

    # --- shaping parameters --------------------------------------------------------------------------------

    def tc_commands(self, dev: str, rate_bps: float | None = None, *, verb: str = "replace") -> list[str]:
        """The ``tc`` batch lines (without the leading ``tc``) that shape ``dev``'s egress for this spec, at
        ``rate_bps`` (default: the current rate, :attr:`rate_bps`). ``verb``: ``replace`` (set-up) or ``change``
        (:meth:`set_rate`: the same qdiscs, new parameters; fails if they are not there)."""
        if verb not in ("replace", "change"):
            raise ValueError(f"verb must be replace or change, got {verb!r}")
        rate = self.rate_bps if rate_bps is None else rate_bps
        rate_bytes = rate / 8
        burst = int(max(16 * 1024, rate_bytes * 1e-3))  # ≥ 1 ms of tokens, ≥ 10 full-size frames
        limit = int(min(max(32 * 2**20, rate_bytes * 1.0), 2**30))  # deep queue: no drops under bulk or incast
        tbf = f"tbf rate {int(round(rate))}bit burst {burst} limit {limit}"
        if self.spec.delay_s <= 0:
            return [f"qdisc {verb} dev {dev} root handle 1: {tbf}"]
        # netem holds every packet in flight for the delay: room for one second plus the delay of full-rate
        # traffic counted in full-size frames (GSO skbs are larger, ACKs are few)
        packets = int(max(10_000, rate_bytes * (self.spec.delay_s + 1.0) / 1500))
        delay_us = plain_number(self.spec.delay_s * 1e6)
        return [
            f"qdisc {verb} dev {dev} root handle 1: netem delay {delay_us}us limit {packets}",
            f"qdisc {verb} dev {dev} parent 1:1 handle 10: {tbf}",
        ]

    def set_rate(self, rate_bps: float) -> None:
        """Change the rate of every node link, both directions (node ``eth0`` and switch ``pK``), in place: the
        qdiscs of the set-up get the new rate with the set-up's burst and queue rules (:meth:`tc_commands`, verb
        ``change``); the delay stays. Used by ``--net-schedule`` (:mod:`tailq.harness.net_schedule`)."""
        self._check_up()
        if isinstance(rate_bps, bool) or not isinstance(rate_bps, int | float) or not (
                MIN_EMULATED_RATE_BPS <= rate_bps <= MAX_RATE_BPS):
            raise ValueError(f"rate_bps must be in [{MIN_EMULATED_RATE_BPS:g}, {MAX_RATE_BPS:g}] (100kbit..100gbit), "
                             f"got {rate_bps!r}")
        rate = float(rate_bps)
        for host in self.hosts:
            _run([_TC, "-n", host.namespace, "-b", "-"], stdin="\n".join(self.tc_commands(host.ifname, rate,
                                                                                          verb="change")) + "\n")
        ports = [line for k in range(self.n_nodes) for line in self.tc_commands(f"p{k}", rate, verb="change")]
        _run([_TC, "-n", self.switch_namespace, "-b", "-"], stdin="\n".join(ports) + "\n")
        self.rate_bps = rate

    def qdisc_rates(self) -> list[dict[str, float]]:
        """The rate the kernel's token buckets hold on each node's link, bits/s, read back from ``tc``: one
        ``{"uplink": ..., "downlink": ...}`` per node (node ``eth0`` egress, switch ``pK`` egress)."""
        self._check_up()

        def tbf_rate(namespace: str, dev: str) -> float:
            proc = _run([_TC, "-j", "-n", namespace, "qdisc", "show", "dev", dev])
            rates = [q["options"]["rate"] for q in json.loads(proc.stdout) if q.get("kind") == "tbf"]
            if len(rates) != 1:
                raise EmulationError(f"expected one tbf qdisc on {dev} in {namespace}, found {len(rates)}")
            return 8.0 * float(rates[0])  # tc reports bytes per second

        return [{"uplink": tbf_rate(h.namespace, h.ifname), "downlink": tbf_rate(self.switch_namespace, f"p{k}")}
                for k, h in enumerate(self.hosts)]

    # --- lifecycle -----------------------------------------------------------------------------------------

    def __enter__(self) -> EmulatedNetwork:
        if self._state != "new":
            raise EmulationError("an EmulatedNetwork can be entered once; create a new one")
        sweep_stale()
        require_emulation(self.spec)
        self._plan()
        cleanup.register(self)
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
        for node, host in enumerate(self.hosts):
            port = f"p{node}"
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
        self._state = "closed"
        cleanup.unregister(self)
        if not self.hosts:
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
        """Argv prefix that runs a command inside the namespace of ``rank``'s node: ``["ip", "netns", "exec", ns]``."""
        self._check_up(rank)
        return [_IP, "netns", "exec", self.hosts[self.node_of(rank)].namespace]

    def env(self, rank: int) -> dict[str, str]:
        """Variables to add to ``rank``'s environment.

        ``GLOO_SOCKET_IFNAME`` (Gloo otherwise binds to the address the host name resolves to, usually loopback,
        which inside a namespace reaches nobody; bound to the node's ``eth0`` address, the ranks of one node still
        reach each other over the local route), ``MASTER_ADDR``/``MASTER_PORT`` (the TCPStore listens on node 0's
        emulated address), and what ``torchrun --nnodes K --nproc-per-node L`` sets: ``RANK``, ``WORLD_SIZE``,
        ``LOCAL_RANK`` (``rank % L``), ``LOCAL_WORLD_SIZE`` (``L``), ``GROUP_RANK`` (the node, ``rank // L``) and
        ``GROUP_WORLD_SIZE`` (``K``).
        """
        self._check_up(rank)
        return {
            "GLOO_SOCKET_IFNAME": self.hosts[self.node_of(rank)].ifname,
            "MASTER_ADDR": self.hosts[0].address,
            "MASTER_PORT": str(self.master_port),
            **node_env(rank, self.n_workers, self.node_size),
        }

    def _link_stats(self, namespace: str, dev: str) -> dict[str, Any]:
        proc = _run([_IP, "-j", "-s", "-n", namespace, "link", "show", "dev", dev])
        data: dict[str, Any] = json.loads(proc.stdout)[0]
        return data

    def tx_bytes(self) -> list[int]:
        """Bytes each node has sent on its interface so far, one entry per node (the kernel's ``tx_bytes`` counter,
        as in sysfs; with ``node_size=1`` one per rank).

        Counts Ethernet frames as handed to the interface (with GSO, one set of headers per super-packet), so it
        is the payload plus a few percent of headers. Traffic between two ranks of one node is not in it (it takes
        the local route).
        """
        self._check_up()
        return [int(self._link_stats(h.namespace, h.ifname)["stats64"]["tx"]["bytes"]) for h in self.hosts]

    def qdisc_drops(self) -> list[int]:
        """Packets dropped by the shaping qdiscs of each node's link (uplink + downlink); should stay 0."""
        self._check_up()
        drops = [0] * self.n_nodes
        sides = [(h.namespace, h.ifname, k) for k, h in enumerate(self.hosts)]
        sides += [(self.switch_namespace, f"p{k}", k) for k in range(self.n_nodes)]
        for namespace, dev, node in sides:
            proc = _run([_TC, "-j", "-s", "-n", namespace, "qdisc", "show", "dev", dev])
            drops[node] += sum(int(q.get("drops", 0)) for q in json.loads(proc.stdout))
        return drops

    def __repr__(self) -> str:
        nodes = "" if self.node_size == 1 else f", node_size={self.node_size}"
        return (f"EmulatedNetwork({self.n_workers}, {self.spec.describe()!r}{nodes}, tag={self.tag!r}, "
                f"state={self._state})")


def node_env(rank: int, n_workers: int, node_size: int) -> dict[str, str]:
    """What ``torchrun --nnodes K --nproc-per-node L`` puts in rank ``rank``'s environment about its place, for
    ``n_workers = K·L`` ranks numbered node by node: ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK`` (``rank % L``),
    ``LOCAL_WORLD_SIZE`` (``L``), ``GROUP_RANK`` (the node, ``rank // L``) and ``GROUP_WORLD_SIZE`` (``K``)."""
    return {
        "RANK": str(rank),
        "WORLD_SIZE": str(n_workers),
        "LOCAL_RANK": str(rank % node_size),
        "LOCAL_WORLD_SIZE": str(node_size),
        "GROUP_RANK": str(rank // node_size),
        "GROUP_WORLD_SIZE": str(n_workers // node_size),
    }
