"""What the command lines share: one-line errors, checks of every flag before any work starts, the
device, and finding a checkpoint.

Every command line (train, sample, views, evaluate, check) refuses a bad value the same way, before it
builds a model or reads data: one line on stderr, "error: --flag VALUE: what is allowed", and exit
status 2 for a usage error, as argparse does, or 1 for a failure at run time (a file that is not a
checkpoint, data that cannot be read). Nothing here imports a model.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
import tempfile

USAGE, RUNTIME = 2, 1
SEED_LIMIT = 2**63          # torch.Generator.manual_seed takes any seed below this (and more, but not all)


class CommandError(SystemExit):
    """A one-line error that ends a command; `.message` is the line, `.code` the exit status."""

    def __init__(self, message: str, status: int = RUNTIME):
        super().__init__(status)
        self.message = message

    def __str__(self) -> str:
        return f"error: {self.message}"


class Parser(argparse.ArgumentParser):
    """argparse, with its own errors (an unknown flag, "abc" for a number) also on one line."""

    def error(self, message: str):
        fail(f"{message} (`{self.prog} --help` lists the flags)", USAGE)


def fail(message: str, status: int = RUNTIME):
    """Print "error: <message>" (one line) on stderr and exit with `status` (1: failure, 2: usage)."""
    message = " ".join(str(message).split())
    print(f"error: {message}", file=sys.stderr, flush=True)
    raise CommandError(message, status)


def usage(flag: str, value, allowed: str):
    """A flag's value is not allowed: "error: --steps 0: must be from 1 to 1000" (exit status 2)."""
    if isinstance(value, float):
        shown = f"{value:g}"
    elif isinstance(value, int) and not isinstance(value, bool):
        shown = value
    else:
        shown = repr(value)
    fail(f"{flag} {shown}: {allowed}", USAGE)


def check_int(flag: str, value, low: int, high: int | None = None):
    """An integer flag within [low, high] (None: no upper limit); None values are not checked."""
    if value is None:
        return
    if value < low or (high is not None and value > high):
        usage(flag, value, f"must be from {low} to {high}" if high is not None else f"must be at least {low}")


def check_float(flag: str, value, low: float | None = None, high: float | None = None, *,
                low_open: bool = False, high_open: bool = False):
    """A finite number flag within its bounds (open or closed at each end); None values are not checked."""
    if value is None:
        return
    if not math.isfinite(value):
        usage(flag, value, "must be a finite number")
    below = low is not None and (value <= low if low_open else value < low)
    above = high is not None and (value >= high if high_open else value > high)
    if below or above:
        lo = "" if low is None else f"{'above' if low_open else 'at least'} {low:g}"
        hi = "" if high is None else f"{'below' if high_open else 'at most'} {high:g}"
        usage(flag, value, "must be " + " and ".join(s for s in (lo, hi) if s))


def check_seed(flag: str, value, count: int = 1):
    """A seed such that value, value + 1, ..., value + count - 1 all fit torch.Generator."""
    if value is None:
        return
    if value < 0 or value + count - 1 >= SEED_LIMIT:
        usage(flag, value, f"must be from 0 to {SEED_LIMIT - count}" + (f" (with {count} images, seed + i must fit)"
                                                                        if count > 1 else ""))


def check_choice(flag: str, value, choices):
    if value is not None and value not in choices:
        usage(flag, value, f"must be one of {', '.join(map(str, choices))}")


def check_writable_dir(flag: str, path) -> None:
    """A folder the command will write into: it exists, or can be made, and takes a new file. Folders
    made for the test are removed again, so a command refused later leaves nothing behind."""
    path = os.path.abspath(os.fspath(path))
    missing, top = [], path
    while not os.path.exists(top):
        missing.append(top)
        top = os.path.dirname(top)
    if not os.path.isdir(top):
        usage(flag, path, f"{top} is a file, not a folder")
    try:
        os.makedirs(path, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".write-test-"):
            pass
    except OSError as e:
        usage(flag, path, f"cannot be written to ({e.strerror or type(e).__name__})")
    finally:
        for folder in missing:                      # deepest first
            try:
                os.rmdir(folder)
            except OSError:
                pass


def check_readable_file(flag: str, path) -> None:
    if path is None:
        return
    if not os.path.exists(path):
        usage(flag, path, "does not exist")
    if os.path.isdir(path):
        usage(flag, path, "is a folder, not a file")
    if not os.access(path, os.R_OK):
        usage(flag, path, "cannot be read (permission denied)")


def free_path(path: str, overwrite: bool = False) -> str:
    """`path`, or when a file is already there (and `overwrite` is off) the first free
    "<stem>-2<ext>", "<stem>-3<ext>", ...: an output never replaces an earlier one silently."""
    if overwrite or not os.path.exists(path):
        return path
    stem, ext = os.path.splitext(path)
    k = 2
    while os.path.exists(f"{stem}-{k}{ext}"):
        k += 1
    return f"{stem}-{k}{ext}"


def check_device(name: str, auto: bool = True):
    """The torch.device a --device value names: cpu, cuda, cuda:N, mps, or with `auto` also "auto" (CUDA
    when there is a GPU). A value torch does not know is a usage error; a GPU this machine lacks, a failure."""
    import torch

    kinds = "cpu, cuda, cuda:N, mps" + (" or auto" if auto else "")
    if auto and name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError:
        usage("--device", name, f"must be {kinds}")
    if device.type not in ("cpu", "cuda", "mps"):
        usage("--device", name, f"must be {kinds}")
    if device.type == "cuda" and not torch.cuda.is_available():
        fail(f"--device {name} was asked for but no CUDA GPU is available; use --device cpu")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        fail(f"--device {name}: there are only {torch.cuda.device_count()} CUDA devices")
    return device


def resolve_device(name: str, dtype_name: str = "auto"):
    """(torch.device, torch.dtype) for --device/--dtype ("auto": CUDA when there is a GPU, float16 on it)."""
    import torch

    device = check_device(name)
    if dtype_name == "auto":
        dtype_name = "float16" if device.type == "cuda" else "float32"
    check_choice("--dtype", dtype_name, ("auto", "float32", "float16", "bfloat16"))
    return device, getattr(torch, dtype_name)


def slug(prompt: str, limit: int = 60) -> str:
    """A file-name-safe stem from a prompt: 'A cat, in a hat!' -> 'a-cat-in-a-hat'."""
    s = re.sub(r"[^a-z0-9]+", "-", prompt.lower()).strip("-")[:limit].rstrip("-")
    return s or "unconditional"


def named_path(name: str, runs_dir: str) -> str:
    """What a path-or-run-name flag names: the path itself when it exists, else the run <runs_dir>/<name>
    when that folder exists, else the path as given (for the caller's error)."""
    if not os.path.exists(name) and os.path.isdir(os.path.join(runs_dir, name)):
        return os.path.join(runs_dir, name)
    return name


def find_checkpoint(ckpt, runs_dir: str) -> str:
    """The file or folder --ckpt names: a path, a run's folder or name (its model.safetensors), or
    without --ckpt the newest run's; a one-line error when there is none."""
    if ckpt is None:
        from .ldm import find_latest_checkpoint

        found = find_latest_checkpoint(runs_dir)
        if found is None:
            fail(f"no checkpoint given and no run found in {runs_dir}/. Train one with `python -m minildm.train "
                 "--dataset cifar`, or pass --ckpt with Stable Diffusion v1 weights (e.g. "
                 "v1-5-pruned-emaonly.safetensors, a .ckpt, or a diffusers folder with unet/ vae/ "
                 "text_encoder/ tokenizer/)", USAGE)
        return found
    ckpt = named_path(ckpt, runs_dir)                                        # a run's name
    if os.path.isfile(os.path.join(ckpt, "model.safetensors")) and os.path.isfile(os.path.join(ckpt, "config.json")):
        ckpt = os.path.join(ckpt, "model.safetensors")                      # a training run's folder
    if not os.path.exists(ckpt):
        fail(f"checkpoint not found: {ckpt}", USAGE)
    return ckpt


def is_guidance_interval(lo: float, hi: float) -> bool:
    """Two finite timesteps with 0 <= lo <= hi (hi 1000 or more: up to the noisiest step)."""
    return math.isfinite(lo) and math.isfinite(hi) and 0 <= lo <= hi


def check_guidance_interval(flag: str, value) -> None:
    """--guidance-interval T_LO T_HI: a one-line usage error unless is_guidance_interval."""
    if value is not None and not is_guidance_interval(*value):
        lo, hi = value
        fail(f"{flag} {lo:g} {hi:g}: must be two timesteps T_LO T_HI with 0 <= T_LO <= T_HI (0 1000: every step)",
             USAGE)


def default_guidance_interval(path: str):
    """The guidance interval to sample a checkpoint with when none is asked for: a training run's own
    (`guidance_interval` in the config.json beside its model.safetensors: what its preset chose), else
    None, every step, as Stable Diffusion samples."""
    config = os.path.join(os.path.dirname(os.path.abspath(path)), "config.json")
    if os.path.basename(path) != "model.safetensors" or not os.path.isfile(config):
        return None
    try:
        value = json.loads(open(config, encoding="utf-8").read()).get("guidance_interval")
        lo, hi = (float(v) for v in value)
    except (OSError, ValueError, AttributeError, TypeError):
        return None
    return (lo, hi) if is_guidance_interval(lo, hi) else None


def load_model(ckpt, runs_dir: str, device_name: str, dtype_name: str, use_ema: bool = True, config=None):
    """(LatentDiffusion, checkpoint path) for a command line, every problem a one-line error.
    config: the original inference YAML of an original-layout file that is not SD v1-sized.
    dtype_name "auto" on the CPU: bfloat16 where cpu_prefers_bfloat16 says so, decided once the sizes
    are read and before any weight is built, else float32."""
    path = find_checkpoint(ckpt, runs_dir)
    check_readable_file("--config", config)
    device, dtype = resolve_device(device_name, dtype_name)

    import torch

    from .convert import CheckpointError
    from .ldm import load_stable_diffusion

    if dtype_name == "auto" and device.type == "cpu":
        def dtype(unet_config):
            return torch.bfloat16 if cpu_prefers_bfloat16(unet_config) else torch.float32
    try:
        return load_stable_diffusion(path, device=device, dtype=dtype, use_ema=use_ema, config=config), path
    except CheckpointError as e:
        fail(str(e))


def cpu_prefers_bfloat16(unet_config) -> bool:
    """Whether --dtype auto samples a model with this UNetConfig in bfloat16 on this CPU: a model of SD's
    width (5 s per UNet call at 512x512 in float32, about 3 s in bfloat16 on two cores) on a CPU that
    multiplies bfloat16 in hardware. Its images stay close to float32's (bench/RESULTS.md: 54 dB PSNR at
    SD v1.5's size on random weights, 50 dB on the trained CIFAR run); the small CIFAR-sized models sample
    in seconds anyway and stay in float32, where evaluations are exact."""
    from .plumbing import cpu_has_bfloat16

    return unet_config.model_channels >= 320 and cpu_has_bfloat16()
