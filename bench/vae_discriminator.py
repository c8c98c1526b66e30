"""What the patch discriminator changes: the same VAE trained with and without it, side by side.

Both runs share the model, data, seeds, batches and optimiser; the only difference is the adversarial
term (a `PatchDiscriminator` switched on halfway, hinge loss, the original's adaptive weight with
disc_weight 0.5). The script prints held-out PSNR and the discriminator's last hinge loss, and saves a
grid of held-out originals over both reconstructions.

    python bench/vae_discriminator.py --dataset shapes
    python bench/vae_discriminator.py --dataset cifar --data-dir cifar10-train-jpg.tar.gz

shapes: the 8-channel VAE of notebook 05 (600 steps); cifar: the 16-channel VAE of its section 6
(1,500 steps on 4,500 photos, 500 held out).
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from minildm.data import load_cifar10, make_shapes, to_float, to_uint8  # noqa: E402
from minildm.steps import image_psnr  # noqa: E402
from minildm.vae import AutoencoderKL, VAEConfig  # noqa: E402
from minildm.vae_loss import PatchDiscriminator, VAELoss  # noqa: E402


def load(args):
    """(x_train, x_held, indices of 10 held-out images to show, config, steps) for the chosen data set."""
    if args.dataset == "shapes":
        x = to_float(make_shapes(600, resolution=32, seed=0).images)
        cfg = VAEConfig(base_channels=8, channel_mult=(1, 2, 2), num_res_blocks=1, z_channels=4, norm_groups=4)
        return x[:500], x[500:], torch.linspace(0, 99, 10).long(), cfg, args.steps or 600
    train, held = load_cifar10(args.data_dir, max_images=5000).split(holdout_per_class=50)
    pick = torch.stack([(held.labels == k).nonzero()[0, 0] for k in range(10)])  # one image per class
    cfg = VAEConfig(base_channels=16, channel_mult=(1, 2, 2), num_res_blocks=1, z_channels=4, norm_groups=8)
    return to_float(train.images), to_float(held.images), pick, cfg, args.steps or 1500


def train(x_train, cfg, steps, with_discriminator, seed=0, batch_size=16, lr=3e-3):
    """The notebook's loop (squared error + 1e-6 KL, Adam), plus the discriminator step when asked."""
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    vae = AutoencoderKL(cfg)
    disc = PatchDiscriminator(ndf=16, n_layers=2) if with_discriminator else None
    loss_fn = VAELoss(kl_weight=1e-6, rec_loss="l2", discriminator=disc, disc_start=steps // 2)
    opt = torch.optim.Adam(vae.parameters(), lr=lr)
    opt_d = torch.optim.Adam(disc.parameters(), lr=lr, betas=(0.5, 0.9)) if disc else None
    logs = {}
    for step in range(steps):
        x = x_train[torch.randint(0, len(x_train), (batch_size,), generator=g)]
        x_rec, posterior = vae(x, generator=g)
        loss, logs = loss_fn(x, x_rec, posterior, step, last_layer=vae.decoder.conv_out.weight)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if loss_fn.discriminator_active(step):
            loss_d, logs_d = loss_fn.discriminator_loss(x, x_rec.detach(), step)
            opt_d.zero_grad()
            loss_d.backward()
            opt_d.step()
            logs.update(logs_d)
    return vae.eval(), logs


@torch.no_grad()
def reconstruct(vae, x):
    return vae.decode(vae.encode(x).mode()).clamp(-1, 1)


def psnr(x_rec, x):
    return image_psnr(x_rec, x).mean().item()


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--dataset", choices=("shapes", "cifar"), default="shapes", help="training images")
    p.add_argument("--data-dir", default=None, help="local CIFAR-10 copy (archive or folder), for --dataset cifar")
    p.add_argument("--steps", type=int, default=None, help="training steps (default: 600 shapes, 1500 cifar)")
    p.add_argument("--threads", type=int, default=2, help="torch threads")
    p.add_argument("--grid", default=None, help="PNG path for originals / without / with discriminator")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    x_train, x_held, pick, cfg, steps = load(args)
    rows = [x_held[pick]]
    for with_disc in (False, True):
        start = time.perf_counter()
        vae, logs = train(x_train, cfg, steps, with_disc)
        x_rec = reconstruct(vae, x_held)
        extra = f", last hinge loss {logs['d_loss']:.3f}, adaptive weight {logs['d_weight']:.3g}" \
            if with_disc and "d_loss" in logs else ""
        print(f"{args.dataset}, {steps} steps, discriminator {'on at step ' + str(steps // 2) if with_disc else 'off'}: "
              f"held-out PSNR {psnr(x_rec, x_held):.2f} dB ({time.perf_counter() - start:.0f} s){extra}", flush=True)
        rows.append(x_rec[pick])
    if args.grid:
        from torchvision.utils import save_image
        grid = torch.nn.functional.interpolate(torch.cat(rows), scale_factor=3, mode="nearest")  # 32 px is small
        save_image(to_uint8(grid).float() / 255, args.grid, nrow=len(pick), padding=2)
        print(f"rows: held-out originals, without, with the discriminator -> {args.grid}")


if __name__ == "__main__":
    main()
