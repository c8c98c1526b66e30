"""LatentDiffusion: the composed model, and the one border between the VAE's latents and the diffusion model's."""
from __future__ import annotations

import math
import os

import torch
import torch.nn.functional as F
from torch import nn

from .. import convert, samplers
from ..clip_text import CLIPTextModel
from ..schedule import NoiseSchedule
from ..tokenizer import CLIPTokenizer
from ..unet import UNet
from ..vae import AutoencoderKL


def to_diffusion_latents(z: torch.Tensor, scale_factor: float) -> torch.Tensor:
    """VAE latents -> the diffusion model's latents, of about unit variance."""
    return z * scale_factor


def from_diffusion_latents(z: torch.Tensor, scale_factor: float) -> torch.Tensor:
    """The diffusion model's latents -> VAE latents, ready for the decoder."""
    return z / scale_factor


class LatentDiffusion(nn.Module):
    """Tokenizer + CLIP text encoder + UNet + VAE + noise schedule + latent scale factor.

    An image-variations model (lambdalabs/sd-image-variations-diffusers) has a CLIP image encoder
    (clip_vision.CLIPModel without its text tower) instead of the tokenizer and text encoder: its context
    is one token, the image's CLIP embedding, and its unconditional context that token's zeros. Given a
    full CLIP's text side (`load_text_clip`), that token can also be images and captions combined in CLIP's
    joint space (a joint_space.JointPrompt as image_prompt)."""

    def __init__(self, unet: UNet, vae: AutoencoderKL, text_encoder: CLIPTextModel | None,
                 tokenizer: CLIPTokenizer | None, schedule: NoiseSchedule | None = None,
                 scale_factor: float | None = None, *, image_encoder: nn.Module | None = None):
        super().__init__()
        if (text_encoder is None) == (image_encoder is None):
            raise ValueError("a LatentDiffusion needs a text encoder or an image encoder (image variations), one of them")
        self.unet = unet
        self.vae = vae
        self.text_encoder = text_encoder
        self.tokenizer = tokenizer
        self.image_encoder = image_encoder
        self.schedule = schedule if schedule is not None else NoiseSchedule.sd()
        self.scale_factor = float(scale_factor if scale_factor is not None else vae.cfg.scale_factor)
        self.vae_tile_size = None  # latent tile size for decoding large images piece by piece
        self.tiny_decoder = None   # a TAESD (minildm.taesd) that decodes in the VAE's place when loaded
        self.text_clip = None      # image variations: CLIP's text tower, for captions in a JointPrompt
        self.image_adapter = None  # a text-to-image model's ImageAdapter (minildm.image_adapter): photos as prompts
        self.text_clip_tokenizer = None

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
        if self.text_encoder is None:
            raise ValueError("this is an image-variations model: it reads an image prompt, not text")
        tokens = self.tokenizer(prompts).to(self.device)                  # (B, L)
        return self.text_encoder(tokens)                                  # (B, L, D)

    @property
    def is_image_variations_model(self) -> bool:
        """Whether the UNet is conditioned on a CLIP image embedding rather than on text."""
        return self.image_encoder is not None

    @torch.no_grad()
    def encode_image_prompt(self, images) -> torch.Tensor:
        """Image prompts (PIL images or uint8 (C, H, W) tensors: one, a list or a batch) -> context (B, 1, D_p):
        CLIP's preprocessing at its image size, then the image encoder's projected embedding as one token."""
        self._require_image_encoder()
        from ..clip_vision import preprocess  # torchvision's transforms, imported only when needed

        pixels = preprocess(images, self.image_encoder.vision_model.cfg.image_size)    # (B, 3, S, S)
        weight = self.image_encoder.visual_projection.weight
        return self.image_encoder.encode_image(pixels.to(weight.device, weight.dtype))[:, None]  # (B, 1, D_p)

    def load_text_clip(self, clip, tokenizer: CLIPTokenizer | None = None) -> None:
        """Give an image-variations model CLIP's text side, so that image prompts can hold captions
        (a JointPrompt, minildm.joint_space): a CLIPModel with its text tower, or a transformers CLIP folder
        with both towers (openai/clip-vit-large-patch14), loaded on the model's device in its dtype.

        From a folder only the text tower and its projection are kept: images go through the model's own
        image encoder (the same CLIP image tower in lambdalabs' folder), so the 300M-parameter copy is
        dropped. tokenizer None: CLIP's BPE at the text tower's number of positions."""
        if self.image_encoder is None:
            raise ValueError("a text-to-image model reads captions with its own text encoder; a CLIP for the "
                             "joint space goes with an image-variations model")
        from ..clip_vision import CLIPModel, load_clip
        from ..joint_space import FULL_CLIP

        where = "the CLIPModel given" if isinstance(clip, CLIPModel) else str(clip)
        if not isinstance(clip, CLIPModel):
            clip = load_clip(clip, device=self.device, dtype=self.dtype)
            if clip.text_model is not None:
                clip.vision_model = clip.visual_projection = None
        if clip.text_model is None:
            raise ValueError(f"{where} is a CLIP image encoder alone (no text tower); captions need {FULL_CLIP}")
        width, image_width = clip.text_projection.out_features, self.image_encoder.visual_projection.out_features
        if width != image_width:
            raise ValueError(f"{where} projects text to {width} wide but this model's image encoder projects "
                             f"images to {image_width}: not the same joint space (SD image variations uses "
                             "openai/clip-vit-large-patch14, 768 wide)")
        self.text_clip = clip
        self.text_clip_tokenizer = tokenizer or CLIPTokenizer.default(
            context_length=clip.text_model.cfg.context_length)

    @torch.no_grad()
    def encode_joint_prompt(self, recipe) -> torch.Tensor:
        """A JointPrompt (images with weights, captions to add and subtract) -> context (1, 1, D_p): the
        images through the image encoder, the captions through the text CLIP of `load_text_clip`, combined
        as unit vectors and given the images' length (joint_space.joint_embedding)."""
        self._require_image_encoder()
        from ..joint_space import joint_embedding

        return joint_embedding(recipe.images, recipe.image_weights, recipe.plus, recipe.minus, recipe.weight,
                               image_encoder=self.image_encoder, text_clip=self.text_clip,
                               tokenizer=self.text_clip_tokenizer, norm=recipe.norm)[:, None]   # (1, 1, D_p)

    def _require_image_encoder(self) -> None:
        if self.image_encoder is None:
            raise ValueError("this model reads text prompts: an image prompt needs an image-variations model "
                             "(a diffusers folder with image_encoder/, such as lambdalabs/sd-image-variations-diffusers) "
                             "or, for a model you trained, an image adapter (load_image_adapter; python -m "
                             "minildm.finetune image-prompt makes one)")

    def load_image_adapter(self, path, scale: float = 1.0) -> None:
        """Let this text-to-image model read photos as prompts, with the adapter in file `path` (written by
        python -m minildm.finetune image-prompt for this model): generate(image_prompt=...) then puts the
        photo's latents, from this model's own VAE, beside the text; `scale` weighs the image term (1 as
        trained). Without an image prompt the model is exactly as before."""
        if self.text_encoder is None:
            raise ValueError("an image adapter goes on a text-to-image model; this image-variations model reads "
                             "image prompts already")
        from ..image_adapter import load_image_adapter

        adapter = load_image_adapter(path, self.unet)
        if adapter.cfg.latent_channels != self.vae.cfg.z_channels:
            raise convert.CheckpointError(f"{path} reads {adapter.cfg.latent_channels}-channel latents; this model's "
                                          f"VAE makes {self.vae.cfg.z_channels}")
        adapter.scale = float(scale)
        self.image_adapter = adapter

    @torch.no_grad()
    def encode_photo_prompt(self, images) -> torch.Tensor:
        """Photos (PIL images or uint8 (C, H, W) tensors: one, a list or a batch) -> z_ref (B, zc, h, w): each
        resized and centre-cropped to the size the image adapter was trained at, then this model's VAE
        (the posterior mean, in the UNet's scale), as the adapter saw its prompts in training."""
        from ..image_adapter import photo_pixels

        size = self.image_adapter.cfg.latent_size * self.downsample_factor
        return self.encode_image(photo_pixels(images, size))

    def load_lora(self, path, scale: float = 1.0) -> int:
        """Merge a LoRA file (kohya or diffusers layout) into the UNet and text encoder weights, times
        `scale` (minildm.lora); returns the number of layers changed. Loading several adds them up."""
        from .. import lora

        return lora.merge_lora(self.unet, self.text_encoder, path, scale)

    def load_textual_inversion(self, path, token: str | None = None) -> str:
        """Teach prompts a new word from a textual-inversion file (diffusers or A1111 layout).

        The file's vectors become new rows of the text encoder's token table and `token` (default: the
        name the file gives, else the file name) a new tokenizer entry that stands for all of them, as
        diffusers' load_textual_inversion does. Returns the token to write in prompts.
        """
        if self.text_encoder is None:
            raise ValueError("this is an image-variations model: it has no text encoder to teach a word")
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

    def load_taesd(self, path) -> None:
        """Decode with the tiny autoencoder in folder `path` (minildm.taesd) instead of the VAE: a small
        fraction of the VAE decoder's time, with pictures close to but not the VAE's."""
        from ..taesd import load_taesd

        taesd = load_taesd(path, device=self.device, dtype=self.dtype)
        zc, f = self.vae.cfg.z_channels, self.downsample_factor
        if (taesd.cfg.latent_channels, taesd.cfg.downsample_factor) != (zc, f):
            raise convert.CheckpointError(
                f"{path} decodes {taesd.cfg.latent_channels}-channel latents at 1/{taesd.cfg.downsample_factor} "
                f"size (SD v1's); this model's VAE makes {zc}-channel latents at 1/{f}")
        self.tiny_decoder = taesd

    @torch.no_grad()
    def decode_latents(self, z: torch.Tensor) -> torch.Tensor:
        """Scaled latents z (B, zc, h, w) -> images x (B, 3, H, W) in [-1, 1] (clamped); by the tiny
        decoder when one is loaded (it reads the scaled latents as they are)."""
        if self.tiny_decoder is not None:
            dtype = next(self.tiny_decoder.parameters()).dtype
            return self.tiny_decoder.decode(z.to(self.device, dtype)).float().clamp(-1, 1)
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

    def _unet(self, z_t, t, context, **kw):
        """The UNet in its own dtype; the samplers keep z_t in float32."""
        return self.unet(z_t.to(self.dtype), t, context.to(self.dtype), **kw).float()

    @property
    def takes_guidance(self) -> bool:
        """Whether the UNet was distilled with the guidance scale as an input (an LCM): then one call per
        step gives the guided prediction and there is no negative prompt."""
        return self.unet.cfg.guidance_embed_dim is not None

    def _denoiser(self, model, context, uncond_context, guidance_scale, guidance_interval):
        """The eps_fn the sampler runs: classifier-free guidance, or for an LCM the scale as an input."""
        if self.takes_guidance:
            w = torch.full((context.shape[0],), float(guidance_scale), device=context.device)
            return lambda z_t, t: model(z_t, t, context, guidance=w)
        return samplers.cfg_denoiser(model, context, uncond_context, guidance_scale, guidance_interval)

    @torch.no_grad()
    def generate(self, prompt: str | list[str] = "", *, negative_prompt: str | list[str] = "", image_prompt=None,
                 num_images: int = 1, num_steps: int = 50, sampler: str = "ddim", guidance_scale: float = 7.5,
                 guidance_interval: tuple | None = None,
                 height: int | None = None, width: int | None = None, seed: int | None = None,
                 seeds: list[int] | None = None, generator: torch.Generator | None = None,
                 latents: torch.Tensor | None = None,
                 init_image: torch.Tensor | None = None, strength: float = 0.8, mask: torch.Tensor | None = None,
                 callback=None, output_type: str = "image", **sampler_options) -> torch.Tensor:
        """Text-to-image, image-to-image and inpainting with classifier-free guidance.

        prompt: one prompt or one per image; num_images images per prompt. negative_prompt: what the
        guidance steers away from ("" is the unconditional context); guidance_interval (t_lo, t_hi)
        guides only the steps at timesteps within it (samplers.cfg_denoiser; None: all). seed or generator pins the noise
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

        image_prompt (an image-variations model only, in place of prompt): one image or several (what
        `encode_image_prompt` reads), num_images variations of each; or a joint_space.JointPrompt, images
        and captions combined in CLIP's joint space ("this photo, but a cat"; captions need
        `load_text_clip` first); or image embeddings (n, D_p) as they are, float. The unconditional context
        is zeros, as the model was trained, so there is no negative prompt.
        """
        if sampler not in samplers.SAMPLERS:
            raise ValueError(f"unknown sampler {sampler!r}; choose one of {', '.join(samplers.SAMPLERS)}")
        if not 0.0 <= strength <= 1.0:
            raise ValueError(f"strength must be between 0 and 1, got {strength}")
        if mask is not None and init_image is None:
            raise ValueError("inpainting needs an init image to go with the mask")
        if seeds is not None:  # one stream per image: its noise and the noise the sampler adds to it
            generator = [torch.Generator().manual_seed(int(s)) for s in seeds]
            if isinstance(prompt, str) and image_prompt is None:  # one image prompt: below
                num_images = len(seeds)
        elif generator is None:  # a fresh generator, so the caller's global random state is left alone
            generator = torch.Generator()
            generator.manual_seed(seed) if seed is not None else generator.seed()
        if init_image is not None:
            height, width = init_image.shape[-2:]
        height, width = height or self.default_size, width or self.default_size
        self.check_size(height, width)

        adapter = None
        if image_prompt is not None and self.image_adapter is not None and not self.is_image_variations_model:
            adapter = self.image_adapter                                   # photos beside the text
            context, uncond_context = self._adapter_contexts(prompt, negative_prompt, image_prompt, num_images,
                                                             seeds)        # (B, N + L, D) each
        elif self.is_image_variations_model or image_prompt is not None:
            context = self._image_prompt_context(image_prompt, prompt, negative_prompt)  # (n, 1, D_p)
            if seeds is not None and len(context) == 1:
                num_images = len(seeds)
            context = context.repeat_interleave(num_images, dim=0)        # (B, 1, D_p)
            uncond_context = torch.zeros_like(context)                     # "no image", as the model was trained
        else:
            context, uncond_context = self._prompt_contexts(prompt, negative_prompt, num_images)  # (B, L, D) each
        B = len(context)
        if seeds is not None and len(seeds) != B:
            raise ValueError(f"{len(seeds)} seeds for {B} images")

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
        if adapter is not None:
            model = self._with_image_adapter(model, adapter)
        if from_noise:
            z = self.sample_from_noise(context, uncond_context, noise, sampler=sampler, num_steps=num_steps,
                                       guidance_scale=guidance_scale, guidance_interval=guidance_interval,
                                       generator=generator, callback=callback, model=model, **sampler_options)
        else:
            eps_fn = self._denoiser(model, context, uncond_context, guidance_scale, guidance_interval)
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

    def _prompt_contexts(self, prompt, negative_prompt, num_images):
        """(context, uncond_context) for text: num_images rows per prompt, and one negative prompt for
        every image or one per prompt."""
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        prompts = [p for p in prompts for _ in range(num_images)]
        negatives = [negative_prompt] if isinstance(negative_prompt, str) else list(negative_prompt)
        if len(negatives) == 1:  # one negative prompt for every image
            negatives = negatives * len(prompts)
        else:  # one per prompt
            negatives = [n for n in negatives for _ in range(num_images)]
        if len(negatives) != len(prompts):
            raise ValueError(f"{len(negatives) // max(1, num_images)} negative prompts for "
                             f"{len(prompts) // max(1, num_images)} prompts")
        return self.encode_prompt(prompts), self.encode_prompt(negatives)

    def _adapter_contexts(self, prompt, negative_prompt, image_prompt, num_images, seeds):
        """(context, uncond_context) for a text-to-image model with an image adapter, (B, N + L, D) each: the
        photos' image tokens in front of the text context; the unconditional rows have no image (zeros) and
        the negative prompt. One prompt goes with every photo and one photo with every prompt; with seeds
        and one of each, a sample per seed."""
        z_ref = self.encode_photo_prompt(image_prompt)                     # (n_photos, zc, h, w)
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        n = max(len(prompts), len(z_ref))
        if len(prompts) not in (1, n) or len(z_ref) not in (1, n):
            raise ValueError(f"{len(prompts)} prompts and {len(z_ref)} image prompts: give as many of each, or "
                             "one of either")
        if seeds is not None and n == 1:
            num_images = len(seeds)
        context, uncond_context = self._prompt_contexts(prompts * n if len(prompts) == 1 else prompts,
                                                        negative_prompt, num_images)   # (n * num_images, L, D)
        z_ref = z_ref.expand(n, -1, -1, -1).repeat_interleave(num_images, dim=0)
        return self.image_adapter.context(z_ref, context), self.image_adapter.context(None, uncond_context)

    def _with_image_adapter(self, model, adapter):
        """The UNet with the image adapter's hooks on while it runs (they come off after every call)."""
        def with_image(z_t, t, context, **kw):
            with adapter.attached(self.unet):
                return model(z_t, t, context, **kw)
        return with_image

    def _image_prompt_context(self, image_prompt, prompt, negative_prompt):
        """An image-variations model's context, one row per image prompt; text is refused, not ignored."""
        self._require_image_encoder()
        if image_prompt is None:
            raise ValueError("this is an image-variations model: give the image to vary as image_prompt")
        if prompt or negative_prompt:
            what = "a prompt" if prompt else "a negative prompt"
            raise ValueError(f"an image-variations model reads only the image prompt: it has no text encoder for "
                             f"{what} (its unconditional context is zeros; captions go into a "
                             "joint_space.JointPrompt, through CLIP's joint space)")
        from ..joint_space import JointPrompt

        if isinstance(image_prompt, JointPrompt):
            return self.encode_joint_prompt(image_prompt)                  # (1, 1, D_p)
        if isinstance(image_prompt, torch.Tensor) and image_prompt.is_floating_point():
            width = self.unet.cfg.context_dim
            if image_prompt.dim() != 2 or image_prompt.shape[1] != width:
                raise ValueError(f"image embeddings of shape {tuple(image_prompt.shape)}: this model reads "
                                 f"(n, {width}) (images are uint8 tensors or PIL images)")
            return image_prompt.to(self.device, torch.float32)[:, None]    # (n, 1, D_p)
        return self.encode_image_prompt(image_prompt)

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
        def model(z_t, t, context, **kw):
            repeats = z_t.shape[0] // extra.shape[0]
            return self._unet(torch.cat([z_t, extra.repeat(repeats, 1, 1, 1).to(z_t)], dim=1), t, context, **kw)
        return model

    @torch.no_grad()
    def sample_from_noise(self, context: torch.Tensor, uncond_context: torch.Tensor, noise: torch.Tensor, *,
                          sampler: str = "ddim", num_steps: int = 50, guidance_scale: float = 7.5,
                          guidance_interval: tuple | None = None, generator=None, callback=None, model=None,
                          **sampler_options) -> torch.Tensor:
        """The text-to-image loop on given contexts (B, L, D) and unit-variance noise (B, zc, h, w).

        Scales the noise to the sampler's start (samplers.init_noise_scale: the start diffusers uses)
        and runs the sampler with classifier-free guidance; returns the latents z_0. generator: the
        CPU generator (or one per image) that stochastic samplers draw from, after the noise;
        guidance_interval: the timesteps that are guided (None: all). model:
        the noise predictor (z_t, t, context) -> eps, the UNet by default.
        """
        eps_fn = self._denoiser(model or self._unet, context, uncond_context, guidance_scale, guidance_interval)
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
