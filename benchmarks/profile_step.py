"""Where one training step of the matched tiny architectures spends its time (torch.profiler).

    python benchmarks/profile_step.py --device cuda ultramem_v2 moe
    python benchmarks/profile_step.py ultramem_v2                 # CPU

For each architecture: build `tiny/<arch>` with the trainer's defaults (bf16 autocast where the
device runs it fast, row-sparse table update), take `--warmup` steps, then profile `--steps`
steps and print the top operators by self device time (by self CPU time on a CPU), then by self
CPU time: on a GPU the second table shows the host-side cost of launching kernels.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from ultramem.config import ModelConfig
from ultramem.train.config import TrainConfig
from ultramem.train.trainer import Trainer


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("archs", nargs="+", help="architectures of the tiny family, e.g. ultramem_v2")
    p.add_argument("--device", default="cpu")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--warmup", type=int, default=4)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--rows", type=int, default=14, help="operators per table")
    args = p.parse_args()
    cuda = args.device.startswith("cuda")
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    for arch in args.archs:
        with tempfile.TemporaryDirectory() as tmp:
            tcfg = TrainConfig(steps=args.warmup + args.steps + 1, batch_size=args.batch_size,
                               seq_len=args.seq_len, device=args.device, tensorboard=False,
                               plot=False, eval_every=0, ckpt_every=0, log_every=10_000)
            trainer = Trainer(ModelConfig.preset(f"tiny/{arch}"), tcfg, Path(tmp),
                              show_progress=False)
            for step in range(args.warmup):
                trainer.train_step(step)
                trainer._zero_grad()
            if cuda:
                torch.cuda.synchronize()
            with profile(activities=activities) as prof:
                for step in range(args.warmup, args.warmup + args.steps):
                    trainer.train_step(step)
                    trainer._zero_grad()
                if cuda:
                    torch.cuda.synchronize()
        table = prof.key_averages()
        print(f"==== tiny/{arch}: {args.steps} steps of {args.batch_size} x {args.seq_len} tokens "
              f"on {args.device}, precision {trainer.precision}")
        first = "self_cuda_time_total" if cuda else "self_cpu_time_total"
        print(table.table(sort_by=first, row_limit=args.rows, max_name_column_width=48))
        if cuda:
            print(table.table(sort_by="self_cpu_time_total", row_limit=8,
                              max_name_column_width=48))


if __name__ == "__main__":
    main()
