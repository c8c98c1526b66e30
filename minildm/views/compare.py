"""Comparing generations: conditioning arithmetic as image strips (view 3) and the sampler gallery (view 4)."""
from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch

from .core import slerp, lerp, blend, to_hwc_uint8, make_noise, encode, generate_from, show_image


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
        show_image(ax, im, label, title_size=7)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return fig


def _strip(ldm, contexts, noises, labels, title, **kwargs) -> Strip:
    x = generate_from(ldm, contexts, noises, **kwargs)
    images = to_hwc_uint8(x)
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


def context_arithmetic(ldm, prompt_a: str, prompt_b: str, prompt_c: str, *, seed: int = 0, weight: float = 1.0,
                       **kwargs) -> Strip:
    """a, b, c and the context a + weight (c - b) (a - b + c at weight 1), all from the same noise."""
    height, width = kwargs.pop("height", None), kwargs.pop("width", None)
    ca, cb, cc = encode(ldm, [prompt_a, prompt_b, prompt_c]).split(1)
    contexts = torch.cat([ca, cb, cc, ca + weight * (cc - cb)])
    noise = make_noise(ldm, [seed] * 4, height, width)
    formula = "a - b + c" if weight == 1 else f"a + {weight:g} (c - b)"
    labels = [prompt_a, prompt_b, prompt_c, formula]
    return _strip(ldm, contexts, noise, labels, f'"{prompt_a}" - "{prompt_b}" + "{prompt_c}"'
                  + ("" if weight == 1 else f" at weight {weight:g}"), seed=seed, **kwargs)


@torch.no_grad()
def image_arithmetic(ldm, photo, minus: str, plus: str, *, weights=(0.0, 0.25, 0.5, 0.75, 1.0), seed: int = 0,
                     **kwargs) -> Strip:
    """An image-variations model (with `load_text_clip`): the photo, then u(u(photo) - a u(minus) + a u(plus))
    at the photo's length for each weight a, all from the same noise (joint_space.py). a = 0 is the plain
    variation; as a grows the picture turns from `minus` towards `plus`."""
    from ..joint_space import JointPrompt

    x = torch.cat([ldm.generate(image_prompt=JointPrompt(images=[photo], minus=[minus], plus=[plus], weight=float(a)),
                                seed=seed, output_type="image", **kwargs) for a in weights])   # (N, 3, H, W) in [0, 1]
    size = x.shape[-2:]
    shown = torch.nn.functional.interpolate(_photo_tensor(photo)[None], size=size, mode="bilinear", antialias=True,
                                            align_corners=False)
    images = to_hwc_uint8(torch.cat([shown.clamp(0, 1), x]) * 2 - 1)
    labels = ["the photo"] + [f"a={float(a):g}" for a in weights]
    return Strip(images=images, labels=labels,
                 figure=plot_strip(images, labels, f'the photo - a "{minus}" + a "{plus}", seed {seed}'))


def _photo_tensor(photo) -> torch.Tensor:
    """A PIL image or a uint8 (C, H, W) tensor -> float RGB (3, H, W) in [0, 1], for showing it."""
    from ..clip_vision import _rgb

    return _rgb(photo).float() / 255


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
            images[(name, n)] = to_hwc_uint8(x)[0]
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
            show_image(axes[r][c], gallery.images[(name, n)], f"{n} steps, {gallery.seconds[(name, n)]:.2f}s",
                       name if c == 0 else "", title_size=7)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return fig
