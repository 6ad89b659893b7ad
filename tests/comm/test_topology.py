"""Topology and the two-link cost model (issue 21): shapes, layouts, NIC bytes, prices, the planner's choice."""

from __future__ import annotations

import pytest
import torch

from tailq.codec import compressor
from tailq.comm.families import family_for
from tailq.comm.network import Network
from tailq.comm.routes import PASSTHROUGH, CodecCost, Planner
from tailq.comm.topology import Shape, agree, detect, link_seconds, nic_bytes


def _planner(K: int, L: int, net: str = "model:50mbit", bits: int = 3, codec: CodecCost | None = None) -> Planner:
    fam = family_for(compressor("tnq", bits=bits), fine_bits=2, keep_own=False)
    return Planner(fam, K * L, Network.parse(net), codec, passthrough=True, shape=Shape(K, L))


@pytest.mark.parametrize(("K", "L"), [(16, 8), (2, 4), (4, 2), (128, 8)])
def test_bits_leaving_each_node_follow_spec_9(K: int, L: int) -> None:
    """The issue's table (SPEC §9), from the formulas, against the planner's accounting of the real collectives."""
    N, d, b, b2 = K * L, 1 << 22, 3, 5
    p = _planner(K, L)
    assert p.nic_bits(PASSTHROUGH, d) == pytest.approx(2 * (N - 1) / N * 16)
    header = 8 * 128  # bits of the codebook header each owner's phase-2 shard carries (32 float32 levels)
    assert p.nic_bits("twophase", d) == pytest.approx(L * (K - 1) / K * b + (N - 1) / N * b2 + header * (N - 1) / d)
    assert p.nic_bits("allgather", d) == pytest.approx((N - 1) * b, rel=1e-3)
    assert p.nic_bits("hier-twophase", d) == pytest.approx((K - 1) / K * (b + b2) + header * L * (K - 1) / d)
    if (K, L) == (16, 8):  # the numbers
        assert round(p.nic_bits(PASSTHROUGH, d), 1) == 31.8
        assert round(p.nic_bits("twophase", d), 1) == 27.5
        assert round(p.nic_bits("hier-twophase", d), 1) == 7.5


def test_one_worker_per_node_prices_exactly_as_before() -> None:
    net = Network.parse("model:1gbit,1ms")
    for c in ("all_reduce", "all_gather", "all_to_all"):
        assert link_seconds(net, "world", c, 12345, Shape.flat(8)) == net.time(c, 12345, 8)
        assert nic_bytes(c, 12345, "world", Shape.flat(8)) == pytest.approx(
            {"all_reduce": 2 * 7 / 8, "all_gather": 7, "all_to_all": 7 / 8}[c] * 12345)
    # one node: everything on the node link; without a node= rate, the network is that link (a single machine's
    # warm-up fit timed exactly its world collectives)
    node = Network.parse("model:50mbit,node=10gbit")
    assert link_seconds(node, "world", "all_reduce", 1 << 20, Shape(1, 8)) == node.node_link().time(
        "all_reduce", 1 << 20, 8)
    assert link_seconds(net, "world", "all_reduce", 1 << 20, Shape(1, 8)) == net.time("all_reduce", 1 << 20, 8)


def test_the_shared_nic_is_priced_with_all_of_the_nodes_traffic() -> None:
    net = Network.parse("model:100mbit")
    s = Shape(4, 8)
    # a flat all-to-all: each of the node's 8 ranks sends 3/4 of its bytes off the node, through one NIC
    assert link_seconds(net, "world", "all_to_all", 1000, s) == pytest.approx(8 * 8 * 1000 * 28 / 32 * 0 + 8 * (
        8 * 1000 * (32 - 8) / 32) / 1e8 + 31 * 0.0)
    # a cross-node ring among K: the 8 cross groups of a node run side by side on its NIC
    assert link_seconds(net, "cross", "all_reduce", 1000, s) == pytest.approx(8 * 8 * 2 * 3 / 4 * 1000 / 1e8)
    assert nic_bytes("all_reduce", 1000, "node", s) == 0.0


def test_the_planner_picks_hierarchical_on_slow_links_and_passthrough_on_fast_ones() -> None:
    cost = CodecCost(per_pass_s=1e-9, cast_s=0.3e-9)
    # two nodes: gathering the other node's 3-bit codes (3 bits a coordinate) beats two phases (1/2 (3 + 5) = 4)
    assert _planner(2, 4, "model:50mbit", codec=cost).plan(1 << 20) == "hier-allgather"
    slow = _planner(4, 2, "model:50mbit", codec=cost)  # four: 3/4 (3 + 5) = 6 bits against 3 x 3 = 9
    assert slow.plan(1 << 20) == "hier-twophase"
    # at 50 Mbit/s the NIC's bits decide: 3/4 (3 + 5) = 6 against L (K-1)/K 3 + (N-1)/N 5 = 8.875
    ratio = slow.seconds("twophase", 1 << 20) / slow.seconds("hier-twophase", 1 << 20)
    model = slow.nic_bits("twophase", 1 << 20) / slow.nic_bits("hier-twophase", 1 << 20)
    assert ratio == pytest.approx(model, rel=0.05)
    fast = _planner(2, 4, "model:100gbit,node=1000gbit", codec=cost)
    assert fast.plan(1 << 20) == PASSTHROUGH
    # one worker per node: the hierarchical routes are no candidates, and a forced one runs as its flat route
    flat = Planner(slow.family, 8, Network.parse("model:50mbit"), cost, passthrough=True)
    assert not any(r.startswith("hier-") for r in flat.candidates)
    assert flat.flat("hier-twophase") == "twophase" and flat.flat("hier-bf16") == PASSTHROUGH
    assert "node_nic_bits" in slow.explain(1 << 20)["candidates"]["hier-twophase"]


def test_detect_and_agree() -> None:
    assert detect(4, {}) == (4, -1, -1, "node_size")
    assert detect(None, {}) == (1, -1, -1, "default")
    env = {"LOCAL_WORLD_SIZE": "2", "LOCAL_RANK": "1", "GROUP_RANK": "3"}
    assert detect(None, env) == (2, 1, 3, "torchrun environment")
    rows = torch.tensor([[2, r % 2, r // 2] for r in range(8)])
    assert agree((2, 0, 0, "torchrun environment"), rows, 8) == (Shape(4, 2), None)
    # not numbered node by node: ranks 2 and 3 swapped nodes with 4 and 5
    bad = torch.tensor([[2, r % 2, [0, 0, 2, 2, 1, 1, 3, 3][r]] for r in range(8)])
    shape, why = agree((2, 0, 0, "torchrun environment"), bad, 8)
    assert shape == Shape(8, 1) and why is not None and "ranks [2, 3, 4, 5]" in why and "flat routes" in why
    with pytest.raises(ValueError, match=r"node_size: node size 3 does not divide the 8 ranks"):
        agree((3, -1, -1, "node_size"), torch.tensor([[3, -1, -1]] * 8), 8)
    mixed = torch.tensor([[4, -1, -1]] * 4 + [[2, -1, -1]] * 4)
    with pytest.raises(ValueError, match=r"different node sizes: 2 on ranks \[4, 5, 6, 7\]; 4 on ranks \[0, 1, 2, 3\]"):
        agree((4, -1, -1, "node_size"), mixed, 8)


def test_the_node_link_in_net_text() -> None:
    n = Network.parse("model:50mbit,1ms,node=10gbit,node_delay=5us")
    assert (n.node_rate_bps, n.node_delay_s) == (10e9, 5e-6)
    assert Network.parse(n.as_arg()) == n
    assert "node link 10 Gbit/s" in n.describe()
    for bad in ("model:50mbit,node=0bit", "model:50mbit,nodes=1gbit", "model:50mbit,node=fast"):
        with pytest.raises(ValueError, match="--net"):
            Network.parse(bad)
