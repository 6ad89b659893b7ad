"""Hugging Face Accelerate with a tailq DDP hook, on CPU or GPU.

    torchrun --nproc_per_node 2 examples/accelerate_train.py --compressor tnq --bits 3
    accelerate launch --cpu --num_processes 2 examples/accelerate_train.py        # the same, through Accelerate

A small MLP on a synthetic classification task (embedded: no downloads). ``--save-state DIR`` writes
``accelerator.save_state`` at the end (model, optimizer, RNG and every rank's hook state); ``--load-state DIR``
resumes from it (``--start`` = the step it was saved at) and primes DDP's buckets so the run continues exactly.
``--out FILE`` writes this rank's final parameters and the hook's numbers (``torch.save``; read with
``weights_only=True``).
"""

from __future__ import annotations

import argparse
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from torch.utils.data import TensorDataset

from tailq.integrations.accelerate import register_hook


def data() -> TensorDataset:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2048, 32, generator=g)
    w = torch.randn(32, 8, generator=g)
    return TensorDataset(x, (x @ w + 0.5 * torch.randn(2048, 8, generator=g)).argmax(1))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--compressor", default="tnq", help="a tailq hook name (tailq list) or fp32/bf16/powersgd")
    ap.add_argument("--bits", type=int, default=3)
    ap.add_argument("--route", default="twophase",
                    help="the hook's route (default twophase: on one machine's loopback route=auto would rightly "
                         "choose bf16 and compress nothing)")
    ap.add_argument("--steps", type=int, default=40, help="last step (exclusive)")
    ap.add_argument("--first-step", type=int, default=0, help="first step (with --load-state: where it was saved)")
    ap.add_argument("--save-state")
    ap.add_argument("--load-state")
    ap.add_argument("--out")
    a = ap.parse_args()
    torch.set_num_threads(1)
    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    set_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(32, 128), torch.nn.ReLU(), torch.nn.Dropout(0.1),
                                torch.nn.Linear(128, 8))
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model, opt = accelerator.prepare(model, opt)
    opts: dict[str, Any] = {} if a.compressor in ("fp32", "fp16", "bf16", "powersgd") else {
        "bits": a.bits, "error_feedback": True, "min_bucket": 0, "route": a.route}
    hook = register_hook(accelerator, model, a.compressor, **opts)  # on the DDP model prepare() built
    x, y = data().tensors
    with torch.no_grad():
        before = float(torch.nn.functional.cross_entropy(accelerator.unwrap_model(model).eval()(x), y))
    model.train()
    rank, world = accelerator.process_index, accelerator.num_processes

    def batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
        idx = torch.randint(0, len(x), (64,), generator=torch.Generator().manual_seed(10_000 * step + rank))
        return x[idx].to(accelerator.device), y[idx].to(accelerator.device)

    if a.load_state:
        accelerator.load_state(a.load_state)
        bx, by = batch(a.first_step)
        hook.prime(lambda: torch.nn.functional.cross_entropy(model(bx), by).backward())
    loss = torch.tensor(float("nan"))
    for step in range(a.first_step, a.steps):
        bx, by = batch(step)
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(bx), by)
        accelerator.backward(loss)
        opt.step()
    if a.save_state:
        accelerator.save_state(a.save_state)
    state = hook.state
    with torch.no_grad():
        full = float(torch.nn.functional.cross_entropy(accelerator.unwrap_model(model).eval()(x), y))
    bits = state.metrics.wire.bits_per_coord() if state is not None else float("nan")
    accelerator.print(f"{a.compressor}: {world} processes, steps {a.first_step}..{a.steps}, loss {full:.4f}, "
                      f"{bits:.2f} bits per coordinate on the wire")
    if a.out:
        torch.save({"params": [p.detach().cpu().clone() for p in accelerator.unwrap_model(model).parameters()],
                    "loss": full, "before": before, "hook_step": -1 if state is None else state.step, "bits": bits,
                    "world": world, "distributed_type": str(accelerator.distributed_type)}, f"{a.out}.{rank}")
    hook.close()


if __name__ == "__main__":
    main()
