"""A plain PyTorch DDP training script, made compressed by the two lines marked "tailq".

    torchrun --nproc-per-node 2 examples/ddp_train.py                 # TNQ, 3 bits, route="auto"
    torchrun --nproc-per-node 2 examples/ddp_train.py --route twophase  # always compressed
    torchrun --nproc-per-node 2 examples/ddp_train.py --hook bf16     # the baseline
"""

import argparse
import datetime

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

import tailq


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--hook", default="tnq", help="any name of tailq.hooks.hook_names()")
    ap.add_argument("--bits", type=int, default=3)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--route", default="auto", help="tailq hooks: auto (measured per bucket: compress or bf16), "
                    "allreduce, allgather, twophase")
    args = ap.parse_args()

    # Gloo on CPU, NCCL on GPU; a dead peer or a hung collective errors out instead of waiting forever.
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=120))
    rank, world = dist.get_rank(), dist.get_world_size()

    gen = torch.Generator().manual_seed(0)  # a synthetic 10-class task, the same on every rank
    w = torch.randn(64, 10, generator=gen)
    x = torch.randn(8192, 64, generator=gen)
    y = (x @ w).argmax(1)

    torch.manual_seed(0)
    model = DDP(torch.nn.Sequential(torch.nn.Linear(64, 512), torch.nn.ReLU(), torch.nn.Linear(512, 10)))
    options = {"bits": args.bits, "route": args.route} if args.hook not in tailq.hooks.BUILTINS else {}
    state, hook = tailq.ddp_hook(args.hook, **options)  # tailq
    model.register_comm_hook(state, hook)  # tailq

    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    shard = torch.arange(rank, len(x), world)  # each rank trains on its own shard
    for _ in range(args.steps):
        idx = shard[torch.randint(0, len(shard), (128,), generator=gen)]
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
        opt.step()
    with torch.no_grad():
        acc = float((model.module(x).argmax(1) == y).float().mean())
        loss = float(torch.nn.functional.cross_entropy(model.module(x), y))
    if rank == 0:
        bits = state.metrics.wire.bits_per_coord()
        print(f"{args.hook}: final loss {loss:.4f}, accuracy {acc:.3f}, {bits:.2f} bits/coordinate handed")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
