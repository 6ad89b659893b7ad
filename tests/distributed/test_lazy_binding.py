"""Hook states may be created before ``init_process_group`` and bind on the first bucket (issue: Lightning).

Lightning's documented path builds ``DDPStrategy(ddp_comm_state=state, ddp_comm_hook=hook)`` before its ``Trainer``
has started the workers, so ``tailq.ddp_hook`` must not need a process group yet. Options are still validated at
creation; everything that needs the group (its size, the planner, PowerSGD's ordered worker) is made on first use.
"""

from __future__ import annotations

import pytest
import torch.distributed as dist
from workers import FakeBucket, launch, w_lazy

import tailq

# routes pinned: route="auto" plans from a timed warm-up, so two runs may plan differently on a loaded machine
HOOKS = [("tnq", {"bits": 3, "min_bucket": 0, "route": "twophase"}), ("bf16", {}), ("powersgd", {}),
         ("qsgd", {"bits": 4, "route": "allgather"})]


def test_a_state_created_before_init_process_group_trains_exactly_as_one_created_after() -> None:
    for r in launch(w_lazy, 2, HOOKS, 8, init=False, timeout=300):
        assert r["bound_before"] == [False] * len(HOOKS)
        assert all("unbound" in s for s in r["repr"])
        assert "no process group to bind to" in r["unbound_error"]
        for hook, _ in HOOKS:
            early, late, same = r[hook]
            assert same, hook  # bit for bit: binding late changes nothing
            assert early == late and early["step"] == 8, hook
            assert early["bits"] > 0  # the hook ran and counted its wire


def test_options_are_still_validated_at_creation_without_a_process_group() -> None:
    assert not dist.is_initialized()
    with pytest.raises(TypeError, match="unknown option"):
        tailq.ddp_hook("tnq", bitz=3)
    with pytest.raises(ValueError, match="bits"):
        tailq.ddp_hook("tnq", bits=12)
    with pytest.raises(ValueError, match="route 'twophase' is not available"):
        tailq.ddp_hook("qsgd", route="twophase")
    tailq.ddp_hook("fp8", route="twophase")  # requantizable: torchft's collective
    for name in ("fp8", "qsgd"):  # no owner requantizer to configure
        with pytest.raises(ValueError, match="gather_bits and owner_feedback configure the owner's requantizer"):
            tailq.ddp_hook(name, gather_bits=4)
    with pytest.raises(TypeError, match="powersgd: unknown option"):
        tailq.ddp_hook("powersgd", rank=2)


def test_a_hook_called_without_any_process_group_fails_clearly() -> None:
    import torch

    assert not dist.is_initialized()
    state, hook = tailq.ddp_hook("tnq", bits=3)
    with pytest.raises(RuntimeError, match="no process group to bind to"):
        hook(state, FakeBucket(torch.ones(16))).wait()  # type: ignore[arg-type]
    state.close()
    bstate, bhook = tailq.ddp_hook("bf16")
    with pytest.raises(RuntimeError, match="no process group to bind to"):
        bhook(bstate, FakeBucket(torch.ones(16)))  # type: ignore[arg-type]
