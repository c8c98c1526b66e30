"""What a training run is made of: its config, the presets, and what follows from them."""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Optional

import torch

from .. import data as data_module
from ..clip_text import CLIPTextConfig
from ..plumbing import Run, init_distributed, process_device
from ..schedule import NoiseSchedule
from ..unet import UNet, UNetConfig
from ..vae import VAEConfig


@dataclass
class TrainConfig:
    stage: str = "all"                      # vae | ldm | all
    vae_path: Optional[str] = None          # stage 2: a trained VAE checkpoint (default: the run's own)
    # data
    dataset: str = "shapes"                 # cifar | folder | shapes
    data_dir: Optional[str] = None          # local copy of the data (see minildm/data/)
    num_images: Optional[int] = None        # use at most this many training images
    holdout_per_class: int = 0              # last N images of each class kept out of training
    resolution: int = 32                    # training images are resolution x resolution
    # models
    vae: dict = field(default_factory=lambda: VAEConfig.tiny().to_dict())
    unet: dict = field(default_factory=lambda: UNetConfig.tiny().to_dict())
    text_encoder: dict = field(default_factory=lambda: CLIPTextConfig.tiny().to_dict())
    schedule: dict = field(default_factory=lambda: NoiseSchedule.sd().to_dict())
    # stage 1: the VAE
    vae_steps: Optional[int] = 300          # optimizer steps (None: until --max-minutes; it may stop earlier)
    vae_batch_size: int = 32
    vae_lr: float = 1e-3
    kl_weight: float = 1e-6                 # as SD's first stage
    rec_loss: str = "l1"                    # l1 | l2
    disc_start: Optional[int] = None        # step at which the patch discriminator starts (None: never)
    disc_weight: float = 0.5
    scale_batches: int = 16                 # batches of 64 images used to measure the latent scale factor
    # stage 2: UNet + text encoder
    ldm_steps: Optional[int] = 500
    batch_size: int = 32                    # global batch (over processes and accumulation steps)
    lr: float = 5e-4
    warmup_steps: int = 50                  # linear warm-up, then cosine decay to min_lr_ratio * lr
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.01
    grad_clip: float = 1.0                  # max global gradient norm (0: no clipping)
    grad_accum: int = 1                     # micro-batches per optimizer step
    ema_decay: float = 0.999
    caption_dropout: float = 0.1            # fraction of captions replaced by "" (for guidance)
    reword: float = 0.0                     # fraction of class captions reworded (data/wording.py; cifar presets 0.5)
    min_snr_gamma: Optional[float] = None   # weight the loss by min(SNR, gamma) / SNR (None: plain MSE)
    cache_latents: bool = True              # encode the data set once (no flips) instead of every step
    # both stages
    max_minutes: Optional[float] = None     # wall-clock budget of the whole run (data, both stages, caching)
    vae_share: float = 0.3                  # the part of max_minutes stage 1 gets when both stages run
    seed: int = 0
    device: str = "cpu"
    dtype: str = "float32"                  # weights' dtype: float32 | bfloat16 | float16
    amp: bool = False                       # autocast: bfloat16 (float16 on GPUs without it); weights stay float32
    compile: bool = False                   # torch.compile the UNet
    log_every: int = 10
    save_every: int = 200
    sample_every: int = 0                   # 0: sample only at the end of stage 2
    sample_steps: int = 25                  # DDIM steps for the sample grids
    guidance_scale: float = 3.0
    guidance_interval: Optional[list] = None  # [t_lo, t_hi]: guide only those timesteps (None: every step)
    probe_per_class: int = 10               # samples per class for the class probe at every grid (0: off)
    evaluate_per_class: int = 0             # after a run with classes: python -m minildm.evaluate with this n
    run_dir: str = "runs/default"

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        known = {f for f in cls.__dataclass_fields__}
        return cls(**{k: v for k, v in d.items() if k in known})

    @classmethod
    def tiny(cls, **overrides) -> "TrainConfig":
        """A CPU smoke run: VAE 43,711 (32px -> 16x16x4), UNet 1,055,044, text encoder 1,600,672 parameters."""
        return cls(**overrides)

    @classmethod
    def cifar(cls, **overrides) -> "TrainConfig":
        """CIFAR-10 on a consumer GPU: VAE 2,147,451 (32px -> 8x8x8), UNet 35,062,152 (UNetConfig.cifar
        with a 256-wide context), text encoder 15,816,192 parameters (32 positions); step budgets."""
        text = CLIPTextConfig.small()
        unet = UNetConfig.cifar()
        unet.context_dim = text.width
        base = dict(vae=VAEConfig.cifar().to_dict(), unet=unet.to_dict(), text_encoder=text.to_dict(),
                    vae_steps=20000, vae_batch_size=16, vae_lr=1e-3, rec_loss="l1",
                    ldm_steps=100000, batch_size=128, lr=2e-4, warmup_steps=500, ema_decay=0.9999,
                    reword=0.5, holdout_per_class=500, log_every=25, save_every=1000, sample_every=2000,
                    sample_steps=50, guidance_scale=7.5)
        base.update(overrides)
        z = VAEConfig.from_dict(base["vae"]).z_channels
        base["unet"] = dict(base["unet"], in_channels=z, out_channels=z)   # the UNet denoises the VAE's latents
        return cls(**base)


    @classmethod
    def cifar_cpu(cls, **overrides) -> "TrainConfig":
        """CIFAR-10 in one hour on a CPU: the `cifar` VAE and text encoder, UNetConfig.cifar_cpu
        (8,521,352 parameters with 8 latent channels), batch 64, min-SNR-5 loss weights; 60 minutes in all,
        30% of them for the VAE. On a CPU that multiplies bfloat16 in hardware the command line turns on
        autocast and gives the VAE 20%: its steps take about half the time there. Stage 2 gets only
        4,000-6,500 steps, so its learning rate is 1e-3: at 4,000 steps that draws the prompted class far
        more often than 5e-4 (bench/RESULTS.md). The text encoder keeps two of the four layers (14,236,672
        parameters): with reworded captions a batch holds about forty distinct captions, and four layers
        cost as much per step as the UNet; two suffice to find the class word among the others.
        Its samples are guided at timesteps 0-800 only (`guidance_interval`; sample and evaluate default
        to it): the noisiest fifth of the steps unguided keeps more variety for two points of accuracy
        (bench/RESULTS.md, "A guidance interval")."""
        text = dict(CLIPTextConfig.small().to_dict(), num_layers=2)
        base = dict(unet=UNetConfig.cifar_cpu().to_dict(), text_encoder=text, vae_steps=None, ldm_steps=None, batch_size=64,
                    lr=1e-3, warmup_steps=100, ema_decay=0.999, min_snr_gamma=5.0, max_minutes=60.0,
                    vae_share=0.3, save_every=500, sample_every=1000, guidance_interval=[0, 800])
        base.update(overrides)
        return cls.cifar(**base)


PRESETS = {"tiny": TrainConfig.tiny, "cifar": TrainConfig.cifar, "cifar-cpu": TrainConfig.cifar_cpu}


def describe_plan(cfg: TrainConfig, preset: str, reason: str) -> str:
    """The first lines a run prints: what it will train, how big, for how long, and why."""
    unet, text = UNetConfig.from_dict(cfg.unet), CLIPTextConfig.from_dict(cfg.text_encoder)
    n_unet = sum(p.numel() for p in UNet(unet).parameters())
    budget = (f"{cfg.max_minutes:g} minutes in all" + (f" ({cfg.max_minutes * cfg.vae_share:g} for the VAE, "
              "the rest for the diffusion model, latent caching included)" if cfg.stage == "all" else "")
              if cfg.max_minutes else f"{cfg.vae_steps} VAE steps, {cfg.ldm_steps} diffusion steps")
    return (f"plan: preset {preset} ({reason}); {cfg.dataset} at {cfg.resolution}px, UNet width "
            f"{unet.model_channels} ({n_unet / 1e6:.1f}M parameters), text encoder {text.width} wide, "
            f"batch {cfg.batch_size}, lr {cfg.lr:g}, device {cfg.device}{', mixed precision (autocast)' if cfg.amp else ''}; "
            f"{budget}.\n"
            f"      --preset, --max-minutes and the other flags change it; files go to {cfg.run_dir}/")


def dtype_of(name: str) -> torch.dtype:
    try:
        return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]
    except KeyError:
        raise SystemExit(f"error: --dtype must be float32, bfloat16 or float16, not {name!r}") from None


def training_data(cfg: TrainConfig) -> tuple:
    """(train, held_out) as configured; held_out may be empty."""
    data = data_module.load_dataset(cfg.dataset, cfg.data_dir, cfg.resolution, None if
                                    cfg.dataset != "shapes" else cfg.num_images, cfg.seed)
    train, held = data.split(cfg.holdout_per_class)
    if cfg.num_images is not None and cfg.dataset != "shapes" and cfg.num_images < len(train):
        train = train.subset(torch.arange(cfg.num_images))
    return train, held


def stage_minutes(cfg: TrainConfig, stage: str, vae_seconds: float = 0.0) -> Optional[float]:
    """The part of the run's --max-minutes a stage may use: when both stages run, stage 1 gets
    `vae_share` of it and stage 2 what stage 1 left (data loading and latent caching included)."""
    if cfg.max_minutes is None or cfg.stage != "all":
        return cfg.max_minutes
    if stage == "vae":
        return cfg.max_minutes * cfg.vae_share
    return max(cfg.max_minutes - vae_seconds / 60, 0.5)


def begin_stage(cfg: TrainConfig, data=None, started: Optional[float] = None) -> tuple:
    """What every stage starts with: (started, dist, device, run, train, held) = the clock (the run's
    start when given, so loading the data counts against the budget), this process's place among the
    processes, its device, the run folder (config.json written), and the data split."""
    started = time.perf_counter() if started is None else started
    dist = init_distributed(cfg.device)
    device = process_device(cfg.device, dist)
    run = Run(cfg.run_dir, dist.main)
    run.write_config(cfg.to_dict())
    train, held = data if data is not None else training_data(cfg)
    return started, dist, device, run, train, held
