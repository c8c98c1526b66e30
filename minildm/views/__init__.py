"""Views that make the invisible visible: what a latent diffusion model does while it generates.

Every view works on any `LatentDiffusion` (minildm/ldm/): a tiny random model in the tests, the model you
trained on CIFAR-10, or the real Stable Diffusion v1 weights. Each one runs the same data flow as
`LatentDiffusion.generate`, written out so the view can look inside it:

    prompt -> tokens -> CLIP -> context ─┐
    seed -> noise z_T ───────────────────┴─> sampler(cfg_denoiser(UNet)) -> z_0 -> z_0 / scale -> VAE decode

    denoising_filmstrip   per step: the noisy latent decoded, the predicted x0 decoded, the predicted
                          noise; one figure and an animated GIF (from the sampler callback)
    attention_maps_view   each prompt token's cross-attention over the image, per layer and averaged
                          over steps, overlaid on the generated image (the UNet's `record` hook)
    prompt_interpolation, seed_interpolation, prompt_blend, context_arithmetic
                          conditioning arithmetic on contexts and on noises, as image strips
    image_arithmetic      an image-variations model: a photo minus one caption plus another in CLIP's
                          joint space (joint_space.py), a strip over the weight a
    sampler_gallery       the same seed and prompt across samplers and step counts, with wall time

The small pure functions underneath (`slerp`, `aggregate_attention`, `image_strip`, ...) are the parts
worth reading first; the views only wire them to a model.

Shapes: B batch, C latent channels, h/w latent size, H/W pixel size, L tokens (77), D context width,
nh attention heads. Images are float tensors in [-1, 1] of shape (B, 3, H, W) until they are turned
into uint8 arrays (H, W, 3) for plotting.

In files: core.py (the pieces), inside.py (views 1 and 2), compare.py (views 3 and 4), cli.py (the
command line, `python -m minildm.views`).
"""

from .core import (slerp, lerp, blend, to_hwc_uint8, latent_to_image, decode_preview, image_strip, image_grid, show_image, save_gif, layer_resolution, aggregate_attention, cross_attention_modules, CrossAttentionRecorder, latent_shape, make_noise, encode, generate_from)  # noqa: F401
from .inside import (Filmstrip, denoising_filmstrip, keep_steps, filmstrip_from_steps, evenly_spaced, plot_filmstrip, AttentionMaps, prompt_tokens, attention_maps_view, plot_token_maps, plot_layer_maps)  # noqa: F401
from .compare import (Strip, plot_strip, _strip, prompt_interpolation, seed_interpolation, prompt_blend, context_arithmetic, image_arithmetic, Gallery, DEFAULT_SAMPLERS, sampler_gallery, plot_gallery)  # noqa: F401
from .cli import VIEWS, build_parser, main  # noqa: F401
