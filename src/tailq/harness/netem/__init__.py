"""Network emulation: make the workers' Gloo TCP connections cross a real, rate-limited network.

The network itself is described by :class:`tailq.comm.network.Network` (``--net``, parsed once). This package
emulates the ``RATE[,DELAY]`` kind, split by job:

* :mod:`.namespaces` — running ``ip``, the host-wide lock that serialises namespace changes, creating, listing,
  deleting and sweeping ``tq-<pid>-…`` namespaces whose owner died;
* :mod:`.probe` — whether emulation works here (checked once per process by doing it) and the one sentence that
  says it does not, with what to use instead;
* :mod:`.cleanup` — teardown at interpreter exit and on SIGINT/SIGTERM, chained to the previous handlers;
* :mod:`.emulated` — :class:`EmulatedNetwork`, the namespaces, bridge and ``tc`` shaping of one run.

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
without it can still emulate the rate, and :func:`emulation_available` says so for a network with a delay.

Namespaces are deleted by ``__exit__``, :meth:`EmulatedNetwork.teardown`, an ``atexit`` hook and SIGINT/SIGTERM
handlers (restored when the last network closes). A process killed by SIGKILL cannot clean up:
:func:`sweep_stale` deletes every ``tq-<pid>-…`` namespace whose process is gone, and every
``EmulatedNetwork.__enter__`` calls it first.

A worker process is launched inside its namespace with ``command_prefix(rank) + argv`` and ``env(rank)`` added
to its environment: ``GLOO_SOCKET_IFNAME`` makes Gloo use the emulated interface (otherwise it binds to the
address of the host name, typically loopback), and ``MASTER_ADDR``/``MASTER_PORT`` put the TCPStore of
``torch.distributed`` on rank 0's emulated address. Only traffic between the namespaces is emulated: GPU
transports (NCCL over NVLink or shared memory) bypass it, so use this with Gloo.
"""

from .emulated import MIN_EMULATED_RATE_BPS, EmulatedNetwork, Host
from .namespaces import EmulationError, sweep_stale
from .probe import emulation_available, require_emulation, unavailable_message

__all__ = [
    "MIN_EMULATED_RATE_BPS",
    "EmulatedNetwork",
    "EmulationError",
    "Host",
    "emulation_available",
    "require_emulation",
    "sweep_stale",
    "unavailable_message",
]
