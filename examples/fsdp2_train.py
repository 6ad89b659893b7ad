"""A plain FSDP2 training script, made compressed by the line marked "tailq".

    torchrun --nproc_per_node 2 examples/fsdp2_train.py                      # TNQ, 3 bits
    torchrun --nproc_per_node 2 examples/fsdp2_train.py --compressor none    # plain FSDP, for comparison
    torchrun --nproc_per_node 2 examples/fsdp2_train.py --compressor tuq --bits 4 --steps 100

CPU and Gloo here (NCCL on GPUs works the same way). A small residual MLP on a synthetic 10-class task: every
block and the root are ``fully_shard``-ed, so each backward runs one reduce-scatter per block plus the root's.
"""

import argparse
import datetime

import torch
import torch.distributed as dist
from torch.distributed.fsdp import fully_shard

import tailq.fsdp


class Block(torch.nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.norm = torch.nn.LayerNorm(width)
        self.fc1 = torch.nn.Linear(width, 2 * width)
        self.fc2 = torch.nn.Linear(2 * width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.fc2(torch.nn.functional.gelu(self.fc1(self.norm(x))))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--compressor", default="tnq", help="tnq, tuq, tbq, single-scale, or none (plain FSDP)")
    ap.add_argument("--bits", type=int, default=3)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--width", type=int, default=128)
    args = ap.parse_args()

    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=120))
    rank, world = dist.get_rank(), dist.get_world_size()

    gen = torch.Generator().manual_seed(0)  # the same task on every rank
    w = torch.randn(64, 10, generator=gen)
    x = torch.randn(8192, 64, generator=gen)
    y = (x @ w).argmax(1)

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, args.width), *[Block(args.width) for _ in range(3)],
                                torch.nn.LayerNorm(args.width), torch.nn.Linear(args.width, 10))
    for block in model[1:4]:
        fully_shard(block)
    fully_shard(model)  # the root: the stem, the final norm and the head
    comm = None
    if args.compressor != "none":
        comm = tailq.fsdp.compress(model, args.compressor, bits=args.bits)  # tailq

    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    shard = torch.arange(rank, len(x), world)  # each rank trains on its own part of the data
    for step in range(args.steps):
        idx = shard[torch.randint(0, len(shard), (128,), generator=gen)]
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(x[idx]), y[idx])
        loss.backward()
        opt.step()
        if rank == 0 and (step % 10 == 0 or step == args.steps - 1):
            print(f"step {step:4d}  loss {float(loss.detach()):.4f}", flush=True)
    with torch.no_grad():
        logits = model(x)
        acc = float((logits.argmax(1) == y).float().mean())
        final = float(torch.nn.functional.cross_entropy(logits, y))
    if rank == 0:
        if comm is None:
            wire = "32 bits/coordinate (fp32 reduce-scatter)"
        else:
            wire = (f"{comm.metrics.wire.bits_per_coord():.2f} bits/coordinate handed, "
                    f"{len(comm.metrics.fallbacks)} fallback(s), {comm.calls_per_step} reduce-scatters per step")
        print(f"{args.compressor}: final loss {final:.4f}, accuracy {acc:.3f}, {wire}")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
