"""Both training steps of the `cifar-cpu` preset in float32 and under bfloat16 autocast, on this CPU.

    flock ../heavy.lock python bench/precision_speed.py

Stage 1: the `cifar` VAE (2.1M) on a batch of 16 images (32 x 32), L1 + KL loss, AdamW, in the layout
`train_vae` picks (`stage1.memory_format`: channels-last in float32, the plain layout under autocast on
a CPU; bfloat16 in channels-last is timed as well, to show why).
Stage 2: the UNet (8.5M) and text encoder (14.2M: two layers) on 64 latents (8 x 8 x 8) with CIFAR captions,
min-SNR-5 loss, gradient clipping, fused AdamW, EMA: what `train_vae` and `train_ldm` run per step.
For each stage two copies with the same weights take turns on the same batches after a warm-up, one
in float32, one with `plumbing.autocast(True, cpu)` (weights, optimizer and loss stay float32), so a
busy machine slows both alike. Printed: the median seconds per step, images/s, and float32 / bfloat16
(> 1: autocast is faster), and the first steps' losses side by side (they differ by bfloat16 rounding).
bfloat16 is only fast on a CPU that multiplies it in hardware (Intel AMX or AVX512-BF16); the script
says whether this one does.
"""
from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from contextlib import nullcontext
from dataclasses import replace
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))   # run from a checkout without installing
from minildm.clip_text import CLIPTextConfig, CLIPTextModel
from minildm.data import CIFAR10_CLASSES, TEMPLATES, fill_template
from minildm.data.wording import Wording
from minildm.plumbing import autocast, cpu_has_bfloat16
from minildm.schedule import NoiseSchedule
from minildm.steps import EMA, Denoiser, adamw, decay_groups, diffusion_loss, vae_objective
from minildm.tokenizer import CLIPTokenizer
from minildm.train.config import TrainConfig
from minildm.train.stage1 import memory_format
from minildm.unet import UNet, UNetConfig
from minildm.vae import AutoencoderKL, VAEConfig
from minildm.vae_loss import VAELoss

CPU = torch.device("cpu")
SIDES = (("float32", False), ("bfloat16", True))


def vae_steps(cfg: TrainConfig, steps: int, sides=None) -> dict:
    """Timed VAE steps for each side (name, autocast, memory layout, context entered around the step):
    by default float32 and bfloat16 in the layouts `train_vae` picks, and bfloat16 in channels-last."""
    if sides is None:
        sides = [(name, amp, memory_format(replace(cfg, amp=amp), CPU), nullcontext) for name, amp in SIDES]
        sides.append(("bfloat16, channels-last", True, torch.channels_last, nullcontext))
    torch.manual_seed(0)
    base = AutoencoderKL(VAEConfig.from_dict(cfg.vae))
    loss_fn = VAELoss(kl_weight=cfg.kl_weight, rec_loss=cfg.rec_loss)
    runs = {}
    for name, amp, layout, context in sides:
        vae = copy.deepcopy(base).to(memory_format=layout)
        opt = torch.optim.AdamW(vae.parameters(), lr=cfg.vae_lr, betas=(0.5, 0.9), weight_decay=0.0)
        runs[name] = dict(vae=vae, opt=opt, amp=amp, layout=layout, context=context, time=[], loss=[])
    g = torch.Generator().manual_seed(0)
    for i in range(3 + steps):
        images = torch.rand(cfg.vae_batch_size, 3, 32, 32, generator=g) * 2 - 1
        for r in runs.values():
            x = images.contiguous(memory_format=r["layout"])
            start = time.perf_counter()
            with r["context"](), autocast(r["amp"], CPU):
                loss, _, _ = vae_objective(r["vae"], loss_fn, x, i, torch.Generator().manual_seed(i),
                                           last_layer=r["vae"].decoder.conv_out.weight)
            r["opt"].zero_grad(set_to_none=True)
            loss.backward()
            r["opt"].step()
            r["loss"].append(loss.item())
            if i >= 3:
                r["time"].append(time.perf_counter() - start)
    return runs


def ldm_steps(cfg: TrainConfig, steps: int, sides=None, reword: float = 0.0) -> dict:
    """Timed stage-2 steps for each side (name, autocast, context entered around the step[, optimizer: a
    function (parameter groups, lr) -> optimizer, by default training's adamw]), by default float32 and
    bfloat16; CIFAR template captions, a share `reword` of them reworded as training does. Each run keeps
    its losses, step times and optimizer-update times."""
    sides = sides or [(name, amp, nullcontext) for name, amp in SIDES]
    unet_cfg, text_cfg = UNetConfig.from_dict(cfg.unet), CLIPTextConfig.from_dict(cfg.text_encoder)
    torch.manual_seed(0)
    base = Denoiser(UNet(unet_cfg), CLIPTextModel(text_cfg))
    tokenizer = CLIPTokenizer.default(context_length=text_cfg.context_length)
    wording = Wording(tokenizer, list(CIFAR10_CLASSES), p=reword) if reword else None
    schedule = NoiseSchedule.from_dict(cfg.schedule)
    runs = {}
    for name, amp, context, *optimizer in sides:
        model = copy.deepcopy(base)
        opt = (optimizer[0] if optimizer else adamw)(decay_groups(model, cfg.weight_decay), lr=cfg.lr)
        runs[name] = dict(model=model, opt=opt, ema=EMA(model, cfg.ema_decay), amp=amp, context=context,
                          time=[], update=[], loss=[])
    g = torch.Generator().manual_seed(0)
    B = cfg.batch_size
    for i in range(3 + steps):
        z = torch.randn(B, unet_cfg.in_channels, 8, 8, generator=g)
        noise = torch.randn(z.shape, generator=g)
        t = torch.randint(0, schedule.num_timesteps, (B,), generator=g)
        picks = torch.randint(len(TEMPLATES) * len(CIFAR10_CLASSES), (B,), generator=g).tolist()
        captions = []
        for k in picks:
            name = CIFAR10_CLASSES[k % len(CIFAR10_CLASSES)]
            caption = fill_template(TEMPLATES[k // len(CIFAR10_CLASSES)], name)
            captions.append(wording(caption, name, g) if wording else caption)
        tokens = tokenizer(captions)
        for r in runs.values():
            start = time.perf_counter()
            with r["context"](), autocast(r["amp"], CPU):
                loss = diffusion_loss(r["model"], schedule, z, tokens, t, noise, cfg.min_snr_gamma)
                loss.backward()
            nn.utils.clip_grad_norm_(r["model"].parameters(), cfg.grad_clip or float("inf"))
            before_update = time.perf_counter()
            r["opt"].step()
            r["opt"].zero_grad(set_to_none=True)
            after_update = time.perf_counter()
            r["ema"].update(r["model"])
            r["loss"].append(loss.item())
            if i >= 3:
                r["time"].append(time.perf_counter() - start)
                r["update"].append(after_update - before_update)
    return runs


def report(stage: str, runs: dict, batch: int, ratio=("float32", "bfloat16"),
           meaning: str = "images per second under autocast") -> None:
    """The first losses side by side, each side's median step, and the ratio of two sides' medians."""
    print(f"{stage}: losses of the first steps: " + " | ".join(
        f"{name} " + " ".join(f"{v:.5f}" for v in r["loss"][:4]) for name, r in runs.items()))
    med = {name: statistics.median(r["time"]) for name, r in runs.items()}
    for name, m in med.items():
        print(f"{stage}: {name:8s} median {m:.3f} s/step ({batch / m:.0f} images/s)")
    a, b = ratio
    print(f"{stage}: {a} / {b}: {med[a] / med[b]:.2f}x ({meaning})")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=30, help="timed steps per side and stage (after 3 warm-up steps)")
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    cfg = TrainConfig.cifar_cpu()
    print(f"this CPU multiplies bfloat16 in hardware: {cpu_has_bfloat16()} ({torch.backends.cpu.get_cpu_capability()}); "
          f"{args.threads} threads, {args.steps} steps per side")
    report("stage 1 (VAE)", vae_steps(cfg, args.steps), cfg.vae_batch_size)
    report("stage 2 (UNet + text)", ldm_steps(cfg, args.steps), cfg.batch_size)


if __name__ == "__main__":
    main()
