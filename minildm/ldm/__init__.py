"""The composed latent diffusion model: text -> context, noise -> latents -> image.

Everything before this file is one part of Stable Diffusion; here they meet. The whole data flow of
text-to-image is `LatentDiffusion.generate`:

    prompt --tokenizer--> tokens --CLIP--> context          (and "" or a negative prompt -> uncond_context)
    z_T ~ N(0, I) --sampler(cfg_denoiser(UNet))--> z_0 --(/ scale_factor)--> VAE decoder --> x

img2img starts from an image instead: x --VAE encoder--> z_0 --(* scale_factor)--> noised to the level of
the step where `strength` says to start. SD image variations replaces the first line: image --CLIP image
encoder--> one-token context, zeros -> uncond_context (`encode_image_prompt`; with a full CLIP's text
tower, images and captions added and subtracted in CLIP's joint space, `encode_joint_prompt`). Inpainting also keeps, at
every step, the original latents (re-noised to the current level) outside the mask.

This is the only package that applies the latent scale factor (0.18215 for SD v1): the VAE works on
unscaled latents, the UNet and samplers on scaled ones, which have roughly unit variance. Training
(minildm/train/) crosses the same border through `to_diffusion_latents`.

Notation (code -> paper): x image in [-1, 1] (x in the paper), z latent z_0 = scale_factor * E(x),
z_t noisy latent, context tau_theta(y), guidance_scale w (classifier-free guidance), strength
(fraction of the sampler's steps that img2img runs), mask m (1 = repaint, 0 = keep).
Shapes: B batch, C=3 image channels, H/W pixels, zc latent channels, h/w = H/f, W/f latent size,
f the VAE's downsampling factor (8 for SD), L tokens (77), D context width (768 for SD v1).

In files: model.py (LatentDiffusion), loading.py (load_stable_diffusion).
"""
from .loading import find_latest_checkpoint, load_stable_diffusion  # noqa: F401
from .model import LatentDiffusion, from_diffusion_latents, to_diffusion_latents  # noqa: F401
