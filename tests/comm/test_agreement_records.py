"""The typed statistics record, the hook's option record, and the metrics' laps (no process group needed)."""

from __future__ import annotations

import pytest
import torch

from tailq.comm.agree import BucketStats
from tailq.comm.wire import WireRecord
from tailq.hooks import HookConfig, HookMetrics, TailqState


def test_bucket_stats_pack_in_one_vector_and_read_back_by_name() -> None:
    body32 = torch.tensor([3.0, 4.0], dtype=torch.float32)
    s = BucketStats(2.0, body=body32)
    packed = s.pack()
    assert packed.dtype == torch.float32 and packed.tolist() == [2.0, 3.0, 4.0]  # [nonfinite, *body]
    back = s.unpack(packed * 2)  # e.g. summed over two ranks
    assert back.nonfinite == 4.0 and back.sum_abs is None and back.body is not None
    assert back.body.tolist() == [6.0, 8.0]
    # with Σ|g| (redesign steps) everything travels in float64: [nonfinite, Σ|g|, *body]
    r = BucketStats(0.0, sum_abs=0.1, body=body32)
    assert r.pack().dtype == torch.float64 and r.pack().tolist() == [0.0, 0.1, 3.0, 4.0]
    between = BucketStats(1.0, sum_abs=2.5)  # between redesigns: two floats, 16 bytes
    assert between.pack().tolist() == [1.0, 2.5] and between.unpack(between.pack()).body is None
    flag = BucketStats(1.0, body=torch.zeros(0, dtype=torch.float64))  # per-rank families: the flag alone
    assert flag.pack().dtype == torch.float64 and flag.pack().numel() == 1


@pytest.mark.parametrize("opts, message", [
    ({"route": "sideways"}, "route must be one of auto, allreduce, allgather"),
    ({"error_feedback": "some"}, "error_feedback must be False, True, 'all' or 'truncation'"),
    ({"min_bucket": -1}, "min_bucket must be an integer >= 0"),
    ({"warmup_steps": True}, "warmup_steps must be an integer >= 0"),
    ({"fine_bits": 9}, "fine_bits must be an integer in [0, 8]"),
    ({"timeout_s": 0}, "timeout_s must be > 0"),
    ({"redesign_every": 2, "stale_stats": True}, "choose one"),
])
def test_hook_options_are_validated_with_the_accepted_range(opts: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")):
        HookConfig(**opts)  # type: ignore[arg-type]


def test_error_feedback_needs_a_warmup_step_unless_the_bucket_layout_is_fixed() -> None:
    with pytest.raises(ValueError, match="error_feedback needs warmup_steps >= 1"):
        TailqState("tnq", error_feedback=True, warmup_steps=0)
    TailqState("tnq", error_feedback=True, warmup_steps=0, fixed_layout=True).close()  # DiLoCo's fragments


def test_hook_config_normalises_and_digests() -> None:
    c = HookConfig(error_feedback=True, timeout_s=5)
    assert c.error_feedback == "all" and c.timeout_s == 5.0
    assert "timeout_s" not in c.digest() and c.digest()["route"] == "auto"  # ranks may wait differently long


def test_metrics_lap_is_one_interval_of_time_and_collectives() -> None:
    m = HookMetrics()

    def rec(step: int) -> WireRecord:
        return WireRecord(step, 0, 10, "allgather", "payload", "all_gather", 4, 4.0)

    m.wire.add(rec(0))
    m.seconds.update(total=1.0, communicate=0.25, measure=0.5)
    lap = m.lap()
    assert (lap.codec_s, lap.comm_s, lap.measure_s) == (0.75, 0.25, 0.5) and [r.step for r in lap.records] == [0]
    m.wire.add(rec(1))
    m.wire.add(rec(2))
    m.seconds.update(total=2.0, communicate=0.5)
    lap = m.lap()
    assert (lap.codec_s, lap.comm_s, lap.measure_s) == (0.75, 0.25, 0.0) and [r.step for r in lap.records] == [1, 2]
    assert m.lap().records == []
    # a bounded log still gives an interval's records once the oldest are dropped
    m.wire.records = type(m.wire.records)(m.wire.records, maxlen=2)
    for s in (3, 4, 5):
        m.wire.add(rec(s))
    assert [r.step for r in m.lap().records] == [4, 5]
