"""python -m minildm.studio: start the studio's page on this machine and print its address."""
from __future__ import annotations

import argparse
import os
import sys

from ..cli import USAGE, CommandError, Parser, check_choice, check_int, check_writable_dir, fail, usage
from ..sample import check_taesd_folder, image_adapter_option, lora_files


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog="python -m minildm.studio", formatter_class=argparse.ArgumentDefaultsHelpFormatter,
               description="A local web page to generate with any model minildm loads, watch the image form, "
                           "and look inside (filmstrip, attention maps, sampler comparisons, prompt arithmetic).")
    p.add_argument("--ckpt", action="append", default=[], metavar="PATH",
                   help="SD v1 .safetensors/.ckpt, a diffusers folder, or a minildm run, offered beside the runs "
                        "in --runs-dir; may be given several times")
    p.add_argument("--runs-dir", default="runs", help="where `python -m minildm.train` writes runs")
    p.add_argument("--taesd", default=None, metavar="FOLDER",
                   help="decode with the tiny autoencoder TAESD (a diffusers AutoencoderTiny folder, or one with "
                        "taesd_decoder.pth): images and previews in a fraction of the VAE's time")
    p.add_argument("--lora", action="append", default=[], metavar="FILE[:SCALE]",
                   help="merge a LoRA for SD v1 (kohya or diffusers layout) into every SD v1 model the page loads, "
                        "times SCALE (default 1); e.g. the LCM-LoRA, then pick the lcm sampler")
    p.add_argument("--clip", default=None, metavar="FOLDER",
                   help="a full CLIP folder (openai/clip-vit-large-patch14): an image-variations model then also "
                        "takes captions, moved in CLIP's joint space (Look inside: a photo and words)")
    p.add_argument("--image-adapter", default=None, metavar="FILE[:SCALE]",
                   help="an image adapter for one of your runs (python -m minildm.finetune image-prompt): that run "
                        "then reads a photo beside the prompt; SCALE weighs the photo (default 1)")
    p.add_argument("--out", default="studio-outputs", help="folder for the images made (PNG with their settings)")
    p.add_argument("--port", type=int, default=7860, help="port of the page")
    p.add_argument("--listen", action="store_true",
                   help="serve on every network interface (0.0.0.0) instead of this machine only (127.0.0.1): "
                        "anyone who can reach the machine can then use the page")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, ... (auto: cuda when available)")
    p.add_argument("--dtype", default="auto", choices=("auto", "float32", "float16", "bfloat16"),
                   help="weight dtype (auto: float16 on CUDA; on the CPU bfloat16 for SD-sized models where the "
                        "CPU multiplies it in hardware, else float32)")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    check_int("--port", args.port, 1, 65535)
    check_choice("--dtype", args.dtype, ("auto", "float32", "float16", "bfloat16"))
    check_writable_dir("--out", args.out)
    check_taesd_folder(args.taesd)
    args.lora = lora_files(args.lora)
    if args.clip is not None and not os.path.isdir(args.clip):
        usage("--clip", args.clip, "must be a folder (a transformers CLIP folder such as openai/clip-vit-large-patch14)")
    if args.image_adapter is not None:
        args.image_adapter = image_adapter_option(args.image_adapter)
    for path in args.ckpt:
        if not os.path.exists(path) and not os.path.isdir(os.path.join(args.runs_dir, path)):
            fail(f"--ckpt {path}: not found", USAGE)
    try:
        import gradio  # noqa: F401
    except ImportError:
        fail("the studio needs Gradio: pip install -r requirements-studio.txt", USAGE)
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    import matplotlib

    matplotlib.use("Agg")
    from .page import CSS, LESSONS, build
    from .session import Studio

    studio = Studio(args.ckpt, args.runs_dir, taesd=args.taesd, loras=args.lora, clip=args.clip,
                    image_adapter=args.image_adapter, device=args.device, dtype=args.dtype, out=args.out)
    models = studio.models()
    if not models:
        fail(f"no model to offer: no run in {args.runs_dir}/ and no --ckpt. Train one with `python -m minildm.train "
             "--dataset cifar`, or pass --ckpt with Stable Diffusion v1 weights", USAGE)
    first = args.ckpt[0] if args.ckpt else models[0]        # what you name comes first, else the newest run
    print(f"loading {first} ...", flush=True)
    try:
        studio.use(first)
    except ValueError as e:
        if isinstance(e.__cause__, CommandError):           # load_model printed its line already
            raise e.__cause__ from None
        fail(str(e))
    print(studio.describe(), flush=True)
    page = build(studio)
    page.queue(default_concurrency_limit=1)
    host = "0.0.0.0" if args.listen else "127.0.0.1"
    try:
        _, url, _ = page.launch(server_name=host, server_port=args.port, prevent_thread_lock=True, quiet=True,
                                show_error=True, allowed_paths=[LESSONS, os.path.abspath(args.out)],
                                footer_links=["api"], css=CSS)
    except OSError as e:
        fail(f"--port {args.port}: cannot serve there ({str(e).splitlines()[0]}); pick another with --port")
    print(f"minildm studio: http://{'127.0.0.1' if not args.listen else host}:{args.port}/"
          + ("  (listening on every interface: --listen)" if args.listen else "") + "   Ctrl+C stops it", flush=True)
    try:
        page.block_thread()
    except KeyboardInterrupt:
        page.close()
    return 0
