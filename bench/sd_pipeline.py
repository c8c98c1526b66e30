"""Stable Diffusion v1.5-size loading and txt2img: minildm against diffusers' StableDiffusionPipeline.

Random weights of the real SD v1.5 sizes are written once as a float16 `.safetensors` file in the
original (CompVis) layout, like v1-5-pruned-emaonly.safetensors. Each side then runs in its own
subprocess, so its peak resident memory is its own:

    load        the float16 file into float32 models ready to sample (minildm: load_stable_diffusion;
                diffusers: StableDiffusionPipeline.from_single_file with a local config folder)
    generate    one 512x512 image, 20 DDIM steps, guidance 7.5, from the same initial latents
    peak RSS    the subprocess's maximum resident set size
    floor       (with --load-only) the least any float32 loader must do: open the file and cast every
                tensor to float32, nothing else; minildm's load is compared with it too

    python bench/sd_pipeline.py --file /tmp/sd15_random_fp16.safetensors
    python bench/sd_pipeline.py --file /tmp/sd15_random_fp16.safetensors --load-only --repeat 3

The checkpoint (1.7 GB) is written to --file if it does not exist yet; never commit it.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

PROMPT = "a photograph of an astronaut riding a horse"
SCHEDULER = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                 set_alpha_to_one=False, steps_offset=1, clip_sample=False, timestep_spacing="leading",
                 prediction_type="epsilon")


def configs(preset):
    """(UNetConfig, VAEConfig, CLIPTextConfig): SD v1.5's, or tiny ones that check this script in seconds."""
    from minildm.clip_text import CLIPTextConfig
    from minildm.unet import UNetConfig
    from minildm.vae import VAEConfig

    if preset == "sd15":
        return UNetConfig.sd15(), VAEConfig.sd(), CLIPTextConfig.vit_l14()
    vae = VAEConfig(base_channels=8, channel_mult=(1, 2, 2, 2), num_res_blocks=1, norm_groups=4)  # f = 8 like SD
    return UNetConfig.tiny(), vae, CLIPTextConfig.tiny()


def make_checkpoint(path, preset):
    """Random weights in the original layout (float16, EMA-only like the released v1-5 file)."""
    from safetensors.torch import save_file

    from minildm import convert
    from minildm.clip_text import CLIPTextModel
    from minildm.schedule import NoiseSchedule
    from minildm.unet import UNet
    from minildm.vae import AutoencoderKL

    torch.manual_seed(0)
    unet_cfg, vae_cfg, text_cfg = configs(preset)
    state = {}
    for prefix, model in ((convert.UNET_PREFIX, UNet(unet_cfg)), (convert.VAE_PREFIX, AutoencoderKL(vae_cfg)),
                          (convert.TEXT_PREFIX, CLIPTextModel(text_cfg))):
        with torch.no_grad():
            for p in model.parameters():  # zero-initialised output layers get weights too
                if p.dim() > 1 and p.abs().max() == 0:
                    p.normal_(0, p[0].numel() ** -0.5)
        state.update({prefix + k: v.half().contiguous() for k, v in model.state_dict().items()})
        del model
    state[convert.TEXT_PREFIX + "embeddings.position_ids"] = torch.arange(77)[None]
    state["alphas_cumprod"] = NoiseSchedule.sd().alphas_cumprod.half()
    tmp = path + ".tmp"
    save_file(state, tmp)
    os.replace(tmp, path)


def diffusers_config_folder(folder, preset):
    """The component configs diffusers' from_single_file needs offline (no weights in it)."""
    from minildm import convert
    from minildm.tokenizer import CLIPTokenizer

    unet_cfg, vae_cfg, text_cfg = configs(preset)

    def write(sub, name, d):
        os.makedirs(os.path.join(folder, sub), exist_ok=True)
        with open(os.path.join(folder, sub, name), "w") as f:
            json.dump(d, f)

    write("unet", "config.json", {"_class_name": "UNet2DConditionModel", **convert.unet_config_to_diffusers(unet_cfg)})
    write("vae", "config.json", {"_class_name": "AutoencoderKL", **convert.vae_config_to_diffusers(vae_cfg)})
    write("text_encoder", "config.json", {"architectures": ["CLIPTextModel"], "model_type": "clip_text_model",
                                          **convert.text_config_to_diffusers(text_cfg)})
    write("scheduler", "scheduler_config.json", {"_class_name": "DDIMScheduler", **SCHEDULER})
    tok = CLIPTokenizer.default()
    write("tokenizer", "vocab.json", tok.encoder)
    with open(os.path.join(folder, "tokenizer", "merges.txt"), "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n" + "\n".join(" ".join(m) for m in tok.merges) + "\n")
    write("tokenizer", "tokenizer_config.json", {"model_max_length": 77, "pad_token": "<|endoftext|>",
                                                 "tokenizer_class": "CLIPTokenizer"})
    write("", "model_index.json", {"_class_name": "StableDiffusionPipeline", "unet": ["diffusers", "UNet2DConditionModel"],
                                   "vae": ["diffusers", "AutoencoderKL"], "text_encoder": ["transformers", "CLIPTextModel"],
                                   "tokenizer": ["transformers", "CLIPTokenizer"], "scheduler": ["diffusers", "DDIMScheduler"],
                                   "safety_checker": [None, None], "feature_extractor": [None, None],
                                   "requires_safety_checker": False})
    return folder


def run_side(side, path, steps, size, out, preset, load_only=False):
    """Load, generate once, and report times and peak memory (runs in a fresh subprocess)."""
    latents = torch.randn(1, 4, size // 8, size // 8, generator=torch.Generator().manual_seed(0))
    if side == "floor":
        from safetensors import safe_open

        start = time.perf_counter()
        with safe_open(path, framework="pt") as f:
            tensors = [f.get_tensor(k).float() for k in f.keys()]
        result = dict(side=side, load_s=time.perf_counter() - start, generate_s=0.0,
                      peak_rss_gb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
                      threads=torch.get_num_threads(), tensors=len(tensors))
        with open(out + ".json", "w") as f:
            json.dump(result, f)
        return
    if side == "minildm":  # imports and the config folder stay outside the timed region
        from minildm.ldm import load_stable_diffusion

        unet_cfg, vae_cfg, text_cfg = configs(preset)
    else:
        from diffusers import StableDiffusionPipeline

        config = diffusers_config_folder(tempfile.mkdtemp(), preset)
    start = time.perf_counter()
    if side == "minildm":
        model = load_stable_diffusion(path, dtype=torch.float32, unet_config=unet_cfg, vae_config=vae_cfg,
                                      text_config=text_cfg)
        loaded = time.perf_counter()
        image = torch.zeros(1) if load_only else model.generate(PROMPT, num_steps=steps, sampler="ddim", guidance_scale=7.5, height=size,
                               width=size, latents=latents)
    else:
        pipe = StableDiffusionPipeline.from_single_file(path, config=config, local_files_only=True,
                                                        torch_dtype=torch.float32, safety_checker=None,
                                                        requires_safety_checker=False)
        loaded = time.perf_counter()
        pipe.set_progress_bar_config(disable=True)
        with torch.no_grad():
            image = torch.zeros(1) if load_only else pipe(PROMPT, num_inference_steps=steps, guidance_scale=7.5, height=size, width=size,
                         latents=latents, output_type="pt").images
    done = time.perf_counter()
    torch.save(image, out + ".pt")
    result = dict(side=side, load_s=loaded - start, generate_s=done - loaded,
                  peak_rss_gb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, threads=torch.get_num_threads())
    with open(out + ".json", "w") as f:
        json.dump(result, f)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--file", default="/tmp/sd15_random_fp16.safetensors", help="the random SD v1.5-size checkpoint")
    p.add_argument("--steps", type=int, default=20, help="DDIM steps")
    p.add_argument("--size", type=int, default=512, help="image height and width")
    p.add_argument("--preset", default="sd15", choices=("sd15", "tiny"),
                   help="sd15 for the benchmark; tiny checks the script in seconds")
    p.add_argument("--load-only", action="store_true", help="measure loading (and its memory) only")
    p.add_argument("--repeat", type=int, default=1, help="runs per side (fresh processes, order rotating)")
    p.add_argument("--side", choices=("minildm", "diffusers", "floor"), help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.side:
        return run_side(args.side, args.file, args.steps, args.size, args.out, args.preset, args.load_only)

    if not os.path.exists(args.file):
        print(f"writing random {args.preset} weights to {args.file} ...", flush=True)
        make_checkpoint(args.file, args.preset)
    work = tempfile.mkdtemp()
    sides = ("diffusers", "minildm") + (("floor",) if args.load_only else ())
    runs = {side: [] for side in sides}
    for r in range(args.repeat):  # fresh processes; the order rotates over repeats
        for side in sides[r % len(sides):] + sides[:r % len(sides)]:
            out = os.path.join(work, side)
            env = dict(os.environ, HF_HUB_OFFLINE="1")
            subprocess.run([sys.executable, os.path.abspath(__file__), "--side", side, "--file", args.file,
                            "--steps", str(args.steps), "--size", str(args.size), "--out", out, "--preset", args.preset]
                           + (["--load-only"] if args.load_only else []), check=True, env=env)
            with open(out + ".json") as f:
                runs[side].append(json.load(f))
            print(json.dumps(runs[side][-1]), flush=True)

    print(f"\n{args.size}x{args.size}, {args.steps} DDIM steps, guidance 7.5, float32, "
          f"{runs['minildm'][0]['threads']} threads, median of {args.repeat}")
    print("| | minildm | diffusers | ratio |\n|---|---|---|---|")
    def median(side, key):
        return statistics.median(run[key] for run in runs[side])

    rows = [("load_s", "load float16 .safetensors (s)")] + ([] if args.load_only else [("generate_s", "txt2img (s)")])
    for key, name in rows + [("peak_rss_gb", "peak RSS (GB)")]:
        ours, ref = median("minildm", key), median("diffusers", key)
        print(f"| {name} | {ours:.2f} | {ref:.2f} | {ours / ref:.2f}x |")
    if args.load_only:
        floor = median("floor", "load_s")
        print(f"\nfloor (open the file, cast every tensor to float32): {floor:.2f} s; minildm "
              f"{median('minildm', 'load_s') / floor:.2f}x the floor, diffusers {median('diffusers', 'load_s') / floor:.2f}x")
        for side in sides:
            print(f"{side:9s} loads (s): " + ", ".join(f"{run['load_s']:.2f}" for run in runs[side]))
    else:
        diff = (torch.load(os.path.join(work, "minildm.pt")) - torch.load(os.path.join(work, "diffusers.pt"))).abs()
        print(f"\nimages: max abs difference {diff.max():.2g}, mean {diff.mean():.2g} (pixels in [0, 1])")


if __name__ == "__main__":
    main()
