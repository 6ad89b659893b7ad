"""The one network description and the route planner's cost model (SPEC §6 "Cost model")."""

from __future__ import annotations

import math

import pytest

from tailq.codec import compressor
from tailq.comm.families import family_for
from tailq.comm.network import PLANNING_DEFAULT, Network, fit_network, ring_traffic_bytes
from tailq.comm.routes import PASSTHROUGH, ROUTES, CodecCost, Planner, route_names, shard_numel


def test_cost_model_is_ring_traffic_over_the_rate_plus_a_latency_per_hop() -> None:
    net = Network.parse("model:100mbit,1ms")
    assert net.hop_latency_s == pytest.approx(2e-3)  # the sender's uplink plus the receiver's downlink
    n, b = 4, 1_000_000
    assert net.time("all_reduce", b, n) == pytest.approx(8 * 2 * 3 / 4 * b / 1e8 + 6 * 2e-3)
    assert net.time("all_gather", b, n) == pytest.approx(8 * 3 * b / 1e8 + 3 * 2e-3)
    assert ring_traffic_bytes("all_reduce", b, 1) == 0.0 and net.time("all_gather", b, 1) == 0.0
    # what the planner assumed before networks were passed in: 10 Gbit/s, 50 us per hop
    assert PLANNING_DEFAULT.rate_bps == 10e9 and PLANNING_DEFAULT.hop_latency_s == pytest.approx(50e-6)
    with pytest.raises(ValueError, match="loopback"):
        Network.parse("none").time("all_reduce", b, n)
    assert not Network.parse("none").known and Network.parse("50mbit").known


def test_summary_records_the_network_without_reparsing() -> None:
    s = Network.parse("model:2.5gbit,2ms").summary()
    assert s == {"spec": "model:2.5gbit,2ms", "kind": "model", "describe": "modeled 2.5 Gbit/s, 2 ms",
                 "rate_bps": 2.5e9, "delay_s": 2e-3, "node_rate_bps": None, "node_delay_s": 0.0, "emulated": False,
                 "modeled": True}


def _planner(name: str, bits: int, n_workers: int, net: Network) -> Planner:
    return Planner(family_for(compressor(name, bits=bits), fine_bits=2, keep_own=False), n_workers, net)


def test_route_auto_picks_differently_at_10_mbit_and_10_gbit_where_the_model_says_they_differ() -> None:
    """TUQ 3-bit at N = 4: summable lanes of w = ceil(log2(4·7 + 1)) = 5 bits, 6 to an int32 word, so the
    all-reduce hands 32/6 bits per coordinate and moves 2·(3/4)·32/6 = 8 on the ring against the all-gather's
    3·3 = 9, but costs 6 hops instead of 3. At 10 Mbit/s (no added delay) the bytes decide: all-reduce. At
    10 Gbit/s with 50 us per hop, 1 bit per coordinate of 100k coordinates (10 us) is worth less than three
    more hops (150 us): all-gather."""
    n = 100_000
    slow, fast = Network.parse("model:10mbit"), Network.parse("model:10gbit,25us")
    words = math.ceil(n / 6)
    lanes_bytes, dense_bytes = 4 * words, math.ceil(3 * n / 8)
    for net, expected in ((slow, "allreduce"), (fast, "allgather")):
        p = _planner("tuq", 3, 4, net)
        p.candidates = ("allreduce", "allgather")  # the two one-collective routes only
        assert p.payload_bytes("allreduce", n) == lanes_bytes and p.payload_bytes("allgather", n) == dense_bytes
        t_ar = net.time("all_reduce", lanes_bytes, 4)
        t_ag = net.time("all_gather", dense_bytes, 4)
        assert (t_ar < t_ag) == (expected == "allreduce")  # the formulas above, independently of the planner
        assert p.plan(n) == expected


def test_two_phase_cost_is_an_all_to_all_of_b_bit_shards_and_an_all_gather_of_requantized_ones() -> None:
    """TUQ 3-bit, gather_bits 5 (the default bits + 2), N = 4, 100 001 values: shards of m = ceil(100001/4) = 25001
    rounded up to 25008 (a multiple of 8); phase 1 hands 4 shards of 3·m/8 bytes, phase 2 a 2-float header and
    5·m/8 bytes. Ring traffic (N − 1)/N·3 + (N − 1)·(5/N) bits per coordinate ≈ 6 at N = 4 — below the all-reduce's
    8 and the all-gather's 9, so at 10 Mbit/s it wins; on a link where hops dominate it does not."""
    n, N = 100_001, 4
    m = shard_numel(n, N)
    assert m == 25008 and shard_numel(3, 4) == 8 and shard_numel(64, 4) == 16
    p = _planner("tuq", 3, N, Network.parse("model:10mbit"))
    assert p.phases("twophase", n) == (("all_to_all", N * 3 * m // 8), ("all_gather", 8 + 5 * m // 8))
    traffic = ring_traffic_bytes("all_to_all", N * 3 * m // 8, N) + ring_traffic_bytes("all_gather", 8 + 5 * m // 8, N)
    assert 8 * traffic / n == pytest.approx(0.75 * 3 + 3 * (5 / 4), rel=2e-3)
    assert p.plan(n) == "twophase"
    # TNQ's header is its 2^5 float32 levels
    assert _planner("tnq", 3, N, PLANNING_DEFAULT).phases("twophase", n)[1] == ("all_gather", 4 * 32 + 5 * m // 8)
    slow_hops = Network.parse("model:10gbit,5ms")  # 10 ms per hop: six hops of two-phase lose to the gather's three
    assert _planner("tuq", 3, N, slow_hops).plan(n) == "allgather"


@pytest.mark.parametrize("net", ["model:10mbit", "model:1gbit,1ms", "model:10gbit,25us", "model:100gbit"])
@pytest.mark.parametrize("n", [8192, 100_000, 1 << 22])
@pytest.mark.parametrize("name", ["tuq", "tnq", "multi-scale", "qsgd"])
def test_the_plan_is_the_cost_models_minimum_including_passthrough_and_codec_time(net: str, n: int, name: str) -> None:
    """Independently of the planner: every candidate's time is Σ Network.time over its collectives plus measured
    codec seconds per element × (1 + the route's passes); passthrough is bf16 (2 bytes) plus its cast."""
    network = Network.parse(net)
    cost = CodecCost(per_pass_s=2e-9, cast_s=0.5e-9)
    fam = family_for(compressor(name, bits=4), fine_bits=2, keep_own=False)
    p = Planner(fam, 8, network, cost, passthrough=True)
    times = {PASSTHROUGH: network.time("all_reduce", 2 * n, 8) + 0.5e-9 * n}
    assert all(r.startswith("hier-") for r in set(p.routes) - set(p.candidates))  # one worker per node: flat only
    for r in p.candidates[1:]:
        phases = ROUTES[r].phases(n, 8, fam)
        times[r] = sum(network.time(c, b, 8) for c, b in phases) + 2e-9 * n * (1 + ROUTES[r].codec_passes(n, 8))
    best = min(times.values())
    assert times[p.plan(n)] == best
    assert p.explain(n)["route"] == p.plan(n)
    if net == "model:100gbit":  # a fast network: nothing pays for its codec time
        assert p.plan(n) == PASSTHROUGH
    if net == "model:10mbit" and name in ("tuq", "tnq") and n >= 100_000:
        assert p.plan(n) == "twophase"  # the fewest bytes at N = 8


def test_families_get_their_routes_from_the_aggregation_attribute() -> None:
    hier = ("hier-bf16", "hier-allreduce", "hier-allgather", "hier-twophase")
    assert route_names() == ("auto", "allreduce", "allgather", "twophase", *hier)
    assert _planner("tnq", 3, 4, PLANNING_DEFAULT).routes == ("allreduce", "allgather", "twophase", *hier)
    assert _planner("multi-scale", 4, 4, PLANNING_DEFAULT).routes == ("allreduce", "allgather", *hier[:3])
    assert Planner(family_for(compressor("qsgd"), fine_bits=2, keep_own=False), 4, PLANNING_DEFAULT).routes == (
        "allgather", "hier-bf16", "hier-allgather")
    # a requantizable per-rank compressor (torchft's FP8, INTELLECT-1's int8, FP4) can also take two-phase
    for name in ("fp8", "int8sigma", "fp4"):
        assert Planner(family_for(compressor(name), fine_bits=2, keep_own=False), 4, PLANNING_DEFAULT).routes == (
            "allgather", "twophase", "hier-bf16", "hier-allgather", "hier-twophase"), name
    # ties go to the summable route (N = 1: every collective is free)
    assert _planner("tuq", 3, 1, PLANNING_DEFAULT).plan(50_000) == "allreduce"
    assert set(ROUTES) == {"allreduce", "allgather", "twophase", *hier}
    assert _planner("tuq", 3, 4, PLANNING_DEFAULT).candidates == ("allreduce", "allgather", "twophase")  # no bf16


@pytest.mark.parametrize("truth", ["model:10gbit,25us", "model:50mbit,1ms", "model:1gbit"])
def test_the_network_fitted_from_timed_all_reduces_recovers_the_one_that_produced_them(truth: str) -> None:
    """Timings generated by a known network (one-element all-reduces for the latency, buckets of 10^4..10^6 bf16
    values), with ±5% noise: the fit recovers its rate within 10% and its hop latency within 10% (or 5 us)."""
    import random

    net, n = Network.parse(truth), 4
    rnd = random.Random(0)
    lat = [net.time("all_reduce", 2, n) * rnd.uniform(0.95, 1.05) for _ in range(5)]
    timings = [(ring_traffic_bytes("all_reduce", 2 * k, n), net.time("all_reduce", 2 * k, n) * rnd.uniform(0.95, 1.05))
               for k in (10_000, 100_000, 1_000_000)]
    fit = fit_network(lat, timings, n)
    assert fit is not None and fit.kind == "model"
    assert fit.rate_bps == pytest.approx(net.rate_bps, rel=0.1)
    assert fit.hop_latency_s == pytest.approx(net.hop_latency_s, rel=0.1, abs=5e-6)
    assert fit_network([], timings, n) is None and fit_network(lat, [], n) is None
    assert fit_network(lat, timings, 1) is None


def test_a_fast_fitted_network_means_passthrough_and_a_slow_one_compression() -> None:
    """With this machine's kind of codec cost (10 ns per element and pass), a 10 Gbit/s fit leaves nothing to gain:
    bf16 passthrough; a 50 Mbit/s fit compresses (two-phase at N = 4)."""
    fam = family_for(compressor("tnq", bits=3), fine_bits=2, keep_own=False)
    cost = CodecCost(per_pass_s=10e-9, cast_s=1e-9)
    for truth, expected in (("model:10gbit,25us", PASSTHROUGH), ("model:50mbit", "twophase")):
        net = Network.parse(truth)
        lat = [net.time("all_reduce", 2, 4)] * 3
        timings = [(ring_traffic_bytes("all_reduce", 2 * k, 4), net.time("all_reduce", 2 * k, 4))
                   for k in (20_000, 300_000)]
        fit = fit_network(lat, timings, 4)
        assert fit is not None
        assert Planner(fam, 4, fit, cost, passthrough=True).plan(300_000) == expected


def test_fp8_two_phase_is_torchfts_all_to_all_and_all_gather_and_wins_at_four_workers_on_a_slow_link() -> None:
    """torchft's FP8 outer collective at N = 4, 2^20 values: phase 1 hands 4 shard encodings of m = 2^18 values
    (m code bytes + m/1024 float32 row scales, each tensor framed by 8 bytes), phase 2 one. Ring traffic
    (N − 1)/N·8.03 twice ≈ 12 bits per coordinate, against the all-gather's (N − 1)·8.03 ≈ 24 and bf16's
    2·(N − 1)/N·16 = 24: on a slow link two-phase is the plan."""
    n, N = 1 << 20, 4
    m = shard_numel(n, N)
    fam = family_for(compressor("fp8"), fine_bits=2, keep_own=False)
    one = 2 * 8 + m + 4 * (m // 1024)
    p = Planner(fam, N, Network.parse("model:10mbit"), CodecCost(per_pass_s=1e-9, cast_s=0.5e-9), passthrough=True)
    assert p.phases("twophase", n) == (("all_to_all", N * one), ("all_gather", one))
    traffic = ring_traffic_bytes("all_to_all", N * one, N) + ring_traffic_bytes("all_gather", one, N)
    assert 8 * traffic / n == pytest.approx(2 * 0.75 * 8.03125, rel=1e-3)
    assert p.plan(n) == "twophase"
