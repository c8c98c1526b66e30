"""The composed latent diffusion model: text -> context, noise -> latents -> image.

Everything before this file is one part of Stable Diffusion; here they meet. The whole data flow of
text-to-image is `LatentDiffusion.generate`:

    prompt --tokenizer--> tokens --CLIP--> context          (and "" or a negative prompt -> uncond_context)
    z_T ~ N(0, I) --sampler(cfg_denoiser(UNet))--> z_0 --(/ scale_factor)--> VAE decoder --> x

img2img starts from an image instead: x --VAE encoder--> z_0 --(* scale_factor)--> noised to the level of
the step where `strength` says to start. Inpainting also keeps, at every step, the original latents
(re-noised to the current level) outside the mask.

This is the only module that applies the latent scale factor (0.18215 for SD v1): the VAE works on
unscaled latents, the UNet and samplers on scaled ones, which have roughly unit variance. Training
(minildm/train/) crosses the same border through `to_diffusion_latents`.

Notation (code -> paper): x image in [-1, 1] (x in the paper), z latent z_0 = scale_factor * E(x),
z_t noisy latent, context tau_theta(y), guidance_scale w (classifier-free guidance), strength
(fraction of the sampler's steps that img2img runs), mask m (1 = repaint, 0 = keep).
Shapes: B batch, C=3 image channels, H/W pixels, zc latent channels, h/w = H/f, W/f latent size,
f the VAE's downsampling factor (8 for SD), L tokens (77), D context width (768 for SD v1).
"""

from __future__ import annotations

import dataclasses
import glob
import math
import os
import warnings

import torch
import torch.nn.functional as F
from torch import nn

from . import convert, samplers
from .clip_text import CLIPTextConfig, CLIPTextModel
from .schedule import NoiseSchedule
from .tokenizer import CLIPTokenizer
from .unet import UNet, UNetConfig
from .vae import AutoencoderKL, VAEConfig


def to_diffusion_latents(z: torch.Tensor, scale_factor: float) -> torch.Tensor:
    """VAE latents -> the diffusion model's latents, of about unit variance."""
    return z * scale_factor


def from_diffusion_latents(z: torch.Tensor, scale_factor: float) -> torch.Tensor:
    """The diffusion model's latents -> VAE latents, ready for the decoder."""
    return z / scale_factor


class LatentDiffusion(nn.Module):
    """Tokenizer + CLIP text encoder + UNet + VAE + noise schedule + latent scale factor."""

    def __init__(self, unet: UNet, vae: AutoencoderKL, text_encoder: CLIPTextModel, tokenizer: CLIPTokenizer,
                 schedule: NoiseSchedule | None = None, scale_factor: float | None = None):
        super().__init__()
        self.unet = unet
        self.vae = vae
        self.text_encoder = text_encoder
        self.tokenizer = tokenizer
        self.schedule = schedule if schedule is not None else NoiseSchedule.sd()
        self.scale_factor = float(scale_factor if scale_factor is not None else vae.cfg.scale_factor)
        self.vae_tile_size = None  # latent tile size for decoding large images piece by piece

    # ----- devices and memory options -------------------------------------------------------------

    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.unet.parameters()).dtype

    @property
    def downsample_factor(self) -> int:
        """Pixels per latent pixel (8 for SD)."""
        return self.vae.cfg.downsample_factor

    @property
    def size_multiple(self) -> int:
        """Height and width must divide by this: the VAE's factor times the UNet's own downsampling."""
        return self.vae.cfg.downsample_factor * self.unet.cfg.downsample_factor

    @property
    def default_size(self) -> int:
        """The image size the model was trained at: 512 for SD v1, 32 for the small presets."""
        return 512 if self.unet.cfg.model_channels >= 320 else 32

    def set_attention_slicing(self, slice_size: int | None) -> None:
        """Attend `slice_size` query positions at a time in the UNet (less memory, same result)."""
        self.unet.set_attention_slicing(slice_size)

    def set_vae_tiling(self, tile_size: int | None) -> None:
        """Decode latents in overlapping tiles of `tile_size` latent pixels (None: all at once)."""
        self.vae_tile_size = tile_size

    # ----- the three encoders/decoders ------------------------------------------------------------

    @torch.no_grad()
    def encode_prompt(self, prompts: str | list[str]) -> torch.Tensor:
        """Prompts -> context (B, L, D): tokens, then the CLIP text transformer."""
        tokens = self.tokenizer(prompts).to(self.device)                  # (B, L)
        return self.text_encoder(tokens)                                  # (B, L, D)

    def load_lora(self, path, scale: float = 1.0) -> int:
        """Merge a LoRA file (kohya or diffusers layout) into the UNet and text encoder weights, times
        `scale` (minildm.lora); returns the number of layers changed. Loading several adds them up."""
        from . import lora

        return lora.merge_lora(self.unet, self.text_encoder, path, scale)

    def load_textual_inversion(self, path, token: str | None = None) -> str:
        """Teach prompts a new word from a textual-inversion file (diffusers or A1111 layout).

        The file's vectors become new rows of the text encoder's token table and `token` (default: the
        name the file gives, else the file name) a new tokenizer entry that stands for all of them, as
        diffusers' load_textual_inversion does. Returns the token to write in prompts.
        """
        file_token, vectors = convert.read_textual_inversion(path)
        token = token or file_token or os.path.splitext(os.path.basename(str(path)))[0]
        width = self.text_encoder.cfg.width
        if vectors.shape[1] != width:
            hint = " (SD 2.x's OpenCLIP encoder is 1024 wide)" if vectors.shape[1] == 1024 else ""
            raise convert.CheckpointError(f"{path} holds {vectors.shape[1]}-wide vectors{hint}; this model's text "
                                          f"encoder is {width} wide")
        if self.tokenizer.vocab_size != self.text_encoder.embeddings.token_embedding.num_embeddings:
            raise ValueError(f"the tokenizer has {self.tokenizer.vocab_size} entries and the text encoder's table "
                             f"{self.text_encoder.embeddings.token_embedding.num_embeddings}: they must agree")
        ids = self.tokenizer.add_tokens(token, len(vectors))
        assert self.text_encoder.add_token_vectors(vectors) == ids
        return token

    @torch.no_grad()
    def encode_image(self, x: torch.Tensor, generator: torch.Generator | None = None,
                     sample: bool = False) -> torch.Tensor:
        """x (B, 3, H, W) in [-1, 1] -> scaled latents z (B, zc, h, w): the posterior mean, or with
        `sample` a sample from it (its noise drawn on the CPU from `generator`, like every seed here)."""
        posterior = self.vae.encode(x.to(self.device, self.vae_dtype))
        z = posterior.mode()
        if sample:
            eps = samplers.noise_like(torch.empty(z.shape), generator)
            z = z + posterior.std * eps.to(z)
        return to_diffusion_latents(z.float(), self.scale_factor)

    @torch.no_grad()
    def decode_latents(self, z: torch.Tensor) -> torch.Tensor:
        """Scaled latents z (B, zc, h, w) -> images x (B, 3, H, W) in [-1, 1] (clamped)."""
        z = from_diffusion_latents(z, self.scale_factor).to(self.device, self.vae_dtype)
        if self.vae_tile_size is not None and max(z.shape[-2:]) > self.vae_tile_size:
            x = self._decode_tiled(z, self.vae_tile_size)
        else:
            x = self.vae.decode(z)
        return x.float().clamp(-1, 1)

    @property
    def vae_dtype(self) -> torch.dtype:
        return next(self.vae.parameters()).dtype

    def _decode_tiled(self, z, tile):
        """Decode overlapping latent tiles and blend them with linear ramps, so no seam shows."""
        f, overlap = self.downsample_factor, max(tile // 4, 1)
        B, _, h, w = z.shape
        out = torch.zeros(B, self.vae.cfg.in_channels, h * f, w * f, device=z.device)
        weight = torch.zeros(1, 1, h * f, w * f, device=z.device)
        stride = tile - overlap
        for top in range(0, max(h - overlap, 1), stride):
            for left in range(0, max(w - overlap, 1), stride):
                top_, left_ = min(top, max(h - tile, 0)), min(left, max(w - tile, 0))
                piece = self.vae.decode(z[:, :, top_:top_ + tile, left_:left_ + tile]).float()
                ph, pw = piece.shape[-2:]
                ramp_h = _ramp(ph, overlap * f, top_ > 0, top_ + tile < h, z.device)
                ramp_w = _ramp(pw, overlap * f, left_ > 0, left_ + tile < w, z.device)
                mask = ramp_h[:, None] * ramp_w[None, :]
                out[:, :, top_ * f:top_ * f + ph, left_ * f:left_ * f + pw] += piece * mask
                weight[:, :, top_ * f:top_ * f + ph, left_ * f:left_ * f + pw] += mask
        return out / weight

    # ----- sampling -------------------------------------------------------------------------------

    def _unet(self, z_t, t, context):
        """The UNet in its own dtype; the samplers keep z_t in float32."""
        return self.unet(z_t.to(self.dtype), t, context.to(self.dtype)).float()

    @torch.no_grad()
    def generate(self, prompt: str | list[str] = "", *, negative_prompt: str | list[str] = "",
                 num_images: int = 1, num_steps: int = 50, sampler: str = "ddim", guidance_scale: float = 7.5,
                 height: int | None = None, width: int | None = None, seed: int | None = None,
                 seeds: list[int] | None = None, generator: torch.Generator | None = None,
                 latents: torch.Tensor | None = None,
                 init_image: torch.Tensor | None = None, strength: float = 0.8, mask: torch.Tensor | None = None,
                 callback=None, output_type: str = "image", **sampler_options) -> torch.Tensor:
        """Text-to-image, image-to-image and inpainting with classifier-free guidance.

        prompt: one prompt or one per image; num_images images per prompt. negative_prompt: what the
        guidance steers away from ("" is the unconditional context). seed or generator pins the noise
        (drawn on the CPU, so a seed gives the same image on any device); latents (B, zc, h, w) gives
        it explicitly. seeds: one seed per image instead (a single prompt is repeated for each), so
        image i of a batch is the image that `seed=seeds[i]` alone gives. init_image (1 or B, 3, H, W) in
        [-1, 1]: img2img from a sample of its VAE posterior (the generator's first draw, as in the original
        script and diffusers), running the last `strength` fraction of the sampler's steps (0 returns the
        reconstruction of the posterior mean). mask (1 or B, 1,
        H, W), 1 = repaint, 0 = keep: inpainting of init_image. callback(info) is called every step
        with the sampler's dict (z_t, x0_pred, ...); `self.decode_latents(info["x0_pred"])` turns the
        prediction into a picture. Returns images (B, 3, H, W) in [0, 1], or the latents z_0 with
        output_type="latent".
        """
        if sampler not in samplers.SAMPLERS:
            raise ValueError(f"unknown sampler {sampler!r}; choose one of {', '.join(samplers.SAMPLERS)}")
        if not 0.0 <= strength <= 1.0:
            raise ValueError(f"strength must be between 0 and 1, got {strength}")
        if mask is not None and init_image is None:
            raise ValueError("inpainting needs an init image to go with the mask")
        if seeds is not None:  # one stream per image: its noise and the noise the sampler adds to it
            generator = [torch.Generator().manual_seed(int(s)) for s in seeds]
            if isinstance(prompt, str):
                num_images = len(seeds)
        elif generator is None:  # a fresh generator, so the caller's global random state is left alone
            generator = torch.Generator()
            generator.manual_seed(seed) if seed is not None else generator.seed()
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        prompts = [p for p in prompts for _ in range(num_images)]
        if seeds is not None and len(seeds) != len(prompts):
            raise ValueError(f"{len(seeds)} seeds for {len(prompts)} images")
        negatives = [negative_prompt] if isinstance(negative_prompt, str) else list(negative_prompt)
        if len(negatives) == 1:  # one negative prompt for every image
            negatives = negatives * len(prompts)
        else:  # one per prompt
            negatives = [n for n in negatives for _ in range(num_images)]
        if len(negatives) != len(prompts):
            raise ValueError(f"{len(negatives) // max(1, num_images)} negative prompts for "
                             f"{len(prompts) // max(1, num_images)} prompts")
        B = len(prompts)
        if init_image is not None:
            height, width = init_image.shape[-2:]
        height, width = height or self.default_size, width or self.default_size
        self.check_size(height, width)

        context = self.encode_prompt(prompts)                              # (B, L, D)
        uncond_context = self.encode_prompt(negatives)                     # (B, L, D)

        if self.is_inpainting_model and (init_image is None or mask is None):
            raise ValueError("this is an inpainting model (its UNet reads a mask and a masked image): "
                             "it needs an init image and a mask")
        f = self.downsample_factor
        shape = (B, self.vae.cfg.z_channels, height // f, width // f)
        first_step = num_steps - int(num_steps * strength) if init_image is not None else 0
        if init_image is not None and first_step >= num_steps:  # strength 0: nothing to denoise
            z0 = self.encode_image(init_image).expand(B, -1, -1, -1)
            return z0 if output_type == "latent" else self.to_unit(self.decode_latents(z0))
        from_noise = init_image is None or (self.is_inpainting_model and first_step == 0)
        if not from_noise:  # a sample of the VAE posterior, drawn before the noise (as the original)
            z0 = self._encode_init_image(init_image, B, generator)        # (B, zc, h, w)
        noise = latents if latents is not None else samplers.noise_like(torch.empty(shape), generator)
        noise = noise.to(self.device, torch.float32)
        model = self._unet
        if self.is_inpainting_model:  # the mask and the masked image's latents ride along as 5 channels
            model = self._with_inpainting_channels(self._inpainting_channels(init_image, mask, B, generator))
        if from_noise:
            z = self.sample_from_noise(context, uncond_context, noise, sampler=sampler, num_steps=num_steps,
                                       guidance_scale=guidance_scale, generator=generator, callback=callback,
                                       model=model, **sampler_options)
        else:
            eps_fn = samplers.cfg_denoiser(model, context, uncond_context, guidance_scale)
            a = samplers.noise_level(sampler, self.schedule, num_steps, first_step, **sampler_options)
            z = math.sqrt(a) * z0 + math.sqrt(1 - a) * noise               # q_sample at abar = a
            blend = mask is not None and not self.is_inpainting_model
            if blend:
                m = self.latent_mask(mask, B)
                eps_fn = self._inpainting(eps_fn, z0, noise, m)
            z = self._run_sampler(sampler, eps_fn, z, num_steps, first_step, generator, callback, sampler_options)
            if blend:
                z = m * z + (1 - m) * z0
        if output_type == "latent":
            return z
        return self.to_unit(self.decode_latents(z))

    def _encode_init_image(self, init_image: torch.Tensor, batch: int, generator) -> torch.Tensor:
        """img2img's clean latents: one posterior sample per image, from its own generator when there are several."""
        if isinstance(generator, list):
            images = init_image.expand(batch, -1, -1, -1) if init_image.shape[0] == 1 else init_image
            return torch.cat([self.encode_image(images[i:i + 1], g, sample=True) for i, g in enumerate(generator)])
        return self.encode_image(init_image, generator, sample=True).expand(batch, -1, -1, -1)

    @property
    def is_inpainting_model(self) -> bool:
        """Whether the UNet reads z_t, a mask and the masked image's latents (SD's 9-channel inpainting model)."""
        return self.unet.cfg.in_channels == 2 * self.vae.cfg.z_channels + 1

    def _inpainting_channels(self, init_image, mask, batch: int, generator) -> torch.Tensor:
        """The inpainting model's extra input (B, 1 + zc, h, w): the mask (1 = repaint) at latent size, and
        the latents of the image with the masked part set to 0 (a posterior sample, drawn after the noise)."""
        m = (mask.float() >= 0.5).float().to(self.device)                  # binarised, like diffusers
        masked = init_image.to(self.device, torch.float32) * (m < 0.5)
        h, w = init_image.shape[-2] // self.downsample_factor, init_image.shape[-1] // self.downsample_factor
        m = F.interpolate(m, size=(h, w))                                  # nearest, as the original
        masked_latents = self._encode_init_image(masked, batch, generator)
        return torch.cat([m.expand(batch, -1, -1, -1), masked_latents], dim=1)

    def _with_inpainting_channels(self, extra: torch.Tensor):
        """The UNet with `extra` (B, 1 + zc, h, w) appended to every z_t (repeated for guidance's 2B rows)."""
        def model(z_t, t, context):
            repeats = z_t.shape[0] // extra.shape[0]
            return self._unet(torch.cat([z_t, extra.repeat(repeats, 1, 1, 1).to(z_t)], dim=1), t, context)
        return model

    @torch.no_grad()
    def sample_from_noise(self, context: torch.Tensor, uncond_context: torch.Tensor, noise: torch.Tensor, *,
                          sampler: str = "ddim", num_steps: int = 50, guidance_scale: float = 7.5,
                          generator=None, callback=None, model=None, **sampler_options) -> torch.Tensor:
        """The text-to-image loop on given contexts (B, L, D) and unit-variance noise (B, zc, h, w).

        Scales the noise to the sampler's start (samplers.init_noise_scale: the start diffusers uses)
        and runs the sampler with classifier-free guidance; returns the latents z_0. generator: the
        CPU generator (or one per image) that stochastic samplers draw from, after the noise. model:
        the noise predictor (z_t, t, context) -> eps, the UNet by default.
        """
        eps_fn = samplers.cfg_denoiser(model or self._unet, context, uncond_context, guidance_scale)
        scale = samplers.init_noise_scale(sampler, self.schedule, num_steps, **sampler_options)
        z = noise.to(self.device, torch.float32) * scale
        return self._run_sampler(sampler, eps_fn, z, num_steps, 0, generator, callback, sampler_options)

    def _run_sampler(self, sampler, eps_fn, z, num_steps, first_step, generator, callback, options):
        if self.device.type != "cpu":  # noise added by ancestral samplers, drawn where the latents are
            generator = ([self._device_generator(g) for g in generator] if isinstance(generator, list)
                         else self._device_generator(generator))
        return samplers.SAMPLERS[sampler](eps_fn, z, self.schedule, num_steps, first_step=first_step,
                                          generator=generator, callback=callback, **options)

    def _device_generator(self, generator: torch.Generator) -> torch.Generator:
        """A generator on the model's device, seeded from a CPU one (the same stream for a given seed)."""
        if generator.device.type != "cpu":
            return generator
        return torch.Generator(self.device).manual_seed(int(torch.randint(2**62, (1,), generator=generator)))

    def _inpainting(self, eps_fn, z0, noise, m):
        """Wrap eps_fn so that outside the mask the sampler follows the original latents.

        The UNet sees the sampler's z_t inside the mask and the original re-noised to the current level
        outside it; outside the mask the returned eps is the one that makes x0_pred exactly z0, so every
        sampler steps the kept region along the original image's own noising path.
        """
        def inpaint_eps(z_t, t):
            abar = 1.0 / (1.0 + self.schedule.t_to_sigma(t.float().cpu()) ** 2)
            abar = abar.to(z_t.device).view(-1, 1, 1, 1)
            kept = abar.sqrt() * z0 + (1 - abar).sqrt() * noise             # q_sample(z0, t, noise)
            eps_pred = eps_fn(m * z_t + (1 - m) * kept, t)
            eps_kept = (z_t - abar.sqrt() * z0) / (1 - abar).sqrt()
            return m * eps_pred + (1 - m) * eps_kept

        return inpaint_eps

    def latent_mask(self, mask: torch.Tensor, batch: int) -> torch.Tensor:
        """A pixel mask (1 or B, 1, H, W) -> latent mask (B, 1, h, w); a latent pixel is repainted if any
        of its f x f pixels is."""
        m = (mask.float() > 0.5).float().to(self.device)
        m = F.max_pool2d(m, self.downsample_factor)                        # (B, 1, h, w)
        return m.expand(batch, -1, -1, -1)

    def check_size(self, height: int, width: int) -> None:
        """Raise a ValueError unless the model can generate images of height x width."""
        if height % 8 or width % 8 or height <= 0 or width <= 0:
            raise ValueError(f"height and width must be positive multiples of 8, got {height}x{width}")
        m = self.size_multiple
        if height % m or width % m:
            raise ValueError(f"this model needs height and width divisible by {m}, got {height}x{width}")

    @staticmethod
    def to_unit(x: torch.Tensor) -> torch.Tensor:
        """Images in [-1, 1] -> [0, 1]."""
        return ((x + 1) / 2).clamp(0, 1)


def _ramp(n, overlap, fade_in, fade_out, device):
    """Blend weights along one side of a tile: linear ramps over `overlap` pixels at shared edges."""
    w = torch.ones(n, device=device)
    k = min(overlap, n)
    ramp = torch.linspace(1.0 / (k + 1), 1.0 - 1.0 / (k + 1), k, device=device)
    if fade_in:
        w[:k] = torch.minimum(w[:k], ramp)
    if fade_out:
        w[n - k:] = torch.minimum(w[n - k:], ramp.flip(0))
    return w


# ----------------------------------------------------------------------------------------------------
# Loading


def _build(name, cls, cfg, state, dtype, device):
    """A model with no memory behind its parameters, then the checkpoint's tensors assigned into it."""
    with convert.empty_parameters():
        model = cls(cfg)
    return convert.load_module(name, model, state, dtype=dtype, device=device).eval()


def _check_schedule(schedule, buffers):
    """Warn when the file's alphas_cumprod disagrees with the schedule we sample with."""
    stored = buffers.get("alphas_cumprod")
    if stored is not None and stored.shape == schedule.alphas_cumprod.shape:
        diff = (stored.float() - schedule.alphas_cumprod).abs().max().item()
        if diff > max(1e-5, 2 * torch.finfo(stored.dtype).eps):  # float16 files round it
            warnings.warn(f"the checkpoint's alphas_cumprod differ from the schedule by up to {diff:.2g}; "
                          "sampling uses the standard SD v1 schedule", stacklevel=3)


def load_stable_diffusion(path, device="cpu", dtype=torch.float32, use_ema: bool = True, *,
                          unet_config: UNetConfig | None = None, vae_config: VAEConfig | None = None,
                          text_config: CLIPTextConfig | None = None,
                          tokenizer: CLIPTokenizer | None = None, config=None) -> LatentDiffusion:
    """A LatentDiffusion from SD v1 weights or a minildm checkpoint.

    path: an original `.safetensors`/`.ckpt` (CompVis layout, EMA weights used when present and
    `use_ema`), a diffusers folder (unet/ vae/ text_encoder/ tokenizer/ with their config.json), or a
    checkpoint written by `minildm.convert.save_checkpoint` (configs read from its metadata). An original
    file's sizes are read from its tensors' shapes; what shapes cannot tell (the UNet's head count, the
    latent scale factor) is SD v1's for a model of SD v1's size, else it comes from `config`, the
    original inference YAML the model was trained with (which must agree with the weights), or from
    explicit configs. dtype: float32, or float16 on CUDA.
    Raises convert.CheckpointError when the file cannot be used, saying what it seems to be.
    """
    try:
        return _load_stable_diffusion(os.fspath(path), device, dtype, use_ema, unet_config, vae_config, text_config,
                                      tokenizer, config)
    except convert.CheckpointError:
        raise
    except torch.cuda.OutOfMemoryError:
        raise
    except (KeyError, TypeError, ValueError, AttributeError, IndexError, RuntimeError, OSError, EOFError) as e:
        # A file damaged in a way no earlier check names: a config entry of the wrong type, a tensor
        # of an impossible shape. Say so in one line rather than with the traceback of where it broke.
        raise convert.CheckpointError(f"{os.fspath(path)} is damaged or not a checkpoint minildm can load "
                                      f"({type(e).__name__}: {convert.first_line(e)})") from None


def _load_stable_diffusion(path, device, dtype, use_ema, unet_config, vae_config, text_config, tokenizer, config):
    device = torch.device(device)
    schedule = None
    if os.path.isdir(path):
        ckpt, configs = convert.read_diffusers_folder(path)
        unet_config, vae_config, text_config = configs["unet"], configs["vae"], configs["text_encoder"]
        sched = configs["schedule"] or {}
        if sched.get("beta_schedule", "scaled_linear") == "scaled_linear":
            schedule = NoiseSchedule.scaled_linear(sched.get("num_train_timesteps", 1000),
                                                   sched.get("beta_start", 0.00085), sched.get("beta_end", 0.012))
        elif sched.get("beta_schedule") == "linear":
            schedule = NoiseSchedule.linear(sched.get("num_train_timesteps", 1000),
                                            sched.get("beta_start", 0.0001), sched.get("beta_end", 0.02))
        scale_factor = configs["scale_factor"]
        if tokenizer is None and configs["tokenizer"]:
            tokenizer = _tokenizer_from_folder(configs["tokenizer"])
    else:
        ckpt = convert.read_checkpoint(path)
        meta = ckpt.meta or {}
        if ckpt.kind == "vae" or ckpt.unet is None:
            raise convert.CheckpointError(f"{path} is {convert.describe('vae')}")
        if ckpt.text_encoder is None:
            raise convert.CheckpointError(f"{path} has no text encoder weights "
                                          "(cond_stage_model.transformer.*), so prompts cannot be encoded")
        no_vae = f"{path} has no VAE weights (first_stage_model.*) to decode latents"
        if ckpt.vae is None:
            raise convert.CheckpointError(no_vae)
        if meta:
            unet_config = unet_config or UNetConfig.from_dict(meta["unet"])
            vae_config = vae_config or (VAEConfig.from_dict(meta["vae"]) if meta.get("vae") else None)
            text_config = text_config or CLIPTextConfig.from_dict(meta["text_encoder"])
            if meta.get("schedule"):
                schedule = NoiseSchedule.from_dict(meta["schedule"])
            scale_factor = meta.get("scale_factor")
            if meta.get("prediction", "eps") != "eps":
                raise convert.CheckpointError(f"{path} predicts {meta['prediction']}; only eps is supported")
        else:
            unet_config, vae_config, text_config, scale_factor, schedule = _original_configs(
                path, ckpt, use_ema, config, unet_config, vae_config, text_config)
        if vae_config is None:  # a minildm file saved without its VAE's config
            raise convert.CheckpointError(no_vae)
        schedule = schedule or NoiseSchedule.sd()
        _check_schedule(schedule, ckpt.buffers)

    unet = _build("UNet", UNet, unet_config, ckpt.unet_state(use_ema), dtype, device)
    vae = _build("VAE", AutoencoderKL, vae_config, ckpt.vae, dtype, device)
    text_encoder = _build("text encoder", CLIPTextModel, text_config, ckpt.text_encoder_state(use_ema), dtype, device)
    if tokenizer is None:
        tokenizer = CLIPTokenizer.default(context_length=text_config.context_length)
    if scale_factor is None:
        scale_factor = vae_config.scale_factor
    return LatentDiffusion(unet, vae, text_encoder, tokenizer, schedule, scale_factor)


def _original_configs(path, ckpt, use_ema, config, unet_config, vae_config, text_config):
    """(unet, vae, text configs, scale factor, schedule) of an original-layout file without minildm's
    metadata: its tensors' shapes, SD v1's values for what shapes cannot tell when it has SD v1's size,
    else the inference YAML `config`; explicit configs win. A disagreement is a one-line error."""
    try:
        shapes = {"UNet": convert.unet_shapes(ckpt.unet_state(use_ema)), "VAE": convert.vae_shapes(ckpt.vae),
                  "text": convert.text_shapes(ckpt.text_encoder_state(use_ema))}
    except (KeyError, IndexError, ValueError, AttributeError):  # tensors missing: let strict loading name them
        return (unet_config or UNetConfig.sd15(), vae_config or VAEConfig.sd(),
                text_config or CLIPTextConfig.vit_l14(), None, None)
    yaml = convert.read_inference_yaml(config) if config else None
    if yaml:
        convert.check_against_yaml("UNet", shapes["UNet"], yaml["unet"], path, config)
        convert.check_against_yaml("VAE", shapes["VAE"], yaml["vae"], path, config)
    sd_unet, sd_vae, sd_text = UNetConfig.sd15(), VAEConfig.sd(), CLIPTextConfig.vit_l14()
    if unet_config is None:
        fields = {k: v for k, v in shapes["UNet"].items() if v is not None}
        sd_like = dataclasses.replace(sd_unet, in_channels=fields["in_channels"])  # 9: the inpainting model
        if yaml:
            unet_config = UNetConfig(**fields, num_heads=yaml["unet"]["num_heads"])
        elif dataclasses.replace(sd_like, **fields) == sd_like:
            unet_config = sd_like                                          # SD v1's sizes: its 8 heads
        else:
            raise convert.CheckpointError(
                f"{path} holds a UNet of another size than SD v1's (width {fields['model_channels']}, levels "
                f"{fields['channel_mult']}); its number of attention heads cannot be read from the weights: give "
                "the inference YAML it was made with (--config FILE.yaml, or config= in load_stable_diffusion)")
    elif shapes["UNet"]["context_dim"] not in (None, unet_config.context_dim):
        raise convert.CheckpointError(f"{path}'s cross-attention reads {shapes['UNet']['context_dim']}-wide contexts, "
                                      f"the UNet config given says {unet_config.context_dim}")
    if text_config is None:
        text_sizes = {k: v for k, v in shapes["text"].items() if k != "num_heads"}
        text_config = sd_text if dataclasses.replace(sd_text, **text_sizes) == sd_text else CLIPTextConfig(**shapes["text"])
    if text_config.width != unet_config.context_dim:
        raise convert.CheckpointError(f"{path}'s text encoder is {text_config.width} wide but its UNet reads "
                                      f"{unet_config.context_dim}-wide contexts")
    scale_factor = None
    if vae_config is None:
        if yaml and yaml["scale_factor"] is not None:
            scale_factor = float(yaml["scale_factor"])
            vae_config = VAEConfig(**shapes["VAE"], scale_factor=scale_factor)
        elif dataclasses.replace(sd_vae, **shapes["VAE"]) == sd_vae:
            vae_config = sd_vae                                            # SD v1's VAE: its 0.18215
        else:
            raise convert.CheckpointError(
                f"{path} holds a VAE of another size than SD v1's, so its latent scale factor is unknown: give "
                "the inference YAML it was made with (--config FILE.yaml, or config= in load_stable_diffusion)")
    schedule = None
    if yaml and yaml["schedule"][1] is not None:
        schedule = NoiseSchedule.scaled_linear(*yaml["schedule"])          # the original's "linear" is in sqrt(beta)
    return unet_config, vae_config, text_config, scale_factor, schedule


def _tokenizer_from_folder(folder) -> CLIPTokenizer:
    """The tokenizer of a diffusers folder: vocab.json + merges.txt, or only the tokenizer.json that
    folders saved by transformers 5 contain."""
    import json

    if os.path.exists(os.path.join(folder, "vocab.json")) or not os.path.exists(os.path.join(folder, "tokenizer.json")):
        return CLIPTokenizer.from_folder(folder)
    with open(os.path.join(folder, "tokenizer.json"), encoding="utf-8") as f:
        bpe = json.load(f)["model"]
    merges = [tuple(m.split()) if isinstance(m, str) else tuple(m) for m in bpe["merges"]]
    pad = "<|endoftext|>"
    config_file = os.path.join(folder, "tokenizer_config.json")
    if os.path.exists(config_file):
        with open(config_file, encoding="utf-8") as f:
            pad = json.load(f).get("pad_token") or pad
        pad = pad["content"] if isinstance(pad, dict) else pad
    return CLIPTokenizer(merges, bpe["vocab"], pad_text=pad)


def find_latest_checkpoint(runs_dir="runs") -> str | None:
    """The newest runs/<name>/model.safetensors written by `python -m minildm.train`, or None."""
    found = glob.glob(os.path.join(os.fspath(runs_dir), "*", "model.safetensors"))
    return max(found, key=os.path.getmtime) if found else None
