"""Stable Diffusion in seconds on a CPU: five ways to make one image, minildm against diffusers, one run.

    a  the defaults: DDIM, 50 steps, guidance 7.5, float32, the VAE decoder
    b  DPM-Solver++(2M) with Karras sigmas, 25 steps, guidance 7.5, float32
    c  the LCM-LoRA merged, LCM sampler, 4 steps, guidance 1 (one UNet call a step), float32
    d  (c) in bfloat16 (minildm: --dtype bfloat16; diffusers: torch_dtype=torch.bfloat16)
    e  (d) decoded by TAESD, the tiny autoencoder, instead of the VAE

Random weights of the real sizes stand in for the real files, in their real layouts: SD v1.5 as an
original float16 .safetensors (bench/sd_pipeline.py writes it), the LCM-LoRA for SD v1.5 as a kohya-style
file with diffusers' module names (rank 64, alpha 8, its 278 layers: attention, feed-forward, the
transformers' projections, every ResBlock's convolutions and time projection, the samplers'
convolutions), TAESD as a diffusers AutoencoderTiny folder. Speed does not depend on the values.

Every case and side runs in a fresh subprocess, sides alternating: it loads (timed apart: reading,
merging the LoRA, loading TAESD), makes an image from fixed initial latents and seed (the first, "cold"), and
for the fast cases (c-e) a second one ("warm"), and reports its peak resident memory. The images of
the two sides are compared, and minildm's bfloat16 image (d) with its float32 one (c). Then the one
command of the fast path, `python -m minildm.sample ... --dtype bfloat16 --taesd ...`, is timed
whole, from the shell's point of view.

    flock ../heavy.lock python bench/fast_cpu.py --sizes 512 256           # all cases, both sides
    flock ../heavy.lock python bench/fast_cpu.py --cases cde --repeat 2    # the fast cases, twice each
    python bench/fast_cpu.py --preset tiny --sizes 64                      # check the script in seconds
    python bench/fast_cpu.py --fidelity runs/cpu60h                        # bfloat16 on a trained CIFAR run
    python bench/fast_cpu.py --components                                  # the UNet, VAE and TAESD apart
    python bench/fast_cpu.py --profile                                     # inside one bfloat16 UNet call

Files go to --work (default /tmp/minildm-fast-cpu): 2.1 GB of checkpoint, never commit them.
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
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from minildm.lora import LCM_LORA_TARGETS  # noqa: E402  (the modules the LCM-LoRA adapts)
import sd_pipeline  # noqa: E402  (bench/sd_pipeline.py: the random SD v1.5 file and diffusers' config folder)

PROMPT = "a cat in a hat"
CASES = {  # name: (sampler, steps, guidance, karras, lora, dtype, taesd)
    "a": ("ddim", 50, 7.5, False, False, "float32", False),
    "b": ("dpmpp_2m", 25, 7.5, True, False, "float32", False),
    "c": ("lcm", 4, 1.0, False, True, "float32", False),
    "d": ("lcm", 4, 1.0, False, True, "bfloat16", False),
    "e": ("lcm", 4, 1.0, False, True, "bfloat16", True),
}
DIFFUSERS_SCHEDULERS = {"ddim": ("DDIMScheduler", {}), "dpmpp_2m": ("DPMSolverMultistepScheduler",
                        {"algorithm_type": "dpmsolver++", "solver_order": 2, "use_karras_sigmas": True}),
                        "lcm": ("LCMScheduler", {})}



# ---------------------------------------------------------------------------------------- the files


def make_lcm_lora(path, preset, rank=64, alpha=8.0):
    """A random LoRA on the LCM-LoRA's layers, in its file layout (kohya keys, diffusers module names)."""
    from diffusers import UNet2DConditionModel
    from safetensors.torch import save_file

    from minildm import convert

    unet_cfg = sd_pipeline.configs(preset)[0]
    with torch.device("meta"):
        unet = UNet2DConditionModel(**convert.unet_config_to_diffusers(unet_cfg))
    g, state = torch.Generator().manual_seed(0), {}
    for name, module in unet.named_modules():
        if not name.endswith(LCM_LORA_TARGETS) or not isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)):
            continue
        w = module.weight
        r = min(rank, w.shape[0], w.shape[1])
        key = "lora_unet_" + name.replace(".", "_")
        state[key + ".lora_down.weight"] = (torch.randn((r,) + tuple(w.shape[1:]), generator=g) * 0.01).half()
        up_shape = (w.shape[0], r) + ((1, 1) if w.dim() == 4 else ())
        state[key + ".lora_up.weight"] = (torch.randn(up_shape, generator=g) * 0.01).half()
        state[key + ".alpha"] = torch.tensor(alpha).half()
    save_file(state, path)
    return len(state) // 3


def make_taesd(folder, preset):
    """A random TAESD for SD v1 latents as a diffusers AutoencoderTiny folder."""
    from diffusers import AutoencoderTiny

    torch.manual_seed(0)
    sizes = {} if preset == "sd15" else dict(encoder_block_out_channels=(8,) * 4, decoder_block_out_channels=(8,) * 4)
    AutoencoderTiny(**sizes).save_pretrained(folder)


def files(work, preset):
    os.makedirs(work, exist_ok=True)
    ckpt, lora, taesd = (os.path.join(work, f"{preset}-{n}") for n in ("sd.safetensors", "lcm-lora.safetensors", "taesd"))
    if not os.path.exists(ckpt):
        print(f"writing random {preset} weights to {ckpt} ...", flush=True)
        sd_pipeline.make_checkpoint(ckpt, preset)
    if not os.path.exists(lora):
        print(f"a random LCM-LoRA with {make_lcm_lora(lora, preset)} layers: {lora}", flush=True)
    if not os.path.exists(taesd):
        make_taesd(taesd, preset)
    return ckpt, lora, taesd


# ---------------------------------------------------------------------------------------- one side


def run_side(side, case, size, paths, preset, out):
    """Load, make one image (two for the fast cases), report times and peak memory (a fresh subprocess)."""
    sampler, steps, guidance, karras, lora, dtype_name, taesd = CASES[case]
    ckpt, lora_path, taesd_dir = paths
    dtype = getattr(torch, dtype_name)
    latents = torch.randn(1, 4, size // 8, size // 8, generator=torch.Generator().manual_seed(0))
    if side == "minildm":
        from minildm.ldm import load_stable_diffusion
    else:
        import diffusers

        config = sd_pipeline.diffusers_config_folder(tempfile.mkdtemp(), preset)
    start = time.perf_counter()
    if side == "minildm":
        unet_cfg, vae_cfg, text_cfg = sd_pipeline.configs(preset)  # read from the shapes for sd15 anyway
        model = load_stable_diffusion(ckpt, dtype=dtype, unet_config=unet_cfg, vae_config=vae_cfg, text_config=text_cfg)
        if lora:
            model.load_lora(lora_path)
        if taesd:
            model.load_taesd(taesd_dir)

        def image():
            return model.generate(PROMPT, num_steps=steps, sampler=sampler, guidance_scale=guidance, height=size,
                                  width=size, latents=latents, seed=0, **({"karras": True} if karras else {}))
    else:
        pipe = diffusers.StableDiffusionPipeline.from_single_file(
            ckpt, config=config, local_files_only=True, torch_dtype=dtype, safety_checker=None,
            requires_safety_checker=False)
        name, options = DIFFUSERS_SCHEDULERS[sampler]
        pipe.scheduler = getattr(diffusers, name).from_config(pipe.scheduler.config, **options)
        if lora:  # merged into the weights and the LoRA layers removed: its fastest way to run one
            pipe.load_lora_weights(lora_path)
            pipe.fuse_lora()
            pipe.unload_lora_weights()
        if taesd:
            pipe.vae = diffusers.AutoencoderTiny.from_pretrained(taesd_dir, torch_dtype=dtype)
        pipe.set_progress_bar_config(disable=True)

        def image():
            with torch.no_grad():
                return pipe(PROMPT, num_inference_steps=steps, guidance_scale=guidance, height=size, width=size,
                            latents=latents.to(dtype), generator=torch.Generator().manual_seed(0),
                            output_type="pt").images.float()
    loaded = time.perf_counter()
    x = image()
    times = [time.perf_counter() - loaded]
    if case in "cde":
        again = time.perf_counter()
        image()
        times.append(time.perf_counter() - again)
    torch.save(x, out + ".pt")
    result = dict(side=side, case=case, size=size, load_s=loaded - start, image_s=times,
                  peak_rss_gb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
                  threads=torch.get_num_threads())
    with open(out + ".json", "w") as f:
        json.dump(result, f)


def time_command(paths, size, work):
    """The fast path as a user types it, timed whole (Python start-up and imports included)."""
    ckpt, lora, taesd = paths
    cmd = [sys.executable, "-m", "minildm.sample", PROMPT, "--ckpt", ckpt, "--lora", lora, "--sampler", "lcm",
           "--steps", "4", "--guidance", "1", "--dtype", "bfloat16", "--taesd", taesd, "--seed", "0",
           "--height", str(size), "--width", str(size), "--out", os.path.join(work, "command"), "--overwrite"]
    start = time.perf_counter()
    subprocess.run(cmd, check=True, cwd=ROOT, capture_output=True, env=dict(os.environ, HF_HUB_OFFLINE="1"))
    return time.perf_counter() - start


def psnr(a, b) -> torch.Tensor:
    """PSNR (dB) of each image of a against b (B,), pixels in [0, 1]: steps.image_psnr, which takes [-1, 1]."""
    from minildm.steps import image_psnr

    return image_psnr(a * 2 - 1, b * 2 - 1)


# ---------------------------------------------------------------------------------------- the parts


def components(repeat=2):
    """One SD v1.5-sized UNet call (batch 1, 64x64 latents), VAE decode and TAESD decode, each in float32,
    with bfloat16 weights and (UNet, VAE) under bfloat16 autocast with float32 weights: the fastest of
    `repeat` timed runs after a warm-up, and the relative difference of the output from float32."""
    import copy

    from minildm.taesd import TAESDConfig, TinyAutoencoder
    from minildm.unet import UNet, UNetConfig
    from minildm.vae import AutoencoderKL, VAEConfig

    def timed(fn):
        fn()
        times = []
        for _ in range(repeat):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        return min(times)

    torch.manual_seed(0)
    z, context, t = torch.randn(1, 4, 64, 64), torch.randn(1, 77, 768), torch.tensor([500.0])
    print(f"| part (SD v1.5 sizes, 512x512) | float32 (s) | bfloat16 weights (s) | bfloat16 autocast (s) | "
          f"relative difference from float32 | ({torch.get_num_threads()} threads) |\n|---|---|---|---|---|---|")
    parts = (("UNet call, batch 1", lambda: UNet(UNetConfig.sd15()), lambda m, x: m(x, t, context.to(x.dtype))),
             ("VAE decode", lambda: AutoencoderKL(VAEConfig.sd()), lambda m, x: m.decode(x)),
             ("TAESD decode", lambda: TinyAutoencoder(TAESDConfig.sd()), lambda m, x: m.decode(x)))
    with torch.no_grad():
        for name, build, run in parts:
            model = build().eval()
            for p in model.parameters():  # zero-initialised output layers get weights too
                if p.dim() > 1 and p.abs().max() == 0:
                    p.normal_(0, p[0].numel() ** -0.5)
            ref = run(model, z)
            t32 = timed(lambda: run(model, z))
            cells = ["n/a", "n/a"]
            if name != "TAESD decode":
                with torch.autocast("cpu", torch.bfloat16):
                    cells[1] = f"{timed(lambda: run(model, z)):.2f}"
            model = copy.deepcopy(model).to(torch.bfloat16)
            out = run(model, z.bfloat16()).float()
            cells[0] = f"{timed(lambda: run(model, z.bfloat16())):.2f}"
            rel = (out - ref).norm() / ref.norm()
            print(f"| {name} | {t32:.2f} | {cells[0]} | {cells[1]} | {rel:.2%} | |", flush=True)
            del model


def profile():
    """Where one SD v1.5-sized UNet call (batch 1, 64x64 latents, bfloat16 weights) spends its time:
    torch.profiler's self CPU time per operator, after a warm-up call."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    from minildm.unet import UNet, UNetConfig

    unet = UNet(UNetConfig.sd15()).eval().to(torch.bfloat16)
    z, context = torch.randn(1, 4, 64, 64).bfloat16(), torch.randn(1, 77, 768).bfloat16()
    t = torch.tensor([500.0])
    with torch.no_grad():
        unet(z, t, context)
        with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
            start = time.perf_counter()
            unet(z, t, context)
            wall = time.perf_counter() - start
    events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    total = sum(e.self_cpu_time_total for e in events)
    print(f"one bfloat16 UNet call, batch 1, 64x64 latents: {wall:.2f} s wall, {torch.get_num_threads()} threads")
    print("| operator | share of self CPU time | calls |\n|---|---|---|")
    for e in events[:8]:
        print(f"| {e.key} | {e.self_cpu_time_total / total:.0%} | {e.count} |")


# ---------------------------------------------------------------------------------------- bfloat16 on a CIFAR run


def fidelity(run, n):
    """minildm's bfloat16 sampling against float32 on a trained run: the same seeds and settings (the run's
    defaults, DDIM 50), the latents' relative difference and the images' PSNR."""
    from minildm.cli import default_guidance_interval, load_model

    prompts = [f"a photo of a {c}" for c in ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog",
                                             "horse", "ship", "truck")]
    prompts = [p for p in prompts for _ in range(n // len(prompts))]
    interval = default_guidance_interval(os.path.join(run, "model.safetensors"))
    out = {}
    for name, dtype, vae_float32 in (("float32", "float32", False), ("bfloat16", "bfloat16", False),
                                     ("bfloat16, VAE float32", "bfloat16", True)):
        model, _ = load_model(run, "runs", "cpu", dtype)
        if vae_float32:
            model.vae.float()
        start = time.perf_counter()
        z = model.generate(prompts, seeds=list(range(len(prompts))), guidance_interval=interval, output_type="latent")
        x = model.to_unit(model.decode_latents(z))
        out[name] = (z, x, time.perf_counter() - start)
    z32, x32, t32 = out["float32"]
    print(f"\n{run}: {len(prompts)} images, DDIM 50, the run's guidance settings, {torch.get_num_threads()} threads")
    print("| | latents: relative difference (median, max) | images: PSNR vs float32 (median, min) | seconds |")
    print("|---|---|---|---|")
    print(f"| float32 | | | {t32:.1f} |")
    for name in ("bfloat16", "bfloat16, VAE float32"):
        z, x, t = out[name]
        rel = ((z - z32).flatten(1).norm(dim=1) / z32.flatten(1).norm(dim=1))
        p = psnr(x, x32)
        print(f"| {name} | {rel.median():.4f}, {rel.max():.4f} | {p.median():.1f} dB, {p.min():.1f} dB | {t:.1f} |")


# ---------------------------------------------------------------------------------------- the table


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--cases", default="abcde", help="which of the cases a-e to run")
    p.add_argument("--sizes", type=int, nargs="+", default=[512, 256], help="image sizes")
    p.add_argument("--preset", default="sd15", choices=("sd15", "tiny"), help="tiny checks the script in seconds")
    p.add_argument("--repeat", type=int, default=1, help="runs of every case and side (medians are reported)")
    p.add_argument("--work", default="/tmp/minildm-fast-cpu", help="where the random files go")
    p.add_argument("--fidelity", metavar="RUN", help="instead: bfloat16 against float32 on a trained CIFAR run")
    p.add_argument("--n", type=int, default=100, help="images for --fidelity")
    p.add_argument("--components", action="store_true", help="instead: time the UNet, VAE and TAESD apart")
    p.add_argument("--profile", action="store_true", help="instead: where one bfloat16 UNet call spends its time")
    p.add_argument("--side", choices=("minildm", "diffusers"), help=argparse.SUPPRESS)
    p.add_argument("--case", help=argparse.SUPPRESS)
    p.add_argument("--size", type=int, help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.fidelity:
        return fidelity(args.fidelity, args.n)
    if args.components:
        return components()
    if args.profile:
        return profile()
    paths = files(args.work, args.preset)
    if args.side:
        return run_side(args.side, args.case, args.size, paths, args.preset, args.out)

    runs, images = {}, {}
    for r in range(args.repeat):
        for size in args.sizes:
            for i, case in enumerate(args.cases):  # which side goes first alternates with case and repeat
                for side in (("minildm", "diffusers") if (i + r) % 2 == 0 else ("diffusers", "minildm")):
                    out = os.path.join(args.work, f"{side}-{case}-{size}")
                    subprocess.run([sys.executable, os.path.abspath(__file__), "--side", side, "--case", case,
                                    "--size", str(size), "--out", out, "--preset", args.preset, "--work", args.work],
                                   check=True, env=dict(os.environ, HF_HUB_OFFLINE="1"))
                    with open(out + ".json") as f:
                        runs.setdefault((side, case, size), []).append(json.load(f))
                    images[side, case, size] = torch.load(out + ".pt")
                    print(json.dumps(runs[side, case, size][-1]), flush=True)
    results = {key: dict(load_s=statistics.median(run["load_s"] for run in rs),
                         image_s=[statistics.median(times) for times in zip(*(run["image_s"] for run in rs))],
                         peak_rss_gb=max(run["peak_rss_gb"] for run in rs), threads=rs[0]["threads"])
               for key, rs in runs.items()}
    # (the tiny preset's file would need its YAML on the command line: the command is timed at SD v1.5's size)
    commands = ({size: statistics.median(time_command(paths, size, args.work) for _ in range(args.repeat))
                 for size in args.sizes} if args.preset == "sd15" else {})

    threads = results["minildm", args.cases[0], args.sizes[0]]["threads"]
    print(f"\n{args.preset}, prompt {PROMPT!r}, {threads} threads, median of {args.repeat}; seconds per image "
          "(sampling and decoding; for c-e the second image, the first in brackets), loading apart")
    print("| size | case | minildm (s) | diffusers (s) | ratio | load minildm / diffusers (s) | "
          "peak RSS minildm / diffusers (GB) | images: max abs difference |")
    print("|---|---|---|---|---|---|---|---|")
    for size in args.sizes:
        for case in args.cases:
            ours, ref = results["minildm", case, size], results["diffusers", case, size]
            t_ours, t_ref = ours["image_s"][-1], ref["image_s"][-1]
            cold = (f" ({ours['image_s'][0]:.1f})", f" ({ref['image_s'][0]:.1f})") if len(ours["image_s"]) > 1 else ("", "")
            diff = (images["minildm", case, size] - images["diffusers", case, size]).abs().max()
            print(f"| {size} | {case} | {t_ours:.1f}{cold[0]} | {t_ref:.1f}{cold[1]} | {t_ours / t_ref:.2f}x | "
                  f"{ours['load_s']:.1f} / {ref['load_s']:.1f} | {ours['peak_rss_gb']:.2f} / {ref['peak_rss_gb']:.2f} | "
                  f"{diff:.2g} |")
    for size in args.sizes:
        line = f"{size}px:" + (f" the whole fast-path command (e) {commands[size]:.1f} s;" if commands else "")
        if "c" in args.cases and "e" in args.cases:
            line += (f" (e) against diffusers' float32 at the same sampler and steps (c): "
                     f"{results['diffusers', 'c', size]['image_s'][-1] / results['minildm', 'e', size]['image_s'][-1]:.2f}x faster;")
        if "a" in args.cases and "e" in args.cases:
            line += (f" against the defaults (a): "
                     f"{results['minildm', 'a', size]['image_s'][-1] / results['minildm', 'e', size]['image_s'][-1]:.0f}x")
        print(line)
        if "c" in args.cases and "d" in args.cases:
            a, b = images["minildm", "c", size], images["minildm", "d", size]
            print(f"{size}px: minildm bfloat16 (d) against its float32 (c): PSNR {psnr(a, b).item():.1f} dB, "
                  f"max abs difference {(a - b).abs().max():.2g}")


if __name__ == "__main__":
    main()
