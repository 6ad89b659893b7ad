"""DiLoCo: H local steps per rank, then a 2-bit outer mean of the pseudo-gradients (the lines marked "tailq").

    torchrun --nproc-per-node 2 examples/diloco_train.py                           # TNQ 2 bits, H = 20
    torchrun --nproc-per-node 2 examples/diloco_train.py --compressor fp32         # the paper's exact outer mean
    torchrun --nproc-per-node 2 examples/diloco_train.py --fragments 4 --delay 2   # Streaming DiLoCo
    torchrun --nproc-per-node 2 examples/diloco_train.py --steps 100 --checkpoint /tmp/ck --checkpoint-at 50
    torchrun --nproc-per-node 2 examples/diloco_train.py --steps 100 --resume /tmp/ck  # continues at step 50

CPU and Gloo here (NCCL on GPUs works the same way). The workload is one of tailq's (``digits``: scikit-learn's
bundled 8x8 digits and an MLP of 300k parameters, no download). Each rank trains on its own shard with plain SGD
(no momentum; ``--inner-momentum``) at the workload's learning rate, or with the workload's AdamW where it uses one
(``charlm``); every ``--sync-every`` steps the ranks' pseudo-gradients (global minus local parameters) are averaged
through the compressor and the global parameters take an outer Nesterov step. ``measure_every=1`` also all-reduces
the exact fp32 mean at each sync to report the outer vNMSE (not counted in the bits).

A checkpoint is one file per rank (``PATH.rank<r>.pt``): the model, the inner optimizer and ``diloco.state_dict()``,
written before the final flush so the resumed run merges any mean in flight at the same step as the uninterrupted
one. Batches are a function of (rank, step) only, so a resumed run ends bit-identical (the printed digest).
"""

import argparse
import datetime
import hashlib
import math

import torch
import torch.distributed as dist

import tailq
from tailq.harness.workloads import WORKLOADS, load_workload


def batch(n: int, rank: int, world: int, step: int, size: int, seed: int) -> torch.Tensor:
    """This rank's batch at ``step``: indices of its shard drawn from a generator seeded by (seed, step)."""
    shard = torch.arange(rank, n, world)
    gen = torch.Generator().manual_seed(seed * 1_000_003 + step)
    return shard[torch.randint(0, len(shard), (size,), generator=gen)]


def digest(tensors: list[torch.Tensor]) -> str:
    h = hashlib.sha256()
    for t in tensors:
        h.update(t.detach().to(torch.float32).contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--workload", default="digits", choices=[w for w in WORKLOADS if w not in ("mnist", "cifar10")])
    ap.add_argument("--compressor", default="tnq", help="a tailq compressor (tailq list) or fp32/fp16/bf16")
    ap.add_argument("--bits", type=int, default=2)
    ap.add_argument("--route", default="auto", help="tailq compressors: auto, allreduce, allgather, twophase")
    ap.add_argument("--sync-every", type=int, default=20, help="H: inner steps between two syncs")
    ap.add_argument("--fragments", type=int, default=1, help="F: Streaming DiLoCo's fragments")
    ap.add_argument("--delay", type=int, default=0, help="tau: inner steps a mean overlaps before it is merged")
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--outer-lr", type=float, default=0.7)
    ap.add_argument("--outer-momentum", type=float, default=0.9)
    ap.add_argument("--inner-lr", type=float, default=None, help="default: the workload's")
    ap.add_argument("--inner-momentum", type=float, default=0.0, help="inner SGD's momentum (SGD workloads)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--checkpoint", default=None, help="write PATH.rank<r>.pt at step --checkpoint-at")
    ap.add_argument("--checkpoint-at", type=int, default=None, help="default: --steps")
    ap.add_argument("--resume", default=None, help="continue from PATH.rank<r>.pt (to --steps in all)")
    args = ap.parse_args()

    # Gloo on CPU, NCCL on GPU; a dead peer or a hung collective errors out instead of waiting forever.
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=120))
    rank, world = dist.get_rank(), dist.get_world_size()

    wl = load_workload(args.workload, seed=args.seed)
    torch.manual_seed(args.seed)
    model = wl.make_model()
    lr = args.inner_lr if args.inner_lr is not None else wl.lr
    # inner SGD leaves the pseudo-gradients heavy-tailed (digits: power-law γ ~2.4-3 at H = 20-50), AdamW's are
    # light-tailed (charlm: γ ~6-11): benchmarks/diloco_tails.py
    if wl.optimizer == "sgd":
        inner = torch.optim.SGD(model.parameters(), lr=lr, momentum=args.inner_momentum)
    else:
        inner = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    options = {} if args.compressor in ("fp32", "fp16", "bf16") else {
        "bits": args.bits, "route": args.route, "measure_every": 1}
    diloco = tailq.DiLoCo(model, inner, sync_every=args.sync_every, compressor=args.compressor,  # tailq
                          fragments=args.fragments, delay=args.delay,
                          outer_optimizer=tailq.diloco.nesterov(args.outer_lr, args.outer_momentum), **options)

    if rank == 0:
        numel = sum(p.numel() for p in model.parameters() if p.requires_grad)
        print(f"{wl.name}: {numel} parameters in {len(diloco.fragments)} fragment(s), {world} ranks, "
              f"{args.compressor} outer mean, H={args.sync_every}, inner {type(inner).__name__} lr {lr}", flush=True)
    start = 0
    if args.resume:
        saved = torch.load(f"{args.resume}.rank{rank}.pt", weights_only=True)
        model.load_state_dict(saved["model"])
        inner.load_state_dict(saved["inner"])
        diloco.load_state_dict(saved["diloco"])  # tailq: θ_global, outer momentum, residuals, means in flight
        start = diloco.step_count
        if rank == 0:
            print(f"resumed from {args.resume} at step {start}", flush=True)
    save_at = args.checkpoint_at if args.checkpoint_at is not None else args.steps

    losses: list[float] = []
    for step in range(start, args.steps):
        idx = batch(len(wl.x_train), rank, world, step, wl.batch_size, args.seed)
        loss = wl.loss(model(wl.x_train[idx]), wl.y_train[idx])
        loss.backward()
        inner.step()
        inner.zero_grad()
        synced = len(diloco.syncs)
        diloco.step()  # tailq: on a sync step, the compressed outer mean and the outer step
        losses.append(float(loss.detach()))
        if len(diloco.syncs) > synced and rank == 0:
            sync, vn = diloco.syncs[-1], diloco.metrics.vnmse
            pg = diloco.last_pseudo_gradient  # None until this process launched a sync (a resumed run)
            pg_norm = math.nan if pg is None else float(pg.norm())
            with diloco.global_model() as m:
                acc, _ = wl.evaluate(m)
            print(f"step {step + 1}: sync {len(diloco.syncs)} (fragment {sync['fragment']}, launched at "
                  f"{sync['launched']}), inner loss {sum(losses) / len(losses):.4f}, |last pseudo-gradient| "
                  f"{pg_norm:.4f}, outer vNMSE {vn[-1]['vnmse'] if vn else math.nan:.4f}, "
                  f"global accuracy {acc:.3f}", flush=True)
            losses = []
        if args.checkpoint and step + 1 == save_at:
            torch.save({"model": model.state_dict(), "inner": inner.state_dict(), "diloco": diloco.state_dict()},
                       f"{args.checkpoint}.rank{rank}.pt")
            if rank == 0:
                print(f"checkpoint {args.checkpoint}.rank*.pt at step {step + 1}", flush=True)
    diloco.flush()  # tailq: the means still in flight (delay > 0)

    with diloco.global_model() as m:
        acc, loss_test = wl.evaluate(m)
    bits = diloco.metrics.wire.bits_per_coord()
    vnmse = [v["vnmse"] for v in diloco.metrics.vnmse if not v.get("warmup")]
    mean_vnmse = sum(vnmse) / len(vnmse) if vnmse else math.nan
    params = digest(diloco.global_parameters() + [p for p in model.parameters()])
    if rank == 0:
        print(f"{args.compressor}: {len(diloco.syncs)} syncs, global test accuracy {acc:.3f} (loss {loss_test:.4f}), "
              f"{bits:.4f} outer bits/coordinate handed, outer vNMSE {mean_vnmse:.4f}, parameters {params}",
              flush=True)
    diloco.close()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
