"""The sampling command line: `python -m minildm.sample "a cat in a hat"`.

Loads a checkpoint with `load_stable_diffusion` (your newest training run by default, or SD v1 weights
with --ckpt), generates with `LatentDiffusion.generate`, and writes PNGs named by prompt and seed, with
every setting in the PNG's text metadata so an image can be reproduced. Image i of --n uses seed + i,
so any single image can be regenerated on its own; images are drawn --batch-size at a time, each from
its own seed, so a batch gives the images that one-at-a-time sampling gives (to float rounding:
one level of 255 at most).

    python -m minildm.sample "a red car" --n 4
    python -m minildm.sample "a cat in a hat" --ckpt v1-5-pruned-emaonly.safetensors --steps 30
    python -m minildm.sample "a watercolour" --ckpt sd15/ --init-image photo.png --strength 0.6
    python -m minildm.sample "a dog on a bench" --ckpt sd15/ --init-image bench.png --mask mask.png
    python -m minildm.sample --ckpt sd-image-variations-diffusers/ --image-prompt photo.png --n 4
    python -m minildm.sample --image-adapter photo-prompts.safetensors --image-prompt cat.png --n 4  # your run

With a full CLIP folder the image embedding of an image-variations model can be moved in CLIP's joint space
(minildm.joint_space): this photo, but a cat; two photos mixed; a caption alone, given a length (a photo of
weight 0 lends its embedding's, or --norm N; the command prints the length of every mix it draws).

    python -m minildm.sample --ckpt sd-image-variations-diffusers/ --clip clip-vit-large-patch14/ \
        --image-prompt photo.png --minus "a dog" --plus "a cat" --text-weight 0.8
    python -m minildm.sample --ckpt sd-image-variations-diffusers/ --image-prompt a.png --image-prompt b.png \
        --image-weights 0.3 0.7
    python -m minildm.sample --ckpt sd-image-variations-diffusers/ --clip clip-vit-large-patch14/ \
        --plus "a cat in a hat" --image-prompt photo.png --image-weights 0
"""

from __future__ import annotations

import argparse
import math
import os
import random
import sys
import time

import torch

from .pngtext import save_png
from .cli import (USAGE, Parser, check_float, check_guidance_interval, check_int, check_readable_file, check_seed,
                  check_writable_dir, default_guidance_interval, fail, free_path, load_model, slug, usage)
from .samplers import LCM_ORIGINAL_STEPS, SAMPLERS

KARRAS_SAMPLERS = ("euler", "euler_a", "heun", "lms", "dpmpp_2m")

MAX_STEPS = 1000        # the schedules' length: more steps than timesteps would repeat timesteps
MAX_SIZE = 4096         # pixels a side, whatever the model; a model's own limit is 4x its training size

def build_parser() -> argparse.ArgumentParser:
    p = Parser(
        prog="python -m minildm.sample", description="Generate images from a prompt with a latent diffusion model.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("prompt", nargs="?", default="", help='the text prompt ("" for unconditional samples)')
    p.add_argument("--ckpt", default=None, help="SD v1 .safetensors/.ckpt, a diffusers folder, or a minildm "
                   "checkpoint; default: the newest runs/*/model.safetensors")
    p.add_argument("--config", default=None, metavar="YAML",
                   help="the original inference YAML of an original-layout file that is not SD v1-sized "
                        "(its head count and latent scale cannot be read from the weights)")
    p.add_argument("--runs-dir", default="runs", help="where to look for the newest training run")
    p.add_argument("--taesd", default=None, metavar="FOLDER",
                   help="decode with the tiny autoencoder TAESD (a diffusers AutoencoderTiny folder, or a folder "
                        "with taesd_decoder.pth): much faster than the VAE, close to its pictures, not equal")
    p.add_argument("--steps", type=int, default=None,
                   help="number of sampler steps (default: 50; 4 with --sampler lcm)")
    p.add_argument("--sampler", default=None, choices=list(SAMPLERS),
                   help="sampling method (default: ddim; lcm for an LCM-distilled model)")
    p.add_argument("--karras", action="store_true",
                   help="Karras et al. sigma spacing (for euler, euler_a, heun, lms and dpmpp_2m)")
    p.add_argument("--guidance", type=float, default=None,
                   help="classifier-free guidance scale, 1 = none (default: 7.5; 1 with --sampler lcm, as the "
                        "LCM-LoRA wants; 8.5 for an LCM-distilled model, which takes it as an input)")
    p.add_argument("--guidance-interval", type=float, nargs=2, default=None, metavar=("T_LO", "T_HI"),
                   help="guide only the steps at timesteps T_LO..T_HI (0 1000: every step); default: a training "
                        "run's own (its config.json's guidance_interval), every step for Stable Diffusion")
    p.add_argument("--negative", default="", help="negative prompt: what guidance steers away from")
    p.add_argument("--seed", type=int, default=None, help="random seed (image i uses seed + i); default: random")
    p.add_argument("--n", type=int, default=1, help="number of images; a grid is saved too when n > 1")
    p.add_argument("--batch-size", type=int, default=None,
                   help="images drawn at once (default: 25 for small models like the CIFAR ones, 1 at 512px)")
    p.add_argument("--height", type=int, default=None, help="image height in pixels, a multiple of 8 "
                   "(default: the model's size, or the init image's)")
    p.add_argument("--width", type=int, default=None, help="image width in pixels, a multiple of 8")
    p.add_argument("--init-image", default=None, help="image to start from (img2img)")
    p.add_argument("--strength", type=float, default=None,
                   help="img2img: how much of the sampling to redo, 0 (keep the image) to 1 (ignore it); "
                        "default 0.75 (1 with an inpainting model)")
    p.add_argument("--mask", default=None, help="inpainting mask for --init-image, same size: white = repaint")
    p.add_argument("--image-prompt", action="append", default=[], metavar="IMAGE",
                   help="an image-variations model (lambdalabs/sd-image-variations-diffusers) draws variations of "
                        "this image; it replaces the text prompt. Given several times, the images are mixed in "
                        "CLIP's joint space")
    p.add_argument("--image-adapter", default=None, metavar="FILE[:SCALE]",
                   help="a model you trained reads --image-prompt beside the text prompt, with this image adapter "
                        "(python -m minildm.finetune image-prompt); SCALE weighs the photo (default 1)")
    p.add_argument("--image-weights", type=float, nargs="+", default=None, metavar="W",
                   help="one weight per --image-prompt for the mix (default: equal weights summing to 1); an image "
                        "of weight 0 lends the embedding its length and nothing else")
    p.add_argument("--clip", default=None, metavar="FOLDER",
                   help="a full CLIP folder with both towers (openai/clip-vit-large-patch14): its text side puts "
                        "--plus and --minus into an image-variations model's image embedding")
    p.add_argument("--plus", action="append", default=[], metavar="TEXT",
                   help='move the image embedding towards this caption in CLIP\'s joint space (this photo, but a '
                        'cat: --minus "a dog" --plus "a cat"); needs --clip; may be given several times')
    p.add_argument("--minus", action="append", default=[], metavar="TEXT",
                   help="move the image embedding away from this caption (needs --clip; may be given several times)")
    p.add_argument("--text-weight", type=float, default=None, metavar="A",
                   help="how far --plus and --minus move it: u(image) + A u(plus) - A u(minus), u a unit vector "
                        "(default 1)")
    p.add_argument("--norm", type=float, default=None, metavar="N",
                   help="the length given to the combined embedding (default: the images' weighted mean length); "
                        "needed for --plus or --minus without --image-prompt")
    p.add_argument("--embedding", action="append", default=[], metavar="FILE[:TOKEN]",
                   help="a textual-inversion embedding (.pt, .bin or .safetensors; diffusers or A1111 layout) "
                        "whose token the prompt may then use; TOKEN renames it; may be given several times")
    p.add_argument("--lora", action="append", default=[], metavar="FILE[:SCALE]",
                   help="merge a LoRA for SD v1 (kohya or diffusers layout) into the weights, times SCALE "
                        "(default 1); may be given several times")
    p.add_argument("--out", default="samples", help="output folder")
    p.add_argument("--overwrite", action="store_true",
                   help="replace files of the same name (default: a new name, <prompt>-<seed>-2.png, ...)")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, ... (auto: cuda when available)")
    p.add_argument("--dtype", default="auto", choices=("auto", "float32", "float16", "bfloat16"),
                   help="weight dtype (auto: float16 on CUDA; on the CPU bfloat16 for SD-sized models where the "
                        "CPU multiplies it in hardware, else float32)")
    p.add_argument("--no-ema", action="store_true", help="use the raw UNet weights even if EMA weights exist")
    p.add_argument("--attention-slicing", type=int, default=None, metavar="N",
                   help="attend N query positions at a time (less memory for large images)")
    p.add_argument("--vae-tiling", type=int, default=None, metavar="N",
                   help="decode latents in tiles of N latent pixels (less memory for large images)")
    p.add_argument("--save-intermediates", action="store_true",
                   help="also save the predicted clean image after every step")
    return p


def read_image(path: str, mode: str | None):
    """The image at `path`, converted to `mode` (None: as it is, transparency included)."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            return im.convert(mode) if mode else im.copy()
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


def check_flags(args) -> None:
    """Every flag's value and combination, before anything is loaded: one line and exit status 2 if not."""
    if args.steps is not None:
        check_int("--steps", args.steps, 1, LCM_ORIGINAL_STEPS if args.sampler == "lcm" else MAX_STEPS)
    check_int("--n", args.n, 1)
    check_int("--batch-size", args.batch_size, 1)
    if args.guidance is not None:
        check_float("--guidance", args.guidance, 0, 100)
    check_guidance_interval("--guidance-interval", args.guidance_interval)
    check_seed("--seed", args.seed, args.n)
    check_float("--strength", args.strength, 0, 1)
    check_int("--attention-slicing", args.attention_slicing, 1)
    check_int("--vae-tiling", args.vae_tiling, 4)
    for flag, value in (("--height", args.height), ("--width", args.width)):
        if value is not None and (value <= 0 or value % 8 or value > MAX_SIZE):
            usage(flag, value, f"must be a positive multiple of 8, at most {MAX_SIZE}")
    if args.karras and args.sampler not in KARRAS_SAMPLERS:
        fail(f"--karras works with --sampler {', '.join(KARRAS_SAMPLERS)}, not "
             f"{args.sampler or 'the default sampler (ddim, or lcm for an LCM model)'}", USAGE)
    if args.mask and not args.init_image:
        fail("--mask needs --init-image (the image to inpaint)", USAGE)
    if args.strength is not None and not args.init_image:
        fail(f"--strength {args.strength:g} needs --init-image (the image img2img starts from)", USAGE)
    if args.image_adapter is not None:
        args.image_adapter = image_adapter_option(args.image_adapter)
        if len(args.image_prompt) != 1:
            fail(f"--image-adapter reads one photo, given with --image-prompt ({len(args.image_prompt)} given)", USAGE)
        joint = [flag for flag, value in (("--plus", args.plus), ("--minus", args.minus), ("--clip", args.clip),
                                          ("--image-weights", args.image_weights), ("--norm", args.norm),
                                          ("--text-weight", args.text_weight)) if value]
        if joint:
            fail(f"{joint[0]} moves an image-variations model's CLIP embedding; with --image-adapter the text goes "
                 "in the prompt", USAGE)
    elif args.image_prompt and args.prompt:
        fail(f"--image-prompt replaces the text prompt: give {args.prompt!r} or --image-prompt, not both", USAGE)
    if (args.plus or args.minus) and args.prompt:
        fail(f"an image-variations model reads no prompt: put {args.prompt!r} into the image embedding with --plus",
             USAGE)
    if (args.image_prompt or args.plus or args.minus) and args.negative and not args.image_adapter:
        fail(f"--negative does not go with --{'image-prompt' if args.image_prompt else 'plus or --minus'}: an "
             "image-variations model has no text encoder, its unconditional context is zeros", USAGE)
    if (args.image_prompt or args.plus or args.minus) and args.embedding and not args.image_adapter:
        fail("--embedding teaches a text encoder a word; an image-variations model (--image-prompt, --plus, "
             "--minus) has none", USAGE)
    check_joint_flags(args)
    for path in args.image_prompt:
        check_readable_file("--image-prompt", path)
    check_readable_file("--init-image", args.init_image)
    check_readable_file("--mask", args.mask)
    check_taesd_folder(args.taesd)
    check_writable_dir("--out", args.out)
    args.embedding = [split_file_option("--embedding", value, "TOKEN") for value in args.embedding]
    for path, _ in args.embedding:
        check_readable_file("--embedding", path)
    args.lora = lora_files(args.lora)


def image_adapter_option(value: str) -> tuple[str, float]:
    """--image-adapter FILE[:SCALE] -> (file, scale): a readable file and a scale from 0 to 10 (default 1)."""
    path, scale = split_file_option("--image-adapter", value, "SCALE")
    check_readable_file("--image-adapter", path)
    try:
        number = 1.0 if scale is None else float(scale)
    except ValueError:
        usage("--image-adapter", f"{path}:{scale}", "SCALE after the colon must be a number, e.g. photos.safetensors:0.8")
    check_float("--image-adapter scale", number, 0, 10)
    return path, number


def check_joint_flags(args) -> None:
    """--image-weights, --clip, --plus, --minus, --text-weight and --norm: the recipe of a joint_space.JointPrompt."""
    texts = args.plus or args.minus
    if texts and not args.clip:
        flag = "--plus" if args.plus else "--minus"
        fail(f"{flag} puts a caption into the image embedding through CLIP's joint space: give a full CLIP folder "
             "(openai/clip-vit-large-patch14, both towers) with --clip", USAGE)
    if args.clip and not texts:
        fail(f"--clip {args.clip}: a CLIP's text side is used for --plus and --minus captions; give one, or drop "
             "--clip", USAGE)
    if args.clip is not None and not os.path.isdir(args.clip):
        usage("--clip", args.clip, "does not exist" if not os.path.exists(args.clip) else
              "must be a folder (a transformers CLIP folder such as openai/clip-vit-large-patch14)")
    for flag, text in [("--plus", t) for t in args.plus] + [("--minus", t) for t in args.minus]:
        if not text.strip():
            usage(flag, text, "must be a caption, not empty")
    if args.text_weight is not None:
        if not texts:
            fail(f"--text-weight {args.text_weight:g} weighs --plus and --minus captions; give one", USAGE)
        check_float("--text-weight", args.text_weight, -100, 100)
    if args.image_weights is not None:
        if len(args.image_weights) != len(args.image_prompt):
            fail(f"--image-weights: {len(args.image_weights)} weights for {len(args.image_prompt)} --image-prompt "
                 "images; give one weight per image", USAGE)
        for w in args.image_weights:
            check_float("--image-weights", w, -100, 100)
        if not texts and not any(args.image_weights):
            fail("--image-weights: every weight is 0 and there is no --plus or --minus, so nothing is left to "
                 "draw", USAGE)
    if args.norm is not None:
        if not (args.image_prompt or texts):
            fail(f"--norm {args.norm:g} sets the length of an image-variations embedding; give --image-prompt or "
                 "--plus", USAGE)
        check_float("--norm", args.norm, 0, 1e4, low_open=True)
    if texts and not args.image_prompt and args.norm is None:
        fail(f"{'--plus' if args.plus else '--minus'} without --image-prompt needs --norm N: the length to give the "
             "embedding (the model was trained on image embeddings' lengths), or an --image-prompt with "
             "--image-weights 0, which lends its length alone", USAGE)


def joint_prompt(args, images):
    """The recipe the flags give (a joint_space.JointPrompt), or None for the plain variation of one image."""
    if len(images) <= 1 and not (args.plus or args.minus or args.image_weights or args.norm is not None):
        return None
    from .joint_space import JointPrompt

    return JointPrompt(images=tuple(images), image_weights=args.image_weights, plus=tuple(args.plus),
                       minus=tuple(args.minus), weight=1.0 if args.text_weight is None else args.text_weight,
                       norm=args.norm)


def recipe_stem(args) -> str:
    """The file name stem of an image-variations output: 'variation-of-photo-minus-a-dog-plus-a-cat'."""
    names = [os.path.splitext(os.path.basename(path))[0] for path in args.image_prompt]
    words = ["variation of " + " and ".join(names)] if names else []
    words += [f"minus {t}" for t in args.minus] + [f"plus {t}" for t in args.plus]
    return slug(" ".join(words))


def check_taesd_folder(path) -> None:
    """--taesd: a folder (what is in it is read when the model is loaded)."""
    if path is not None and not os.path.isdir(path):
        usage("--taesd", path, "must be a folder (a diffusers AutoencoderTiny folder, or one with taesd_decoder.pth)")


def lora_files(values) -> list[tuple[str, float]]:
    """--lora FILE[:SCALE] values -> (file, scale) pairs, each file readable and each scale a number."""
    pairs = [(path, lora_scale(path, scale)) for path, scale in
             (split_file_option("--lora", value, "SCALE") for value in values)]
    for path, _ in pairs:
        check_readable_file("--lora", path)
    return pairs


def sampling_defaults(args, model) -> list[str]:
    """Fill in --sampler, --steps and --guidance left unset: LCM models take few steps and their own
    guidance (an LCM-distilled UNet reads the scale as an input; the LCM-LoRA wants 1 to 2, where 1
    means one UNet call per step). Returns the notes to print."""
    notes = []
    args.sampler, steps, guidance = default_sampling(model.takes_guidance, args.sampler)
    lcm = args.sampler == "lcm"
    if args.steps is None:
        args.steps = steps
    if lcm:
        check_int("--steps", args.steps, 1, LCM_ORIGINAL_STEPS)
    if args.guidance is None:
        args.guidance = guidance
    if model.takes_guidance:
        ignored = [flag for flag, given in (("--negative", args.negative), ("--guidance-interval", args.guidance_interval))
                   if given]
        notes.append(f"an LCM-distilled model: guidance {args.guidance:g} is an input of the UNet, one call per "
                     f"step{'; ' + ' and '.join(ignored) + ' have no effect' if ignored else ''}")
        if not lcm:
            notes.append(f"note: this model was distilled for --sampler lcm; {args.sampler} will look worse")
    elif args.negative and args.guidance == 1:
        notes.append("note: --negative has no effect at --guidance 1 (no unconditional branch)")
    return notes


def default_sampling(takes_guidance: bool, sampler: str | None = None) -> tuple[str, int, float]:
    """(sampler, steps, guidance) for what is not given: ddim, 50 steps, guidance 7.5; the lcm sampler takes
    4 steps at guidance 1 (the LCM-LoRA's way, one UNet call a step); an LCM-distilled model (which reads
    the guidance scale as an input) samples with lcm at 8.5."""
    sampler = sampler or ("lcm" if takes_guidance else "ddim")
    lcm = sampler == "lcm"
    return sampler, 4 if lcm else 50, 8.5 if takes_guidance else 1.0 if lcm else 7.5


def split_file_option(flag: str, value: str, what: str) -> tuple[str, str | None]:
    """'FILE' or 'FILE:WHAT' -> (file, what or None); a path that exists as written is never split."""
    if os.path.exists(value) or ":" not in value:
        return value, None
    path, suffix = value.rsplit(":", 1)
    if not suffix.strip():
        usage(flag, value, f"{what} after the colon must not be empty")
    return path, suffix


def lora_scale(path: str, scale: str | None) -> float:
    """The number after --lora FILE: (1 without one), within [-10, 10]."""
    try:
        number = 1.0 if scale is None else float(scale)
    except ValueError:
        usage("--lora", f"{path}:{scale}", "SCALE after the colon must be a number, e.g. style.safetensors:0.8")
    check_float("--lora scale", number, -10, 10)
    return number


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    check_flags(args)
    strength = 0.75 if args.strength is None else args.strength

    init = mask = None
    prompt_images = [read_image(path, None) for path in args.image_prompt]
    recipe = joint_prompt(args, prompt_images)                          # None: one image, varied as it is
    image_prompt = prompt_images[0] if prompt_images and recipe is None else None
    variations = (args.image_prompt or args.plus or args.minus) and not args.image_adapter  # a variations model's
    if args.init_image:
        image = read_image(args.init_image, "RGB")
        if args.mask:
            mask_image = read_image(args.mask, "L")
            if mask_image.size != image.size:
                fail(f"--mask {args.mask}: the mask is {mask_image.size[0]}x{mask_image.size[1]} but the init "
                     f"image is {image.size[0]}x{image.size[1]}; they must be the same size", USAGE)

    started = time.time()
    model, ckpt = load_model(args.ckpt, args.runs_dir, args.device, args.dtype, use_ema=not args.no_ema,
                             config=args.config)
    notes = [f"loaded {ckpt} in {time.time() - started:.1f} s"]          # printed once every check passed
    if args.dtype == "auto" and model.dtype == torch.bfloat16 and model.device.type == "cpu":
        notes.append("bfloat16: this CPU multiplies it in hardware, about 1.5x float32's speed and close to its "
                     "image (--dtype float32 for the float32 image, the one that equals diffusers')")
    if args.guidance_interval is None:
        args.guidance_interval = default_guidance_interval(ckpt)
        if args.guidance_interval is not None:
            notes.append("guidance at timesteps {:g}-{:g} only (this run's default; --guidance-interval 0 1000 "
                         "guides every step)".format(*args.guidance_interval))
    if args.image_adapter:
        from .convert import CheckpointError

        path, scale = args.image_adapter
        if model.is_image_variations_model:
            fail(f"--image-adapter is for a text-to-image model you trained; {ckpt} is an image-variations model, "
                 "which reads --image-prompt as it is", USAGE)
        try:
            model.load_image_adapter(path, scale)
        except (ValueError, CheckpointError) as e:
            fail(f"--image-adapter {path}: {e}")
        notes.append(f"image adapter {path}: the photo {args.image_prompt[0]} beside the text, at scale {scale:g}")
    elif args.image_prompt and not model.is_image_variations_model:
        fail(f"{ckpt} reads text prompts: --image-prompt needs an image-variations model (a diffusers folder with "
             "image_encoder/, such as lambdalabs/sd-image-variations-diffusers)", USAGE)
    if (args.plus or args.minus) and not model.is_image_variations_model:
        fail(f"{ckpt} reads text prompts: --clip, --plus and --minus move an image-variations model's image "
             "embedding (a diffusers folder with image_encoder/, such as lambdalabs/sd-image-variations-diffusers)",
             USAGE)
    if model.is_image_variations_model and not variations:
        fail(f"{ckpt} is an image-variations model: give the image to vary with --image-prompt (or a caption "
             "with --clip, --plus and --norm)", USAGE)
    if args.clip:
        from .convert import CheckpointError

        try:
            model.load_text_clip(args.clip)
        except CheckpointError as e:
            fail(f"--clip {args.clip}: {e}")
        except ValueError as e:  # a CLIP without a text tower, or of another width
            fail(f"--clip {args.clip}: {e}", USAGE)
        notes.append(f"captions through the text tower of {args.clip}")
    # LoRA weights first, then textual-inversion embeddings: (flag, file, its value, loader, what to say)
    add_ons = ([("--lora", path, scale, model.load_lora, "LoRA {path}: {result} layers merged at scale {value:g}")
                for path, scale in args.lora] +
               [("--embedding", path, token, model.load_textual_inversion,
                 "embedding {path}: write {result} in the prompt") for path, token in args.embedding])
    for flag, path, value, load, note in add_ons:
        try:
            result = load(path, value)
        except ValueError as e:  # CheckpointError included
            fail(f"{flag} {path}: {e}")
        notes.append(note.format(path=path, value=value, result=result))
    if args.taesd:
        try:
            model.load_taesd(args.taesd)
        except ValueError as e:  # CheckpointError included
            fail(f"--taesd {args.taesd}: {e}")
        notes.append(f"decoding with the tiny autoencoder in {args.taesd}"
                     + (" (--vae-tiling applies to the VAE only)" if args.vae_tiling else ""))
    if model.is_inpainting_model:
        if not (args.init_image and args.mask):
            fail(f"{ckpt} is an inpainting model: give the image with --init-image and what to repaint with --mask",
                 USAGE)
        if args.strength is None:  # it sees the masked image itself, so it starts from pure noise
            strength = 1.0
    model.set_attention_slicing(args.attention_slicing)
    model.set_vae_tiling(args.vae_tiling)
    notes += sampling_defaults(args, model)
    check_int("--steps", args.steps, 1, model.schedule.num_timesteps)

    if args.init_image:
        m = math.lcm(8, model.size_multiple)
        width, height = args.width or image.size[0] // m * m, args.height or image.size[1] // m * m
        if width < m or height < m:
            fail(f"--init-image {args.init_image}: too small for this model (at least {m}x{m} pixels)", USAGE)
        if (width, height) != image.size:
            notes.append(f"resizing the init image from {image.size[0]}x{image.size[1]} to {width}x{height}")
        init = to_tensor(image.resize((width, height))) * 2 - 1
        if args.sampler in ("plms", "lms") and strength < 1:
            notes.append(f"note: img2img with --sampler {args.sampler} starts part of the way down as lesson 07 "
                         "describes; diffusers' img2img pipeline starts it differently, so this one combination "
                         "is not compared with diffusers (every other sampler is)")
        if args.mask:
            mask = to_tensor(mask_image.resize((width, height)))
        if 0 < strength and int(args.steps * strength) == 0:
            notes.append(f"note: --strength {strength:g} of {args.steps} steps runs no step, so the image comes back "
                         f"as the VAE reconstructs it; raise --strength to at least {1 / args.steps:g} or --steps")
    else:
        height = args.height or model.default_size
        width = args.width or model.default_size
    limit = 4 * model.default_size
    for flag, value in (("--height", height), ("--width", width)):
        if value > limit:
            usage(flag, value, f"at most {limit} for this model (4x the {model.default_size} pixels it was "
                               "trained at; beyond that it draws repeated fragments and needs far more memory)")
    try:
        model.check_size(height, width)
    except ValueError as e:
        fail(str(e), USAGE)
    embedding_norm = None
    if recipe is not None:  # the recipe's embedding, once for every image: (1, D_p)
        try:
            image_prompt = model.encode_joint_prompt(recipe)[:, 0]
        except ValueError as e:
            fail(str(e), USAGE)
        embedding_norm = round(image_prompt.norm().item(), 4)
        notes.append(f"the image embedding's length: {embedding_norm:g}"
                     + (" (--norm)" if args.norm is not None else " (the images' weighted mean; --norm sets it)"))
    for note in notes:
        print(note, file=sys.stderr)

    from tqdm import tqdm

    os.makedirs(args.out, exist_ok=True)
    seed = args.seed if args.seed is not None else random.SystemRandom().randrange(2**31)
    stem = recipe_stem(args) if variations else slug(args.prompt)
    if args.image_adapter:  # "a cat like photo", or "like photo"
        stem = "-".join(part for part in (slug(args.prompt) if args.prompt else "", "like",
                                          slug(os.path.splitext(os.path.basename(args.image_prompt[0]))[0])) if part)
    steps_run = args.steps if init is None else args.steps - (args.steps - int(args.steps * strength))
    bar = tqdm(total=args.n * steps_run, desc="sampling", unit="step", file=sys.stderr)
    batch = args.batch_size or (25 if max(height, width) <= 64 else 1)
    images, paths = [], []
    for first in range(0, args.n, batch):
        seeds = list(range(seed + first, seed + min(args.n, first + batch)))
        names = [free_path(os.path.join(args.out, f"{stem}-{s}.png"), args.overwrite)[:-4] for s in seeds]
        step_dirs = [f"{name}-steps" for name in names]

        def callback(info, step_dirs=step_dirs):
            bar.update(len(step_dirs))
            if args.save_intermediates:
                x0 = model.to_unit(model.decode_latents(info["x0_pred"]))
                for x, step_dir in zip(x0, step_dirs):
                    os.makedirs(step_dir, exist_ok=True)
                    to_pil(x).save(os.path.join(step_dir, f"step_{info['step']:03d}.png"))

        try:
            xs = model.generate(args.prompt, negative_prompt=args.negative, image_prompt=image_prompt,
                                num_steps=args.steps,
                                sampler=args.sampler, guidance_scale=args.guidance,
                                guidance_interval=args.guidance_interval, height=height, width=width,
                                seeds=seeds, init_image=init, strength=strength, mask=mask,
                                callback=callback, **({"karras": True} if args.karras else {}))
        except ValueError as e:
            fail(str(e))
        for s, x, name in zip(seeds, xs, names):
            settings = {"prompt": args.prompt, "negative": args.negative, "seed": s, "steps": args.steps,
                        "sampler": args.sampler, "karras": args.karras, "guidance": args.guidance,
                        "guidance_interval": list(args.guidance_interval) if args.guidance_interval else None,
                        "height": height, "width": width, "checkpoint": os.path.abspath(ckpt),
                        "ema": not args.no_ema, "dtype": str(model.dtype)[6:]}
            if args.lora:
                settings["loras"] = [[os.path.abspath(path), scale] for path, scale in args.lora]
            if args.taesd:
                settings["taesd"] = os.path.abspath(args.taesd)
            if args.embedding:
                settings["embeddings"] = [os.path.abspath(path) for path, _ in args.embedding]
            if args.image_adapter:
                settings["image_adapter"] = [os.path.abspath(args.image_adapter[0]), args.image_adapter[1]]
            if len(args.image_prompt) == 1:
                settings["image_prompt"] = os.path.abspath(args.image_prompt[0])
            elif args.image_prompt:
                settings["image_prompt"] = [os.path.abspath(path) for path in args.image_prompt]
            if embedding_norm is not None:  # a JointPrompt: its recipe and the length it came to
                settings.update(image_weights=args.image_weights, plus=args.plus, minus=args.minus,
                                text_weight=1.0 if args.text_weight is None else args.text_weight,
                                norm=args.norm, embedding_norm=embedding_norm,
                                clip=os.path.abspath(args.clip) if args.clip else None)
            if init is not None:
                settings.update(init_image=os.path.abspath(args.init_image), strength=strength)
            if mask is not None:
                settings["mask"] = os.path.abspath(args.mask)
            path = f"{name}.png"
            save_png(to_pil(x), path, settings)
            images.append(x)
            paths.append(path)
    bar.close()
    if args.n > 1:
        from torchvision.utils import make_grid

        grid = make_grid(torch.stack(images), nrow=int(args.n ** 0.5 + 0.999), padding=2, pad_value=1.0)
        path = free_path(os.path.join(args.out, f"{stem}-{seed}-grid.png"), args.overwrite)
        save_png(to_pil(grid), path, {"prompt": args.prompt, "seeds": f"{seed}..{seed + args.n - 1}"})
        paths.append(path)
    for path in paths:
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
