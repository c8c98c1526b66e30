"""The sampling command line: `python -m minildm.sample "a cat in a hat"`.

Loads a checkpoint with `load_stable_diffusion` (your newest training run by default, or SD v1 weights
with --ckpt), generates with `LatentDiffusion.generate`, and writes PNGs named by prompt and seed, with
every setting in the PNG's text metadata so an image can be reproduced. Image i of --n uses seed + i,
so any single image can be regenerated on its own.

    python -m minildm.sample "a red car" --n 4
    python -m minildm.sample "a cat in a hat" --ckpt v1-5-pruned-emaonly.safetensors --steps 30
    python -m minildm.sample "a watercolour" --ckpt sd15/ --init-image photo.png --strength 0.6
    python -m minildm.sample "a dog on a bench" --ckpt sd15/ --init-image bench.png --mask mask.png
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import re
import sys
import time

import torch

from .samplers import SAMPLERS

NO_CHECKPOINT = (
    "no checkpoint given and no run found in {runs}/. Train one with `python -m minildm.train "
    "--dataset cifar`, or pass --ckpt with Stable Diffusion v1 weights (e.g. v1-5-pruned-emaonly.safetensors, "
    "a .ckpt, or a diffusers folder with unet/ vae/ text_encoder/ tokenizer/)")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m minildm.sample", description="Generate images from a prompt with a latent diffusion model.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("prompt", nargs="?", default="", help='the text prompt ("" for unconditional samples)')
    p.add_argument("--ckpt", default=None, help="SD v1 .safetensors/.ckpt, a diffusers folder, or a minildm "
                   "checkpoint; default: the newest runs/*/model.safetensors")
    p.add_argument("--runs-dir", default="runs", help="where to look for the newest training run")
    p.add_argument("--steps", type=int, default=50, help="number of sampler steps")
    p.add_argument("--sampler", default="ddim", choices=list(SAMPLERS), help="sampling method")
    p.add_argument("--guidance", type=float, default=7.5, help="classifier-free guidance scale (1 = none)")
    p.add_argument("--negative", default="", help="negative prompt: what guidance steers away from")
    p.add_argument("--seed", type=int, default=None, help="random seed (image i uses seed + i); default: random")
    p.add_argument("--n", type=int, default=1, help="number of images; a grid is saved too when n > 1")
    p.add_argument("--height", type=int, default=None, help="image height in pixels, a multiple of 8 "
                   "(default: the model's size, or the init image's)")
    p.add_argument("--width", type=int, default=None, help="image width in pixels, a multiple of 8")
    p.add_argument("--init-image", default=None, help="image to start from (img2img)")
    p.add_argument("--strength", type=float, default=0.75,
                   help="img2img: how much of the sampling to redo, 0 (keep the image) to 1 (ignore it)")
    p.add_argument("--mask", default=None, help="inpainting mask for --init-image, same size: white = repaint")
    p.add_argument("--out", default="samples", help="output folder")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, ... (auto: cuda when available)")
    p.add_argument("--dtype", default="auto", choices=("auto", "float32", "float16", "bfloat16"),
                   help="weight dtype (auto: float16 on CUDA, float32 on the CPU)")
    p.add_argument("--no-ema", action="store_true", help="use the raw UNet weights even if EMA weights exist")
    p.add_argument("--attention-slicing", type=int, default=None, metavar="N",
                   help="attend N query positions at a time (less memory for large images)")
    p.add_argument("--vae-tiling", type=int, default=None, metavar="N",
                   help="decode latents in tiles of N latent pixels (less memory for large images)")
    p.add_argument("--save-intermediates", action="store_true",
                   help="also save the predicted clean image after every step")
    return p


def slug(prompt: str, limit: int = 60) -> str:
    """A file-name-safe stem from a prompt: 'A cat, in a hat!' -> 'a-cat-in-a-hat'."""
    s = re.sub(r"[^a-z0-9]+", "-", prompt.lower()).strip("-")[:limit].rstrip("-")
    return s or "unconditional"


def fail(message: str):
    """Exit with a one-line error (no traceback)."""
    raise SystemExit(f"error: {message}")


def read_image(path: str, mode: str):
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            return im.convert(mode)
    except FileNotFoundError:
        fail(f"image not found: {path}")
    except (UnidentifiedImageError, OSError) as e:
        fail(f"cannot read {path} as an image ({type(e).__name__})")


def to_tensor(image) -> torch.Tensor:
    """A PIL image -> (1, C, H, W) float in [0, 1]."""
    import numpy as np

    a = torch.from_numpy(np.asarray(image, dtype=np.float32).copy()) / 255.0
    a = a[..., None] if a.ndim == 2 else a
    return a.permute(2, 0, 1)[None]


def to_pil(x: torch.Tensor):
    """(3, H, W) in [0, 1] -> PIL image."""
    from PIL import Image

    return Image.fromarray((x.clamp(0, 1) * 255).round().byte().permute(1, 2, 0).cpu().numpy())


def save_png(image, path: str, settings: dict):
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    info.add_text("minildm", json.dumps(settings))
    for k, v in settings.items():
        info.add_text(k, str(v))
    image.save(path, pnginfo=info)


def resolve_device(name: str, dtype_name: str):
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError:
        fail(f"unknown device {name!r}")
    if device.type == "cuda" and not torch.cuda.is_available():
        fail("--device cuda was asked for but no CUDA GPU is available")
    if dtype_name == "auto":
        dtype_name = "float16" if device.type == "cuda" else "float32"
    return device, getattr(torch, dtype_name)


def load_model(ckpt, runs_dir: str, device_name: str, dtype_name: str, use_ema: bool = True):
    """(LatentDiffusion, checkpoint path) for a command line: `ckpt`, or the newest run in `runs_dir`
    when it is None; every problem is a one-line error."""
    if ckpt is None:
        from .ldm import find_latest_checkpoint

        ckpt = find_latest_checkpoint(runs_dir)
        if ckpt is None:
            fail(NO_CHECKPOINT.format(runs=runs_dir))
    if not os.path.exists(ckpt):
        fail(f"checkpoint not found: {ckpt}")
    device, dtype = resolve_device(device_name, dtype_name)

    from .convert import CheckpointError
    from .ldm import load_stable_diffusion

    try:
        return load_stable_diffusion(ckpt, device=device, dtype=dtype, use_ema=use_ema), ckpt
    except CheckpointError as e:
        fail(str(e))


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.steps < 1:
        fail(f"--steps must be at least 1, got {args.steps}")
    if args.n < 1:
        fail(f"--n must be at least 1, got {args.n}")
    if not 0.0 <= args.strength <= 1.0:
        fail(f"--strength must be between 0 and 1, got {args.strength}")
    for name in ("height", "width"):
        value = getattr(args, name)
        if value is not None and (value <= 0 or value % 8):
            fail(f"--{name} must be a positive multiple of 8, got {value}")
    if args.mask and not args.init_image:
        fail("--mask needs --init-image (the image to inpaint)")

    init = mask = None
    if args.init_image:
        image = read_image(args.init_image, "RGB")
        if args.mask:
            mask_image = read_image(args.mask, "L")
            if mask_image.size != image.size:
                fail(f"the mask is {mask_image.size[0]}x{mask_image.size[1]} but the init image is "
                     f"{image.size[0]}x{image.size[1]}; they must be the same size")

    started = time.time()
    model, ckpt = load_model(args.ckpt, args.runs_dir, args.device, args.dtype, use_ema=not args.no_ema)
    print(f"loaded {ckpt} in {time.time() - started:.1f} s", file=sys.stderr)
    model.set_attention_slicing(args.attention_slicing)
    model.set_vae_tiling(args.vae_tiling)

    if args.init_image:
        m = math.lcm(8, model.size_multiple)
        width, height = args.width or image.size[0] // m * m, args.height or image.size[1] // m * m
        if width < m or height < m:
            fail(f"the init image is too small for this model (at least {m}x{m} pixels)")
        if (width, height) != image.size:
            print(f"resizing the init image from {image.size[0]}x{image.size[1]} to {width}x{height}", file=sys.stderr)
        init = to_tensor(image.resize((width, height))) * 2 - 1
        if args.mask:
            mask = to_tensor(mask_image.resize((width, height)))
    else:
        height = args.height or model.default_size
        width = args.width or model.default_size
    try:
        model.check_size(height, width)
    except ValueError as e:
        fail(str(e))

    from tqdm import tqdm

    os.makedirs(args.out, exist_ok=True)
    seed = args.seed if args.seed is not None else random.SystemRandom().randrange(2**31)
    stem = slug(args.prompt)
    steps_run = args.steps if init is None else args.steps - (args.steps - int(args.steps * args.strength))
    bar = tqdm(total=args.n * steps_run, desc="sampling", unit="step", file=sys.stderr)
    images, paths = [], []
    for i in range(args.n):
        settings = {"prompt": args.prompt, "negative": args.negative, "seed": seed + i, "steps": args.steps,
                    "sampler": args.sampler, "guidance": args.guidance, "height": height, "width": width,
                    "checkpoint": os.path.abspath(ckpt), "ema": not args.no_ema, "dtype": str(model.dtype)[6:]}
        if init is not None:
            settings.update(init_image=os.path.abspath(args.init_image), strength=args.strength)
        if mask is not None:
            settings["mask"] = os.path.abspath(args.mask)
        name = f"{stem}-{seed + i}"
        step_dir = os.path.join(args.out, f"{name}-steps")

        def callback(info, step_dir=step_dir):
            bar.update(1)
            if args.save_intermediates:
                os.makedirs(step_dir, exist_ok=True)
                x = model.to_unit(model.decode_latents(info["x0_pred"]))[0]
                to_pil(x).save(os.path.join(step_dir, f"step_{info['step']:03d}.png"))

        try:
            x = model.generate(args.prompt, negative_prompt=args.negative, num_steps=args.steps,
                               sampler=args.sampler, guidance_scale=args.guidance, height=height, width=width,
                               seed=seed + i, init_image=init, strength=args.strength, mask=mask,
                               callback=callback)[0]
        except ValueError as e:
            fail(str(e))
        path = os.path.join(args.out, f"{name}.png")
        save_png(to_pil(x), path, settings)
        images.append(x)
        paths.append(path)
    bar.close()
    if args.n > 1:
        from torchvision.utils import make_grid

        grid = make_grid(torch.stack(images), nrow=int(args.n ** 0.5 + 0.999), padding=2, pad_value=1.0)
        path = os.path.join(args.out, f"{stem}-{seed}-grid.png")
        save_png(to_pil(grid), path, {"prompt": args.prompt, "seeds": f"{seed}..{seed + args.n - 1}"})
        paths.append(path)
    for path in paths:
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
