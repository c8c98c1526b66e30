"""Which training settings make the cifar() VAE learn fastest? Equal wall-clock budgets, side by side.

    python bench/vae_settings.py --data-dir <cifar10/train> --minutes 4 \\
        --runs bs64-l2 bs32-l1 bs32-l2 bs16-l1 bs16-l2 bs8-l2

Each run name is `bs<batch>-<l1|l2>`, optionally followed by `-lr<value>` and/or `-b999` (Adam betas
(0.9, 0.999) instead of the original's (0.5, 0.9)). Every run trains `VAEConfig.cifar()` from the same
seed with the loop of `minildm.train.train_vae` reduced to its core (random batches with flips,
channels-last, reconstruction + 1e-6 KL, AdamW with cosine decay to a tenth over the budget), for the
same wall-clock minutes, one after another in this process; held-out PSNR on 1,000 of the 5,000
held-out images (the last 500 of each class). Run it on an otherwise idle machine: a second process on
the same cores changes every figure.
"""
from __future__ import annotations

import argparse
import json
import math
import re
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from minildm import data as data_module
from minildm.steps import psnr
from minildm.vae import AutoencoderKL, VAEConfig
from minildm.vae_loss import VAELoss


def parse_run(name: str) -> dict:
    m = re.fullmatch(r"bs(\d+)-(l1|l2)((?:-lr[0-9.e-]+)?)((?:-b999)?)", name)
    if not m:
        raise SystemExit(f"error: bad run name {name!r} (expected e.g. bs16-l1, bs32-l2-lr2e-3, bs64-l1-b999)")
    return {"batch": int(m[1]), "loss": m[2], "lr": float(m[3][3:]) if m[3] else 1e-3,
            "betas": (0.9, 0.999) if m[4] else (0.5, 0.9)}


def train_for(train_images: torch.Tensor, held, minutes: float, batch: int, loss: str, lr: float, betas) -> dict:
    torch.manual_seed(0)
    vae = AutoencoderKL(VAEConfig.cifar()).to(memory_format=torch.channels_last)
    loss_fn = VAELoss(kl_weight=1e-6, rec_loss=loss)
    opt = torch.optim.AdamW(vae.parameters(), lr=lr, betas=betas, weight_decay=0.0)
    g = torch.Generator().manual_seed(0)
    budget, start, step = minutes * 60, time.perf_counter(), 0
    while (elapsed := time.perf_counter() - start) < budget:
        for group in opt.param_groups:  # cosine from lr down to lr / 10 over the budget
            group["lr"] = lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * elapsed / budget)))
        idx = torch.randint(0, len(train_images), (batch,), generator=g)
        x = data_module.to_float(train_images[idx])
        flip = torch.rand(batch, generator=g) < 0.5
        x = torch.where(flip[:, None, None, None], x.flip(-1), x).contiguous(memory_format=torch.channels_last)
        x_rec, posterior = vae(x)
        total, _ = loss_fn(x, x_rec, posterior, step)
        opt.zero_grad(set_to_none=True)
        total.backward()
        opt.step()
        step += 1
    return {"steps": step, "images_per_s": step * batch / budget,
            "held_out_psnr": psnr(vae.to(memory_format=torch.contiguous_format), held)}


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data-dir", required=True, help="CIFAR-10 archive/folder or ImageFolder tree")
    p.add_argument("--minutes", type=float, default=4.0, help="wall-clock budget of each run")
    p.add_argument("--runs", nargs="+", default=["bs64-l2", "bs32-l2", "bs16-l1", "bs16-l2"],
                   help="settings to compare, e.g. bs16-l1 bs32-l2-lr2e-3 bs64-l1-b999")
    p.add_argument("--held-out", type=int, default=1000, help="held-out images to score (of 5,000)")
    args = p.parse_args()
    settings = {name: parse_run(name) for name in args.runs}
    train, held = data_module.load_cifar10(args.data_dir).split(500)
    held = held.subset(torch.randperm(len(held), generator=torch.Generator().manual_seed(0))[:args.held_out])
    print(f"{len(train)} training images, {len(held)} held out; {args.minutes} min per run, "
          f"{torch.get_num_threads()} threads")
    print("| run | batch | loss | lr | Adam betas | steps | images/s | held-out PSNR |\n|---|---|---|---|---|---|---|---|")
    for name, s in settings.items():
        r = train_for(train.images, held, args.minutes, s["batch"], s["loss"], s["lr"], s["betas"])
        print(f"| {name} | {s['batch']} | {s['loss'].upper()} | {s['lr']:g} | {s['betas']} | {r['steps']} | "
              f"{r['images_per_s']:.1f} | {r['held_out_psnr']:.2f} dB |", flush=True)
        print(json.dumps({"run": name, **r}), file=sys.stderr, flush=True)


if __name__ == "__main__":
    main()
