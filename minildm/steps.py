"""The training step, as a chapter: what one optimizer step of stage 2 computes, and the EMA of its weights.

Stage 2 (lesson 06), as `train_ldm` runs it (train/stage2.py), in the order of its random draws:

    z                  = to_diffusion_latents(mean + std * randn, scale_factor)   a posterior sample,
                                                                                  unit variance (ldm/)
    captions, t, noise = training_inputs(z, captions, schedule, 0.1, g)           10% "" for guidance
    loss               = diffusion_loss(denoiser, schedule, z, tokenizer(captions), t, noise)
                                                         || noise - eps_theta(q_sample(z, t, noise), t, c) ||^2
    loss.backward(); optimizer.step()
    ema.update(denoiser)                                                          the weights that sample

`Denoiser` is the trained pair (text encoder, then UNet) as one module. Stage 1 (`train_vae`) runs
`vae_objective` (reconstruct through a posterior sample, `vae_loss.VAELoss`) and one optimizer step; `psnr`
scores it. `plumbing.py` does the rest of a run's work.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from . import data as data_module
from .clip_text import CLIPTextModel
from .schedule import NoiseSchedule
from .unet import UNet
from .vae import AutoencoderKL


class EMA:
    """An exponential moving average of a model's parameters: ema = decay * ema + (1 - decay) * param.

    The effective decay warms up as min(decay, (1 + n) / (10 + n)) after n updates (as the original
    LitEma), so early averages are not dominated by the random initialisation.
    """

    def __init__(self, model: nn.Module, decay: float):
        self.decay = decay
        self.num_updates = 0
        self.shadow = {k: v.detach().clone().float() for k, v in model.state_dict().items()}

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        self.num_updates += 1
        ema_update(self.shadow, model.state_dict(), self.decay, self.num_updates)

    def state_dict(self) -> dict:
        return {"decay": self.decay, "num_updates": self.num_updates, "shadow": self.shadow}

    def load_state_dict(self, state: dict) -> None:
        self.decay, self.num_updates = state["decay"], state["num_updates"]
        self.shadow = {k: v.clone() for k, v in state["shadow"].items()}

    def copy_to(self, model: nn.Module) -> nn.Module:
        model.load_state_dict({k: v.to(p.dtype) for (k, v), p in
                               zip(self.shadow.items(), model.state_dict().values())})
        return model


@torch.no_grad()
def ema_update(shadow: dict, weights: dict, decay: float, num_updates: int) -> dict:
    """One EMA step, the `num_updates`-th: shadow <- d * shadow + (1 - d) * weights for floating-point
    tensors, with the warmed-up decay d = min(decay, (1 + n) / (10 + n)); other tensors are copied.
    Updates `shadow` in place and returns it."""
    d = min(decay, (1 + num_updates) / (10 + num_updates))
    floats = [(shadow[k], w.float()) for k, w in weights.items() if w.is_floating_point()]
    torch._foreach_lerp_([s for s, _ in floats], [w for _, w in floats], 1 - d)   # s += (1 - d) (w - s)
    for k, w in weights.items():
        if not w.is_floating_point():
            shadow[k].copy_(w)
    return shadow


def decay_groups(model: nn.Module, weight_decay: float) -> list:
    """AdamW's usual parameter groups: weight decay on the matrices, none on biases, norms and embeddings."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (decay if p.dim() >= 2 and "embedding" not in name else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def adamw(param_groups, **options) -> torch.optim.AdamW:
    """AdamW with PyTorch's fused kernel where this PyTorch has one for the device (CPU from 2.4 on, CUDA):
    the same update in one pass over each tensor instead of a dozen. Stage 2's optimizer step on the CPU
    drops from about a fifth of the step to a few percent (bench/optimizer_speed.py)."""
    param_groups = list(param_groups)
    try:
        return torch.optim.AdamW(param_groups, fused=True, **options)
    except (RuntimeError, TypeError, ValueError):   # an older PyTorch, or a device without the kernel
        return torch.optim.AdamW(param_groups, **options)


class Denoiser(nn.Module):
    """The trained pair as one module (one DDP wrapper): tokens -> context, then the UNet's eps."""

    def __init__(self, unet: UNet, text_encoder: CLIPTextModel):
        super().__init__()
        self.unet = unet
        self.text_encoder = text_encoder

    def forward(self, z_t, t, tokens):
        # Rows of a batch often share a caption (CIFAR-10 has about sixty different ones): encode each
        # distinct caption once and give its context to every row that has it. Same loss, same gradients.
        distinct, row = torch.unique(tokens, dim=0, return_inverse=True)    # (U, L), (B,)
        return self.unet(z_t, t, self.text_encoder(distinct)[row])


def diffusion_loss(denoiser, schedule: NoiseSchedule, z: torch.Tensor, tokens: torch.Tensor,
                   t: torch.Tensor, noise: torch.Tensor, min_snr_gamma: Optional[float] = None) -> torch.Tensor:
    """The simple objective: mean squared error between the noise and the model's estimate of it.

    With `min_snr_gamma`, each example's error is weighted by min(SNR(t), gamma) / SNR(t) (Hang et al.,
    2023, "min-SNR-gamma" for an eps-predicting model): the nearly clean timesteps, whose noise is easy
    to tell and whose gradients would dominate, count less; the noisy ones, where the layout and the
    class of the image are decided, count fully.
    """
    z_t = schedule.q_sample(z, t, noise)
    eps_pred = denoiser(z_t, t, tokens)
    if min_snr_gamma is None:
        return F.mse_loss(eps_pred.float(), noise.float())
    snr = schedule.snr(t.cpu()).to(z.device)                                      # (B,)
    per_example = (eps_pred.float() - noise.float()).pow(2).flatten(1).mean(1)    # (B,)
    return (per_example * snr.clamp(max=min_snr_gamma) / snr).mean()


def training_inputs(z: torch.Tensor, captions: list, schedule: NoiseSchedule, caption_dropout: float,
                    generator: torch.Generator) -> tuple:
    """The rest of one step's random draws, in this order: (captions with a fraction replaced by "",
    timesteps t ~ U{0, ..., T-1}, noise ~ N(0, I) shaped like the latents z)."""
    captions = drop_captions(captions, caption_dropout, generator)
    t = torch.randint(0, schedule.num_timesteps, (len(z),), generator=generator)
    noise = torch.randn(z.shape, generator=generator)
    return captions, t, noise


def drop_captions(captions: list, p: float, generator: torch.Generator) -> list:
    """Replace a fraction p of captions by the empty prompt, which guidance uses as 'unconditional'."""
    keep = torch.rand(len(captions), generator=generator) >= p
    return [c if k else "" for c, k in zip(captions, keep.tolist())]


def vae_objective(autoencoder, loss_fn, x: torch.Tensor, step: int, generator: torch.Generator,
                  last_layer: torch.Tensor) -> tuple:
    """Stage 1's objective on a batch: reconstruct x through a posterior sample (the reparameterisation
    trick, noise from `generator`), then `vae_loss.VAELoss` (reconstruction + KL, and the discriminator's
    verdict once it is on). Returns (loss, logs, x_rec)."""
    x_rec, posterior = autoencoder(x, generator=generator)
    loss, logs = loss_fn(x, x_rec.float(), posterior, step, last_layer=last_layer)
    return loss, logs, x_rec


def image_psnr(x_rec: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """PSNR in dB of each image x_rec against x (B,): 10 log10(1 / MSE) with pixels in [0, 1]; both in [-1, 1]."""
    mse = ((x_rec - x) / 2).pow(2).flatten(1).mean(1).clamp_min(1e-10)
    return -10 * torch.log10(mse)


@torch.no_grad()
def psnr(vae: AutoencoderKL, data, batch_size: int = 128, device="cpu") -> float:
    """Mean PSNR (dB, pixels in [0, 1]) of the VAE's reconstructions (posterior mode) of `data`."""
    vae.eval()
    total, n = 0.0, 0
    for i in range(0, len(data), batch_size):
        x = data_module.to_float(data.images[i:i + batch_size]).to(device)
        x_rec = vae.decode(vae.encode(x).mode()).clamp(-1, 1)
        total += image_psnr(x_rec, x).sum().item()
        n += len(x)
    return total / max(1, n)
