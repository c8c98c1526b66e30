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
import copy
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))   # run from a checkout without installing
from minildm.clip_text import CLIPTextConfig, CLIPTextModel
from minildm.data import CIFAR10_CLASSES, TEMPLATES, fill_template
from minildm.schedule import NoiseSchedule
from minildm.steps import EMA, Denoiser, decay_groups, diffusion_loss
from minildm.tokenizer import CLIPTokenizer
from minildm.train.config import TrainConfig
from minildm.unet import UNet, UNetConfig


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=30, help="timed steps per optimizer (after 3 warm-up steps)")
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = p.parse_args()
    torch.set_num_threads(args.threads)

    cfg = TrainConfig.cifar_cpu()
    unet_cfg, text_cfg = UNetConfig.from_dict(cfg.unet), CLIPTextConfig.from_dict(cfg.text_encoder)
    torch.manual_seed(0)
    base = Denoiser(UNet(unet_cfg), CLIPTextModel(text_cfg))
    tokenizer = CLIPTokenizer.default(context_length=text_cfg.context_length)
    schedule = NoiseSchedule.from_dict(cfg.schedule)
    z_channels = unet_cfg.in_channels

    runs = {}
    for name, fused in (("plain", False), ("fused", True)):
        model = copy.deepcopy(base)
        opt = torch.optim.AdamW(decay_groups(model, cfg.weight_decay), lr=cfg.lr, fused=fused)
        runs[name] = dict(model=model, opt=opt, ema=EMA(model, cfg.ema_decay), step=[], update=[], loss=[])

    g = torch.Generator().manual_seed(0)
    B = cfg.batch_size
    for i in range(3 + args.steps):
        z = torch.randn(B, z_channels, 8, 8, generator=g)
        noise = torch.randn(z.shape, generator=g)
        t = torch.randint(0, schedule.num_timesteps, (B,), generator=g)
        picks = torch.randint(len(TEMPLATES) * len(CIFAR10_CLASSES), (B,), generator=g).tolist()
        captions = [fill_template(TEMPLATES[k // len(CIFAR10_CLASSES)], CIFAR10_CLASSES[k % len(CIFAR10_CLASSES)])
                    for k in picks]
        tokens = tokenizer(captions)
        for r in runs.values():
            start = time.perf_counter()
            loss = diffusion_loss(r["model"], schedule, z, tokens, t, noise, cfg.min_snr_gamma)
            loss.backward()
            nn.utils.clip_grad_norm_(r["model"].parameters(), cfg.grad_clip or float("inf"))
            before_update = time.perf_counter()
            r["opt"].step()
            r["opt"].zero_grad(set_to_none=True)
            after_update = time.perf_counter()
            r["ema"].update(r["model"])
            end = time.perf_counter()
            r["loss"].append(loss.item())
            if i >= 3:
                r["step"].append(end - start)
                r["update"].append(after_update - before_update)

    print(f"stage 2 step of the cifar-cpu preset, batch {B}, {args.threads} threads, {args.steps} steps each")
    print("losses of the first steps: plain " + " ".join(f"{v:.5f}" for v in runs["plain"]["loss"][:4]) +
          " | fused " + " ".join(f"{v:.5f}" for v in runs["fused"]["loss"][:4]))
    med = {}
    for name, r in runs.items():
        med[name] = statistics.median(r["step"])
        print(f"{name:6s} median {med[name]:.3f} s/step ({B / med[name]:.0f} images/s), of which the optimizer "
              f"update {statistics.median(r['update']) * 1000:.0f} ms")
    print(f"plain / fused: {med['plain'] / med['fused']:.2f}x (images per second with the fused kernel)")


if __name__ == "__main__":
    main()
