"""python -m minildm.views: each view from the command line, as a PNG (and a GIF for the filmstrip)."""
from __future__ import annotations


from .. import samplers
from .inside import denoising_filmstrip, attention_maps_view
from .compare import prompt_interpolation, seed_interpolation, context_arithmetic, sampler_gallery, image_arithmetic


VIEWS = ("filmstrip", "attention", "gallery", "interpolate", "seeds", "arithmetic", "image-arithmetic")


def build_parser():
    import argparse

    from ..cli import Parser

    p = Parser(
        prog="python -m minildm.views",
        description="Look inside generation: save a view of a checkpoint (your CIFAR run by default, or "
                    "Stable Diffusion v1 weights) as PNG files.",
        epilog='examples:  python -m minildm.views filmstrip "a photo of a cat"\n'
               '           python -m minildm.views attention "a red car on a road" --ckpt v1-5.safetensors\n'
               '           python -m minildm.views interpolate "a photo of a cat" "a photo of a dog"\n'
               '           python -m minildm.views arithmetic "a photo of a cat" "cat" "dog"\n'
               '           python -m minildm.views image-arithmetic photo.png "a dog" "a cat" '
               '--ckpt sd-image-variations-diffusers --clip clip-vit-large-patch14',
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("view", choices=VIEWS, help="filmstrip: denoising step by step (+ GIF); attention: each "
                   "token's cross-attention map; gallery: samplers x step counts; interpolate: prompt A to "
                   "prompt B; seeds: one prompt, seed A to seed B; arithmetic: A - B + C; image-arithmetic: an "
                   "image-variations model, PHOTO - a B + a C in CLIP's joint space, a strip over a")
    p.add_argument("prompts", nargs="+", help="one prompt (filmstrip, attention, gallery, seeds), two "
                   "(interpolate) or three (arithmetic; image-arithmetic: a photo's path, then the caption to "
                   "take away and the one to add)")
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
    p.add_argument("--clip", default=None, metavar="FOLDER",
                   help="image-arithmetic: a full CLIP folder (openai/clip-vit-large-patch14) for the captions")
    p.add_argument("--weights", type=float, nargs="+", default=[0.0, 0.25, 0.5, 0.75, 1.0], metavar="A",
                   help="image-arithmetic: the weights a of the strip")
    p.add_argument("--size", type=int, default=None, help="image height and width (default: the model's)")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto")
    p.add_argument("--dtype", default="auto", choices=("auto", "float32", "float16", "bfloat16"),
                   help="weights' dtype (auto: float16 on CUDA; on the CPU bfloat16 for SD-sized models where "
                        "the CPU multiplies it in hardware, else float32)")
    p.add_argument("--overwrite", action="store_true", help="replace files of the same name (default: a new name)")
    return p


def main(argv=None) -> int:
    import os

    from ..cli import (USAGE, check_float, check_int, check_seed, check_writable_dir, fail, free_path, load_model, slug,
                       usage)

    args = build_parser().parse_args(argv)
    wanted = {"interpolate": 2, "arithmetic": 3, "image-arithmetic": 3}.get(args.view, 1)
    if len(args.prompts) != wanted:
        fail(f"the {args.view} view takes {wanted} prompt{'s' if wanted > 1 else ''}, got {len(args.prompts)}", USAGE)
    check_int("--steps", args.steps, 1, 1000)
    check_float("--guidance", args.guidance, 0, 100)
    check_seed("--seed", args.seed)
    check_seed("--seed-b", args.seed_b)
    check_int("--num", args.num, 2, 64)
    if args.size is not None and (args.size <= 0 or args.size % 8 or args.size > 4096):
        usage("--size", args.size, "must be a positive multiple of 8, at most 4096")
    photo = None
    if args.view == "image-arithmetic":
        import math

        from ..sample import read_image

        if args.clip is None:
            fail("the image-arithmetic view needs --clip FOLDER: a full CLIP (openai/clip-vit-large-patch14) for "
                 "the captions", USAGE)
        if not os.path.isdir(args.clip):
            usage("--clip", args.clip, "is not a folder (a transformers CLIP folder with config.json)")
        if len(args.weights) > 16 or not all(math.isfinite(a) and abs(a) <= 10 for a in args.weights):
            usage("--weights", " ".join(f"{a:g}" for a in args.weights), "must be at most 16 numbers in [-10, 10]")
        photo = read_image(args.prompts[0], None)
    elif args.clip is not None:
        fail("--clip goes with the image-arithmetic view", USAGE)
    check_writable_dir("--out", args.out)
    ldm, _ = load_model(args.ckpt, args.runs_dir, args.device, args.dtype, config=args.config)
    if (args.view == "image-arithmetic") != ldm.is_image_variations_model:
        fail("the image-arithmetic view needs an image-variations model (--ckpt sd-image-variations-diffusers)"
             if photo is not None else f"this is an image-variations model: of the views it has image-arithmetic "
             "(a photo and two captions, with --clip)", USAGE)
    if photo is not None:
        from ..convert import CheckpointError
        try:
            ldm.load_text_clip(args.clip)
        except (ValueError, CheckpointError) as e:
            fail(f"--clip {args.clip}: {e}")
    check_int("--steps", args.steps, 1, ldm.schedule.num_timesteps)
    if args.size is not None:
        if args.size > 4 * ldm.default_size:
            usage("--size", args.size, f"at most {4 * ldm.default_size} for this model (4x its training size)")
        try:
            ldm.check_size(args.size, args.size)
        except ValueError as e:
            fail(str(e), USAGE)
    first = os.path.splitext(os.path.basename(args.prompts[0]))[0] if photo is not None else args.prompts[0]
    stem = os.path.join(args.out, f"{args.view}-{slug(first, 40)}-s{args.seed}")
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
    elif args.view == "image-arithmetic":
        figure = image_arithmetic(ldm, photo, *args.prompts[1:], weights=args.weights, **sampling, **common).figure
    else:
        figure = context_arithmetic(ldm, *args.prompts, **sampling, **common).figure
    figure.savefig(stem + ".png", dpi=120)
    for path in [stem + ".png"] + written:
        print(path)
    return 0

