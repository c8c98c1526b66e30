"""python -m minildm.train: the flags, the plan that suits the machine, resume, and exit statuses."""
from __future__ import annotations

import argparse
import json
import os
import time
from dataclasses import replace
from pathlib import Path
from typing import Optional

import torch

from .. import data as data_module
from ..cli import (USAGE, Parser, check_choice, check_device, check_float, check_guidance_interval, check_int,
                   check_readable_file, check_seed, check_writable_dir, fail, named_path, usage)
from ..convert import CheckpointError
from ..ldm import LatentDiffusion
from ..plumbing import STOP, Budget, Run, TrainingDiverged, cpu_has_bfloat16
from ..unet import UNetConfig
from ..vae import VAEConfig
from .config import PRESETS, TrainConfig, describe_plan, training_data, stage_minutes
from .stage1 import train_vae
from .stage2 import train_ldm


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog="python -m minildm.train",
                                description="Train a text-to-image latent diffusion model from scratch "
                                            "(stage 1: VAE, stage 2: UNet + text encoder).")
    p.add_argument("--dataset", choices=data_module.DATASETS, default=None,
                   help="training data: cifar (CIFAR-10 with template captions), folder (your images), "
                        "shapes (generated, no download); default cifar")
    p.add_argument("--data-dir", default=None,
                   help="local data: CIFAR-10 archive/folder or ImageFolder tree (folder or .tar.gz), or your image folder")
    p.add_argument("--preset", choices=sorted(PRESETS), default=None,
                   help="model sizes and budgets: tiny (a smoke run), cifar-cpu (one hour on a CPU) or "
                        "cifar (a consumer GPU); default for --dataset cifar: cifar on a CUDA GPU, "
                        "else cifar-cpu; tiny for other data sets")
    p.add_argument("--stage", choices=("vae", "ldm", "all"), default=None,
                   help="train the VAE, the latent diffusion model, or both in turn (default all; "
                        "with --resume, the stage(s) the run was started with)")
    p.add_argument("--vae", default=None, help="stage 2: start from this trained VAE checkpoint")
    p.add_argument("--name", default=None, help="run name: files go to <runs-dir>/<name>/")
    p.add_argument("--runs-dir", default="runs", help="folder holding the runs")
    p.add_argument("--resume", default=None, metavar="RUN",
                   help="continue the run in this folder (or run name) exactly where it stopped")
    p.add_argument("--max-steps", type=int, default=None, help="optimizer steps per stage")
    p.add_argument("--vae-steps", type=int, default=None, help="stage 1 steps (overrides --max-steps)")
    p.add_argument("--ldm-steps", type=int, default=None, help="stage 2 steps (overrides --max-steps)")
    p.add_argument("--max-minutes", type=float, default=None,
                   help="wall-clock budget of the whole run (data loading, both stages, latent caching); "
                        "with both stages the VAE gets --vae-share of it")
    p.add_argument("--vae-share", type=float, default=None,
                   help="fraction of --max-minutes for stage 1 when both stages run (default 0.3)")
    p.add_argument("--num-images", type=int, default=None, help="train on at most this many images")
    p.add_argument("--holdout-per-class", type=int, default=None,
                   help="keep the last N images of every class out of training (for evaluation)")
    p.add_argument("--resolution", type=int, default=None, help="image size in pixels")
    p.add_argument("--unet-channels", type=int, default=None,
                   help="override the preset UNet's model_channels (e.g. 64 for a CPU budget)")
    p.add_argument("--batch-size", type=int, default=None, help="stage 2 global batch size")
    p.add_argument("--vae-batch-size", type=int, default=None, help="stage 1 global batch size")
    p.add_argument("--lr", type=float, default=None, help="stage 2 peak learning rate (AdamW)")
    p.add_argument("--vae-lr", type=float, default=None, help="stage 1 peak learning rate")
    p.add_argument("--warmup-steps", type=int, default=None, help="stage 2 linear warm-up steps")
    p.add_argument("--grad-accum", type=int, default=None, help="micro-batches per optimizer step")
    p.add_argument("--grad-clip", type=float, default=None, help="max gradient norm (0: off)")
    p.add_argument("--ema-decay", type=float, default=None, help="decay of the UNet's EMA weights")
    p.add_argument("--caption-dropout", type=float, default=None,
                   help="fraction of empty captions, for classifier-free guidance")
    p.add_argument("--reword", type=float, default=None,
                   help="fraction of class captions reworded: template words dropped, noise words from the whole "
                        "vocabulary put in, synonyms (data/wording.py; cifar presets: 0.5, 0 turns it off)")
    p.add_argument("--min-snr-gamma", type=float, default=None,
                   help="weight the diffusion loss by min(SNR, gamma) / SNR (cifar-cpu: 5; 0 turns it off: plain MSE)")
    p.add_argument("--disc-start", type=int, default=None,
                   help="stage 1: switch the patch discriminator on at this step (default: no discriminator)")
    p.add_argument("--no-cache-latents", action="store_true",
                   help="encode images every step (with flips) instead of caching latents once")
    p.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda if available)")
    p.add_argument("--dtype", default=None, help="weights' dtype: float32 (default), bfloat16, float16")
    p.add_argument("--amp", action=argparse.BooleanOptionalAction, default=None,
                   help="mixed precision: bfloat16 autocast (float16 on GPUs without bfloat16); default: on for "
                        "cifar-cpu on a CPU with bfloat16 in hardware (AMX, AVX512-BF16), else off")
    p.add_argument("--compile", action="store_true", help="torch.compile the UNet + text encoder")
    p.add_argument("--seed", type=int, default=None, help="seed of weights, data order and noise")
    p.add_argument("--log-every", type=int, default=None, help="log metrics every N steps")
    p.add_argument("--save-every", type=int, default=None, help="write checkpoints every N steps")
    p.add_argument("--sample-every", type=int, default=None,
                   help="save a sample grid every N steps of stage 2 (0: only at the end)")
    p.add_argument("--sample-steps", type=int, default=None, help="DDIM steps for sample grids")
    p.add_argument("--guidance", type=float, default=None, help="guidance scale for sample grids")
    p.add_argument("--guidance-interval", type=float, nargs=2, default=None, metavar=("T_LO", "T_HI"),
                   help="guide only timesteps T_LO..T_HI in the grids, and by default in sample and evaluate "
                        "(0 1000: every step)")
    p.add_argument("--probe-per-class", type=int, default=None,
                   help="samples per class for the class probe logged with every grid (0: off)")
    p.add_argument("--evaluate", type=int, default=None, metavar="N",
                   help="when a run on CIFAR-10 ends, score N samples per class with python -m minildm.evaluate")
    return p


_OVERRIDES = {"num_images": "num_images", "holdout_per_class": "holdout_per_class",
              "resolution": "resolution", "batch_size": "batch_size", "vae_batch_size": "vae_batch_size",
              "lr": "lr", "vae_lr": "vae_lr", "warmup_steps": "warmup_steps", "grad_accum": "grad_accum",
              "grad_clip": "grad_clip", "ema_decay": "ema_decay", "caption_dropout": "caption_dropout",
              "reword": "reword",
              "disc_start": "disc_start", "device": "device", "dtype": "dtype", "seed": "seed",
              "log_every": "log_every", "save_every": "save_every", "sample_every": "sample_every",
              "sample_steps": "sample_steps", "guidance": "guidance_scale",
              "guidance_interval": "guidance_interval", "max_minutes": "max_minutes",
              "vae_share": "vae_share", "min_snr_gamma": "min_snr_gamma", "probe_per_class": "probe_per_class", "evaluate": "evaluate_per_class",
              "data_dir": "data_dir"}


def config_from_args(args) -> tuple:
    """(TrainConfig, plan): the saved config when resuming, else the preset that suits the machine
    with the flags applied; plan says in words what was chosen and why."""
    if args.resume:
        run_dir = Path(named_path(args.resume, args.runs_dir))                # a path or a run's name
        if not (run_dir / "config.json").exists():
            usage("--resume", args.resume, f"is not a run (no config.json there or in {args.runs_dir}/)")
        try:
            cfg = TrainConfig.from_dict(json.loads((run_dir / "config.json").read_text()))
        except (ValueError, TypeError) as e:
            fail(f"--resume {args.resume}: its config.json cannot be read ({type(e).__name__})")
        cfg.run_dir = str(run_dir)
        plan = f"resuming {run_dir}: the run's own config.json"
    else:
        dataset = args.dataset or "cifar"
        gpu = torch.cuda.is_available() if args.device is None else args.device.startswith("cuda")
        if args.preset:
            preset, reason = args.preset, "asked for"
        elif dataset == "cifar":
            preset, reason = ("cifar", "a CUDA GPU is here") if gpu else ("cifar-cpu", "no CUDA GPU: sized for an hour on a CPU")
        else:
            preset, reason = "tiny", f"the default for --dataset {dataset}"
        cfg = PRESETS[preset](dataset=dataset)
        name = args.name or time.strftime(f"{dataset}-{preset}-%Y%m%d-%H%M%S")
        cfg.run_dir = str(Path(args.runs_dir) / name)
        if (Path(cfg.run_dir) / "config.json").exists():
            usage("--name", name, f"{cfg.run_dir} holds a run already: continue it with --resume {cfg.run_dir}, "
                                  "or choose another --name")
        if cfg.device == "cpu" and args.device is None and torch.cuda.is_available():
            cfg.device = "cuda"
        # Only where the CPU multiplies bfloat16 in hardware is autocast faster than float32 there.
        fast_bfloat16 = preset == "cifar-cpu" and not gpu and cpu_has_bfloat16()
        if preset == "cifar-cpu" and not gpu:
            cfg.amp = fast_bfloat16
    for flag, fieldname in _OVERRIDES.items():
        value = getattr(args, flag)
        if value is not None:
            setattr(cfg, fieldname, value)
    if args.stage is not None:
        cfg.stage = args.stage
    if args.vae is not None:
        cfg.vae_path = args.vae
    if args.max_steps is not None:
        cfg.vae_steps = cfg.ldm_steps = args.max_steps
    if args.vae_steps is not None:
        cfg.vae_steps = args.vae_steps
    if args.ldm_steps is not None:
        cfg.ldm_steps = args.ldm_steps
    if args.unet_channels is not None:
        cfg.unet = dict(cfg.unet, model_channels=args.unet_channels)
    if args.no_cache_latents:
        cfg.cache_latents = False
    if args.amp is not None:
        cfg.amp = args.amp
    if not args.resume and fast_bfloat16 and cfg.amp and args.vae_share is None:
        # the VAE's steps take about half the time under autocast, so the diffusion model gets more of
        # the hour (bench/precision_speed.py, bench/RESULTS.md)
        cfg.vae_share = 0.2
    if args.compile:
        cfg.compile = True
    if cfg.min_snr_gamma == 0:
        cfg.min_snr_gamma = None
    check_config(cfg)
    if not args.resume:
        plan = describe_plan(cfg, preset, reason)
    return cfg, plan


# The flags a resumed run cannot change: they decide the models' shapes or the data the run was started on.
FIXED_ON_RESUME = ("dataset", "data_dir", "preset", "resolution", "unet_channels", "num_images",
                   "holdout_per_class", "seed")


def check_flags(args) -> None:
    """Every flag's value, before any data is read or model built: one line and exit status 2 if not."""
    if args.resume:
        given = [f for f in FIXED_ON_RESUME if getattr(args, f) is not None] + (["name"] if args.name else [])
        if given:
            flag = "--" + given[0].replace("_", "-")
            usage(flag, getattr(args, given[0]), "cannot change a run being resumed (it keeps its config.json); "
                                                  "start a new run instead")
    for flag in ("max_steps", "vae_steps", "ldm_steps", "num_images", "batch_size", "vae_batch_size",
                 "grad_accum", "log_every", "sample_steps", "resolution", "unet_channels"):
        check_int("--" + flag.replace("_", "-"), getattr(args, flag), 1)
    for flag in ("holdout_per_class", "warmup_steps", "save_every", "sample_every", "disc_start",
                 "probe_per_class", "evaluate"):
        check_int("--" + flag.replace("_", "-"), getattr(args, flag), 0)
    check_int("--sample-steps", args.sample_steps, 1, 1000)
    check_float("--max-minutes", args.max_minutes, 0, 7 * 24 * 60, low_open=True)
    check_float("--vae-share", args.vae_share, 0, 1, low_open=True, high_open=True)
    check_float("--lr", args.lr, 0, 1, low_open=True)
    check_float("--vae-lr", args.vae_lr, 0, 1, low_open=True)
    check_float("--grad-clip", args.grad_clip, 0)
    check_float("--ema-decay", args.ema_decay, 0, 1, high_open=True)
    check_float("--caption-dropout", args.caption_dropout, 0, 1, high_open=True)
    check_float("--reword", args.reword, 0, 1)
    check_float("--guidance", args.guidance, 0, 100)
    check_guidance_interval("--guidance-interval", args.guidance_interval)
    check_float("--min-snr-gamma", args.min_snr_gamma, 0)
    check_seed("--seed", args.seed)
    check_choice("--dtype", args.dtype, ("float32", "bfloat16", "float16"))
    if args.device is not None:
        check_device(args.device, auto=False)
    if args.dataset == "folder" and not args.data_dir:
        fail("--dataset folder needs --data-dir DIR (a folder of images)", USAGE)
    if args.data_dir is not None and not os.path.exists(args.data_dir):
        usage("--data-dir", args.data_dir, "does not exist")
    check_readable_file("--vae", args.vae)
    if args.vae is not None and args.stage != "ldm" and not args.resume:
        fail(f"--vae {args.vae} is for --stage ldm (a trained VAE to start stage 2 from)", USAGE)
    if args.name is not None and (not args.name.strip() or os.sep in args.name or args.name in (".", "..")):
        usage("--name", args.name, "must be a plain folder name (no slashes)")
    if not args.resume:
        check_writable_dir("--runs-dir", args.runs_dir)


def check_config(cfg: TrainConfig) -> None:
    """What only the whole config can tell: sizes that fit the models, budgets, batches that split."""
    try:
        unet, vae = UNetConfig.from_dict(cfg.unet), VAEConfig.from_dict(cfg.vae)
    except (ValueError, TypeError) as e:
        fail(f"--unet-channels {cfg.unet.get('model_channels')}: {e}", USAGE)
    multiple = vae.downsample_factor * unet.downsample_factor
    if cfg.resolution % multiple or not multiple <= cfg.resolution <= 1024:
        usage("--resolution", cfg.resolution, f"must be a multiple of {multiple} (the VAE's factor "
                                              f"{vae.downsample_factor} x the UNet's {unet.downsample_factor}), "
                                              "at most 1024")
    if cfg.batch_size % cfg.grad_accum:
        usage("--batch-size", cfg.batch_size, f"must divide by --grad-accum {cfg.grad_accum}")
    if cfg.vae_steps is None and cfg.ldm_steps is None and cfg.max_minutes is None:
        fail("no budget: give --max-steps or --max-minutes", USAGE)
    if cfg.stage == "ldm" and cfg.vae_path is None and not (Path(cfg.run_dir) / "vae.safetensors").exists():
        fail("--stage ldm needs a trained VAE: --vae PATH (or a run folder that has vae.safetensors)", USAGE)


def finished(cfg: TrainConfig) -> Optional[str]:
    """When the run in cfg.run_dir has done all the training cfg asks for: what it did; else None."""
    stage = "vae" if cfg.stage == "vae" else "ldm"
    run = Run(cfg.run_dir, main=False)
    state = run.load_state(stage)
    if state is None or not state.get("done"):
        return None
    vae_state = run.load_state("vae") if stage == "ldm" and cfg.stage == "all" else None
    minutes = stage_minutes(cfg, stage, float(vae_state["elapsed"]) if vae_state else 0.0)
    budget = Budget(cfg.vae_steps if stage == "vae" else cfg.ldm_steps, minutes, float(state["elapsed"]))
    if not budget.reached(int(state["step"])):
        return None
    return (f"{cfg.run_dir} is finished: {'stage 1 (VAE)' if stage == 'vae' else 'stage 2'} ended at step "
            f"{int(state['step'])} after {float(state['elapsed']) / 60:.1f} minutes. Nothing was changed; to train "
            f"longer, resume with more steps (--{'vae' if stage == 'vae' else 'ldm'}-steps) or minutes (--max-minutes)")


def run(cfg: TrainConfig, stage: str = "all", resume: bool = False, vae_path: Optional[str] = None,
        callback=None):
    """Train the requested stage(s); returns the LatentDiffusion (stage 2) or (vae, scale) (stage 1),
    or None when `callback` stopped the run early."""
    started = time.perf_counter()  # loading the data is part of the budget
    cfg = replace(cfg, stage=stage)
    data = training_data(cfg)
    if stage == "vae":
        return train_vae(cfg, resume=resume, data=data, callback=callback, started=started)
    if stage == "ldm":
        return train_ldm(cfg, resume=resume, data=data, vae_path=vae_path, callback=callback, started=started)
    vae, scale = train_vae(cfg, resume=resume, data=data, callback=callback, started=started)
    if scale is None:
        return None
    return train_ldm(cfg, vae=vae, scale_factor=scale, resume=resume, data=data, callback=callback)


def main(argv=None):
    args = build_parser().parse_args(argv)
    check_flags(args)
    cfg, plan = config_from_args(args)
    rank0 = int(os.environ.get("RANK", "0")) == 0
    if args.resume:
        check_writable_dir("--resume", cfg.run_dir)
        done = finished(cfg)
        if done:
            if rank0:
                print(done)
            return 0
    if rank0:
        print(plan, flush=True)
    STOP.install()
    try:
        result = run(cfg, cfg.stage, resume=bool(args.resume), vae_path=cfg.vae_path)
        if isinstance(result, LatentDiffusion) and cfg.evaluate_per_class and rank0:
            from ..evaluate import evaluate_run
            evaluate_run(cfg.run_dir, runs_dir=str(Path(cfg.run_dir).parent), data_dir=cfg.data_dir,
                         n=cfg.evaluate_per_class, model=result)
        if STOP.requested:
            fail(f"stopped by {STOP.signal}; saved {STOP.saved or 'nothing new'}. Continue with --resume "
                 f"{cfg.run_dir}", 130 if STOP.signal == "SIGINT" else 143)
    except (data_module.DataError, CheckpointError) as e:
        fail(str(e))
    except TrainingDiverged as e:
        fail(str(e))
    except KeyboardInterrupt:
        saved = [p.name for p in (Path(cfg.run_dir) / "state_vae.pt", Path(cfg.run_dir) / "state_ldm.pt") if p.exists()]
        fail("interrupted " + (f"between steps; the last saved state ({', '.join(saved)}) is kept: continue with "
                               f"--resume {cfg.run_dir}" if saved else "before the first training step; nothing "
                               "was saved, so start the run again"), 130)
    finally:
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            import torch.distributed as tdist
            if tdist.is_initialized():
                tdist.destroy_process_group()
