"""Train a latent diffusion model from scratch: first the VAE, then the UNet and a text encoder.

    python -m minildm.train --dataset cifar                  # both stages on CIFAR-10
    python -m minildm.train --dataset shapes --preset tiny   # a CPU smoke run in minutes
    python -m minildm.train --stage ldm --vae runs/x/vae.safetensors --dataset cifar
    python -m minildm.train --resume runs/x                  # continue exactly where it stopped
    torchrun --nproc_per_node 2 -m minildm.train ...         # data parallel (gloo on CPU, nccl on GPU)

Stage 1 (`train_vae`) fits the autoencoder to images with `vae_loss.VAELoss` (reconstruction + KL, and
optionally a patch discriminator), then measures the latent scale factor on the data (1 / std of the
latents, so the diffusion model sees unit-variance latents). Stage 2 (`train_ldm`) freezes the VAE and
trains the UNet and a small CLIP-architecture text encoder, from scratch, to predict the noise:

    tokens  = tokenizer(captions, 10% replaced by "")       caption dropout -> classifier-free guidance
    context = text_encoder(tokens)                          (B, L, D)
    z       = vae.encode(x).sample() * scale_factor         (B, C, h, w), cached once per run
    t       ~ U{0, ..., T-1},  eps ~ N(0, I)
    z_t     = sqrt(abar_t) z + sqrt(1 - abar_t) eps         schedule.q_sample
    loss    = || eps - unet(z_t, t, context) ||^2           (DDPM eq. 14, the "simple" objective)

Everything lands in runs/<name>/:

    config.json         the TrainConfig of the run (models' configs included)
    vae.safetensors     stage 1's VAE-only checkpoint (with the measured scale factor)
    model.safetensors   the newest sampleable checkpoint: UNet (+ EMA), VAE, text encoder, schedule
    state_vae.pt        everything needed to resume a stage exactly (weights, optimizers, EMA, step,
    state_ldm.pt          RNG states), a plain dict of tensors: torch.load(..., weights_only=True)
    metrics.jsonl       one JSON line per logged step (stage, step, loss, lr, images/s, ...)
    loss.png            the loss curves
    samples/            stage 1: vae_step_N.png, 8 fixed images over their reconstructions, at every
                          checkpoint; stage 2: step_N.png, sample grids for fixed prompts and seeds,
                          every --sample-every steps

The chapter in files, in the order to read them:

    config.py    TrainConfig and the presets (tiny, cifar-cpu, cifar): every number a run uses
    stage1.py    train_vae: the autoencoder, then the latent scale factor
    stage2.py    train_ldm: the UNet and the text encoder on the frozen VAE's latents
    cli.py       python -m minildm.train: flags, the plan for the machine, resume, exit statuses

The step each loop runs is in `minildm/steps.py`; processes, seeds, the run folder and budgets are in
`minildm/plumbing.py`.

Reproducibility: the data order of epoch e is a permutation drawn from (seed, e), and all randomness
of step s (timesteps, noise, caption dropout, templates, flips) comes from a generator seeded with
(seed, s). A resumed run therefore replays the same batches and noise, and a DDP run splits the very
same global batch over its processes: the loss is the mean over the global batch either way.
"""

from .cli import FIXED_ON_RESUME, build_parser, check_config, check_flags, config_from_args, finished, main, run
from .config import PRESETS, TrainConfig, describe_plan, dtype_of, training_data, stage_minutes
from .stage1 import load_vae, measure_scale_factor, reconstruction_grid, train_vae
from .stage2 import build_pipeline, cache_latents, fit_class_probe, probe_samples, sample_grid, train_ldm

__all__ = ["FIXED_ON_RESUME", "PRESETS", "TrainConfig", "build_parser", "build_pipeline", "cache_latents", "check_config",
           "check_flags", "config_from_args", "describe_plan", "dtype_of", "finished", "fit_class_probe", "training_data",
           "load_vae", "main", "measure_scale_factor", "probe_samples", "reconstruction_grid", "run", "sample_grid",
           "stage_minutes", "train_ldm", "train_vae"]
