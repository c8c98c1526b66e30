"""The pieces every view is made of: interpolation, images side by side, recording cross-attention,
and running a LatentDiffusion with the view's own hands on the loop."""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from .. import samplers


def slerp(a: torch.Tensor, b: torch.Tensor, t: float, dim=None, eps: float = 1e-7) -> torch.Tensor:
    """Spherical interpolation from `a` (t=0) to `b` (t=1) along the great circle between them.

    The angle is measured over the dimensions `dim` (all of them when None): pass dim=-1 to move each
    token vector of a context on its own sphere, None to treat a whole noise tensor as one vector.
    Gaussian noise lives near a sphere of radius sqrt(numel); a straight line between two noises cuts
    through the inside, where a sampler has never seen a latent. Nearly parallel inputs fall back to
    a straight line (the two paths agree there).
    """
    a32, b32 = a.double(), b.double()
    dims = tuple(range(a.dim())) if dim is None else dim
    dot = (a32 * b32).sum(dim=dims, keepdim=True)
    norms = (a32.pow(2).sum(dim=dims, keepdim=True) * b32.pow(2).sum(dim=dims, keepdim=True)).sqrt()
    cos = (dot / norms.clamp_min(eps)).clamp(-1.0, 1.0)
    theta = torch.acos(cos)
    sin = torch.sin(theta)
    parallel = sin.abs() < 1e-4
    safe_sin = torch.where(parallel, torch.ones_like(sin), sin)
    w_a = torch.where(parallel, torch.full_like(sin, 1.0 - t), torch.sin((1.0 - t) * theta) / safe_sin)
    w_b = torch.where(parallel, torch.full_like(sin, float(t)), torch.sin(t * theta) / safe_sin)
    return (w_a * a32 + w_b * b32).to(a.dtype)


def lerp(a: torch.Tensor, b: torch.Tensor, t: float) -> torch.Tensor:
    """Straight-line interpolation, for comparison with `slerp`."""
    return (1.0 - t) * a + t * b


def blend(tensors, weights) -> torch.Tensor:
    """Weighted average of tensors of one shape (weights are normalised to sum to one)."""
    weights = torch.as_tensor(weights, dtype=torch.float64)
    if weights.sum().abs() < 1e-12:
        raise ValueError("blend weights sum to zero")
    weights = weights / weights.sum()
    return sum(float(w) * x for w, x in zip(weights, tensors))


def to_hwc_uint8(x: torch.Tensor) -> np.ndarray:
    """Images in [-1, 1], (B, 3, H, W) or (3, H, W), as uint8 arrays (B, H, W, 3) or (H, W, 3)."""
    x = ((x.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    x = x.movedim(-3, -1)
    if x.shape[-1] == 1:
        x = x.expand(*x.shape[:-1], 3)
    return x.cpu().numpy()


def latent_to_image(z: torch.Tensor, size=None) -> torch.Tensor:
    """A latent or a noise (B, C, h, w) as a viewable image in [-1, 1]: the first three channels as RGB.

    Each image is divided by twice its standard deviation, so unit noise fills the colour range.
    `size` (H, W) enlarges it with nearest-neighbour pixels, to sit beside decoded images.
    """
    z = z.detach().float()
    if z.shape[1] >= 3:
        z = z[:, :3]
    else:
        z = z[:, :1].expand(-1, 3, -1, -1)
    std = z.flatten(1).std(dim=1).clamp_min(1e-8).view(-1, 1, 1, 1)
    x = (z / (2 * std)).clamp(-1, 1)
    if size is not None:
        x = F.interpolate(x, size=tuple(size), mode="nearest")
    return x


@torch.no_grad()
def decode_preview(ldm, z: torch.Tensor, max_latent_side: int = 32) -> np.ndarray:
    """A quick look at latents (B, C, h, w): the first one decoded (by TAESD when the model has it loaded)
    from a copy shrunk to at most `max_latent_side` latent pixels a side (256 px for SD), as uint8
    (H', W', 3). Shrinking first is what makes a live preview cheap: the decoder's cost grows with the
    area, and a preview does not need SD's full 512 px."""
    z = z[:1].float()
    h, w = z.shape[-2:]
    scale = min(1.0, max_latent_side / max(h, w))
    if scale < 1:
        z = F.interpolate(z, size=(max(1, round(h * scale)), max(1, round(w * scale))), mode="bilinear",
                          align_corners=False, antialias=True)
    return to_hwc_uint8(ldm.decode_latents(z.to(ldm.device)))[0]


def image_strip(images, gap: int = 2) -> np.ndarray:
    """uint8 images (H, W, 3) side by side with white gaps, as one uint8 array."""
    images = list(images)
    h = max(im.shape[0] for im in images)
    cols = []
    for i, im in enumerate(images):
        pad = np.full((h, im.shape[1], 3), 255, dtype=np.uint8)
        pad[: im.shape[0]] = im
        cols.append(pad)
        if i < len(images) - 1 and gap:
            cols.append(np.full((h, gap, 3), 255, dtype=np.uint8))
    return np.concatenate(cols, axis=1)


def image_grid(rows, gap: int = 2) -> np.ndarray:
    """A list of rows of uint8 images (H, W, 3) as one uint8 array."""
    strips = [image_strip(r, gap) for r in rows]
    width = max(s.shape[1] for s in strips)
    out = []
    for i, s in enumerate(strips):
        pad = np.full((s.shape[0], width, 3), 255, dtype=np.uint8)
        pad[:, : s.shape[1]] = s
        out.append(pad)
        if i < len(strips) - 1 and gap:
            out.append(np.full((gap, width, 3), 255, dtype=np.uint8))
    return np.concatenate(out, axis=0)


def show_image(ax, image, title: str = "", label: str = "", title_size: int = 8) -> None:
    """One panel of a figure: `image` (H, W, 3) without ticks, a title above and a label on the left."""
    ax.imshow(image)
    ax.set_xticks([])
    ax.set_yticks([])
    if title:
        ax.set_title(title, fontsize=title_size)
    if label:
        ax.set_ylabel(label, fontsize=8)


def save_gif(frames, path, duration_ms: int = 300, scale: int = 1) -> None:
    """uint8 frames (H, W, 3) as an animated GIF that loops forever (PIL)."""
    from PIL import Image

    pil = [Image.fromarray(f) for f in frames]
    if scale != 1:
        pil = [im.resize((im.width * scale, im.height * scale), Image.NEAREST) for im in pil]
    pil[0].save(path, save_all=True, append_images=pil[1:], duration=duration_ms, loop=0)


def layer_resolution(num_positions: int, latent_hw) -> tuple:
    """The (h, w) of a UNet level whose attention covers `num_positions` = h*w query positions.

    Levels halve both sides, so the level is found from the ratio of areas to the latent's.
    """
    h, w = latent_hw
    factor = math.sqrt(h * w / num_positions)
    hl, wl = round(h / factor), round(w / factor)
    if hl * wl != num_positions:
        raise ValueError(f"{num_positions} positions do not tile a {h}x{w} latent")
    return hl, wl


def aggregate_attention(records, latent_hw, size=None):
    """Cross-attention maps from recorded weights: per layer, and averaged over layers.

    records: {layer name: (sum of head-averaged weights (h*w, L), number of calls)} as collected by
    `CrossAttentionRecorder`. Returns (per_layer, average): per_layer maps each layer to (L, hl, wl)
    averaged over the calls (the sampling steps); average is (L, H, W) with every layer's maps
    bilinearly resized to `size` (default the latent size) and averaged with equal weight per layer.
    """
    per_layer = {}
    for name, (total, count) in records.items():
        hl, wl = layer_resolution(total.shape[0], latent_hw)
        per_layer[name] = (total / max(count, 1)).T.reshape(-1, hl, wl)  # (L, hl, wl)
    if not per_layer:
        raise ValueError("no cross-attention weights were recorded")
    size = tuple(size or latent_hw)
    resized = [F.interpolate(m[None].float(), size=size, mode="bilinear", align_corners=False)[0]
               for m in per_layer.values()]
    return per_layer, torch.stack(resized).mean(0)


# ----------------------------------------------------------------------------------------------
# Recording cross-attention through the UNet's `record` hook
# ----------------------------------------------------------------------------------------------

def cross_attention_modules(unet) -> dict:
    """The UNet's cross-attention modules by name: those with a `record` attribute named ...attn2."""
    if hasattr(unet, "cross_attention_modules"):
        return unet.cross_attention_modules()
    found = {name: m for name, m in unet.named_modules() if hasattr(m, "record")}
    cross = {name: m for name, m in found.items() if name.endswith("attn2")}
    return cross or found


class CrossAttentionRecorder:
    """Context manager that sums the UNet's cross-attention weights per layer while it is active.

    With classifier-free guidance the UNet sees [uncond, cond] on the batch axis; only the
    conditional half is kept when `num_images` says how many images there are. Weights are averaged
    over heads and images, then summed per layer; `records` holds {name: (sum (h*w, L), calls)}.
    """

    def __init__(self, unet, num_images: int | None = None):
        self.modules = cross_attention_modules(unet)
        if not self.modules:
            raise ValueError("this UNet has no cross-attention modules with a `record` hook")
        self.num_images = num_images
        self.records = {}

    def __call__(self, name, weights):
        w = weights.detach().float()  # (B, nh, h*w, L)
        if self.num_images is not None and w.shape[0] == 2 * self.num_images:
            w = w[self.num_images:]
        w = w.mean(dim=(0, 1))  # (h*w, L)
        total, count = self.records.get(name, (0.0, 0))
        self.records[name] = (total + w, count + 1)

    def __enter__(self):
        for m in self.modules.values():
            m.record = self
        return self

    def __exit__(self, *exc):
        for m in self.modules.values():
            m.record = None
        return False


# ----------------------------------------------------------------------------------------------
# Running a LatentDiffusion with the view's own hands on the loop
# ----------------------------------------------------------------------------------------------

def latent_shape(ldm, height=None, width=None) -> tuple:
    """(C, h, w) of the latents for an image of height x width pixels (default: the model's size)."""
    height, width = height or ldm.default_size, width or ldm.default_size
    ldm.check_size(height, width)
    f = ldm.downsample_factor
    return ldm.unet.cfg.in_channels, height // f, width // f


def make_noise(ldm, seeds, height=None, width=None) -> torch.Tensor:
    """One N(0, I) latent per seed, (len(seeds), C, h, w), drawn on the CPU as generate() does."""
    shape = (len(seeds), *latent_shape(ldm, height, width))
    generators = [torch.Generator().manual_seed(int(s)) for s in seeds]
    return samplers.noise_like(torch.empty(shape), generators).to(ldm.device, torch.float32)


@torch.no_grad()
def encode(ldm, prompts) -> torch.Tensor:
    """Contexts (N, L, D) for a list of prompts."""
    return ldm.encode_prompt(list(prompts))


@torch.no_grad()
def generate_from(ldm, context, noise, *, uncond_context=None, guidance_scale=7.5, sampler="ddim",
                  num_steps=20, seed=0, callback=None, decode=True, guidance_interval=None):
    """Sample from given contexts (N, L, D) and noises (N, C, h, w); returns images (N, 3, H, W).

    This is LatentDiffusion.generate() with its two inputs exposed, which is all conditioning
    arithmetic needs. Images come back in [-1, 1]. The generator that ancestral samplers draw from
    is seeded and advanced past the noise as generate() does, so one image with
    make_noise(ldm, [seed]) and the same seed matches generate(prompt, seed=seed) for every sampler.
    """
    n = noise.shape[0]
    if context.shape[0] != n:
        context = context.expand(n, -1, -1)
    if uncond_context is None:
        uncond_context = ldm.encode_prompt([""])
    uncond_context = uncond_context.to(context).expand(n, -1, -1)
    generator = torch.Generator().manual_seed(int(seed))
    torch.randn(noise.shape, generator=generator)  # generate() drew its noise from it first
    z0 = ldm.sample_from_noise(context, uncond_context, noise, sampler=sampler, num_steps=num_steps,
                               guidance_scale=guidance_scale, guidance_interval=guidance_interval,
                               generator=generator, callback=callback)
    return ldm.decode_latents(z0) if decode else z0
