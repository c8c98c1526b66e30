"""Stage 2's training step on the CPU with PyTorch's plain AdamW against its fused kernel.

    flock ../heavy.lock python bench/optimizer_speed.py

The `cifar-cpu` preset's pair (UNet 8.5M, text encoder 14.2M of which 12.6M is the token table) at its
batch of 64 latents (8 x 8 x 8) with CIFAR captions; a step is what `train_ldm` runs: min-SNR-5 loss,
backward, gradient clipping, the optimizer, the EMA. Two copies with the same weights take turns after a
warm-up, so a busy machine slows both alike. Printed: median seconds per step and per optimizer update,
images/s, and plain / fused (> 1: the fused kernel is faster). The two give the same update up to float
rounding: the first steps' losses are printed side by side.
"""
from __future__ import annotations

import argparse
import statistics
import sys
from contextlib import nullcontext
from functools import partial
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))   # run from a checkout without installing
from minildm.train.config import TrainConfig
from precision_speed import ldm_steps, report   # the two-copies-take-turns loop, shared


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=30, help="timed steps per optimizer (after 3 warm-up steps)")
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = p.parse_args()
    torch.set_num_threads(args.threads)

    cfg = TrainConfig.cifar_cpu()
    sides = [(name, False, nullcontext, partial(torch.optim.AdamW, fused=fused))
             for name, fused in (("plain", False), ("fused", True))]
    runs = ldm_steps(cfg, args.steps, sides)
    print(f"stage 2 step of the cifar-cpu preset, batch {cfg.batch_size}, {args.threads} threads, {args.steps} steps each")
    for name, r in runs.items():
        print(f"stage 2: {name} optimizer update, median {statistics.median(r['update']) * 1000:.0f} ms")
    report("stage 2", runs, cfg.batch_size, ratio=("plain", "fused"), meaning="images per second with the fused kernel")


if __name__ == "__main__":
    main()
