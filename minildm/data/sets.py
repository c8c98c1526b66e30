"""A data set by name, as `--dataset` asks for it, and `python -m minildm.data` to look at one."""
from __future__ import annotations

import os

import torch

from .captioned import DataError, CaptionedImages
from .cifar import load_cifar10
from .folder import load_folder
from .shapes import make_shapes


DATASETS = ("cifar", "folder", "shapes")


def load_dataset(name: str, data_dir: str | None = None, resolution: int = 32,
                 num_images: int | None = None, seed: int = 0) -> CaptionedImages:
    """The data set the training command line asks for by `--dataset`."""
    if name == "cifar":
        data = load_cifar10(data_dir, max_images=num_images)
        if resolution != data.resolution:
            data.images = torch.nn.functional.interpolate(
                data.images.float(), size=resolution, mode="bicubic", align_corners=False
            ).round().clamp(0, 255).to(torch.uint8)
        return data
    if name == "folder":
        if data_dir is None:
            raise DataError("--dataset folder needs --data-dir DIR (a folder of images)")
        return load_folder(data_dir, resolution, max_images=num_images)
    if name == "shapes":
        return make_shapes(num_images or 2000, resolution, seed)
    raise DataError(f"unknown dataset {name!r}; choose from {', '.join(DATASETS)}")


def main(argv=None):
    """Load a data set, print a summary, and optionally save a grid of examples."""
    from ..cli import Parser

    parser = Parser(prog="python -m minildm.data", description="Inspect a minildm data set.")
    parser.add_argument("--dataset", choices=DATASETS, default="shapes", help="which data set to load")
    parser.add_argument("--data-dir", default=None, help="local copy of the data (cifar, folder)")
    parser.add_argument("--resolution", type=int, default=32, help="image size in pixels")
    parser.add_argument("--num-images", type=int, default=None, help="load at most this many images")
    parser.add_argument("--seed", type=int, default=0, help="seed for generated shapes")
    parser.add_argument("--grid", default=None, help="save a PNG grid of the first 16 images here")
    args = parser.parse_args(argv)
    from ..cli import check_int, check_seed, check_writable_dir, fail, usage

    check_int("--resolution", args.resolution, 8, 1024)
    check_int("--num-images", args.num_images, 1)
    check_seed("--seed", args.seed)
    if args.data_dir is not None and not os.path.exists(args.data_dir):
        usage("--data-dir", args.data_dir, "does not exist")
    if args.grid:
        check_writable_dir("--grid", os.path.dirname(os.path.abspath(args.grid)))
    try:
        data = load_dataset(args.dataset, args.data_dir, args.resolution, args.num_images, args.seed)
    except DataError as e:
        fail(str(e))
    print(data)
    for i in range(min(5, len(data))):
        print(f"  {i}: {data.caption(i)!r}")
    if args.grid:
        import torchvision
        torchvision.utils.save_image(data.images[:16].float() / 255, args.grid, nrow=4)
        print(f"saved {args.grid}")

