"""How much of a class the first stage keeps: the evaluation judge on VAE reconstructions of real photos.

    python bench/vae_ceiling.py runs/cpu60b [--runs-dir runs] [--data-dir ../shared/data/cifar10-train-jpg.tar.gz]

The run may be a whole run (model.safetensors) or a first stage alone (`--stage vae`: vae.safetensors),
which makes this a quick screen of a first-stage design before an hour is spent on stage 2.
A trained CIFAR run's held-out photos x are read by the judge `python -m minildm.evaluate` uses (the
cached one: run the evaluation first) three ways: as they are, as decode(encode(x)) through the run's
VAE (posterior mean), and blurred over 4x4 pixel blocks. Samples of a class can hardly be more
recognisable than the VAE's reconstructions of it. Prints accuracy overall and per class.
"""
import argparse
from pathlib import Path

import torch

from minildm import data as data_module
from minildm import evaluate, judge as judge_module
from minildm.ldm import load_stable_diffusion
from minildm.train import load_vae


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("run", help="a CIFAR-10 run folder (config.json and model.safetensors or vae.safetensors)")
    p.add_argument("--runs-dir", default="runs", help="where the evaluation caches its judge (runs/judges/)")
    p.add_argument("--data-dir", default=None, help="the CIFAR-10 copy the run used (default: its config's)")
    args = p.parse_args()
    run = Path(args.run)
    train, held = evaluate.run_data(run, args.data_dir)
    judge, _ = judge_module.load_or_train_judge(judge_module.cached_judge_path(args.runs_dir, train), train, held)
    x = data_module.to_float(held.images)
    if (run / "model.safetensors").exists():
        model = load_stable_diffusion(run / "model.safetensors")
        reconstruct = lambda images: model.decode_latents(model.encode_image(images))
    else:
        vae, _ = load_vae(run / "vae.safetensors")
        reconstruct = lambda images: vae.decode(vae.encode(images).mode()).clamp(-1, 1)
    with torch.no_grad():
        rec = torch.cat([reconstruct(x[i:i + 500]) for i in range(0, len(x), 500)])
    for name, images in (("real photos", x), ("VAE reconstructions", rec), ("blurred 4x4", judge_module.blurred(x))):
        _, predicted = judge_module.judge_outputs(judge, images)
        right = predicted == held.labels
        per_class = " ".join(f"{c} {right[held.labels == k].float().mean():.2f}" for k, c in enumerate(held.class_names))
        print(f"{name:<20} {right.float().mean():.3f}   {per_class}")


if __name__ == "__main__":
    main()
