"""Views that make the invisible visible: what a latent diffusion model does while it generates.

Every view works on any `LatentDiffusion` (ldm.py): a tiny random model in the tests, the model you
trained on CIFAR-10, or the real Stable Diffusion v1 weights. Each one runs the same data flow as
`LatentDiffusion.generate`, written out so the view can look inside it:

    prompt -> tokens -> CLIP -> context ─┐
    seed -> noise z_T ───────────────────┴─> sampler(cfg_denoiser(UNet)) -> z_0 -> z_0 / scale -> VAE decode

    denoising_filmstrip   per step: the noisy latent decoded, the predicted x0 decoded, the predicted
                          noise; one figure and an animated GIF (from the sampler callback)
    attention_maps_view   each prompt token's cross-attention over the image, per layer and averaged
                          over steps, overlaid on the generated image (the UNet's `record` hook)
    prompt_interpolation, seed_interpolation, prompt_blend, context_arithmetic
                          conditioning arithmetic on contexts and on noises, as image strips
    sampler_gallery       the same seed and prompt across samplers and step counts, with wall time

The small pure functions underneath (`slerp`, `aggregate_attention`, `image_strip`, ...) are the parts
worth reading first; the views only wire them to a model.

Shapes: B batch, C latent channels, h/w latent size, H/W pixel size, L tokens (77), D context width,
nh attention heads. Images are float tensors in [-1, 1] of shape (B, 3, H, W) until they are turned
into uint8 arrays (H, W, 3) for plotting.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from . import samplers


# ----------------------------------------------------------------------------------------------
# Pure helpers
# ----------------------------------------------------------------------------------------------

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


def to_uint8(x: torch.Tensor) -> np.ndarray:
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
    shape = latent_shape(ldm, height, width)
    out = [torch.randn(shape, generator=torch.Generator().manual_seed(int(s))) for s in seeds]
    return torch.stack(out).to(ldm.device, torch.float32)


@torch.no_grad()
def encode(ldm, prompts) -> torch.Tensor:
    """Contexts (N, L, D) for a list of prompts."""
    return ldm.encode_prompt(list(prompts))


@torch.no_grad()
def generate_from(ldm, context, noise, *, uncond_context=None, guidance_scale=7.5, sampler="ddim",
                  num_steps=20, seed=0, callback=None, decode=True):
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
                               guidance_scale=guidance_scale, generator=generator, callback=callback)
    return ldm.decode_latents(z0) if decode else z0


# ----------------------------------------------------------------------------------------------
# View 1: the denoising filmstrip
# ----------------------------------------------------------------------------------------------

@dataclass
class Filmstrip:
    """Per sampling step: the noisy latent decoded, the predicted x0 decoded, the predicted noise."""

    steps: list            # step indices shown
    timesteps: list        # t at each shown step
    noisy: list            # uint8 (H, W, 3) per shown step
    x0_pred: list
    eps_pred: list
    image: np.ndarray      # the final image, uint8 (H, W, 3)
    figure: object = None
    gif_path: str | None = None
    frames: list = field(default_factory=list)


@torch.no_grad()
def denoising_filmstrip(ldm, prompt: str, *, num_steps: int = 20, sampler: str = "ddim",
                        guidance_scale: float = 7.5, seed: int = 0, height=None, width=None,
                        max_columns: int = 8, every: int = 1, gif_path=None,
                        gif_scale: int = 1) -> Filmstrip:
    """Watch one image being denoised; returns a `Filmstrip` with a figure (and a GIF if asked).

    The sampler's callback hands over z_t, x0_pred and eps_pred at every step. The noisy latent is
    decoded as it is (the VAE has never seen noise, so early frames look like coloured static); the
    predicted x0 is the model's current guess of the final latent; the predicted noise is shown as
    colours. At most `max_columns` evenly spaced steps go into the figure; the GIF has every kept
    step. `every` keeps only every k-th step (and the last): decoding twice per step is the slow
    part with SD's VAE on a CPU.
    """
    noise = make_noise(ldm, [seed], height, width)
    caught = []

    def callback(info):
        if info["step"] % every == 0 or info["step"] == info["num_steps"] - 1:
            caught.append({k: info[k] for k in ("step", "t", "z_t", "x0_pred", "eps_pred")})

    context = encode(ldm, [prompt])
    x = generate_from(ldm, context, noise, guidance_scale=guidance_scale, sampler=sampler,
                      num_steps=num_steps, seed=seed, callback=callback)
    size = x.shape[-2:]
    noisy, x0s, epss, ts = [], [], [], []
    for c in caught:
        noisy.append(to_uint8(ldm.decode_latents(c["z_t"].float()[:1]))[0])
        x0s.append(to_uint8(ldm.decode_latents(c["x0_pred"].float()[:1]))[0])
        epss.append(to_uint8(latent_to_image(c["eps_pred"][:1], size))[0])
        t = c["t"]
        ts.append(float(t.flatten()[0]) if torch.is_tensor(t) else float(t))
    strip = Filmstrip(steps=[c["step"] for c in caught], timesteps=ts, noisy=noisy, x0_pred=x0s,
                      eps_pred=epss, image=to_uint8(x)[0])
    strip.frames = [image_strip([a, b, c]) for a, b, c in zip(noisy, x0s, epss)] + \
                   [image_strip([strip.image, strip.image, np.full_like(strip.image, 255)])]
    if gif_path is not None:
        save_gif(strip.frames, gif_path, scale=gif_scale)
        strip.gif_path = str(gif_path)
    strip.figure = plot_filmstrip(strip, title=f'"{prompt}" - {sampler}, {num_steps} steps, '
                                               f'guidance {guidance_scale}', max_columns=max_columns)
    return strip


def evenly_spaced(n: int, k: int) -> list:
    """k indices from 0 to n-1 inclusive, evenly spaced (all of them when k >= n)."""
    if k >= n:
        return list(range(n))
    return sorted({round(i * (n - 1) / (k - 1)) for i in range(k)}) if k > 1 else [n - 1]


def plot_filmstrip(strip: Filmstrip, title: str = "", max_columns: int = 8):
    """A 3-row figure: noisy latent decoded / predicted x0 decoded / predicted noise, per step."""
    import matplotlib.pyplot as plt

    cols = evenly_spaced(len(strip.steps), max_columns)
    fig, axes = plt.subplots(3, len(cols), figsize=(1.6 * len(cols), 5.2), squeeze=False)
    rows = [("z_t decoded", strip.noisy), ("x0_pred decoded", strip.x0_pred),
            ("eps_pred", strip.eps_pred)]
    for r, (label, images) in enumerate(rows):
        for c, i in enumerate(cols):
            ax = axes[r][c]
            ax.imshow(images[i])
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(f"step {strip.steps[i]}\nt={strip.timesteps[i]:.0f}", fontsize=8)
            if c == 0:
                ax.set_ylabel(label, fontsize=8)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return fig


# ----------------------------------------------------------------------------------------------
# View 2: cross-attention maps
# ----------------------------------------------------------------------------------------------

@dataclass
class AttentionMaps:
    """A generated image and its prompt tokens' cross-attention maps."""

    image: np.ndarray       # uint8 (H, W, 3)
    tokens: list            # (position in the context, text) of each prompt token shown
    per_layer: dict         # layer name -> (L, hl, wl), averaged over steps
    average: torch.Tensor   # (L, H, W), averaged over steps and layers
    figure: object = None
    layer_figure: object = None


def prompt_tokens(tokenizer, prompt: str) -> list:
    """(context position, text) for each token of the prompt: position 0 is the start token."""
    ids = tokenizer.encode(prompt)[: tokenizer.context_length - 2]
    return [(i + 1, tokenizer.decode([tid]).strip() or "_") for i, tid in enumerate(ids)]


@torch.no_grad()
def attention_maps_view(ldm, prompt: str, *, num_steps: int = 20, sampler: str = "ddim",
                        guidance_scale: float = 7.5, seed: int = 0, height=None, width=None,
                        include_special: bool = False) -> AttentionMaps:
    """Generate an image while recording every cross-attention layer; plot each token's map.

    The UNet's cross-attention modules call `record(name, weights)` with weights (B, nh, h*w, L)
    when their `record` attribute is set. We keep the conditional half of the guided batch,
    average over heads, sum over steps, and show: per token, the map averaged over all layers
    and steps laid over the image; and per layer, the maps of every prompt token.
    """
    noise = make_noise(ldm, [seed], height, width)
    context = encode(ldm, [prompt])
    with CrossAttentionRecorder(ldm.unet, num_images=1) as rec:
        x = generate_from(ldm, context, noise, guidance_scale=guidance_scale, sampler=sampler,
                          num_steps=num_steps, seed=seed)
    per_layer, average = aggregate_attention(rec.records, noise.shape[-2:], size=x.shape[-2:])
    tokens = prompt_tokens(ldm.tokenizer, prompt)
    if include_special or not tokens:
        tokens = [(0, "<start>")] + tokens + [(len(tokens) + 1, "<end>")]
    maps = AttentionMaps(image=to_uint8(x)[0], tokens=tokens, per_layer=per_layer, average=average)
    maps.figure = plot_token_maps(maps.image, average, tokens, title=f'"{prompt}"')
    maps.layer_figure = plot_layer_maps(per_layer, tokens)
    return maps


def plot_token_maps(image, maps, tokens, title: str = ""):
    """The image, then one panel per token with its attention map (normalised) over the image."""
    import matplotlib.pyplot as plt

    n = len(tokens) + 1
    fig, axes = plt.subplots(1, n, figsize=(1.9 * n, 2.3), squeeze=False)
    axes[0][0].imshow(image)
    axes[0][0].set_title("image", fontsize=8)
    for ax, (pos, text) in zip(axes[0][1:], tokens):
        m = maps[pos]
        m = (m - m.min()) / (m.max() - m.min()).clamp_min(1e-12)
        ax.imshow(image)
        ax.imshow(m.cpu().numpy(), cmap="jet", alpha=0.5,
                  extent=(-0.5, image.shape[1] - 0.5, image.shape[0] - 0.5, -0.5))
        ax.set_title(text, fontsize=8)
    for ax in axes[0]:
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return fig


def plot_layer_maps(per_layer, tokens):
    """A grid: one row per cross-attention layer (name and resolution), one column per token."""
    import matplotlib.pyplot as plt

    names = list(per_layer)
    fig, axes = plt.subplots(len(names), len(tokens), squeeze=False,
                             figsize=(1.3 * len(tokens) + 1.5, 1.2 * len(names) + 0.5))
    for r, name in enumerate(names):
        m = per_layer[name]
        for c, (pos, text) in enumerate(tokens):
            ax = axes[r][c]
            ax.imshow(m[pos].cpu().numpy(), cmap="viridis")
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(text, fontsize=8)
            if c == 0:
                short = name.replace(".transformer_blocks.0.attn2", "")
                ax.set_ylabel(f"{short}\n{m.shape[1]}x{m.shape[2]}", fontsize=6, rotation=0,
                              ha="right", va="center")
    fig.tight_layout()
    return fig


# ----------------------------------------------------------------------------------------------
# View 3: conditioning arithmetic
# ----------------------------------------------------------------------------------------------

@dataclass
class Strip:
    """A row of generated images with a label each."""

    images: np.ndarray      # uint8 (N, H, W, 3)
    labels: list
    figure: object = None


def plot_strip(images, labels, title: str = ""):
    """Images in one row with a label over each."""
    import matplotlib.pyplot as plt

    n = len(images)
    fig, axes = plt.subplots(1, n, figsize=(1.7 * n, 2.1), squeeze=False)
    for ax, im, label in zip(axes[0], images, labels):
        ax.imshow(im)
        ax.set_title(label, fontsize=7)
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return fig


def _strip(ldm, contexts, noises, labels, title, **kwargs) -> Strip:
    x = generate_from(ldm, contexts, noises, **kwargs)
    images = to_uint8(x)
    return Strip(images=images, labels=labels, figure=plot_strip(images, labels, title))


def prompt_interpolation(ldm, prompt_a: str, prompt_b: str, *, num: int = 5, seed: int = 0,
                         spherical: bool = True, **kwargs) -> Strip:
    """From prompt_a to prompt_b with the same noise: each token's context vector slerped (or lerped)."""
    ca, cb = encode(ldm, [prompt_a, prompt_b]).split(1)
    ts = np.linspace(0.0, 1.0, num)
    contexts = torch.cat([slerp(ca, cb, float(t), dim=-1) if spherical else lerp(ca, cb, float(t))
                          for t in ts])
    noise = make_noise(ldm, [seed] * num, kwargs.pop("height", None), kwargs.pop("width", None))
    labels = [f"t={t:.2f}" for t in ts]
    return _strip(ldm, contexts, noise, labels, f'"{prompt_a}" -> "{prompt_b}"', seed=seed,
                  **kwargs)


def seed_interpolation(ldm, prompt: str, seed_a: int, seed_b: int, *, num: int = 5,
                       spherical: bool = True, **kwargs) -> Strip:
    """From seed_a's noise to seed_b's with one prompt: the whole noise tensor slerped (or lerped).

    lerp at t=0.5 shrinks the noise's norm by about 1/sqrt(2) (two independent Gaussians), which the
    sampler reads as a less noisy start and turns into a washed-out image; slerp keeps the norm.
    """
    height, width = kwargs.pop("height", None), kwargs.pop("width", None)
    na, nb = make_noise(ldm, [seed_a, seed_b], height, width).split(1)
    ts = np.linspace(0.0, 1.0, num)
    noises = torch.cat([slerp(na, nb, float(t)) if spherical else lerp(na, nb, float(t))
                        for t in ts])
    context = encode(ldm, [prompt])
    labels = [f"t={t:.2f}" for t in ts]
    kind = "slerp" if spherical else "lerp"
    return _strip(ldm, context, noises, labels, f'"{prompt}": seed {seed_a} -> {seed_b} ({kind})',
                  seed=seed_a, **kwargs)


def prompt_blend(ldm, prompts, weight_rows, *, seed: int = 0, **kwargs) -> Strip:
    """One image per row of weights: the prompts' contexts averaged with those weights."""
    height, width = kwargs.pop("height", None), kwargs.pop("width", None)
    contexts = encode(ldm, prompts)
    mixed = torch.cat([blend(contexts.split(1), w) for w in weight_rows])
    noise = make_noise(ldm, [seed] * len(weight_rows), height, width)
    labels = [" ".join(f"{float(w):g}" for w in row) for row in weight_rows]
    return _strip(ldm, mixed, noise, labels, "blend of " + " | ".join(f'"{p}"' for p in prompts),
                  seed=seed, **kwargs)


def context_arithmetic(ldm, prompt_a: str, prompt_b: str, prompt_c: str, *, seed: int = 0,
                       **kwargs) -> Strip:
    """a, b, c and the context a - b + c, all from the same noise."""
    height, width = kwargs.pop("height", None), kwargs.pop("width", None)
    ca, cb, cc = encode(ldm, [prompt_a, prompt_b, prompt_c]).split(1)
    contexts = torch.cat([ca, cb, cc, ca - cb + cc])
    noise = make_noise(ldm, [seed] * 4, height, width)
    labels = [prompt_a, prompt_b, prompt_c, "a - b + c"]
    return _strip(ldm, contexts, noise, labels, f'"{prompt_a}" - "{prompt_b}" + "{prompt_c}"',
                  seed=seed, **kwargs)


# ----------------------------------------------------------------------------------------------
# View 4: the sampler gallery
# ----------------------------------------------------------------------------------------------

@dataclass
class Gallery:
    """images[(sampler, num_steps)] = uint8 (H, W, 3); seconds[(sampler, num_steps)] = wall time."""

    samplers: list
    steps: list
    images: dict
    seconds: dict
    figure: object = None


DEFAULT_SAMPLERS = ("ddim", "plms", "euler", "euler_a", "heun", "lms", "dpmpp_2m", "ddpm")


@torch.no_grad()
def sampler_gallery(ldm, prompt: str, *, samplers=DEFAULT_SAMPLERS, steps=(5, 10, 20), seed: int = 0,
                    guidance_scale: float = 7.5, height=None, width=None) -> Gallery:
    """The same prompt and starting noise through every sampler at several step counts.

    Wall time covers sampling and decoding one image; Heun calls the UNet twice per step, so its
    column costs about twice as much at the same number of steps.
    """
    noise = make_noise(ldm, [seed], height, width)
    context = encode(ldm, [prompt])
    uncond = ldm.encode_prompt([""])
    images, seconds = {}, {}
    for name in samplers:
        for n in steps:
            start = time.perf_counter()
            x = generate_from(ldm, context, noise, uncond_context=uncond,
                              guidance_scale=guidance_scale, sampler=name, num_steps=n, seed=seed)
            seconds[(name, n)] = time.perf_counter() - start
            images[(name, n)] = to_uint8(x)[0]
    gallery = Gallery(samplers=list(samplers), steps=list(steps), images=images, seconds=seconds)
    gallery.figure = plot_gallery(gallery, title=f'"{prompt}", seed {seed}, guidance {guidance_scale}')
    return gallery


def plot_gallery(gallery: Gallery, title: str = ""):
    """Rows: samplers; columns: step counts; each panel titled with its wall time."""
    import matplotlib.pyplot as plt

    rows, cols = len(gallery.samplers), len(gallery.steps)
    fig, axes = plt.subplots(rows, cols, figsize=(1.8 * cols + 0.8, 1.8 * rows), squeeze=False)
    for r, name in enumerate(gallery.samplers):
        for c, n in enumerate(gallery.steps):
            ax = axes[r][c]
            ax.imshow(gallery.images[(name, n)])
            ax.set_xticks([])
            ax.set_yticks([])
            ax.set_title(f"{n} steps, {gallery.seconds[(name, n)]:.2f}s", fontsize=7)
            if c == 0:
                ax.set_ylabel(name, fontsize=8)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return fig


# ----------------------------------------------------------------------------------------------
# Command line: any view of any checkpoint, saved as PNG (and GIF)
# ----------------------------------------------------------------------------------------------

VIEWS = ("filmstrip", "attention", "gallery", "interpolate", "seeds", "arithmetic")


def build_parser():
    import argparse

    from .cli import Parser

    p = Parser(
        prog="python -m minildm.views",
        description="Look inside generation: save a view of a checkpoint (your CIFAR run by default, or "
                    "Stable Diffusion v1 weights) as PNG files.",
        epilog='examples:  python -m minildm.views filmstrip "a photo of a cat"\n'
               '           python -m minildm.views attention "a red car on a road" --ckpt v1-5.safetensors\n'
               '           python -m minildm.views interpolate "a photo of a cat" "a photo of a dog"\n'
               '           python -m minildm.views arithmetic "a photo of a cat" "cat" "dog"',
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("view", choices=VIEWS, help="filmstrip: denoising step by step (+ GIF); attention: each "
                   "token's cross-attention map; gallery: samplers x step counts; interpolate: prompt A to "
                   "prompt B; seeds: one prompt, seed A to seed B; arithmetic: A - B + C")
    p.add_argument("prompts", nargs="+", help="one prompt (filmstrip, attention, gallery, seeds), two "
                   "(interpolate) or three (arithmetic)")
    p.add_argument("--ckpt", default=None, help="checkpoint (default: the newest run in --runs-dir)")
    p.add_argument("--config", default=None, metavar="YAML",
                   help="the original inference YAML of an original-layout file that is not SD v1-sized")
    p.add_argument("--runs-dir", default="runs", help="where `python -m minildm.train` writes runs")
    p.add_argument("--out", default="views", help="folder for the PNG/GIF files")
    p.add_argument("--steps", type=int, default=20, help="sampling steps")
    p.add_argument("--sampler", default="ddim", choices=sorted(samplers.SAMPLERS), help="sampler")
    p.add_argument("--guidance", type=float, default=7.5, help="classifier-free guidance scale")
    p.add_argument("--seed", type=int, default=0, help="seed of the starting noise")
    p.add_argument("--seed-b", type=int, default=1, help="the second seed of `seeds`")
    p.add_argument("--num", type=int, default=5, help="images in an interpolation strip")
    p.add_argument("--size", type=int, default=None, help="image height and width (default: the model's)")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto")
    p.add_argument("--dtype", default="auto", choices=("auto", "float32", "float16", "bfloat16"),
                   help="weights' dtype (auto: float16 on CUDA)")
    p.add_argument("--overwrite", action="store_true", help="replace files of the same name (default: a new name)")
    return p


def main(argv=None) -> int:
    import os
    import re

    from .cli import USAGE, check_float, check_int, check_seed, check_writable_dir, fail, free_path, load_model, usage

    args = build_parser().parse_args(argv)
    wanted = {"interpolate": 2, "arithmetic": 3}.get(args.view, 1)
    if len(args.prompts) != wanted:
        fail(f"the {args.view} view takes {wanted} prompt{'s' if wanted > 1 else ''}, got {len(args.prompts)}", USAGE)
    check_int("--steps", args.steps, 1, 1000)
    check_float("--guidance", args.guidance, 0, 100)
    check_seed("--seed", args.seed)
    check_seed("--seed-b", args.seed_b)
    check_int("--num", args.num, 2, 64)
    if args.size is not None and (args.size <= 0 or args.size % 8 or args.size > 4096):
        usage("--size", args.size, "must be a positive multiple of 8, at most 4096")
    check_writable_dir("--out", args.out)
    ldm, _ = load_model(args.ckpt, args.runs_dir, args.device, args.dtype, config=args.config)
    check_int("--steps", args.steps, 1, ldm.schedule.num_timesteps)
    if args.size is not None:
        if args.size > 4 * ldm.default_size:
            usage("--size", args.size, f"at most {4 * ldm.default_size} for this model (4x its training size)")
        try:
            ldm.check_size(args.size, args.size)
        except ValueError as e:
            fail(str(e), USAGE)
    stem = os.path.join(args.out, args.view + "-" + re.sub(r"[^a-z0-9]+", "_", args.prompts[0].lower()).strip("_")[:40]
                        + f"-s{args.seed}")
    os.makedirs(args.out, exist_ok=True)
    stem = free_path(stem + ".png", args.overwrite)[:-4]          # never over an earlier view
    common = dict(seed=args.seed, height=args.size, width=args.size)
    sampling = dict(num_steps=args.steps, sampler=args.sampler, guidance_scale=args.guidance)
    written = []
    if args.view == "filmstrip":
        size = args.size or ldm.default_size  # small images are enlarged in the GIF to about 256 pixels
        strip = denoising_filmstrip(ldm, args.prompts[0], gif_path=stem + ".gif", gif_scale=max(1, 256 // size),
                                    **sampling, **common)
        figure, written = strip.figure, [stem + ".gif"]
    elif args.view == "attention":
        maps = attention_maps_view(ldm, args.prompts[0], **sampling, **common)
        maps.layer_figure.savefig(stem + "-layers.png", dpi=120)
        figure, written = maps.figure, [stem + "-layers.png"]
    elif args.view == "gallery":
        figure = sampler_gallery(ldm, args.prompts[0], guidance_scale=args.guidance, **common).figure
    elif args.view == "interpolate":
        figure = prompt_interpolation(ldm, *args.prompts, num=args.num, **sampling, **common).figure
    elif args.view == "seeds":
        figure = seed_interpolation(ldm, args.prompts[0], args.seed, args.seed_b, num=args.num,
                                    height=args.size, width=args.size, **sampling).figure
    else:
        figure = context_arithmetic(ldm, *args.prompts, **sampling, **common).figure
    figure.savefig(stem + ".png", dpi=120)
    for path in [stem + ".png"] + written:
        print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
