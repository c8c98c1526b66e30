"""minildm: latent diffusion (Stable Diffusion v1) from scratch in plain PyTorch.

The package follows the data flow of a latent diffusion model, one concept per module:

    schedule.py   the noise schedule and the forward process
    samplers.py   DDPM, DDIM, PLMS, the k-diffusion samplers and LCM; classifier-free guidance
    toy.py        a 2-D diffusion model that trains in seconds
    unet.py       the conditional UNet that predicts noise
    tokenizer.py  the CLIP byte-pair-encoding tokenizer
    clip_text.py  the CLIP text transformer that turns tokens into a context
    clip_vision.py  CLIP's image tower, the shared image-text space, CLIP's preprocessing
    vae.py        the KL autoencoder between pixels and latents
    vae_loss.py   the losses that train it
    taesd.py      TAESD, a tiny, fast, approximate autoencoder for SD v1's latents
    convert/      the only package that knows checkpoint key names
    ldm/          the composed model: text -> context, noise -> latents -> image
    data/         data sets: CIFAR-10, a folder of images, generated shapes
    steps.py      the training step: diffusion loss, caption dropout, EMA
    plumbing.py   a training run's processes, seeds, run folder and budgets
    train/        the two training stages and the training command line
    sample.py     the sampling command line
    judge.py      the judge that scores a trained CIFAR model; evaluate.py runs it
    views/        views inside the generation: filmstrips, attention maps, interpolations
    check/        the exercise checker

Names are imported lazily, so `import minildm` stays cheap.
"""

import importlib

__version__ = "0.1.0"

_EXPORTS = {
    "NoiseSchedule": "schedule",
    "UNet": "unet",
    "UNetConfig": "unet",
    "CLIPTokenizer": "tokenizer",
    "CLIPTextModel": "clip_text",
    "CLIPTextConfig": "clip_text",
    "CLIPVisionModel": "clip_vision",
    "CLIPVisionConfig": "clip_vision",
    "CLIPModel": "clip_vision",
    "load_clip": "clip_vision",
    "AutoencoderKL": "vae",
    "VAEConfig": "vae",
    "LatentDiffusion": "ldm",
    "load_stable_diffusion": "ldm",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        module = importlib.import_module(f".{_EXPORTS[name]}", __name__)
        return getattr(module, name)
    raise AttributeError(f"module 'minildm' has no attribute {name!r}")
