"""Rank functions for tests/distributed/test_diloco.py (spawned by workers.launch)."""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

import tailq
from tailq.diloco import nesterov


def _data(rank: int, step: int, batch: int = 32, d: int = 16, classes: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 * step + rank)
    x = torch.randn(batch, d, generator=g)
    w = torch.linspace(-1, 1, d * classes).reshape(d, classes)
    return x, (x @ w).argmax(1)


def _model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 4))


def _inner(model: torch.nn.Module, opt: torch.optim.Optimizer, rank: int, step: int) -> None:
    x, y = _data(rank, step)
    opt.zero_grad(set_to_none=True)
    torch.nn.functional.cross_entropy(model(x), y).backward()
    opt.step()


def _params(model: torch.nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters()]


def w_sync_equivalence(rank: int, world: int, steps: int) -> dict[str, Any]:
    """fp32 outer, H = 1, outer SGD lr 1 momentum 0 against synchronous DDP (fp32 all-reduce), inner SGD."""
    model = _model(rank)  # different seeds: DiLoCo must broadcast rank 0's parameters
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    diloco = tailq.DiLoCo(model, opt, sync_every=1, compressor="fp32", outer_optimizer=nesterov(1.0, 0.0))
    for s in range(steps):
        _inner(model, opt, rank, s)
        diloco.step()
    ref = torch.nn.parallel.DistributedDataParallel(_model(0))
    ropt = torch.optim.SGD(ref.parameters(), lr=0.1)
    for s in range(steps):
        x, y = _data(rank, s)
        ropt.zero_grad(set_to_none=True)
        torch.nn.functional.cross_entropy(ref(x), y).backward()
        ropt.step()
    diloco.close()
    return {"diloco": _params(model), "ddp": _params(ref.module), "glob": diloco.global_parameters(),
            "syncs": len(diloco.syncs)}


def w_schedule(rank: int, world: int, H: int, F: int, tau: int, alpha: float, steps: int) -> dict[str, Any]:
    """Known inner updates (rank r subtracts 0.01·(r+1) from every value each step); fp32 outer, SGD lr 1 mom 0."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(*[torch.nn.Linear(3, 3) for _ in range(4)])
    diloco = tailq.DiLoCo(model, None, sync_every=H, fragments=F, delay=tau, merge_alpha=alpha, compressor="fp32",
                          outer_optimizer=nesterov(1.0, 0.0))
    start = torch.cat([p.detach().reshape(-1) for p in model.parameters()]).double()
    for _ in range(steps):
        with torch.no_grad():
            for p in model.parameters():
                p.sub_(0.01 * (rank + 1))
        diloco.step()
    diloco.flush()
    frag_of = [k for k, f in enumerate(diloco.fragments) for p in f.params for _ in range(p.numel())]
    out = {"start": start, "glob": torch.cat([g.reshape(-1) for g in diloco.global_parameters()]).double(),
           "local": torch.cat([p.detach().reshape(-1) for p in model.parameters()]).double(),
           "frag_of": frag_of, "offsets": [f.offset for f in diloco.fragments], "syncs": diloco.syncs,
           "params": [id(p) for f in diloco.fragments for p in f.params], "all": [id(p) for p in model.parameters()]}
    diloco.close()
    return out


def w_nonfinite(rank: int, world: int, compressor: str, opts: dict[str, Any]) -> dict[str, Any]:
    model = _model(0)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    diloco = tailq.DiLoCo(model, opt, sync_every=2, compressor=compressor, **opts)
    for s in range(4):
        _inner(model, opt, rank, s)
        if s == 3 and rank == world - 1:
            with torch.no_grad():
                next(model.parameters())[0, 0] = float("nan")
        diloco.step()
    out = {"skipped": diloco.skipped, "syncs": list(diloco.syncs), "fallbacks": list(diloco.metrics.fallbacks),
           "finite_local": all(bool(torch.isfinite(p).all()) for p in model.parameters()),
           "finite_global": all(bool(torch.isfinite(g).all()) for g in diloco.global_parameters()),
           "glob": diloco.global_parameters()}
    for s in range(4, 6):  # training goes on
        _inner(model, opt, rank, s)
        diloco.step()
    out["after"] = diloco.global_parameters()
    out["finite_after"] = all(bool(torch.isfinite(g).all()) for g in out["after"])
    diloco.close()
    return out


def w_mismatch(rank: int, world: int, per_rank: list[dict[str, Any]]) -> str:
    model = _model(0)
    try:
        tailq.DiLoCo(model, None, **per_rank[rank])
    except RuntimeError as err:
        return str(err)
    return "no error"


def _run(rank: int, opts: dict[str, Any], start: int, stop: int, path: str | None, save_at: int | None,
         load: bool) -> dict[str, Any]:
    model = _model(0)
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    diloco = tailq.DiLoCo(model, opt, **opts)
    if load:
        assert path is not None
        saved = torch.load(f"{path}.{rank}", weights_only=True)
        model.load_state_dict(saved["model"])
        opt.load_state_dict(saved["opt"])
        diloco.load_state_dict(saved["diloco"])
    for s in range(start, stop):
        _inner(model, opt, rank, s)
        diloco.step()
        if save_at is not None and s + 1 == save_at:
            assert path is not None
            torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "diloco": diloco.state_dict()},
                       f"{path}.{rank}")
    diloco.flush()
    out = {"local": _params(model), "glob": diloco.global_parameters(), "bits": diloco.metrics.wire.bits_per_coord(),
           "syncs": len(diloco.syncs)}
    diloco.close()
    return out


def w_resume(rank: int, world: int, opts: dict[str, Any], path: str, phase: str, total: int, at: int
             ) -> dict[str, Any]:  # fmt: skip
    if phase == "full":
        return _run(rank, opts, 0, total, path, at, False)
    return _run(rank, opts, at, total, path, None, True)


def w_compressed(rank: int, world: int, compressor: str, opts: dict[str, Any], steps: int) -> dict[str, Any]:
    model = _model(0)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    diloco = tailq.DiLoCo(model, opt, sync_every=4, compressor=compressor, measure_every=1, **opts)
    for s in range(steps):
        _inner(model, opt, rank, s)
        diloco.step()
    m = diloco.metrics
    out = {"wire": m.wire.summary(), "bits": m.wire.bits_per_coord(), "vnmse": [v["vnmse"] for v in m.vnmse],
           "syncs": len(diloco.syncs),
           "routes": sorted({v["route"] for v in m.last.values()}), "numel": sum(p.numel() for p in model.parameters()),
           "same": _params(model)}
    diloco.close()
    dist.barrier()
    return out
