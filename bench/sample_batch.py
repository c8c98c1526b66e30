"""Drawing many images: one at a time against batches, with the same seeds and the same images.

    python bench/sample_batch.py runs/NAME --n 100 --batch-sizes 1 25 100

For each batch size, the n images of one prompt are drawn as `python -m minildm.sample --n N
--batch-size B` draws them (DDIM 50 steps, guidance 7.5, image i from seed + i); the script prints the
wall time of each, its ratio to one at a time, and the largest difference between the images of a
batch and the same images drawn alone.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from minildm.ldm import load_stable_diffusion


def draw(model, prompt: str, n: int, batch: int, steps: int, guidance: float, seed: int) -> torch.Tensor:
    parts = []
    for first in range(0, n, batch):
        seeds = list(range(seed + first, seed + min(n, first + batch)))
        parts.append(model.generate(prompt, seeds=seeds, num_steps=steps, guidance_scale=guidance))
    return torch.cat(parts)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run", help="a run folder or checkpoint")
    p.add_argument("--prompt", default="a photo of a cat")
    p.add_argument("--n", type=int, default=100)
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 25, 100])
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--guidance", type=float, default=7.5)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    path = Path(args.run)
    model = load_stable_diffusion(str(path / "model.safetensors" if path.is_dir() else path))
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; {args.n} images of {args.prompt!r}, "
          f"DDIM {args.steps} steps, guidance {args.guidance}")
    draw(model, args.prompt, 2, 2, 2, args.guidance, args.seed)  # warm-up
    times, images = {}, {}
    for batch in args.batch_sizes:
        start = time.perf_counter()
        images[batch] = draw(model, args.prompt, args.n, batch, args.steps, args.guidance, args.seed)
        times[batch] = time.perf_counter() - start
    base = args.batch_sizes[0]
    for batch in args.batch_sizes:
        diff = (images[batch] - images[base]).abs().max().item()
        print(f"batch {batch:>4}: {times[batch]:7.1f} s  {args.n / times[batch]:6.2f} images/s  "
              f"speed-up {times[base] / times[batch]:5.2f}x over batch {base}  max |difference| {diff:.1e}")


if __name__ == "__main__":
    main()
