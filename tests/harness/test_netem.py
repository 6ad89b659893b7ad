"""Network emulation: ``--net`` parsing, emulated links that really shape TCP and Gloo, and teardown guarantees.

Tolerances, from the link model (tbf on both directions of each worker link, rate R):

* a TCP bulk transfer carries 1448 payload bytes per 1514-byte frame (tbf counts the Ethernet header, TCP
  timestamps are on), so goodput ≈ 0.956·R, minus slow start and the ACK clock; the brief's window is
  [0.6, 1.05]·R (the upper edge leaves room for the 16 KiB token bucket that starts full);
* incast (two senders into one worker) is limited by the receiver's downlink: the aggregate must also be
  ≈ R, not 2·R, and the deep switch-side queue must not drop;
* a 2-rank Gloo all-reduce of S bytes moves 2·(N−1)/N·S bytes over each uplink, so it cannot finish before
  that many bits / R (plus nothing: headers only make it slower);
* ``tx_bytes`` counts frames handed to the interface, so it is at least the payload sent.
* K nodes × L workers (``node_size=L``): ranks of one node talk over loopback (≈ 0 bytes on the node's NIC),
  a ring over all ranks numbered node by node has one edge leaving each node (2·(N−1)/N·S on each NIC, up
  to 10% more for headers), and L senders of one node share its rate.

Emulation tests need root, iproute2 and network namespaces; they are skipped (with the reason) elsewhere. Every
test deletes its namespaces in ``finally``, also when an assertion fails.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import selectors
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator

import pytest

from tailq.comm.network import Network
from tailq.harness.netem import (
    EmulatedNetwork,
    EmulationError,
    Host,
    emulation_available,
    sweep_stale,
)

AVAILABLE, REASON = emulation_available()
needs_emulation = pytest.mark.skipif(not AVAILABLE, reason=f"network emulation unavailable: {REASON}")
DELAY_OK, DELAY_REASON = emulation_available(Network.parse("100mbit,5ms")) if AVAILABLE else (False, REASON)

# ------------------------------------------------------------------------------------------------- parsing


@pytest.mark.parametrize(
    ("text", "kind", "rate", "delay"),
    [
        ("none", "none", None, 0.0),
        ("NONE", "none", None, 0.0),
        ("100mbit,1ms", "emulated", 1e8, 1e-3),
        ("100mbit", "emulated", 1e8, 0.0),
        ("1gbit", "emulated", 1e9, 0.0),
        ("500kbit", "emulated", 5e5, 0.0),
        ("2.5GBit", "emulated", 2.5e9, 0.0),
        ("10mbps", "emulated", 8e7, 0.0),  # bytes per second, tc's convention
        ("1kbps", "emulated", 8e3, 0.0),
        ("3gbps", "emulated", 2.4e10, 0.0),
        ("64bit", "emulated", 64.0, 0.0),
        ("100gbit,10s", "emulated", 1e11, 10.0),
        ("50mbit,500us", "emulated", 5e7, 5e-4),
        ("50mbit,0.2ms", "emulated", 5e7, 2e-4),
        ("50mbit,2s", "emulated", 5e7, 2.0),
        ("50mbit,0ms", "emulated", 5e7, 0.0),
        (" 50mbit , 1ms ", "emulated", 5e7, 1e-3),
        ("model:1gbit", "model", 1e9, 0.0),
        ("MODEL:100mbit,1ms", "model", 1e8, 1e-3),
    ],
)
def test_parse_net_accepts(text: str, kind: str, rate: float | None, delay: float) -> None:
    spec = Network.parse(text)
    assert spec.kind == kind
    if rate is None:
        assert spec.rate_bps is None
    else:
        assert spec.rate_bps == pytest.approx(rate, rel=1e-12)
    assert spec.delay_s == pytest.approx(delay, rel=1e-12, abs=0)
    assert Network.parse(spec.as_arg()) == spec  # the canonical text round-trips


@pytest.mark.parametrize(
    "text",
    ["", "fast", "100", "100mb", "100mbit/s", "mbit", "-1mbit", "0mbit", "0.0gbit", "101gbit", "100mbit,1",
     "100mbit,-1ms", "100mbit,11s", "100mbit,1ms,2", "100mbit,,", "model:", "model:none", "none,1ms", "1e3mbit",
     "emulated:100mbit", "100mbit;1ms"],
)  # fmt: skip
def test_parse_net_rejects(text: str) -> None:
    with pytest.raises(ValueError, match="--net") as info:
        Network.parse(text)
    message = str(info.value)
    assert repr(text) in message  # echoes the bad text
    assert "model:RATE[,DELAY]" in message and "'none'" in message  # lists the accepted forms


def test_describe() -> None:
    assert Network.parse("100mbit,1ms").describe() == "emulated 100 Mbit/s, 1 ms"
    assert Network.parse("model:1gbit").describe() == "modeled 1 Gbit/s"
    assert Network.parse("none").describe() == "loopback"
    assert Network.parse("10mbps,500us").describe() == "emulated 80 Mbit/s, 500 us"
    assert Network.parse("model:2.5gbit,2s").describe() == "modeled 2.5 Gbit/s, 2 s"


def test_netspec_validates_direct_construction() -> None:
    with pytest.raises(ValueError, match="--net"):
        Network("emulated", 0.0, 0.0)
    with pytest.raises(ValueError, match="--net"):
        Network("emulated", 1e6, 11.0)
    with pytest.raises(ValueError, match="--net"):
        Network("wifi", 1e6, 0.0)
    with pytest.raises(ValueError, match="--net"):
        EmulatedNetwork(2, Network.parse("model:1gbit"))
    with pytest.raises(ValueError, match="at least 100kbit"):
        EmulatedNetwork(2, Network.parse("99kbit"))  # parses (model: takes it), but tc cannot shape it
    with pytest.raises(ValueError, match="tag"):
        EmulatedNetwork(2, Network.parse("1mbit"), tag="has-dash")


def test_tc_commands_shape_rate_and_delay() -> None:
    # 100 Mbit/s = 12.5 MB/s: a 16 KiB bucket (1 ms of tokens would be only 12.5 kB) and a 32 MiB queue
    # (one second of traffic would be only 12.5 MB)
    assert EmulatedNetwork(2, Network.parse("100mbit")).tc_commands("eth0") == [
        "qdisc replace dev eth0 root handle 1: tbf rate 100000000bit burst 16384 limit 33554432"
    ]
    # 10 Gbit/s: 1 ms of tokens (1.25 MB) and one second of queue (1.25 GB, capped at 1 GiB); netem first,
    # room for (delay + 1 s) of full-size frames
    assert EmulatedNetwork(2, Network.parse("10gbit,2ms")).tc_commands("p1") == [
        "qdisc replace dev p1 root handle 1: netem delay 2000us limit 835000",
        "qdisc replace dev p1 parent 1:1 handle 10: tbf rate 10000000000bit burst 1250000 limit 1073741824",
    ]


def test_emulation_available_answers_with_a_sentence() -> None:
    ok, reason = emulation_available()
    assert isinstance(ok, bool) and isinstance(reason, str) and len(reason) > 10


# ---------------------------------------------------------------------------------------------- helpers


def _tag(prefix: str) -> str:
    return f"{prefix}{secrets.token_hex(3)}"


def _netns() -> set[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True).stdout
    return {line.split()[0] for line in out.splitlines() if line.strip()}


def _of_tag(tag: str) -> set[str]:
    return {n for n in _netns() if re.match(rf"^tq-\d+-{tag}-", n)}


def _purge(tag: str) -> None:
    """Last-resort cleanup for a test: delete every namespace of ``tag`` (whoever owns it)."""
    for name in _of_tag(tag):
        subprocess.run(["ip", "netns", "delete", name], capture_output=True, check=False)


@pytest.fixture
def tag(request: pytest.FixtureRequest) -> Iterator[str]:
    name = _tag(re.sub(r"[^a-z0-9]", "", request.node.name.lower())[-10:])
    try:
        yield name
    finally:
        _purge(name)


def _readline(proc: subprocess.Popen[str], timeout: float) -> str:
    """One line of a child's stdout, or fail after ``timeout`` seconds."""
    assert proc.stdout is not None
    sel = selectors.DefaultSelector()
    sel.register(proc.stdout, selectors.EVENT_READ)
    try:
        if not sel.select(timeout):
            raise AssertionError(f"no output from {proc.args!r} within {timeout} s")
        return proc.stdout.readline()
    finally:
        sel.close()


def _kill(procs: list[subprocess.Popen[str]]) -> None:
    for p in procs:
        if p.poll() is None:
            p.kill()
        p.wait(timeout=10)


SERVER = r"""
import json, socket, sys, threading, time
addr, port, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
srv = socket.socket(); srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1); srv.bind((addr, port)); srv.listen(n)
print("ready", flush=True)
res = []
def serve(conn):
    got, first = 0, None
    while True:
        b = conn.recv(1 << 20)
        if not b: break
        if first is None: first = time.perf_counter()
        got += len(b)
    res.append((got, first, time.perf_counter())); conn.sendall(b"k"); conn.close()
threads = []
for _ in range(n):
    conn, _ = srv.accept(); t = threading.Thread(target=serve, args=(conn,)); t.start(); threads.append(t)
for t in threads: t.join()
print(json.dumps({"bytes": [r[0] for r in res], "first": min(r[1] for r in res), "last": max(r[2] for r in res)}))
"""

CLIENT = r"""
import socket, sys
c = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=30)
c.sendall(b"x" * int(sys.argv[3])); c.shutdown(socket.SHUT_WR); assert c.recv(1) == b"k"
"""

ECHO = r"""
import json, socket, statistics, sys, time
addr, port, mode = sys.argv[1], int(sys.argv[2]), sys.argv[3]
if mode == "server":
    srv = socket.socket(); srv.bind((addr, port)); srv.listen(1); print("ready", flush=True)
    conn, _ = srv.accept(); conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    while (b := conn.recv(64)): conn.sendall(b)
else:
    c = socket.create_connection((addr, port), timeout=30); c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    rtts = []
    for _ in range(12):
        t = time.perf_counter(); c.sendall(b"p"); assert c.recv(64) == b"p"; rtts.append(time.perf_counter() - t)
    print(json.dumps({"min": min(rtts[2:]), "median": statistics.median(rtts[2:])}))
"""


def _bulk(net: EmulatedNetwork, senders: list[int], nbytes: int, port: int = 5001) -> dict[str, float]:
    """Senders each push ``nbytes`` to a server bound to rank 0's address; aggregate goodput in bit/s."""
    procs: list[subprocess.Popen[str]] = []
    try:
        server = subprocess.Popen(
            net.command_prefix(0) + [sys.executable, "-c", SERVER, net.workers[0].address, str(port),
                                     str(len(senders))],
            stdout=subprocess.PIPE, text=True,
        )  # fmt: skip
        procs.append(server)
        assert _readline(server, 20).strip() == "ready"
        for rank in senders:
            procs.append(subprocess.Popen(
                net.command_prefix(rank) + [sys.executable, "-c", CLIENT, net.workers[0].address, str(port),
                                            str(nbytes)],
                text=True,
            ))  # fmt: skip
        out, _ = server.communicate(timeout=30)
        for p in procs[1:]:
            assert p.wait(timeout=30) == 0
        res = json.loads(out)
        assert res["bytes"] == [nbytes] * len(senders)
        seconds = res["last"] - res["first"]
        return {"seconds": seconds, "bps": nbytes * len(senders) * 8 / seconds}
    finally:
        _kill(procs)


# --------------------------------------------------------------------------------------- emulated links


@needs_emulation
@pytest.mark.parametrize("n_workers", [2, 3])
def test_topology_and_bulk_throughput(n_workers: int, tag: str) -> None:
    rate = 50e6
    net = EmulatedNetwork(n_workers, Network.parse("50mbit"), tag=tag)
    try:
        with net:
            names = _netns()
            pid = os.getpid()
            assert set(net.namespaces) <= names
            assert net.switch_namespace == f"tq-{pid}-{tag}-sw"
            for rank, host in enumerate(net.workers):
                assert host == Host(f"tq-{pid}-{tag}-w{rank}", "eth0", f"10.213.{net.subnet_id}.{rank + 1}")
                assert net.command_prefix(rank) == ["ip", "netns", "exec", host.namespace]
                env = net.env(rank)
                assert env["GLOO_SOCKET_IFNAME"] == "eth0" and env["MASTER_ADDR"] == net.workers[0].address
                assert env["RANK"] == str(rank) and env["WORLD_SIZE"] == str(n_workers)
                # lo is up, eth0 is up and carries only its IPv4 address (no IPv6 link-local for Gloo to pick)
                addrs = json.loads(subprocess.run(["ip", "-j", "-n", host.namespace, "addr", "show"],
                                                  capture_output=True, text=True, check=True).stdout)  # fmt: skip
                by_name = {a["ifname"]: a for a in addrs}
                assert "UP" in by_name["lo"]["flags"] and "UP" in by_name["eth0"]["flags"]
                assert [(i["family"], i["local"]) for i in by_name["eth0"]["addr_info"]] == [("inet", host.address)]
            # both directions of every link are shaped
            for ns, dev in [(h.namespace, "eth0") for h in net.workers] + [
                (net.switch_namespace, f"p{r}") for r in range(n_workers)
            ]:
                qdiscs = json.loads(subprocess.run(["tc", "-j", "-n", ns, "qdisc", "show", "dev", dev],
                                                   capture_output=True, text=True, check=True).stdout)  # fmt: skip
                tbf = [q for q in qdiscs if q["kind"] == "tbf"]
                assert len(tbf) == 1 and tbf[0]["options"]["rate"] == rate / 8, (ns, dev, qdiscs)

            nbytes = 4_000_000
            before = net.tx_bytes()
            one = _bulk(net, [1], nbytes)
            after = net.tx_bytes()
            print(f"\n{n_workers} workers, 50 Mbit/s, 4 MB worker1->worker0: {one['seconds']:.3f} s, "
                  f"{one['bps'] / 1e6:.1f} Mbit/s ({one['bps'] / rate:.3f} x rate); "
                  f"tx_bytes delta {[a - b for a, b in zip(after, before, strict=True)]}")  # fmt: skip
            assert 0.6 * rate <= one["bps"] <= 1.05 * rate
            assert after[1] - before[1] >= nbytes
            assert after[0] - before[0] < nbytes // 10  # rank 0 only sent ACKs
            if n_workers == 3:
                # incast: ranks 1 and 2 send at once; rank 0's downlink (switch-side tbf) is the bottleneck
                both = _bulk(net, [1, 2], nbytes // 2, port=5002)
                print(f"incast 2 x 2 MB -> worker0: {both['seconds']:.3f} s, aggregate {both['bps'] / 1e6:.1f} "
                      f"Mbit/s ({both['bps'] / rate:.3f} x rate)")  # fmt: skip
                assert 0.6 * rate <= both["bps"] <= 1.05 * rate
            assert net.qdisc_drops() == [0] * n_workers
        assert not (set(net.namespaces) & _netns())
    finally:
        net.teardown()


@needs_emulation
@pytest.mark.skipif(not DELAY_OK, reason=f"delay emulation unavailable: {DELAY_REASON}")
def test_delay_round_trip(tag: str) -> None:
    delay = 5e-3
    # worker1 -> worker0 crosses worker1's uplink and worker0's downlink (2 delays); the reply crosses the two
    # other directions of the same links: a round trip adds 4 delays
    procs: list[subprocess.Popen[str]] = []
    net = EmulatedNetwork(2, Network.parse("100mbit,5ms"), tag=tag)
    try:
        with net:
            addr = net.workers[0].address
            server = subprocess.Popen(net.command_prefix(0) + [sys.executable, "-c", ECHO, addr, "5003", "server"],
                                      stdout=subprocess.PIPE, text=True)  # fmt: skip
            procs.append(server)
            assert _readline(server, 20).strip() == "ready"
            client = subprocess.run(net.command_prefix(1) + [sys.executable, "-c", ECHO, addr, "5003", "client"],
                                    capture_output=True, text=True, timeout=30, check=True)  # fmt: skip
            res = json.loads(client.stdout)
            print(f"\nRTT worker1<->worker0 with 5 ms per link: min {res['min'] * 1e3:.2f} ms, "
                  f"median {res['median'] * 1e3:.2f} ms")  # fmt: skip
            assert res["min"] >= 4 * delay * 0.98
            assert res["median"] <= 4 * delay + 0.015
    finally:
        _kill(procs)
        net.teardown()


@needs_emulation
@pytest.mark.skipif(DELAY_OK, reason="this kernel has netem; delays are emulated")
def test_delay_without_netem_is_a_clear_error(tag: str) -> None:
    spec = Network.parse("100mbit,5ms")
    ok, reason = emulation_available(spec)
    assert not ok and "netem" in reason and "--net 100mbit" in reason
    with pytest.raises(EmulationError, match=r"netem.*--net model:100mbit,5ms"):
        with EmulatedNetwork(2, spec, tag=tag):
            pass  # pragma: no cover
    assert not _of_tag(tag)


GLOO_WORKER = r"""
import json, os, time
from datetime import timedelta
import torch, torch.distributed as dist
dist.init_process_group("gloo", init_method="env://", timeout=timedelta(seconds=60))
rank, n = dist.get_rank(), dist.get_world_size()
x = torch.full((1 << 20,), float(rank + 1)); dist.all_reduce(x)  # warm-up: connections, buffers
dist.barrier()
times, ok = [], bool(torch.all(x == n * (n + 1) / 2))
for _ in range(3):
    x = torch.full((1 << 20,), float(rank + 1))
    t = time.perf_counter(); dist.all_reduce(x); times.append(time.perf_counter() - t)
    ok = ok and bool(torch.all(x == n * (n + 1) / 2))
dist.barrier()
print(json.dumps({"rank": rank, "ok": ok, "times": times}), flush=True)
dist.destroy_process_group()
"""


@needs_emulation
def test_gloo_all_reduce_across_the_emulated_network(tag: str) -> None:
    pytest.importorskip("torch")
    n, rate = 2, 200e6
    size = 4 * 2**20  # 2^20 float32
    bound = 2 * (n - 1) / n * size * 8 / rate  # seconds per all-reduce on the uplink, without any header
    procs: list[subprocess.Popen[str]] = []
    net = EmulatedNetwork(n, Network.parse("200mbit"), tag=tag)
    try:
        with net:
            before = net.tx_bytes()
            for rank in range(n):
                procs.append(subprocess.Popen(
                    net.command_prefix(rank) + [sys.executable, "-c", GLOO_WORKER],
                    env={**os.environ, **net.env(rank)}, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                ))  # fmt: skip
            outs = []
            for p in procs:
                out, err = p.communicate(timeout=60)
                assert p.returncode == 0, err[-3000:]
                outs.append(json.loads(out.strip().splitlines()[-1]))
            after = net.tx_bytes()
            sent = [a - b for a, b in zip(after, before, strict=True)]
            per_call = [max(o["times"][i] for o in outs) for i in range(3)]
            print(f"\nGloo all-reduce of 4 MiB, 2 ranks, 200 Mbit/s: {[round(t, 3) for t in per_call]} s per call "
                  f"(bandwidth bound {bound:.3f} s); tx_bytes per rank {sent}")  # fmt: skip
            assert all(o["ok"] for o in outs)
            for t in per_call:
                assert t >= bound
                assert t <= 3 * bound  # it is the link, not something else, that sets the pace
            # 4 all-reduces (warm-up included) crossed each rank's interface
            for s in sent:
                assert s >= 4 * 2 * (n - 1) / n * size
            assert net.qdisc_drops() == [0] * n
    finally:
        _kill(procs)
        net.teardown()


NODE_WORKER = r"""
import json, os, time
from datetime import timedelta
import torch, torch.distributed as dist
dist.init_process_group("gloo", init_method="env://", timeout=timedelta(seconds=60))
rank, n = dist.get_rank(), dist.get_world_size()
L, node = int(os.environ["LOCAL_WORLD_SIZE"]), int(os.environ["GROUP_RANK"])
place = {k: os.environ[k] for k in ("LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "GROUP_WORLD_SIZE")}
groups = [dist.new_group(list(range(k * L, (k + 1) * L))) for k in range(n // L)]  # every rank creates every group
mine = groups[node]
numel = int(os.environ["TQ_NUMEL"])
def tx():  # this node's NIC: eth0 of the namespace ip netns exec put us in (sysfs is remounted for it)
    dist.barrier()
    with open("/sys/class/net/eth0/statistics/tx_bytes") as f:
        v = int(f.read())
    dist.barrier()
    return v
def timed(fn):
    dist.barrier(); t = time.perf_counter(); fn(); return time.perf_counter() - t
x = torch.ones(1024); dist.all_reduce(x); dist.all_reduce(x, group=mine)  # warm-up: every connection opened
out = {"rank": rank, "place": place}
t0 = tx()
y = torch.full((numel,), float(rank + 1)); out["t_node"] = timed(lambda: dist.all_reduce(y, group=mine))
out["node_ok"] = bool(torch.all(y == sum(range(node * L + 1, (node + 1) * L + 1))))
t1 = tx()
z = torch.full((numel,), float(rank + 1)); out["t_world"] = timed(lambda: dist.all_reduce(z))
out["world_ok"] = bool(torch.all(z == n * (n + 1) / 2))
t2 = tx()
# the L workers of node 0 each send numel floats to their peer on node 1 at the same time (one shared NIC)
buf = torch.full((numel,), float(rank))
dist.barrier()
t = time.perf_counter()
if node == 0:
    dist.send(buf, rank + L)
elif node == 1:
    dist.recv(buf, rank - L)
    out["p2p_ok"] = bool(torch.all(buf == rank - L))
out["t_p2p"] = time.perf_counter() - t
t3 = tx()
out.update(node_bytes=t1 - t0, world_bytes=t2 - t1, p2p_bytes=t3 - t2)
print(json.dumps(out), flush=True)
dist.destroy_process_group()
"""


@needs_emulation
def test_nodes_share_one_nic_and_talk_locally_inside(tag: str) -> None:
    """2 nodes x 2 workers at 200 Mbit/s, measured on each node's eth0: an all-reduce among the two workers of a node
    puts ~0 bytes on its NIC (loopback), a ring all-reduce over the 4 ranks (numbered node by node: one ring edge
    leaves each node) puts 2(N-1)/N·B on each node's NIC, and two workers of one node sending at once share its
    rate (each about half)."""
    pytest.importorskip("torch")
    n, L, rate = 4, 2, 200e6
    numel = 1 << 20
    size = 4 * numel  # B: 4 MiB of float32
    ring = 2 * (n - 1) / n * size
    procs: list[subprocess.Popen[str]] = []
    net = EmulatedNetwork(n, Network.parse("200mbit"), node_size=L, tag=tag)
    try:
        with net:
            pid = os.getpid()
            assert net.n_nodes == 2 and len(net.namespaces) == 3  # 2 nodes + the switch
            assert [net.node_of(r) for r in range(n)] == [0, 0, 1, 1]
            for r in range(n):
                assert net.command_prefix(r) == ["ip", "netns", "exec", f"tq-{pid}-{tag}-w{r // L}"]
                assert net.workers[r] == net.hosts[r // L]
                env = net.env(r)
                assert env["MASTER_ADDR"] == net.hosts[0].address and env["GLOO_SOCKET_IFNAME"] == "eth0"
                assert (env["RANK"], env["WORLD_SIZE"], env["LOCAL_RANK"], env["LOCAL_WORLD_SIZE"], env["GROUP_RANK"],
                        env["GROUP_WORLD_SIZE"]) == (str(r), "4", str(r % L), "2", str(r // L), "2")
            before = net.tx_bytes()
            assert len(before) == 2
            for rank in range(n):
                procs.append(subprocess.Popen(
                    net.command_prefix(rank) + [sys.executable, "-c", NODE_WORKER],
                    env={**os.environ, **net.env(rank), "TQ_NUMEL": str(numel), "OMP_NUM_THREADS": "1"},
                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                ))  # fmt: skip
            outs = []
            for p in procs:
                out, err = p.communicate(timeout=90)
                assert p.returncode == 0, err[-3000:]
                outs.append(json.loads(out.strip().splitlines()[-1]))
            after = net.tx_bytes()
            total = [a - b for a, b in zip(after, before, strict=True)]
            by_node = {k: outs[k * L] for k in range(2)}  # local rank 0 of each node reports its node's counter
            t_world = max(o["t_world"] for o in outs)
            t_p2p = [outs[2]["t_p2p"], outs[3]["t_p2p"]]  # receivers: from the common start to the last byte
            print(f"\n2 nodes x 2 workers, 200 Mbit/s, B = 4 MiB. NIC bytes per node: node-group all-reduce "
                  f"{[o['node_bytes'] for o in by_node.values()]}, world all-reduce "
                  f"{[o['world_bytes'] for o in by_node.values()]} (2(N-1)/N·B = {ring:.0f}), two 4 MiB sends from "
                  f"node 0 at once {[o['p2p_bytes'] for o in by_node.values()]}; whole run {total}. Times: node "
                  f"all-reduce {max(o['t_node'] for o in outs):.3f} s, world all-reduce {t_world:.3f} s "
                  f"(bound {ring * 8 / rate:.3f} s), the two sends {[round(t, 3) for t in t_p2p]} s = "
                  f"{[round(size * 8 / t / 1e6, 1) for t in t_p2p]} Mbit/s each")  # fmt: skip
            for o in outs:
                assert o["place"] == {"LOCAL_RANK": str(o["rank"] % L), "LOCAL_WORLD_SIZE": "2",
                                      "GROUP_RANK": str(o["rank"] // L), "GROUP_WORLD_SIZE": "2"}
                assert o["node_ok"] and o["world_ok"]
            assert outs[2]["p2p_ok"] and outs[3]["p2p_ok"]
            for o in by_node.values():
                assert o["node_bytes"] < 0.01 * size  # inside a node: loopback, not the NIC (barriers only)
                assert ring <= o["world_bytes"] <= 1.1 * ring  # one ring edge leaves each node, + TCP/IP headers
            assert 2 * size <= by_node[0]["p2p_bytes"] <= 1.1 * 2 * size
            assert by_node[1]["p2p_bytes"] < 0.05 * size  # ACKs
            assert t_world >= ring * 8 / rate  # the NIC sets the pace
            for t in t_p2p:  # each sender gets about half the node's rate (alone it would get ~0.95)
                assert size * 8 / t <= 0.7 * rate
            assert 0.6 * rate <= 2 * size * 8 / max(t_p2p) <= 1.05 * rate  # together: the one link's rate
            # the whole run on the same counters read from outside (ip -s link): at least what the phases sent
            assert total[0] >= ring + 2 * size and total[1] >= ring
            assert net.qdisc_drops() == [0, 0]
        assert not (set(net.namespaces) & _netns())
    finally:
        _kill(procs)
        net.teardown()


def test_node_size_must_divide_the_workers() -> None:
    with pytest.raises(ValueError, match=r"node_size must be a divisor of n_workers \(6\).*accepted 1, 2, 3, 6; got 4"):
        EmulatedNetwork(6, Network.parse("100mbit"), node_size=4)
    for bad in (0, 7, True, 2.0):
        with pytest.raises(ValueError, match="node_size"):
            EmulatedNetwork(6, Network.parse("100mbit"), node_size=bad)  # type: ignore[arg-type]
    net = EmulatedNetwork(6, Network.parse("100mbit"), node_size=3)
    assert (net.n_nodes, net.node_size) == (2, 3) and [net.node_of(r) for r in range(6)] == [0, 0, 0, 1, 1, 1]
    with pytest.raises(ValueError, match="rank must be in"):
        net.node_of(6)


def test_node_env_is_what_torchrun_sets() -> None:
    from tailq.harness.netem import node_env

    assert node_env(5, 8, 4) == {"RANK": "5", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "4",
                                 "GROUP_RANK": "1", "GROUP_WORLD_SIZE": "2"}
    assert node_env(3, 4, 1)["LOCAL_RANK"] == "0" and node_env(3, 4, 1)["GROUP_RANK"] == "3"


# --------------------------------------------------------------------------------------------- teardown


@needs_emulation
def test_teardown_after_normal_exit_and_exception(tag: str) -> None:
    net = EmulatedNetwork(2, Network.parse("100mbit"), tag=tag)
    with net:
        names = set(net.namespaces)
        assert len(names) == 3 and names <= _netns()
    assert not (names & _netns())
    net.teardown()  # idempotent
    net.teardown()

    net2 = EmulatedNetwork(3, Network.parse("100mbit"), tag=tag + "x")
    try:
        with pytest.raises(KeyError):
            with net2:
                names2 = set(net2.namespaces)
                assert len(names2) == 4 and names2 <= _netns()
                raise KeyError("boom")
        assert not (names2 & _netns())
        with pytest.raises(EmulationError):
            net2.command_prefix(0)  # a closed network is not usable
    finally:
        net2.teardown()
        _purge(tag + "x")


@needs_emulation
def test_signal_handlers_are_restored(tag: str) -> None:
    before = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    with EmulatedNetwork(2, Network.parse("100mbit"), tag=tag) as outer:
        with EmulatedNetwork(2, Network.parse("100mbit"), tag=tag + "i"):
            pass
        # the inner network closing must not drop the handlers that still protect the outer one
        if threading.current_thread() is threading.main_thread():
            assert signal.getsignal(signal.SIGTERM) is not before[signal.SIGTERM]
        assert set(outer.namespaces) <= _netns()
    assert {s: signal.getsignal(s) for s in before} == before
    _purge(tag + "i")


CHILD = r"""
import json, signal, sys, time
from tailq.comm.network import Network
from tailq.harness import netem as mod
signal.signal(signal.SIGINT, signal.default_int_handler)  # as in an interactive run, whatever pytest left us
if sys.argv[3] == "chain":
    def previous(signum, frame):
        print("previous handler called", flush=True)
        sys.exit(3)
    signal.signal(signal.SIGTERM, previous)
net = mod.EmulatedNetwork(2, Network.parse("100mbit"), tag=sys.argv[2])
if sys.argv[3] == "atexit":  # entered by hand and never exited: the atexit hook must clean up
    net.__enter__()
    print(json.dumps(net.namespaces), flush=True)
    sys.stdin.readline()
    sys.exit(0)
with net:
    print(json.dumps(net.namespaces), flush=True)
    time.sleep(60)
"""


def _child(tag: str, mode: str = "plain") -> tuple[subprocess.Popen[str], list[str]]:
    proc = subprocess.Popen([sys.executable, "-c", CHILD, "-", tag, mode], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
    try:
        names = json.loads(_readline(proc, 30))
    except BaseException:
        _kill([proc])
        raise
    return proc, names


@needs_emulation
@pytest.mark.parametrize(
    ("sig", "mode", "returncodes"),
    [
        (signal.SIGINT, "plain", (1, -signal.SIGINT)),  # KeyboardInterrupt
        (signal.SIGTERM, "plain", (-signal.SIGTERM,)),  # default action re-raised after teardown
        (signal.SIGTERM, "chain", (3,)),  # the previous handler runs after teardown
    ],
    ids=["sigint", "sigterm", "sigterm-chained"],
)
def test_teardown_on_signal(sig: int, mode: str, returncodes: tuple[int, ...], tag: str) -> None:
    proc, names = _child(tag, mode)
    try:
        assert len(names) == 3 and all(f"-{tag}-" in n for n in names) and set(names) <= _netns()
        proc.send_signal(sig)
        out, err = proc.communicate(timeout=20)
        assert proc.returncode in returncodes, (proc.returncode, err[-2000:])
        if mode == "chain":
            assert "previous handler called" in out
        assert not (set(names) & _netns())
    finally:
        _kill([proc])


@needs_emulation
def test_sigkill_then_sweep_stale(tag: str) -> None:
    proc, names = _child(tag)
    try:
        assert set(names) <= _netns()
        assert all(n.startswith(f"tq-{proc.pid}-") for n in names)
        assert not (set(sweep_stale()) & set(names))  # the owner is alive: left alone
        proc.kill()
        proc.wait(timeout=10)
        assert set(names) <= _netns()  # SIGKILL cannot clean up
        removed = sweep_stale()
        assert set(names) <= set(removed)
        assert not (set(names) & _netns())
    finally:
        _kill([proc])


@needs_emulation
def test_teardown_at_interpreter_exit(tag: str) -> None:
    proc, names = _child(tag, "atexit")
    try:
        assert set(names) <= _netns()
        out, err = proc.communicate(input="\n", timeout=20)
        assert proc.returncode == 0, err[-2000:]
        assert not (set(names) & _netns())
    finally:
        _kill([proc])


def test_namespace_changes_are_serialised_across_processes_and_the_lock_is_reentrant() -> None:
    """Concurrent `ip netns add` from several processes can race inside iproute2, so tailq serialises its own
    namespace changes with one host-wide advisory lock: while one process holds it another cannot take it, and the
    same process may take it again (a SIGINT handler's teardown during set-up)."""
    from tailq.harness.netem import namespaces as netem

    probe = ("import fcntl, os, sys; fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT)\n"
             "try:\n    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB); print('free')\n"
             "except BlockingIOError:\n    print('held')")
    path = netem._lock_path()

    def other() -> str:
        return subprocess.run([sys.executable, "-c", probe, path], capture_output=True, text=True,
                              timeout=60).stdout.strip()

    with netem._host_lock():
        with netem._host_lock():
            assert other() == "held"
        assert other() == "held"
    assert other() == "free"
