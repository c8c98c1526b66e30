"""FLOPs of one training image per stage, and what they mean in GPU time.

    python bench/train_cost.py                                   # the cifar preset
    python bench/train_cost.py --unet-channels 64                # the CPU benchmark's UNet width
    python bench/train_cost.py --measured-ldm 12.3 --measured-vae 60  # images/s measured on this CPU

PyTorch's FlopCounterMode counts the matrix multiplies and convolutions of one forward + backward
(the backward of a layer costs about twice its forward) for a batch, divided by the batch size. With
the images/s measured by `python -m minildm.train` (metrics.jsonl) it gives the achieved GFLOP/s
here; dividing the FLOPs of a whole run by a GPU's sustained rate gives the GPU-time estimate.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from minildm.clip_text import CLIPTextModel, CLIPTextConfig
from minildm.train import TrainConfig
from minildm.unet import UNet, UNetConfig
from minildm.vae import AutoencoderKL, VAEConfig


def flops_per_image(fn, batch: int) -> float:
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops() / batch


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--unet-channels", type=int, default=None, help="override the preset's UNet width")
    p.add_argument("--batch", type=int, default=8, help="batch used for counting (FLOPs scale linearly)")
    p.add_argument("--measured-ldm", type=float, default=None, help="stage 2 images/s measured here")
    p.add_argument("--measured-vae", type=float, default=None, help="stage 1 images/s measured here")
    p.add_argument("--gpu-tflops", type=float, default=25.0,
                   help="sustained TFLOP/s of the GPU for this small-kernel workload (default 25: "
                        "an RTX 3090/4070-class card with bf16 autocast at ~35%% of its tensor peak)")
    p.add_argument("--epochs", type=float, default=100, help="stage 2 epochs of 50,000 images to price")
    p.add_argument("--vae-epochs", type=float, default=20, help="stage 1 epochs to price")
    args = p.parse_args()

    cfg = TrainConfig.cifar()
    unet_cfg, text_cfg, vae_cfg = (UNetConfig.from_dict(cfg.unet), CLIPTextConfig.from_dict(cfg.text_encoder),
                                   VAEConfig.from_dict(cfg.vae))
    if args.unet_channels:
        unet_cfg.model_channels = args.unet_channels
    B, h = args.batch, 32 // vae_cfg.downsample_factor
    unet, text, vae = UNet(unet_cfg), CLIPTextModel(text_cfg), AutoencoderKL(vae_cfg)

    def ldm_step():
        tokens = torch.randint(0, text_cfg.vocab_size - 1, (B, text_cfg.context_length))
        eps = unet(torch.randn(B, unet_cfg.in_channels, h, h), torch.randint(0, 1000, (B,)), text(tokens))
        eps.pow(2).mean().backward()

    def vae_step():
        x_rec, posterior = vae(torch.randn(B, 3, 32, 32))
        (x_rec.abs().mean() + posterior.kl().mean()).backward()

    rows = {"ldm": (flops_per_image(ldm_step, B), args.measured_ldm, args.epochs, "UNet + text encoder"),
            "vae": (flops_per_image(vae_step, B), args.measured_vae, args.vae_epochs, "VAE")}
    n_unet = sum(q.numel() for q in unet.parameters())
    print(f"UNet {n_unet:,} parameters (model_channels {unet_cfg.model_channels}), text encoder "
          f"{sum(q.numel() for q in text.parameters()):,}, VAE {sum(q.numel() for q in vae.parameters()):,}")
    for stage, (f, measured, epochs, what) in rows.items():
        line = f"{stage}: {f / 1e9:.2f} GFLOP per training image ({what}, forward + backward)"
        if measured:
            line += f"; measured {measured:.1f} images/s here = {f * measured / 1e9:.0f} GFLOP/s achieved"
        total = f * epochs * 50_000
        line += (f"; {epochs:g} epochs = {total / 1e15:.1f} PFLOP = {total / (args.gpu_tflops * 1e12) / 3600:.2f} "
                 f"GPU-hours at {args.gpu_tflops:g} TFLOP/s")
        print(line)


if __name__ == "__main__":
    main()
