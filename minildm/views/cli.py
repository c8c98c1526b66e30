"""python -m minildm.views: each view from the command line, as a PNG (and a GIF for the filmstrip)."""
from __future__ import annotations


from .. import samplers
from .inside import denoising_filmstrip, attention_maps_view
from .compare import prompt_interpolation, seed_interpolation, context_arithmetic, sampler_gallery


VIEWS = ("filmstrip", "attention", "gallery", "interpolate", "seeds", "arithmetic")


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
                   help="weights' dtype (auto: float16 on CUDA; on the CPU bfloat16 for SD-sized models where "
                        "the CPU multiplies it in hardware, else float32)")
    p.add_argument("--overwrite", action="store_true", help="replace files of the same name (default: a new name)")
    return p


def main(argv=None) -> int:
    import os

    from ..cli import (USAGE, check_float, check_int, check_seed, check_writable_dir, fail, free_path, load_model, slug,
                       usage)

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
    stem = os.path.join(args.out, f"{args.view}-{slug(args.prompts[0], 40)}-s{args.seed}")
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

