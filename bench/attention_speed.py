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
the kernel in bfloat16, one with minildm's product, so a busy machine slows both alike (the loops of
bench/precision_speed.py). Printed: median seconds per step and the ratio (> 1: minildm's product is faster).
"""
from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))   # run from a checkout without installing
from minildm import clip_text, unet, vae
from minildm.attention import scaled_dot_product
from minildm.plumbing import cpu_has_bfloat16
from minildm.train.config import TrainConfig
from minildm.train.stage1 import memory_format
from precision_speed import ldm_steps, report, vae_steps   # the two-copies-take-turns loops, shared

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


KERNELS = (("bfloat16 kernel", native), ("float32 product", scaled_dot_product))


def ldm_sides() -> list:
    """Both under autocast: the kernel in bfloat16, and minildm's product (float32 when a backward follows)."""
    return [(name, True, lambda fn=fn: kernel(fn)) for name, fn in KERNELS]


def vae_sides(cfg: TrainConfig) -> list:
    """As ldm_sides, in the memory layout `train_vae` picks under autocast on a CPU."""
    layout = memory_format(replace(cfg, amp=True), CPU)
    return [(name, True, layout, lambda fn=fn: kernel(fn)) for name, fn in KERNELS]


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
    ratio = dict(ratio=("bfloat16 kernel", "float32 product"), meaning="> 1: minildm's product is faster")
    report("stage 2 (UNet + text)", ldm_steps(cfg, args.steps, ldm_sides(), reword=cfg.reword), cfg.batch_size, **ratio)
    report("stage 1 (VAE)", vae_steps(cfg, args.steps, vae_sides(cfg)), cfg.vae_batch_size, **ratio)


if __name__ == "__main__":
    main()
