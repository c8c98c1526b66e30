"""Exercises for lesson 07, Stable Diffusion. Check them with:  python -m minildm.check 07

Five pieces of the real pipeline: reading a checkpoint's UNet weights ("Anatomy of a checkpoint"),
merging a LoRA ("LoRA files"), where img2img starts ("img2img: start part of the way down") and how
inpainting keeps what it keeps ("Inpainting by latent blending"). The checks run the package's loader,
merger and `LatentDiffusion.generate` on tiny random models beside yours.

An original Stable Diffusion v1 checkpoint is one flat dict of tensors. The UNet's weights sit under
"model.diffusion_model." (e.g. "model.diffusion_model.input_blocks.0.0.weight"); the training run's
exponential moving average of the same weights, when the file has it, sits under "model_ema." with the
rest of the name run together without dots: "model_ema.diffusion_modelinput_blocks00weight".
"""
import math

import torch


def ema_key(unet_key: str) -> str:
    """The EMA key of a UNet weight, from its name inside the UNet (without "model.diffusion_model."):
    "input_blocks.0.0.weight" -> "model_ema.diffusion_modelinput_blocks00weight"."""
    raise NotImplementedError


def unet_weights(state: dict, use_ema: bool) -> dict:
    """The UNet's state dict from a checkpoint: {name inside the UNet: tensor}, a new dict.

    With use_ema, the EMA copy of each weight when the checkpoint has EMA weights (keys "model_ema.*"
    other than the bookkeeping entries "model_ema.decay" and "model_ema.num_updates"), else the raw ones.
    """
    raise NotImplementedError


def lora_merge(weight: torch.Tensor, down: torch.Tensor, up: torch.Tensor, alpha, scale: float) -> torch.Tensor:
    """A layer's weight with a LoRA merged into it at strength `scale` (lesson 07's W + s (alpha / r) B A);
    returns a new tensor, weight itself unchanged.

    A linear layer: weight (out, in), down A (r, in), up B (out, r). A convolution: weight (out, in, kh, kw),
    down (r, in, kh, kw) (a 3x3 kernel for a 3x3 layer), up (out, r, 1, 1): the product then runs over
    the rank r, a kernel of the down matrix per output channel. r is the rank (down's first size);
    alpha a float, or None when the file gives none (then alpha = r).
    """
    raise NotImplementedError


def img2img_start(z0: torch.Tensor, noise: torch.Tensor, alphas_cumprod: torch.Tensor, timesteps: list,
                  strength: float):
    """Where an img2img run of a DDIM sampler starts: returns (first_step, z).

    z0 (B, zc, h, w): the image's clean latents; noise like z0; timesteps: the sampler's n timesteps,
    highest first (ints); 0 < strength <= 1, the fraction of the n steps that is run, rounded down to
    whole steps (strength 1 runs them all). first_step is the index in timesteps of the first step run
    (lesson 07's k), and z the latent that step starts from: z0 noised with `noise` to that step's
    timestep.
    """
    raise NotImplementedError


def inpaint_eps(eps_fn, z_t: torch.Tensor, t: torch.Tensor, z0: torch.Tensor, noise: torch.Tensor,
                mask: torch.Tensor, alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """One call of the inpainting denoiser (lesson 07, "Inpainting by latent blending"): the eps that a
    sampler at z_t should step with so that it paints inside the mask and keeps the original outside.

    eps_fn(z, t) -> eps: the model, called once, on the latent lesson 07 says the UNet sees. z_t, z0
    (the original's clean latents) and noise (the noise z0 was noised with): (B, zc, h, w); t: (B,) float
    tensor of integer timesteps; mask (B, 1, h, w), 1 = repaint, 0 = keep. Inside the mask return the
    model's eps; outside it, the eps whose predicted x0 is exactly z0.
    """
    raise NotImplementedError
