"""Network emulation: make the workers' Gloo TCP connections cross a real, rate-limited network.

The network itself is described by :class:`tailq.comm.network.Network` (``--net``, parsed once). This package
emulates the ``RATE[,DELAY]`` kind, split by job:

* :mod:`.namespaces` — running ``ip``, the host-wide lock that serialises namespace changes, creating, listing,
  deleting and sweeping ``tq-<pid>-…`` namespaces whose owner died;
* :mod:`.probe` — whether emulation works here (checked once per process by doing it) and the one sentence that
  says it does not, with what to use instead;
* :mod:`.cleanup` — teardown at interpreter exit and on SIGINT/SIGTERM, chained to the previous handlers;
* :mod:`.emulated` — :class:`EmulatedNetwork`, the namespaces, bridge and ``tc`` shaping of one run.

Topology of an emulated network with tag ``T`` owned by process ``P`` (``N = K·L`` workers on ``K`` nodes of
``L = node_size`` workers each, subnet ``10.213.X.0/24`` with ``X`` derived from the tag)::

    node 0 = tq-P-T-w0: ranks 0..L-1,   lo, eth0 10.213.X.1/24 ─veth─ p0 ┐
    node 1 = tq-P-T-w1: ranks L..2L-1,  lo, eth0 10.213.X.2/24 ─veth─ p1 ┼─ br0   (namespace tq-P-T-sw)
    ...                                                                  ┘

With ``node_size=1`` (the default) every worker is a node: ``K = N`` namespaces, rank ``r`` in ``tq-P-T-wr``.
The ``L`` workers of a node all run in its namespace and bind Gloo to its ``eth0`` address; a connection between
two of them goes to a local address, which the kernel routes over loopback (not shaped, never on the veth), so
only traffic between nodes crosses the node's veth: the rate-limited NIC its ``L`` workers share (measured by
``tests/harness/test_netem.py::test_nodes_share_one_nic_and_talk_locally_inside``).

Shaping, on each node link, both directions (node ``eth0`` egress = uplink, switch ``pK`` egress = downlink)::

    tc qdisc replace dev IF root handle 1: tbf rate RATEbit burst BURST limit LIMIT          # DELAY == 0
    tc qdisc replace dev IF root handle 1: netem delay DELAYus limit PACKETS                 # DELAY > 0
    tc qdisc replace dev IF parent 1:1 handle 10: tbf rate RATEbit burst BURST limit LIMIT   #   (netem, then tbf)

``--net-schedule`` changes the rate mid-run (:meth:`EmulatedNetwork.set_rate`): the same lines with ``change`` for
``replace``, at the new rate (BURST and LIMIT by the rules below), on every node link in both directions; the delay
stays. :meth:`EmulatedNetwork.qdisc_rates` reads the rates back from the kernel.

``DELAY`` is added on every link direction a packet crosses: node ``a`` → node ``b`` crosses ``a``'s uplink and
``b``'s downlink, so the one-way latency between two workers of different nodes is ``2·DELAY`` and a round trip
``4·DELAY`` (workers of one node: none).
``BURST`` is max(16 KiB, 1 ms of traffic). The tbf queue, ``LIMIT`` = max(32 MiB, 1 s of traffic) bytes (at most
1 GiB), is deliberately deep so that TCP bulk transfers and incast do not see tc drops (they make timings erratic;
the price is queueing delay under incast); :meth:`EmulatedNetwork.qdisc_drops` reports any that happen. Emulated
rates go from 100 kbit to 100 gbit. Delay needs the kernel's ``netem`` qdisc (``CONFIG_NET_SCH_NETEM``); kernels
without it can still emulate the rate, and :func:`emulation_available` says so for a network with a delay.

Namespaces are deleted by ``__exit__``, :meth:`EmulatedNetwork.teardown`, an ``atexit`` hook and SIGINT/SIGTERM
handlers (restored when the last network closes). A process killed by SIGKILL cannot clean up:
:func:`sweep_stale` deletes every ``tq-<pid>-…`` namespace whose process is gone, and every
``EmulatedNetwork.__enter__`` calls it first.

A worker process is launched inside its node's namespace with ``command_prefix(rank) + argv`` and ``env(rank)``
added to its environment: ``GLOO_SOCKET_IFNAME`` makes Gloo use the emulated interface (otherwise it binds to the
address of the host name, typically loopback), ``MASTER_ADDR``/``MASTER_PORT`` put the TCPStore of
``torch.distributed`` on node 0's emulated address, and ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``,
``LOCAL_WORLD_SIZE``, ``GROUP_RANK``, ``GROUP_WORLD_SIZE`` are what ``torchrun --nnodes K --nproc-per-node L`` would
set (:func:`node_env`). :meth:`EmulatedNetwork.tx_bytes` and :meth:`EmulatedNetwork.qdisc_drops` have one entry per
node. Only traffic between the namespaces is emulated: GPU
transports (NCCL over NVLink or shared memory) bypass it, so use this with Gloo.
"""

from .emulated import MIN_EMULATED_RATE_BPS, EmulatedNetwork, Host, node_env
from .namespaces import EmulationError, sweep_stale
from .probe import emulation_available, require_emulation, unavailable_message

__all__ = [
    "MIN_EMULATED_RATE_BPS",
    "EmulatedNetwork",
    "EmulationError",
    "Host",
    "emulation_available",
    "node_env",
    "require_emulation",
    "sweep_stale",
    "unavailable_message",
]
