"""The KL-regularised autoencoder between pixels and latents (Stable Diffusion v1's first stage).

Latent diffusion runs its expensive denoising loop not on pixels but on a small latent image. This
module is the map between the two: an `Encoder` that turns an image into the parameters of a diagonal
Gaussian over latents, and a `Decoder` that turns a latent back into an image.

Module names follow the original CompVis code (`ldm.models.autoencoder.AutoencoderKL`), so
`AutoencoderKL(VAEConfig.sd()).state_dict()` has exactly the keys of a Stable Diffusion v1 checkpoint
with the prefix "first_stage_model." removed (e.g. `encoder.mid.attn_1.q.weight`, stored as a 1x1
convolution, and `decoder.up.0.block.2.conv2.weight`, where up.0 is the *highest* resolution).

Notation (code name -> paper symbol, Rombach et al. 2022 / Kingma & Welling 2014):

    x          image in [-1, 1]                                   x
    z          latent                                             z = E(x)
    posterior  q(z | x) = N(mean, diag(exp(logvar)))              q_phi(z|x)
    x_rec      decoder output D(z)                                x~
    kl         KL(q(z|x) || N(0, I)), summed over the latent      D_KL
    f          downsampling factor H / h                          f

Shapes: B batch, C image channels (3), H/W pixels, zc latent channels (4), h = H/f, w = W/f.

    encode(x (B, C, H, W))       -> DiagonalGaussian with mean, logvar (B, zc, h, w)
    decode(z (B, zc, h, w))      -> x_rec (B, C, H, W)
    forward(x)                   -> (x_rec, posterior)

The latent scale factor (0.18215 for SD v1, or `estimate_scale_factor` for a VAE trained here) is
stored in `VAEConfig.scale_factor` but NOT applied in this module: only the composed model (minildm/ldm/)
multiplies latents by it on the way into the diffusion model and divides on the way out.

The losses that train it (reconstruction, KL, a patch discriminator) are in vae_loss.py.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Iterable

import torch
import torch.nn as nn
import torch.nn.functional as F

from .attention import scaled_dot_product


# ----------------------------------------------------------------------------------------------
# Configuration


@dataclass
class VAEConfig:
    in_channels: int = 3                         # image channels (also the decoder's output channels)
    base_channels: int = 128                     # channels at full resolution ("ch" in the original)
    channel_mult: tuple = (1, 2, 4, 4)           # per level; len - 1 downsamplings, so f = 2**(len - 1)
    num_res_blocks: int = 2                      # ResNet blocks per encoder level (decoder: one more)
    z_channels: int = 4                          # latent channels ("z_channels" = "embed_dim" in SD)
    norm_groups: int = 32                        # GroupNorm groups (eps 1e-6 as the original)
    dropout: float = 0.0                         # dropout inside ResNet blocks (0 in SD)
    scale_factor: float = 0.18215                # latent multiplier applied by minildm/ldm/, 1/std of latents

    def __post_init__(self):
        self.channel_mult = tuple(self.channel_mult)

    @property
    def downsample_factor(self) -> int:
        """How many pixels one latent cell covers along each side."""
        return 2 ** (len(self.channel_mult) - 1)

    def compression_ratio(self) -> float:
        """Numbers in an image over numbers in its latent."""
        return self.in_channels * self.downsample_factor ** 2 / self.z_channels

    def to_dict(self) -> dict:
        d = asdict(self)
        d["channel_mult"] = list(self.channel_mult)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "VAEConfig":
        return cls(**d)

    @classmethod
    def sd(cls) -> "VAEConfig":
        """Stable Diffusion v1's first stage: 512x512x3 -> 64x64x4 (f = 8). 83,653,863 parameters."""
        return cls(base_channels=128, channel_mult=(1, 2, 4, 4), num_res_blocks=2, z_channels=4,
                   scale_factor=0.18215)

    @classmethod
    def cifar(cls) -> "VAEConfig":
        """32x32x3 -> 8x8x8 (f = 4, 6x fewer numbers). 2,147,451 parameters.

        The shape was chosen by measurement (lessons/05_vae.md, section 6): CIFAR-10 training JPEGs,
        batch 32, squared error + 1e-6 KL, Adam 1e-3 with cosine decay, 5 CPU-minutes on one thread
        each, PSNR on 1,000 held-out images (with 4 latent channels):
            channels 32/64/128, 2 blocks   3.48M params   33.0 img/CPU-s   20.8 dB
            channels 32/64/128, 1 block    2.70M params   43.2 img/CPU-s   20.6 dB
            channels 48/96/96,  1 block    2.14M params   34.1 img/CPU-s   21.2 dB   <- this preset
            channels 64/128/128, 1 block   3.79M params   21.3 img/CPU-s   19.7 dB
        Width at 32x32 and 16x16 pays more per FLOP than a second block or width at 8x8.
        Eight latent channels instead of four cost nothing measurable and keep what tells classes
        apart: after 9 minutes of training each (2 threads, batch 16, 2,940 steps), held-out PSNR
        27.17 against 25.68 dB, and a CIFAR-10 judge that is right on 78.6% of the held-out photos
        reads their reconstructions right 57.1% of the time against 50.2% (bench/RESULTS.md).
        scale_factor is a placeholder until `estimate_scale_factor` is run on the trained model
        (training stores the measured value in the checkpoint).
        """
        return cls(base_channels=48, channel_mult=(1, 2, 2), num_res_blocks=1, z_channels=8,
                   norm_groups=16, scale_factor=1.0)

    @classmethod
    def tiny(cls) -> "VAEConfig":
        """For tests: 16x16 -> 8x8, 8/16 channels, one block per level. 20,823 parameters."""
        return cls(base_channels=8, channel_mult=(1, 2), num_res_blocks=1, z_channels=4,
                   norm_groups=4, scale_factor=1.0)


# ----------------------------------------------------------------------------------------------
# Building blocks (as in ldm/modules/diffusionmodules/model.py)


def _norm(channels: int, groups: int) -> nn.GroupNorm:
    return nn.GroupNorm(groups, channels, eps=1e-6, affine=True)


class ResnetBlock(nn.Module):
    """GroupNorm -> SiLU -> conv, twice, plus a 1x1 `nin_shortcut` when the channel count changes."""

    def __init__(self, in_channels: int, out_channels: int, groups: int, dropout: float = 0.0):
        super().__init__()
        self.norm1 = _norm(in_channels, groups)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = _norm(out_channels, groups)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        if in_channels != out_channels:
            self.nin_shortcut = nn.Conv2d(in_channels, out_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        if hasattr(self, "nin_shortcut"):
            x = self.nin_shortcut(x)
        return x + h


class AttnBlock(nn.Module):
    """Single-head self-attention over all h*w positions; q, k, v, proj_out are 1x1 convolutions."""

    def __init__(self, channels: int, groups: int):
        super().__init__()
        self.norm = _norm(channels, groups)
        self.q = nn.Conv2d(channels, channels, 1)
        self.k = nn.Conv2d(channels, channels, 1)
        self.v = nn.Conv2d(channels, channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, C, h, w = x.shape
        x_norm = self.norm(x)
        # One head of width C: (B, C, h, w) -> (B, 1, h*w, C); SDPA's default scale is 1/sqrt(C).
        q, k, v = (conv(x_norm).reshape(B, 1, C, h * w).transpose(-1, -2)
                   for conv in (self.q, self.k, self.v))
        out = scaled_dot_product(q, k, v)
        out = out.transpose(-1, -2).reshape(B, C, h, w)
        return x + self.proj_out(out)


class Downsample(nn.Module):
    """Halve the resolution with a stride-2 3x3 conv after padding one pixel right and bottom only."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # The original's asymmetric padding: (left, right, top, bottom) = (0, 1, 0, 1).
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    """Double the resolution: nearest-neighbour copy, then a 3x3 conv."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class _Level(nn.Module):
    """One resolution level: `block` (ResNet blocks) and `attn` (empty in SD: no attention at any level),
    plus `downsample` or `upsample` when the level changes resolution (names as in the original)."""

    def __init__(self):
        super().__init__()
        self.block = nn.ModuleList()
        self.attn = nn.ModuleList()


class _Mid(nn.Module):
    """The bottleneck: ResNet block, self-attention, ResNet block."""

    def __init__(self, channels: int, groups: int, dropout: float):
        super().__init__()
        self.block_1 = ResnetBlock(channels, channels, groups, dropout)
        self.attn_1 = AttnBlock(channels, groups)
        self.block_2 = ResnetBlock(channels, channels, groups, dropout)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.block_2(self.attn_1(self.block_1(h)))


# ----------------------------------------------------------------------------------------------
# Encoder, posterior, decoder


class Encoder(nn.Module):
    """x (B, C, H, W) -> moments (B, 2*zc, h, w): the mean and log-variance stacked on channels."""

    def __init__(self, cfg: VAEConfig):
        super().__init__()
        ch, g = cfg.base_channels, cfg.norm_groups
        self.conv_in = nn.Conv2d(cfg.in_channels, ch, 3, padding=1)
        self.down = nn.ModuleList()
        block_in = ch
        for i_level, mult in enumerate(cfg.channel_mult):
            level = _Level()
            for _ in range(cfg.num_res_blocks):
                level.block.append(ResnetBlock(block_in, ch * mult, g, cfg.dropout))
                block_in = ch * mult
            if i_level != len(cfg.channel_mult) - 1:
                level.downsample = Downsample(block_in)
            self.down.append(level)
        self.mid = _Mid(block_in, g, cfg.dropout)
        self.norm_out = _norm(block_in, g)
        self.conv_out = nn.Conv2d(block_in, 2 * cfg.z_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for level in self.down:
            for block in level.block:
                h = block(h)
            if hasattr(level, "downsample"):
                h = level.downsample(h)
        h = self.mid(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    """z (B, zc, h, w) -> x_rec (B, C, H, W); up.0 is the full-resolution level, as in the original."""

    def __init__(self, cfg: VAEConfig):
        super().__init__()
        ch, g = cfg.base_channels, cfg.norm_groups
        block_in = ch * cfg.channel_mult[-1]
        self.conv_in = nn.Conv2d(cfg.z_channels, block_in, 3, padding=1)
        self.mid = _Mid(block_in, g, cfg.dropout)
        # Built from the lowest resolution up, but indexed like the encoder (up.0 = highest resolution).
        levels = []
        for i_level in reversed(range(len(cfg.channel_mult))):
            level = _Level()
            for _ in range(cfg.num_res_blocks + 1):
                level.block.append(ResnetBlock(block_in, ch * cfg.channel_mult[i_level], g, cfg.dropout))
                block_in = ch * cfg.channel_mult[i_level]
            if i_level != 0:
                level.upsample = Upsample(block_in)
            levels.insert(0, level)
        self.up = nn.ModuleList(levels)
        self.norm_out = _norm(block_in, g)
        self.conv_out = nn.Conv2d(block_in, cfg.in_channels, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.mid(self.conv_in(z))
        for level in reversed(self.up):
            for block in level.block:
                h = block(h)
            if hasattr(level, "upsample"):
                h = level.upsample(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class DiagonalGaussian:
    """q(z|x) = N(mean, diag(exp(logvar))), from the encoder's moments (B, 2*zc, h, w)."""

    def __init__(self, moments: torch.Tensor):
        self.mean, logvar = moments.chunk(2, dim=1)
        # The original clamps so that exp() stays finite in float32 at initialisation and beyond.
        self.logvar = logvar.clamp(-30.0, 20.0)
        self.std = torch.exp(0.5 * self.logvar)
        self.var = torch.exp(self.logvar)

    def sample(self, generator: torch.Generator | None = None) -> torch.Tensor:
        """A latent drawn by the reparameterisation trick (`reparameterize`)."""
        eps = torch.randn(self.mean.shape, generator=generator, device=self.mean.device,
                          dtype=self.mean.dtype)
        return reparameterize(self.mean, self.logvar, eps)

    def mode(self) -> torch.Tensor:
        """The most likely latent (the mean); what inference uses for a deterministic encoding."""
        return self.mean

    def kl(self) -> torch.Tensor:
        """KL(q(z|x) || N(0, I)) per sample, summed over the latent: (B,)."""
        return gaussian_kl(self.mean, self.logvar)


def reparameterize(mean: torch.Tensor, logvar: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """The reparameterisation trick: z = mean + std * noise with std = exp(logvar / 2), noise ~ N(0, I);
    differentiable in mean and logvar."""
    return mean + torch.exp(0.5 * logvar) * noise


def gaussian_kl(mean: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL(N(mean, exp(logvar)) || N(0, I)) per sample, summed over the latent: (B,)."""
    return 0.5 * (mean.pow(2) + torch.exp(logvar) - 1.0 - logvar).sum(dim=(1, 2, 3))


class AutoencoderKL(nn.Module):
    """Encoder -> quant_conv -> posterior -> (sample) -> post_quant_conv -> Decoder."""

    def __init__(self, cfg: VAEConfig):
        super().__init__()
        self.cfg = cfg
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)
        zc = cfg.z_channels
        self.quant_conv = nn.Conv2d(2 * zc, 2 * zc, 1)
        self.post_quant_conv = nn.Conv2d(zc, zc, 1)

    def encode(self, x: torch.Tensor) -> DiagonalGaussian:
        """x (B, C, H, W) in [-1, 1] -> posterior over z (B, zc, h, w); odd sizes floor at each halving."""
        return DiagonalGaussian(self.quant_conv(self.encoder(x)))

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """z (B, zc, h, w), unscaled -> x_rec (B, C, h*f, w*f), roughly in [-1, 1] (not clamped)."""
        return self.decoder(self.post_quant_conv(z))

    def forward(self, x: torch.Tensor, generator: torch.Generator | None = None,
                sample_posterior: bool = True):
        posterior = self.encode(x)
        z = posterior.sample(generator) if sample_posterior else posterior.mode()
        return self.decode(z), posterior


@torch.no_grad()
def estimate_scale_factor(vae: AutoencoderKL, batches: Iterable[torch.Tensor],
                          generator: torch.Generator | None = None) -> float:
    """1 / std of sampled latents over the given image batches (the original's `scale_by_std`).

    Multiplying latents by this makes them unit-variance, the scale the noise schedule assumes.
    Statistics are pooled over every element of every batch, accumulated in float64.
    """
    total, total_sq, count = 0.0, 0.0, 0
    for x in batches:
        z = vae.encode(x).sample(generator).double()
        total += z.sum().item()
        total_sq += z.pow(2).sum().item()
        count += z.numel()
    if count < 2:
        raise ValueError("estimate_scale_factor needs at least two latent values")
    var = (total_sq - total * total / count) / (count - 1)
    return 1.0 / math.sqrt(var)
