"""How well a trained VAE reconstructs held-out CIFAR-10 images, and how fast it runs.

    python bench/vae_quality.py runs/cifar/vae.safetensors --data-dir /path/to/cifar10/train
    python bench/vae_quality.py --throughput --preset cifar

The first form evaluates a VAE checkpoint: a minildm checkpoint (configs in its metadata, see
minildm/convert/), an original-layout file with first_stage_model.* keys, or a bare state dict
(keys encoder.*, decoder.*, ...) together with --preset. It prints

    PSNR          mean over held-out images of 10 log10(1 / MSE), pixels in [0, 1], reconstruction
                  = decode(posterior mode), clamped (minildm.steps.image_psnr, the definition minildm.steps.psnr uses);
                  also the PSNR of the pooled MSE, which is lower (Jensen's inequality)
    compression   numbers per image / numbers per latent, e.g. 32*32*3 / (8*8*4) = 12
    ms/image      encode + decode time per image at the given batch size

Held-out images: the last 500 images of every class, in the order the data loader reads them
(sorted file names for the JPEG ImageFolder tree, i.e. 4500.jpg-4999.jpg of each class; file order for
torchvision's pickled batches): 5,000 images that a run with --holdout-per-class 500 never trains on.
--grid writes originals over reconstructions as a PNG.

The second form measures training throughput of a preset (forward + backward + Adam step on random
32x32 images) and counts its floating-point operations, which turns a time budget into a number of
steps on other hardware: steps = budget * sustained FLOP/s / (FLOP per step).
"""
from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from minildm.convert import read_checkpoint, read_state_dict  # noqa: E402
from minildm.steps import image_psnr  # noqa: E402
from minildm.vae import AutoencoderKL, VAEConfig  # noqa: E402
from minildm.vae_loss import VAELoss  # noqa: E402

PRESETS = {"sd": VAEConfig.sd, "cifar": VAEConfig.cifar, "tiny": VAEConfig.tiny}


def load_vae(path: str, preset: str | None) -> tuple:
    """(AutoencoderKL in eval mode, scale_factor or None) from a checkpoint file."""
    state, _ = read_state_dict(path)
    if all(k.startswith(("encoder.", "decoder.", "quant_conv.", "post_quant_conv.")) for k in state):
        if preset is None:
            raise SystemExit("error: a bare state dict has no config; pass --preset")
        cfg, vae_state, scale = PRESETS[preset](), state, None
    else:
        ckpt = read_checkpoint(path)
        if ckpt.vae is None:
            raise SystemExit(f"error: {path} has no first_stage_model.* weights")
        meta = ckpt.meta or {}
        if meta.get("vae"):
            cfg = VAEConfig.from_dict(meta["vae"])
        elif preset is not None:
            cfg = PRESETS[preset]()
        else:
            raise SystemExit(f"error: {path} stores no VAE config; pass --preset")
        vae_state, scale = ckpt.vae, meta.get("scale_factor")
    vae = AutoencoderKL(cfg)
    vae.load_state_dict({k: v.float() for k, v in vae_state.items()}, strict=True)
    return vae.eval(), scale


def held_out_images(data_dir: str, per_class: int) -> torch.Tensor:
    """uint8 (N, 3, 32, 32): the last `per_class` images of every CIFAR-10 class."""
    from minildm.data import load_cifar10

    _, held = load_cifar10(data_dir).split(per_class)
    return held.images


@torch.no_grad()
def evaluate(vae: AutoencoderKL, images: torch.Tensor, batch_size: int) -> dict:
    """PSNR per image (mean), PSNR of the pooled MSE, and encode+decode milliseconds per image."""
    psnrs, mses, seconds = [], [], 0.0
    for i in range(0, len(images), batch_size):
        x = images[i:i + batch_size].float() / 127.5 - 1
        t0 = time.perf_counter()
        x_rec = vae.decode(vae.encode(x).mode())
        seconds += time.perf_counter() - t0
        mses.append(((x_rec.clamp(-1, 1) - x) / 2).pow(2).flatten(1).mean(1))
        psnrs.append(image_psnr(x_rec.clamp(-1, 1), x))
    mse = torch.cat(mses)
    return {"psnr": torch.cat(psnrs).mean().item(), "psnr_pooled": -10 * math.log10(mse.mean().item()),
            "ms_per_image": 1000 * seconds / len(images), "n": len(images)}


@torch.no_grad()
def save_grid(vae: AutoencoderKL, images: torch.Tensor, path: str, n: int = 16) -> None:
    """Rows of originals over their reconstructions, n per row, two pairs of rows."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    idx = torch.linspace(0, len(images) - 1, 2 * n).long()
    x = images[idx].float() / 127.5 - 1
    x_rec = vae.decode(vae.encode(x).mode()).clamp(-1, 1)
    rows = [x[:n], x_rec[:n], x[n:], x_rec[n:]]
    grid = torch.cat([torch.cat(list(r), dim=2) for r in rows], dim=1)  # (3, 4*H, n*W)
    fig = plt.figure(figsize=(n * 0.6, 4 * 0.6), dpi=100)
    plt.imshow(((grid + 1) / 2).permute(1, 2, 0).numpy())
    plt.axis("off")
    plt.title("held-out originals (rows 1, 3) and reconstructions (rows 2, 4)", fontsize=8)
    fig.savefig(path, bbox_inches="tight")
    plt.close(fig)


def training_flops(cfg: VAEConfig, batch_size: int, size: int) -> float:
    """Floating-point operations of one training step (forward + backward) of the VAE."""
    from torch.utils.flop_counter import FlopCounterMode

    vae, loss_fn = AutoencoderKL(cfg), VAELoss(rec_loss="l2")
    x = torch.zeros(batch_size, cfg.in_channels, size, size)
    with FlopCounterMode(display=False) as counter:
        x_rec, posterior = vae(x)
        loss_fn(x, x_rec, posterior, 0)[0].backward()
    return float(counter.get_total_flops())


def throughput(cfg: VAEConfig, batch_size: int, size: int, steps: int) -> float:
    """Training images per second of plain L2 + KL steps with Adam on random images."""
    vae, loss_fn = AutoencoderKL(cfg), VAELoss(rec_loss="l2")
    opt = torch.optim.Adam(vae.parameters(), lr=1e-4)
    x = torch.rand(batch_size, cfg.in_channels, size, size) * 2 - 1
    for i in range(steps + 2):
        if i == 2:  # the first steps allocate buffers
            t0 = time.perf_counter()
        x_rec, posterior = vae(x)
        loss, _ = loss_fn(x, x_rec, posterior, i)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return steps * batch_size / (time.perf_counter() - t0)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", nargs="?", help="VAE checkpoint (.safetensors, .ckpt or .pt) to evaluate")
    p.add_argument("--data-dir", help="CIFAR-10: the JPEG ImageFolder tree or torchvision's archive/folder")
    p.add_argument("--preset", choices=sorted(PRESETS), help="config for bare state dicts and --throughput")
    p.add_argument("--holdout-per-class", type=int, default=500, help="held-out images per class (the last ones)")
    p.add_argument("--batch-size", type=int, default=100, help="images per encode/decode call")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--grid", help="write originals over reconstructions to this PNG")
    p.add_argument("--throughput", action="store_true", help="measure training images/s and FLOP per image")
    p.add_argument("--train-batch-size", type=int, default=16, help="batch size for --throughput (the cifar preset trains with 16)")
    p.add_argument("--steps", type=int, default=10, help="timed training steps for --throughput")
    p.add_argument("--budget-minutes", type=float, default=30.0, help="budget to project for --throughput")
    p.add_argument("--gpu-tflops", type=float, default=10.0,
                   help="sustained float32 TFLOP/s assumed for a consumer GPU in the projection")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    if args.throughput:
        cfg = PRESETS[args.preset or "cifar"]()
        size = 32
        flops = training_flops(cfg, args.train_batch_size, size) / args.train_batch_size
        rate = throughput(cfg, args.train_batch_size, size, args.steps)
        budget_s = 60 * args.budget_minutes
        gpu_rate = args.gpu_tflops * 1e12 / flops
        print(f"preset {args.preset or 'cifar'}: {sum(q.numel() for q in AutoencoderKL(cfg).parameters()):,} "
              f"parameters, {flops / 1e9:.2f} GFLOP per training image ({size}x{size})")
        print(f"CPU ({torch.get_num_threads()} threads): {rate:.1f} training images/s = "
              f"{rate * flops / 1e9:.0f} GFLOP/s; {args.budget_minutes:g} min = {rate * budget_s:,.0f} images "
              f"= {rate * budget_s / args.train_batch_size:,.0f} steps of {args.train_batch_size}")
        print(f"GPU at {args.gpu_tflops:g} TFLOP/s sustained: {gpu_rate:,.0f} images/s; "
              f"{args.budget_minutes:g} min = {gpu_rate * budget_s:,.0f} images "
              f"({gpu_rate / rate:.0f}x the CPU)")
        return

    if args.checkpoint is None or args.data_dir is None:
        p.error("give a checkpoint and --data-dir (or --throughput)")
    vae, scale = load_vae(args.checkpoint, args.preset)
    images = held_out_images(args.data_dir, args.holdout_per_class)
    result = evaluate(vae, images, args.batch_size)
    cfg = vae.cfg
    print(f"{args.checkpoint}: {result['n']} held-out images, {sum(q.numel() for q in vae.parameters()):,} "
          f"parameters, f={cfg.downsample_factor}, z {cfg.z_channels} channels")
    print(f"PSNR {result['psnr']:.2f} dB (pooled MSE: {result['psnr_pooled']:.2f} dB), compression "
          f"{cfg.compression_ratio():g}x ({images.shape[1]}x{images.shape[2]}x{images.shape[3]} -> "
          f"{cfg.z_channels}x{images.shape[2] // cfg.downsample_factor}x{images.shape[3] // cfg.downsample_factor}), "
          f"{result['ms_per_image']:.2f} ms/image encode+decode ({torch.get_num_threads()} threads), "
          f"scale factor {scale if scale is not None else 'not stored'}")
    if args.grid:
        save_grid(vae, images, args.grid)
        print(f"wrote {args.grid}")


if __name__ == "__main__":
    main()
