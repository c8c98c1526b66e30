"""One UNet training step: minildm against diffusers' UNet2DConditionModel, same architecture and batch.

    flock /work/heavy.lock python bench/train_speed.py                      # the CIFAR training UNet
    flock /work/heavy.lock python bench/train_speed.py --model-channels 64  # the CPU benchmark's width

A training step is forward + MSE loss against the noise + backward + AdamW step, on the same inputs
(z_t (B, 4, h, w), t (B,), context (B, L, D)) for both sides. Both models live in this process with
identical weights (minildm's state dict renamed into diffusers' layout by `convert.unet_to_diffusers`;
the outputs are compared first), and their steps alternate after a warm-up, so a busy machine slows
both alike. Reported: median and best seconds per step, images/s, and the ratios diffusers / minildm (>= 1
means minildm is at least as fast).
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))   # run from a checkout without installing
from minildm.convert import unet_config_to_diffusers, unet_to_diffusers
from minildm.unet import UNet, UNetConfig


def build(cfg: UNetConfig):
    """(minildm UNet, diffusers UNet2DConditionModel) with the same weights."""
    from diffusers import UNet2DConditionModel
    torch.manual_seed(0)
    ours = UNet(cfg)
    with torch.no_grad():  # the zero-initialised output layers would make any two UNets agree
        for p in ours.parameters():
            p.add_(0.02 * torch.randn_like(p))
    theirs = UNet2DConditionModel(**unet_config_to_diffusers(cfg))
    theirs.load_state_dict(unet_to_diffusers(ours.state_dict(), cfg), strict=True)
    return ours, theirs


def step_fn(model, forward, batch):
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    z_t, t, context, noise = batch

    def step():
        eps_pred = forward(model, z_t, t, context)
        loss = torch.nn.functional.mse_loss(eps_pred, noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return loss.item()
    return step


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model-channels", type=int, default=128, help="UNetConfig.cifar() width (128)")
    p.add_argument("--context-dim", type=int, default=256, help="text context width (CLIPTextConfig.small: 256)")
    p.add_argument("--latent-size", type=int, default=8, help="h = w of the latents (CIFAR VAE: 8)")
    p.add_argument("--context-length", type=int, default=32, help="text tokens L (CLIPTextConfig.small: 32)")
    p.add_argument("--batch-size", type=int, default=64, help="images per step")
    p.add_argument("--runs", type=int, default=7, help="timed steps per side")
    p.add_argument("--threads", type=int, default=2, help="torch threads")
    args = p.parse_args()
    torch.set_num_threads(args.threads)

    cfg = UNetConfig.cifar()
    cfg.model_channels, cfg.context_dim = args.model_channels, args.context_dim
    ours, theirs = build(cfg)
    n_params = sum(p.numel() for p in ours.parameters())
    B, s = args.batch_size, args.latent_size
    g = torch.Generator().manual_seed(0)
    batch = (torch.randn(B, cfg.in_channels, s, s, generator=g), torch.randint(0, 1000, (B,), generator=g),
             torch.randn(B, args.context_length, cfg.context_dim, generator=g), torch.randn(B, cfg.in_channels, s, s, generator=g))

    with torch.no_grad():
        a = ours(*batch[:3])
        b = theirs(batch[0], batch[1], encoder_hidden_states=batch[2]).sample
    diff = (a - b).abs()
    print(f"UNet {n_params:,} parameters, batch {B}, latents {cfg.in_channels}x{s}x{s}, "
          f"context {args.context_length}x{cfg.context_dim}")
    print(f"same weights, same output: max |diff| {diff.max():.2e}, mean {diff.mean():.2e} "
          f"(output mean |eps_pred| {a.abs().mean():.3f})")

    steps = {"minildm": step_fn(ours, lambda m, z, t, c: m(z, t, c), batch),
             "diffusers": step_fn(theirs, lambda m, z, t, c: m(z, t, encoder_hidden_states=c).sample, batch)}
    times = {k: [] for k in steps}
    for name, step in steps.items():  # warm-up
        step()
    for _ in range(args.runs):
        for name, step in steps.items():
            start = time.perf_counter()
            step()
            times[name].append(time.perf_counter() - start)
    med = {k: statistics.median(v) for k, v in times.items()}
    best = {k: min(v) for k, v in times.items()}
    for k in steps:
        print(f"{k:10s} median {med[k]:.3f} s/step ({B / med[k]:.1f} images/s), best {best[k]:.3f} s/step "
              f"(runs: {', '.join(f'{x:.2f}' for x in times[k])})")
    # On a shared machine the best run is the least disturbed one; both ratios are printed.
    print(f"ratio diffusers / minildm: median {med['diffusers'] / med['minildm']:.2f}x, "
          f"best {best['diffusers'] / best['minildm']:.2f}x (target >= 1.0x)")


if __name__ == "__main__":
    main()
