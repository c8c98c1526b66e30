"""Attention in bfloat16 on a CPU: PyTorch's fused kernel run in bfloat16, against the same product run
in float32 and returned in bfloat16 (what `minildm.attention.scaled_dot_product` does on a CPU when a
backward pass follows; "float32 product" below).

    flock ../heavy.lock python bench/attention_speed.py

1. The product alone at the shapes the models meet, forward and backward, median milliseconds per call,
   and the largest error of each against float64 (relative to the largest output value).
2. The whole stage-2 step of the `cifar-cpu` preset under autocast: UNet and text encoder on 64 latents
   with reworded CIFAR captions (the training mix), min-SNR loss, clipping, fused AdamW, EMA.
3. The whole stage-1 step (the `cifar` VAE, batch 16, L1 + KL).
In 2 and 3 two copies with the same weights take turns on the same batches after a warm-up, one with
the kernel in bfloat16, one with minildm's product, so a busy machine slows both alike. Printed: median
seconds per step and the ratio (> 1: minildm's product is faster).
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))   # run from a checkout without installing
from minildm import clip_text, unet, vae
from minildm.attention import scaled_dot_product
from minildm.clip_text import CLIPTextConfig, CLIPTextModel
from minildm.data import CIFAR10_CLASSES, TEMPLATES, fill_template
from minildm.data.wording import Wording
from minildm.plumbing import autocast, cpu_has_bfloat16
from minildm.schedule import NoiseSchedule
from minildm.steps import EMA, Denoiser, adamw, decay_groups, diffusion_loss, vae_objective
from minildm.tokenizer import CLIPTokenizer
from minildm.train.config import TrainConfig
from minildm.unet import UNet, UNetConfig
from minildm.vae import AutoencoderKL, VAEConfig
from minildm.vae_loss import VAELoss

CPU = torch.device("cpu")

# (what, q shape, k/v shape, causal, backward too)
SHAPES = [
    ("cifar-cpu text encoder, 40 captions", (40, 4, 32, 64), (40, 4, 32, 64), True, True),
    ("cifar-cpu UNet self-attention, 4x4", (64, 4, 16, 32), (64, 4, 16, 32), False, True),
    ("cifar-cpu UNet cross-attention", (64, 4, 16, 32), (64, 4, 32, 32), False, True),
    ("cifar VAE middle block, 8x8", (16, 1, 64, 96), (16, 1, 64, 96), False, True),
    ("SD v1 UNet self-attention, 64x64 latents", (2, 8, 4096, 40), (2, 8, 4096, 40), False, False),
    ("SD v1 UNet cross-attention, 64x64 latents", (2, 8, 4096, 40), (2, 8, 77, 40), False, False),
]


def native(q, k, v, causal=False):
    """The fused kernel in whatever type q, k, v have."""
    return F.scaled_dot_product_attention(q, k, v, is_causal=causal)


def upcast(q, k, v, causal=False):
    """The product in float32, returned in q's type."""
    with torch.autocast("cpu", enabled=False):
        return F.scaled_dot_product_attention(q.float(), k.float(), v.float(), is_causal=causal).to(q.dtype)


@contextlib.contextmanager
def kernel(fn):
    """Every model module calls `fn` for its attention product while inside."""
    modules = (clip_text, unet, vae)
    saved = [m.scaled_dot_product for m in modules]
    for m in modules:
        m.scaled_dot_product = fn
    try:
        yield
    finally:
        for m, f in zip(modules, saved):
            m.scaled_dot_product = f


def time_call(fn, repeats: int) -> float:
    times = []
    for i in range(repeats + 2):
        start = time.perf_counter()
        fn()
        if i >= 2:
            times.append(time.perf_counter() - start)
    return statistics.median(times) * 1000


def products(repeats: int) -> None:
    print(f"{'product':<44}{'pass':>9}{'bfloat16 ms':>13}{'float32 ms':>12}{'ratio':>7}"
          f"{'err bf16':>10}{'err f32':>9}")
    g = torch.Generator().manual_seed(0)
    for what, qs, ks, causal, backward in SHAPES:
        q, k, v = torch.randn(qs, generator=g), torch.randn(ks, generator=g), torch.randn(ks, generator=g)
        exact = native(q.double(), k.double(), v.double(), causal)
        q16, k16, v16 = (t.bfloat16() for t in (q, k, v))
        scale = exact.abs().max().item()
        # Both see the same bfloat16 inputs; the error is the product's own, against float64 on those inputs.
        exact16 = native(q16.double(), k16.double(), v16.double(), causal)
        err = {name: (fn(q16, k16, v16, causal).double() - exact16).abs().max().item() / scale
               for name, fn in (("bf16", native), ("f32", upcast))}
        rows = [("forward", lambda fn: (lambda: fn(q16, k16, v16, causal)))]
        if backward:
            leaves = [t.clone().requires_grad_() for t in (q16, k16, v16)]
            grad = torch.randn(qs, generator=g).bfloat16()
            rows.append(("fwd+bwd", lambda fn: (lambda: fn(*leaves, causal).backward(grad))))
        for name, make in rows:
            t16, t32 = time_call(make(native), repeats), time_call(make(upcast), repeats)
            print(f"{what:<44}{name:>9}{t16:>13.2f}{t32:>12.2f}{t16 / t32:>7.2f}"
                  + (f"{err['bf16']:>10.1e}{err['f32']:>9.1e}" if name == "forward" else ""))


def stage2(cfg: TrainConfig, steps: int) -> dict:
    unet_cfg, text_cfg = UNetConfig.from_dict(cfg.unet), CLIPTextConfig.from_dict(cfg.text_encoder)
    torch.manual_seed(0)
    base = Denoiser(UNet(unet_cfg), CLIPTextModel(text_cfg))
    tokenizer = CLIPTokenizer.default(context_length=text_cfg.context_length)
    wording = Wording(tokenizer, list(CIFAR10_CLASSES), p=cfg.reword)
    schedule = NoiseSchedule.from_dict(cfg.schedule)
    runs = {}
    for name, fn in (("bfloat16 kernel", native), ("float32 product", scaled_dot_product)):
        model = copy.deepcopy(base)
        opt = adamw(decay_groups(model, cfg.weight_decay), lr=cfg.lr)
        runs[name] = dict(model=model, opt=opt, ema=EMA(model, cfg.ema_decay), fn=fn, time=[], loss=[])
    g = torch.Generator().manual_seed(0)
    B = cfg.batch_size
    for i in range(3 + steps):
        z = torch.randn(B, unet_cfg.in_channels, 8, 8, generator=g)
        noise = torch.randn(z.shape, generator=g)
        t = torch.randint(0, schedule.num_timesteps, (B,), generator=g)
        picks = torch.randint(len(TEMPLATES) * len(CIFAR10_CLASSES), (B,), generator=g).tolist()
        captions = []
        for pick in picks:
            name = CIFAR10_CLASSES[pick % len(CIFAR10_CLASSES)]
            captions.append(wording(fill_template(TEMPLATES[pick // len(CIFAR10_CLASSES)], name), name, g))
        tokens = tokenizer(captions)
        for r in runs.values():
            start = time.perf_counter()
            with kernel(r["fn"]), autocast(True, CPU):
                loss = diffusion_loss(r["model"], schedule, z, tokens, t, noise, cfg.min_snr_gamma)
                loss.backward()
            nn.utils.clip_grad_norm_(r["model"].parameters(), cfg.grad_clip or float("inf"))
            r["opt"].step()
            r["opt"].zero_grad(set_to_none=True)
            r["ema"].update(r["model"])
            r["loss"].append(loss.item())
            if i >= 3:
                r["time"].append(time.perf_counter() - start)
    return runs


def stage1(cfg: TrainConfig, steps: int) -> dict:
    torch.manual_seed(0)
    base = AutoencoderKL(VAEConfig.from_dict(cfg.vae))
    loss_fn = VAELoss(kl_weight=cfg.kl_weight, rec_loss=cfg.rec_loss)
    runs = {}
    for name, fn in (("bfloat16 kernel", native), ("float32 product", scaled_dot_product)):
        model = copy.deepcopy(base)
        opt = torch.optim.AdamW(model.parameters(), lr=cfg.vae_lr, betas=(0.5, 0.9), weight_decay=0.0)
        runs[name] = dict(vae=model, opt=opt, fn=fn, time=[], loss=[])
    g = torch.Generator().manual_seed(0)
    for i in range(3 + steps):
        images = torch.rand(cfg.vae_batch_size, 3, 32, 32, generator=g) * 2 - 1
        for r in runs.values():
            start = time.perf_counter()
            with kernel(r["fn"]), autocast(True, CPU):
                loss, _, _ = vae_objective(r["vae"], loss_fn, images, i, torch.Generator().manual_seed(i),
                                           last_layer=r["vae"].decoder.conv_out.weight)
            r["opt"].zero_grad(set_to_none=True)
            loss.backward()
            r["opt"].step()
            r["loss"].append(loss.item())
            if i >= 3:
                r["time"].append(time.perf_counter() - start)
    return runs


def report(stage: str, runs: dict, batch: int) -> None:
    print(f"{stage}: losses of the first steps: " + " | ".join(
        f"{name} " + " ".join(f"{v:.5f}" for v in r["loss"][:4]) for name, r in runs.items()))
    med = {name: statistics.median(r["time"]) for name, r in runs.items()}
    for name, m in med.items():
        print(f"{stage}: {name:16s} median {m:.3f} s/step ({batch / m:.0f} images/s)")
    a, b = med.values()
    print(f"{stage}: bfloat16 kernel / float32 product: {a / b:.2f}x")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=30, help="timed training steps per side and stage (after 3 warm-up steps)")
    p.add_argument("--repeats", type=int, default=20, help="timed calls per product and pass")
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    cfg = TrainConfig.cifar_cpu()
    print(f"this CPU multiplies bfloat16 in hardware: {cpu_has_bfloat16()} ({torch.backends.cpu.get_cpu_capability()}); "
          f"{args.threads} threads")
    products(args.repeats)
    report("stage 2 (UNet + text)", stage2(cfg, args.steps), cfg.batch_size)
    report("stage 1 (VAE)", stage1(cfg, args.steps), cfg.vae_batch_size)


if __name__ == "__main__":
    main()
