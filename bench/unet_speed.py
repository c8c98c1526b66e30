"""One SD v1.5-size UNet forward: minildm against diffusers, same weights, same inputs, CPU float32.

    flock /work/heavy.lock python bench/unet_speed.py          # about 8 GB of RAM, a few minutes

Timing: both models live in this process and their forwards alternate, A B B A ... (one warm-up
each first, then the median of --runs each), so a busy machine slows both alike; we report wall time
and CPU time (user + system over all threads), the steadier of the two on a shared machine. Memory: each side is measured in a fresh
subprocess that builds its model and runs one forward; we report the peak resident set size of the
whole process (Linux VmHWM) and the peak of the forward alone (VmHWM reset just before it). Weights
are random but identical on both sides: every tensor is drawn from a generator seeded by its name in
the original checkpoint layout, and diffusers' tensors are named through diffusers' own converter.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
import zlib
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))   # run from a checkout without installing
from minildm.convert import UNET_PREFIX, add_prefix
from minildm.unet import UNet, UNetConfig


def original_names(cfg: UNetConfig) -> dict:
    """diffusers key -> original checkpoint key, from diffusers' single-file converter (on meta tensors)."""
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint
    with torch.device("meta"):
        state = add_prefix(UNet(cfg).state_dict(), UNET_PREFIX)
    by_id = {id(v): k for k, v in state.items()}
    converted = convert_ldm_unet_checkpoint(state, {"layers_per_block": cfg.num_res_blocks})
    return {k: by_id[id(v)] for k, v in converted.items()}


def fill(model: torch.nn.Module, name_of=lambda k: k) -> torch.nn.Module:
    """Materialise a meta-device model with random weights that depend only on each tensor's original name."""
    model.to_empty(device="cpu")
    with torch.no_grad():
        for key, p in model.state_dict(keep_vars=True).items():
            name = name_of(key)
            g = torch.Generator().manual_seed(zlib.crc32(name.encode()))
            if p.ndim > 1:
                p.copy_(torch.randn(p.shape, generator=g) / (p[0].numel() ** 0.5))
            else:
                p.copy_(0.1 * torch.randn(p.shape, generator=g) + (1.0 if name.endswith("weight") else 0.0))
    return model.eval()


def build(side: str, cfg: UNetConfig):
    """The model of one side and a function running one forward on (z_t, t, context)."""
    if side == "minildm":
        with torch.device("meta"):
            model = UNet(cfg)
        fill(model, lambda k: UNET_PREFIX + k)
        return model, lambda z_t, t, context: model(z_t, t, context)
    from diffusers import UNet2DConditionModel
    names = original_names(cfg)
    with torch.device("meta"):
        model = UNet2DConditionModel(       # diffusers' defaults are SD v1.5's UNet
            in_channels=cfg.in_channels, out_channels=cfg.out_channels,
            block_out_channels=[cfg.model_channels * m for m in cfg.channel_mult],
            cross_attention_dim=cfg.context_dim, attention_head_dim=cfg.num_heads)
    fill(model, lambda k: names[k])
    return model, lambda z_t, t, context: model(z_t, t, context).sample


def inputs(cfg: UNetConfig, batch: int, size: int, tokens: int):
    g = torch.Generator().manual_seed(0)
    z_t = torch.randn(batch, cfg.in_channels, size, size, generator=g)
    t = torch.tensor([981.0, 261.0][:batch] + [500.0] * max(0, batch - 2))
    context = torch.randn(batch, tokens, cfg.context_dim, generator=g)
    return z_t, t, context


def peak_rss_kib() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM"))


def reset_peak_rss() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")        # Linux: reset VmHWM to the current RSS


def config(args) -> UNetConfig:
    cfg = UNetConfig.sd15()
    cfg.model_channels = args.model_channels
    return cfg


def measure_memory(side: str, args) -> dict:
    """Run in a fresh process: build one side, one forward; peak RSS of the process and of the forward."""
    cfg = config(args)
    model, forward = build(side, cfg)
    z_t, t, context = inputs(cfg, args.batch, args.size, args.tokens)
    build_peak = peak_rss_kib()
    reset_peak_rss()
    before = peak_rss_kib()
    with torch.no_grad():
        forward(z_t, t, context)
    forward_peak = peak_rss_kib()
    return {"process_peak_gib": max(build_peak, forward_peak) / 2**20,
            "forward_extra_gib": (forward_peak - before) / 2**20}


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--runs", type=int, default=5, help="timed forwards per side, after one warm-up each")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    p.add_argument("--batch", type=int, default=2, help="batch size (2 = one classifier-free-guidance step)")
    p.add_argument("--size", type=int, default=64, help="latent height and width (64 = 512x512 pixels)")
    p.add_argument("--tokens", type=int, default=77, help="context length L")
    p.add_argument("--model-channels", type=int, default=320,
                   help="width of an SD-shaped UNet (320 = SD v1.5; e.g. 64 for a quick check of the script)")
    p.add_argument("--memory-of", choices=["minildm", "diffusers"], help=argparse.SUPPRESS)
    p.add_argument("--skip-memory", action="store_true", help="time only")
    args = p.parse_args()
    torch.set_num_threads(args.threads)

    if args.memory_of:
        print(json.dumps(measure_memory(args.memory_of, args)))
        return

    cfg = config(args)
    z_t, t, context = inputs(cfg, args.batch, args.size, args.tokens)
    print(f"SD v1.5-shaped UNet (model_channels {cfg.model_channels}) forward, batch {args.batch}, latents {cfg.in_channels}x{args.size}x{args.size}, "
          f"context {args.tokens}x{cfg.context_dim}, float32, CPU, {args.threads} threads, torch {torch.__version__}")
    sides = {side: build(side, cfg) for side in ("minildm", "diffusers")}
    wall = {side: [] for side in sides}
    cpu = {side: [] for side in sides}
    eps = {}
    with torch.no_grad():
        for side, (_, forward) in sides.items():          # warm-up
            eps[side] = forward(z_t, t, context)
        for i in range(args.runs):
            for side in (list(sides) if i % 2 == 0 else list(sides)[::-1]):   # ABBA: no side always first
                start_wall, start_cpu = time.perf_counter(), time.process_time()
                sides[side][1](z_t, t, context)
                wall[side].append(time.perf_counter() - start_wall)
                cpu[side].append(time.process_time() - start_cpu)
    diff = (eps["minildm"] - eps["diffusers"]).abs()
    print(f"same weights and inputs: max abs diff of eps {diff.max():.2e} (mean {diff.mean():.2e}, "
          f"mean |eps| {eps['diffusers'].abs().mean():.2e})")
    med_wall = {side: statistics.median(ts) for side, ts in wall.items()}
    med_cpu = {side: statistics.median(ts) for side, ts in cpu.items()}
    for side in sides:
        print(f"{side:>9}: median {med_wall[side]:.2f} s wall, {med_cpu[side]:.2f} s CPU per forward  "
              f"(wall: {', '.join(f'{x:.2f}' for x in wall[side])})")
    # CPU time (user + system, all threads) is what the forward costs; wall time also counts the
    # moments another program had the cores, so on a shared machine it is the noisier of the two.
    print(f"ratio minildm / diffusers: {med_wall['minildm'] / med_wall['diffusers']:.3f} (wall), "
          f"{med_cpu['minildm'] / med_cpu['diffusers']:.3f} (CPU)")
    del sides, eps

    if not args.skip_memory:
        for side in ("minildm", "diffusers"):
            cmd = [sys.executable, os.path.abspath(__file__), "--memory-of", side, "--threads", str(args.threads),
                   "--batch", str(args.batch), "--size", str(args.size), "--tokens", str(args.tokens),
                   "--model-channels", str(args.model_channels)]
            mem = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.splitlines()[-1])
            print(f"{side:>9}: peak RSS {mem['process_peak_gib']:.2f} GiB for the process, "
                  f"{mem['forward_extra_gib']:.2f} GiB above the weights during the forward")


if __name__ == "__main__":
    main()
