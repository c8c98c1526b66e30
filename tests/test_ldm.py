"""The composed model: loading every layout, parity with diffusers' StableDiffusionPipeline, img2img,
inpainting, determinism and the memory options."""
import dataclasses
import gzip
import json
import os

import pytest
import torch

from minildm import convert
from minildm.clip_text import CLIPTextConfig, CLIPTextModel
from minildm.ldm import LatentDiffusion, find_latest_checkpoint, load_stable_diffusion
from minildm.schedule import NoiseSchedule
from minildm.tokenizer import CLIPTokenizer
from minildm.unet import UNet
from minildm.vae import AutoencoderKL
from reference_configs import diffusers_unet_config, diffusers_vae_config, original_yaml, transformers_text_config
from test_convert import UNET_3LEVEL, original_state, tiny_configs, tiny_models, write_safetensors

SIZE = 32  # pixels; the tiny VAE makes 16x16 latents


def write_tokenizer_folder(folder):
    """vocab.json + merges.txt built directly from the clip package's BPE file, in CLIP's id order."""
    import importlib.util

    folder_of_clip = importlib.util.find_spec("clip").submodule_search_locations[0]  # importing clip needs pkg_resources
    bpe = os.path.join(folder_of_clip, "bpe_simple_vocab_16e6.txt.gz")
    merges = gzip.open(bpe, "rt", encoding="utf-8").read().split("\n")[1:49152 - 256 - 2 + 1]
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("\u00a1"), ord("\u00ac") + 1),
                 *range(ord("\u00ae"), ord("\u00ff") + 1)]
    others = [b for b in range(256) if b not in printable]
    symbols = [chr(b) for b in printable] + [chr(256 + i) for i in range(len(others))]  # GPT-2's byte table
    vocab = symbols + [s + "</w>" for s in symbols] + ["".join(m.split()) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "vocab.json"), "w", encoding="utf-8") as f:
        json.dump({token: i for i, token in enumerate(vocab)}, f)
    with open(os.path.join(folder, "merges.txt"), "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n" + "\n".join(merges) + "\n")
    return folder


@pytest.fixture(scope="module")
def models():
    return tiny_models(seed=1)


@pytest.fixture(scope="module")
def original_file(models, tmp_path_factory):
    """The tiny models as an original-layout .safetensors, EMA weights equal to the raw ones."""
    path = tmp_path_factory.mktemp("orig") / "sd.safetensors"
    return write_safetensors(path, original_state(*models, ema_offset=0.0))


def load_original(path, **kw):
    unet_cfg, vae_cfg, text_cfg = tiny_configs()
    return load_stable_diffusion(path, unet_config=unet_cfg, vae_config=vae_cfg, text_config=text_cfg, **kw)


def diffusers_parts(models, tokenizer_dir):
    """diffusers/transformers models holding the same weights (converted by diffusers' own converter),
    configured as diffusers reads the original YAML (tests/reference_configs.py)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from diffusers.loaders import single_file_utils as sfu
    from transformers import CLIPTextModel as HFTextModel
    from transformers import CLIPTokenizer as HFTokenizer

    unet, vae, text = models
    state = original_state(unet, vae, text, ema_offset=0.0)
    d_unet = UNet2DConditionModel(**diffusers_unet_config(unet.cfg))
    d_unet.load_state_dict(sfu.convert_ldm_unet_checkpoint(dict(state), d_unet.config, extract_ema=True))
    d_vae = AutoencoderKL(**diffusers_vae_config(vae.cfg))
    d_vae.load_state_dict(sfu.convert_ldm_vae_checkpoint(dict(state), d_vae.config))
    d_text = HFTextModel(transformers_text_config(text.cfg))
    clip_state = sfu.convert_ldm_clip_checkpoint(dict(state))
    clip_state.pop("text_model.embeddings.position_ids", None)
    if not any(k.startswith("text_model.") for k in d_text.state_dict()):  # transformers 5 dropped the wrapper
        clip_state = convert.strip_prefix(clip_state, "text_model.")
    d_text.load_state_dict(clip_state, strict=True)
    tokenizer = HFTokenizer(os.path.join(tokenizer_dir, "vocab.json"), os.path.join(tokenizer_dir, "merges.txt"),
                            pad_token="<|endoftext|>", model_max_length=77)
    return d_unet.eval(), d_vae.eval(), d_text.eval(), tokenizer


SCHEDULER_CONFIG = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                        set_alpha_to_one=False, steps_offset=1, clip_sample=False, skip_prk_steps=True,
                        timestep_spacing="leading", prediction_type="epsilon")


@pytest.fixture(scope="module")
def diffusers_folder(models, tmp_path_factory):
    """The same weights saved by diffusers as a pipeline folder (unet/ vae/ text_encoder/ tokenizer/ scheduler/)."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    root = tmp_path_factory.mktemp("diffusers")
    tok_dir = write_tokenizer_folder(str(root / "tok"))
    unet, vae, text, tokenizer = diffusers_parts(models, tok_dir)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text, tokenizer=tokenizer, unet=unet,
                                   scheduler=DDIMScheduler(**{k: v for k, v in SCHEDULER_CONFIG.items()
                                                              if k != "skip_prk_steps"}),
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(root / "pipe")
    return str(root / "pipe")


def test_original_and_diffusers_folder_give_identical_images(original_file, diffusers_folder):
    """The same weights as an original file and as a diffusers folder generate identical images."""
    a = load_original(original_file)
    b = load_stable_diffusion(diffusers_folder)
    assert b.unet.cfg == a.unet.cfg and b.text_encoder.cfg == a.text_encoder.cfg
    assert b.scale_factor == a.scale_factor == 0.5
    kw = dict(num_steps=3, seed=7, height=SIZE, width=SIZE, negative_prompt="blurry")
    x_a, x_b = a.generate("a red cube on a table", **kw), b.generate("a red cube on a table", **kw)
    assert torch.equal(x_a, x_b), f"max diff {(x_a - x_b).abs().max():.3g}"


def reference_pipeline(kind, models, tmp_path, scheduler="DDIMScheduler", **scheduler_options):
    """diffusers' pipeline `kind` holding the same weights, its scheduler built from SD v1.5's config."""
    import diffusers
    from test_samplers import SD15_SCHEDULER_CONFIG

    unet, vae, text, tokenizer = diffusers_parts(models, write_tokenizer_folder(str(tmp_path / "tok")))
    pipe = getattr(diffusers, kind)(
        vae=vae, text_encoder=text, tokenizer=tokenizer, unet=unet,
        scheduler=getattr(diffusers, scheduler).from_config({**SD15_SCHEDULER_CONFIG, **scheduler_options}),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


PIPELINE_CASES = [  # every sampler with a diffusers scheduler, built from SD v1.5's scheduler config
    ("ddim", "DDIMScheduler", {}), ("plms", "PNDMScheduler", {}), ("ddpm", "DDPMScheduler", {}),
    ("euler", "EulerDiscreteScheduler", {}), ("euler", "EulerDiscreteScheduler", {"karras": True}),
    ("euler_a", "EulerAncestralDiscreteScheduler", {}), ("heun", "HeunDiscreteScheduler", {}),
    ("heun", "HeunDiscreteScheduler", {"karras": True}), ("lms", "LMSDiscreteScheduler", {}), ("lms", "LMSDiscreteScheduler", {"karras": True}),
    ("dpmpp_2m", "DPMSolverMultistepScheduler", {}), ("dpmpp_2m", "DPMSolverMultistepScheduler", {"karras": True}),
    ("lcm", "LCMScheduler", {}),
]
# Random weights do not predict noise: a random UNet's output is unrelated to z_t, so the x0 estimate
# (z_t - sqrt(1 - abar) eps) / sqrt(abar) grows by up to 1 / sqrt(abar_T) = 14x at the noisiest step and
# the latents end at 25-75. A trained model's eps is close to the noise in z_t. The pipeline tests make
# both libraries' UNets behave that way with one forward hook each (as_denoisers): eps = z_t + 0.1 UNet(...),
# the UNet's part still computed by each library on its own. The latents then stay O(1) (largest values
# 1.3-2.2; images in [0, 1]), and every element must lie within PIPELINE_ATOL of the reference, absolutely
# (measured over the 47 comparisons of the pipeline, seed, img2img, inpainting and LoRA tests: at most 4.1e-6).
DENOISER_RESIDUAL = 0.1
PIPELINE_ATOL = 1e-5


def as_denoisers(*unets):
    """Make each UNet (minildm's or diffusers') predict eps = z_t + DENOISER_RESIDUAL * its own output; z_t is
    the first channels of its input (the inpainting model appends the mask and the masked image)."""
    def hook(module, args, out):
        if isinstance(out, torch.Tensor):                       # minildm: the noise prediction
            return args[0][:, :out.shape[1]] + DENOISER_RESIDUAL * out
        if hasattr(out, "sample"):                               # diffusers with return_dict=True
            return type(out)(sample=args[0][:, :out.sample.shape[1]] + DENOISER_RESIDUAL * out.sample)
        sample = out[0]                                          # diffusers: (sample,) with return_dict=False
        return (args[0][:, :sample.shape[1]] + DENOISER_RESIDUAL * sample,) + tuple(out[1:])
    for unet in unets:
        unet.register_forward_hook(hook)


def assert_close_to_reference(ours, reference, what, atol=PIPELINE_ATOL):
    diff = (ours - reference).abs().max()
    scale = reference.abs().max()
    assert scale < 10, f"{what}: the reference reaches {scale:.3g}; the test models should keep latents O(1)"
    assert diff <= atol, f"{what}: max abs diff {diff:.3g} (the largest value {scale:.3g})"


@pytest.mark.parametrize("sampler, scheduler, options", PIPELINE_CASES,
                         ids=[f"{s}{'-karras' if o else ''}" for s, _, o in PIPELINE_CASES])
def test_matches_diffusers_pipeline(models, original_file, tmp_path, sampler, scheduler, options):
    """Same weights, scheduler and unit-variance initial noise (each library scales it to its own start),
    the same generator for the noise stochastic samplers add: images equal StableDiffusionPipeline's."""
    ours = load_original(original_file)
    extra = {"use_karras_sigmas": True} if options.get("karras") else {}
    pipe = reference_pipeline("StableDiffusionPipeline", models, tmp_path, scheduler, **extra)
    as_denoisers(ours.unet, pipe.unet)
    prompts, negative = ["a photo of an astronaut riding a horse", "a cat in a hat"], "low quality"
    latents = torch.randn(2, 4, SIZE // 2, SIZE // 2, generator=torch.Generator().manual_seed(3))
    kw = dict(num_steps=6, guidance_scale=5.0, height=SIZE, width=SIZE, latents=latents, sampler=sampler, **options)
    d_kw = dict(negative_prompt=[negative] * 2, num_inference_steps=6, guidance_scale=5.0, height=SIZE, width=SIZE,
                latents=latents)
    z = ours.generate(prompts, negative_prompt=negative, output_type="latent", seed=11, **kw)
    x = ours.generate(prompts, negative_prompt=negative, seed=11, **kw)
    with torch.no_grad():
        z_ref = pipe(prompts, output_type="latent", generator=torch.Generator().manual_seed(11), **d_kw).images
        x_ref = pipe(prompts, output_type="pt", generator=torch.Generator().manual_seed(11), **d_kw).images
    for name, a, b in (("latents", z, z_ref), ("images", x, x_ref)):
        assert_close_to_reference(a, b, f"{sampler} {name}")
    # the prompt steers the result: another prompt gives another image
    other = ours.generate(["a bowl of soup", "a red bicycle"], negative_prompt=negative, seed=11, **kw)
    assert (other - x).abs().max() > 1e-3


def test_a_seed_gives_the_image_diffusers_gives(models, original_file, tmp_path):
    """No latents passed: `seed=s` draws the starting noise (and a stochastic sampler's noise) as
    StableDiffusionPipeline does from torch.Generator().manual_seed(s) on the CPU. (CUDA generators draw
    other numbers from the same seed, in both libraries alike.)"""
    ours = load_original(original_file)
    as_denoisers(ours.unet)
    prompts = ["a photo of an astronaut riding a horse", "a cat in a hat"]
    for sampler, scheduler in (("ddim", "DDIMScheduler"), ("euler_a", "EulerAncestralDiscreteScheduler"),
                               ("dpmpp_2m", "DPMSolverMultistepScheduler"), ("lcm", "LCMScheduler")):
        pipe = reference_pipeline("StableDiffusionPipeline", models, tmp_path, scheduler)
        as_denoisers(pipe.unet)
        z = ours.generate(prompts, num_steps=5, guidance_scale=5.0, height=SIZE, width=SIZE, seed=7,
                          sampler=sampler, output_type="latent")
        with torch.no_grad():
            z_ref = pipe(prompts, num_inference_steps=5, guidance_scale=5.0, height=SIZE, width=SIZE,
                         generator=torch.Generator().manual_seed(7), output_type="latent").images
        assert_close_to_reference(z, z_ref, f"{sampler} from a seed")


# img2img with every sampler whose diffusers scheduler starts part of the way down as the original does.
# PLMS and LMS are not here: diffusers' PNDMScheduler repeats its first timestep and LMSDiscreteScheduler
# takes its order from the step's index, so their img2img differs from minildm's by design (lesson 07).
IMG2IMG_CASES = [("ddim", "DDIMScheduler", {}), ("ddpm", "DDPMScheduler", {}), ("euler", "EulerDiscreteScheduler", {}),
                 ("euler", "EulerDiscreteScheduler", {"karras": True}),
                 ("euler_a", "EulerAncestralDiscreteScheduler", {}), ("heun", "HeunDiscreteScheduler", {}),
                 ("heun", "HeunDiscreteScheduler", {"karras": True}),
                 ("dpmpp_2m", "DPMSolverMultistepScheduler", {}),
                 ("dpmpp_2m", "DPMSolverMultistepScheduler", {"karras": True}), ("lcm", "LCMScheduler", {})]


@pytest.mark.parametrize("sampler, scheduler, options", IMG2IMG_CASES,
                         ids=[f"{s}{'-karras' if o else ''}" for s, _, o in IMG2IMG_CASES])
def test_img2img_matches_diffusers_pipeline(models, original_file, tmp_path, sampler, scheduler, options):
    """img2img equals StableDiffusionImg2ImgPipeline's: the same strength gives the same first step and
    noise level, and one generator draws the posterior sample, then the noise, then the sampler's noise."""
    ours = load_original(original_file)
    extra = {"use_karras_sigmas": True} if options.get("karras") else {}
    pipe = reference_pipeline("StableDiffusionImg2ImgPipeline", models, tmp_path, scheduler, **extra)
    as_denoisers(ours.unet, pipe.unet)
    x = torch.rand(1, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(4)) * 2 - 1
    prompts, negative = ["a watercolour of a lighthouse", "a cat in a hat"], "low quality"
    steps = []
    z = ours.generate(prompts, negative_prompt=negative, init_image=x, strength=0.6, num_steps=10, seed=21,
                      guidance_scale=5.0, sampler=sampler, output_type="latent",
                      callback=lambda info: steps.append(info["step"]), **options)
    with torch.no_grad():
        z_ref = pipe(prompts, image=x, strength=0.6, num_inference_steps=10, guidance_scale=5.0,
                     negative_prompt=[negative] * 2, generator=torch.Generator().manual_seed(21),
                     output_type="latent").images
    assert steps == list(range(4, 10))
    assert_close_to_reference(z, z_ref, sampler)


def count_calls(unet):
    """A list that grows by the batch size of every forward call of this UNet."""
    calls = []
    unet.register_forward_hook(lambda module, args, out: calls.append(args[0].shape[0]))
    return calls


def test_lcm_at_guidance_1_is_one_unet_call_per_step_as_in_diffusers(models, original_file, tmp_path):
    """LCM-LoRA's way of sampling: 4 LCM steps at guidance 1 from a seed. Like diffusers (which guides only
    above 1), no unconditional branch: one UNet call per step on the prompts alone; the same image."""
    ours = load_original(original_file)
    pipe = reference_pipeline("StableDiffusionPipeline", models, tmp_path, "LCMScheduler")
    as_denoisers(ours.unet, pipe.unet)
    ours_calls, ref_calls = count_calls(ours.unet), count_calls(pipe.unet)
    prompts = ["a photo of an astronaut riding a horse", "a cat in a hat"]
    z = ours.generate(prompts, num_steps=4, guidance_scale=1.0, height=SIZE, width=SIZE, seed=5, sampler="lcm",
                      output_type="latent")
    with torch.no_grad():
        z_ref = pipe(prompts, num_inference_steps=4, guidance_scale=1.0, height=SIZE, width=SIZE,
                     generator=torch.Generator().manual_seed(5), output_type="latent").images
    assert ours_calls == ref_calls == [2, 2, 2, 2]
    assert_close_to_reference(z, z_ref, "lcm at guidance 1")


def lcm_distilled_folder(models, root):
    """An LCM-distilled model as diffusers saves one (LCM_Dreamshaper_v7's layout): a UNet with
    time_cond_proj_dim (the guidance scale's embedding), made and randomly initialised by diffusers
    itself, with the tiny VAE and text encoder, and an LCMScheduler; LatentConsistencyModelPipeline."""
    from diffusers import LatentConsistencyModelPipeline, LCMScheduler, UNet2DConditionModel
    from test_samplers import SD15_SCHEDULER_CONFIG

    _, vae, text, tokenizer = diffusers_parts(models, write_tokenizer_folder(str(root / "tok")))
    torch.manual_seed(8)
    unet = UNet2DConditionModel(**{**diffusers_unet_config(models[0].cfg), "time_cond_proj_dim": 16})
    with torch.no_grad():  # diffusers leaves no layer at zero, but make the guidance input's layer count
        unet.time_embedding.cond_proj.weight.normal_(0, 0.5)
    pipe = LatentConsistencyModelPipeline(vae=vae, text_encoder=text, tokenizer=tokenizer, unet=unet.eval(),
                                          scheduler=LCMScheduler.from_config(SD15_SCHEDULER_CONFIG),
                                          safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(root / "lcm")
    pipe.set_progress_bar_config(disable=True)
    return str(root / "lcm"), pipe


def test_lcm_distilled_model_from_its_diffusers_folder_matches_diffusers(models, tmp_path):
    """A full LCM (guidance as a UNet input) loads from its diffusers folder; a seed gives the image
    LatentConsistencyModelPipeline gives, with one UNet call per step and no negative branch; another
    guidance scale gives another image, and the UNet refuses to run without one."""
    folder, pipe = lcm_distilled_folder(models, tmp_path)
    ours = load_stable_diffusion(folder)
    assert ours.takes_guidance and ours.unet.cfg.guidance_embed_dim == 16
    as_denoisers(ours.unet, pipe.unet)
    ours_calls, ref_calls = count_calls(ours.unet), count_calls(pipe.unet)
    prompts = ["a photo of an astronaut riding a horse", "a cat in a hat"]
    kw = dict(height=SIZE, width=SIZE, output_type="latent")
    for steps, w in ((4, 8.5), (2, 3.0)):
        z = ours.generate(prompts, num_steps=steps, guidance_scale=w, seed=9, sampler="lcm", **kw)
        with torch.no_grad():
            z_ref = pipe(prompts, num_inference_steps=steps, guidance_scale=w,
                         generator=torch.Generator().manual_seed(9), **kw).images
        assert_close_to_reference(z, z_ref, f"LCM {steps} steps at w {w}")
    assert ours_calls == ref_calls == [2] * 6
    other = ours.generate(prompts, num_steps=2, guidance_scale=1.0, seed=9, sampler="lcm", **kw)
    assert (other - z).abs().max() > 1e-3
    with pytest.raises(ValueError, match="pass guidance"):
        ours.unet(torch.zeros(1, 4, 16, 16), 10, torch.zeros(1, 77, 32))


def test_lcm_dreamshaper_sized_unet_has_diffusers_parameter_count():
    """At full size (on the meta device): the UNet config.json of an LCM-distilled SD v1.5 (SD v1.5's, with
    time_cond_proj_dim 256, as SimianLuo/LCM_Dreamshaper_v7's) read by minildm gives a UNet with exactly
    diffusers' parameter count: SD v1.5's 859,520,964 and the 256 x 320 guidance projection."""
    from diffusers import UNet2DConditionModel

    from minildm.unet import UNetConfig

    config = {"_class_name": "UNet2DConditionModel", "act_fn": "silu", "attention_head_dim": 8,
              "block_out_channels": [320, 640, 1280, 1280], "center_input_sample": False,
              "cross_attention_dim": 768, "down_block_types": ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
              "downsample_padding": 1, "flip_sin_to_cos": True, "freq_shift": 0, "in_channels": 4,
              "layers_per_block": 2, "mid_block_scale_factor": 1, "norm_eps": 1e-05, "norm_num_groups": 32,
              "out_channels": 4, "sample_size": 96, "time_cond_proj_dim": 256,
              "up_block_types": ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3}
    with torch.device("meta"):
        theirs = UNet2DConditionModel(**{k: v for k, v in config.items() if not k.startswith("_")})
        ours = UNet(convert.unet_config_from_diffusers(config))
    count = lambda m: sum(p.numel() for p in m.parameters())
    assert ours.cfg == dataclasses.replace(UNetConfig.sd15(), guidance_embed_dim=256)
    assert count(ours) == count(theirs) == 859_520_964 + 256 * 320


def tiny_taesd_folder(root):
    """A diffusers AutoencoderTiny with random weights, two resolutions like the tiny VAE (factor 2), saved
    by diffusers: the layout of madebyollin/taesd's diffusers folder at test size."""
    from diffusers import AutoencoderTiny

    torch.manual_seed(4)
    taesd = AutoencoderTiny(encoder_block_out_channels=(8, 8), decoder_block_out_channels=(8, 8),
                            num_encoder_blocks=(1, 1), num_decoder_blocks=(1, 1), latent_channels=4).eval()
    taesd.save_pretrained(root / "taesd")
    return str(root / "taesd"), taesd


def test_tiny_decoder_gives_the_image_diffusers_gives_with_autoencoder_tiny(models, original_file, tmp_path):
    """The fast path end to end: LCM from a seed, decoded by a TAESD loaded from its diffusers folder, gives
    the image StableDiffusionPipeline gives with LCMScheduler and that AutoencoderTiny as its VAE; the
    callback's previews go through it too, and without it the VAE decodes (another picture)."""
    folder, taesd = tiny_taesd_folder(tmp_path)
    ours = load_original(original_file)
    vae_image = None
    pipe = reference_pipeline("StableDiffusionPipeline", models, tmp_path, "LCMScheduler")
    pipe.vae = taesd
    as_denoisers(ours.unet, pipe.unet)
    prompts = ["a photo of an astronaut riding a horse", "a cat in a hat"]
    kw = dict(num_steps=4, guidance_scale=1.0, height=SIZE, width=SIZE, seed=3, sampler="lcm")
    vae_image = ours.generate(prompts, **kw)
    ours.load_taesd(folder)
    previews = []
    x = ours.generate(prompts, callback=lambda info: previews.append(ours.decode_latents(info["x0_pred"])), **kw)
    with torch.no_grad():
        x_ref = pipe(prompts, num_inference_steps=4, guidance_scale=1.0, height=SIZE, width=SIZE,
                     generator=torch.Generator().manual_seed(3), output_type="pt").images
    assert_close_to_reference(x, x_ref, "images through the tiny decoder")
    assert torch.allclose(ours.to_unit(previews[-1]), x, atol=1e-6)   # the last step's x0 is the result
    assert (vae_image - x).abs().max() > 1e-2


def test_a_tiny_decoder_for_other_latents_is_refused(original_file, tmp_path):
    """A TAESD whose latents are not this model's (SD v1's factor 8 against the tiny VAE's 2) is a one-line error."""
    from diffusers import AutoencoderTiny

    AutoencoderTiny(encoder_block_out_channels=(8,) * 4, decoder_block_out_channels=(8,) * 4).save_pretrained(
        tmp_path / "sd-taesd")
    with pytest.raises(convert.CheckpointError, match="decodes 4-channel latents at 1/8 size .* at 1/2"):
        load_original(original_file).load_taesd(tmp_path / "sd-taesd")


@pytest.fixture(scope="module")
def inpainting_models():
    """Tiny models whose UNet reads 9 channels: z_t, the mask and the masked image's latents."""
    return tiny_models(seed=3, unet=dict(UNET_3LEVEL, in_channels=9))


@pytest.fixture(scope="module")
def inpainting_file(inpainting_models, tmp_path_factory):
    path = tmp_path_factory.mktemp("inpaint") / "sd-inpainting.safetensors"
    return write_safetensors(path, original_state(*inpainting_models, ema_offset=0.0))


def load_inpainting(path, monkeypatch):
    """Load as an original file of unknown size is loaded (the presets, here the tiny ones): the UNet's
    input channels come from the file."""
    from minildm.clip_text import CLIPTextConfig
    from minildm.unet import UNetConfig
    from minildm.vae import VAEConfig

    unet_cfg, vae_cfg, text_cfg = tiny_configs()
    monkeypatch.setattr(UNetConfig, "sd15", classmethod(lambda cls: unet_cfg))
    monkeypatch.setattr(VAEConfig, "sd", classmethod(lambda cls: vae_cfg))
    monkeypatch.setattr(CLIPTextConfig, "vit_l14", classmethod(lambda cls: text_cfg))
    return load_stable_diffusion(path)


INPAINT_CASES = [("ddim", "DDIMScheduler", 1.0), ("euler_a", "EulerAncestralDiscreteScheduler", 1.0),
                 ("dpmpp_2m", "DPMSolverMultistepScheduler", 1.0), ("ddim", "DDIMScheduler", 0.7),
                 ("ddpm", "DDPMScheduler", 0.7), ("euler", "EulerDiscreteScheduler", 0.7),
                 ("euler_a", "EulerAncestralDiscreteScheduler", 0.7), ("heun", "HeunDiscreteScheduler", 0.7),
                 ("dpmpp_2m", "DPMSolverMultistepScheduler", 0.7)]


@pytest.mark.parametrize("sampler, scheduler, strength", INPAINT_CASES,
                         ids=[f"{c[0]}-strength{c[2]}" for c in INPAINT_CASES])
def test_inpainting_model_matches_diffusers_pipeline(inpainting_models, inpainting_file, tmp_path, monkeypatch,
                                                     sampler, scheduler, strength):
    """The 9-channel inpainting model, loaded from an original file, equals StableDiffusionInpaintPipeline."""
    ours = load_inpainting(inpainting_file, monkeypatch)
    assert ours.is_inpainting_model and ours.unet.cfg.in_channels == 9
    pipe = reference_pipeline("StableDiffusionInpaintPipeline", inpainting_models, tmp_path, scheduler)
    as_denoisers(ours.unet, pipe.unet)
    x = torch.rand(1, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(6)) * 2 - 1
    mask = torch.zeros(1, 1, SIZE, SIZE)
    mask[..., 6:22, 10:30] = 1
    prompts, negative = ["a red door", "a window with flowers"], "low quality"
    z = ours.generate(prompts, negative_prompt=negative, init_image=x, mask=mask, strength=strength, num_steps=6,
                      seed=5, guidance_scale=5.0, sampler=sampler, output_type="latent")
    with torch.no_grad():
        z_ref = pipe(prompts, image=x, mask_image=mask, strength=strength, num_inference_steps=6, guidance_scale=5.0,
                     negative_prompt=[negative] * 2, generator=torch.Generator().manual_seed(5), height=SIZE,
                     width=SIZE, output_type="latent").images
    assert_close_to_reference(z, z_ref, sampler)


def test_inpainting_model_from_a_diffusers_folder_and_its_errors(inpainting_models, inpainting_file, tmp_path,
                                                                 monkeypatch):
    """A diffusers folder of the inpainting model loads with its 9 channels and gives the original file's
    images; without an init image and a mask it says what it needs."""
    pipe = reference_pipeline("StableDiffusionInpaintPipeline", inpainting_models, tmp_path)
    pipe.save_pretrained(tmp_path / "folder")
    folder = load_stable_diffusion(str(tmp_path / "folder"))
    original = load_inpainting(inpainting_file, monkeypatch)
    assert folder.is_inpainting_model
    x = torch.rand(1, 3, SIZE, SIZE) * 2 - 1
    mask = torch.ones(1, 1, SIZE, SIZE)
    kw = dict(init_image=x, mask=mask, strength=1.0, num_steps=3, seed=1, output_type="latent")
    assert torch.equal(folder.generate("a door", **kw), original.generate("a door", **kw))
    with pytest.raises(ValueError, match="inpainting model .* needs an init image and a mask"):
        original.generate("a door", num_steps=2)


def test_float16_file_loads_as_float32_or_float16(models, tmp_path):
    """A float16 file loads into float32 (values equal to the half-precision ones) or stays float16."""
    state = {k: (v.half() if v.is_floating_point() else v) for k, v in original_state(*models).items()}
    path = write_safetensors(tmp_path / "half.safetensors", state)
    m32 = load_original(path)
    m16 = load_original(path, dtype=torch.float16)
    k = "input_blocks.1.0.in_layers.2.weight"
    assert m32.unet.state_dict()[k].dtype == torch.float32
    assert m16.unet.state_dict()[k].dtype == torch.float16
    assert torch.equal(m32.unet.state_dict()[k], state[convert.ema_key(k)].float())  # EMA chosen


def test_ema_can_be_switched_off(models, tmp_path):
    """use_ema=False loads the raw UNet weights instead of model_ema.*."""
    path = write_safetensors(tmp_path / "ema.safetensors", original_state(*models, ema_offset=1.0))
    k = "out.2.bias"
    assert torch.equal(load_original(path).unet.state_dict()[k], models[0].state_dict()[k] + 1.0)
    assert torch.equal(load_original(path, use_ema=False).unet.state_dict()[k], models[0].state_dict()[k])


def test_minildm_checkpoint_loads_with_its_configs(models, tmp_path):
    """A checkpoint from save_checkpoint loads without configs and generates like the models it holds."""
    unet, vae, text = models
    path = convert.save_checkpoint(tmp_path / "runs" / "a" / "model.safetensors", unet=unet, vae=vae,
                                   text_encoder=text, schedule=NoiseSchedule.sd(), scale_factor=0.5)
    loaded = load_stable_diffusion(path)
    direct = LatentDiffusion(unet, vae, text, CLIPTokenizer.default(), NoiseSchedule.sd(), 0.5)
    kw = dict(num_steps=2, seed=0, height=SIZE, width=SIZE)
    assert torch.equal(loaded.generate("x", **kw), direct.generate("x", **kw))
    assert find_latest_checkpoint(tmp_path / "runs") == str(path)
    assert find_latest_checkpoint(tmp_path / "nothing") is None


def test_text_encoder_with_fewer_positions_gets_a_matching_tokenizer(tmp_path):
    """A checkpoint whose text encoder has 16 positions loads with a 16-token tokenizer and generates."""
    unet_cfg, vae_cfg, text_cfg = tiny_configs()
    text_cfg.context_length = 16
    torch.manual_seed(0)
    unet, vae, text = UNet(unet_cfg), AutoencoderKL(vae_cfg), CLIPTextModel(text_cfg)
    path = convert.save_checkpoint(tmp_path / "short.safetensors", unet=unet, vae=vae, text_encoder=text,
                                   schedule=NoiseSchedule.sd(), scale_factor=0.5)
    loaded = load_stable_diffusion(path)
    assert loaded.tokenizer.context_length == 16
    assert loaded.encode_prompt(["a photo of a cat", ""]).shape == (2, 16, text_cfg.width)
    assert loaded.generate("a photo of a cat", num_steps=2, seed=0, height=SIZE, width=SIZE).shape == (1, 3, SIZE, SIZE)


def test_context_width_disagreement_names_both_widths(models, tmp_path):
    """A config whose context width is not the file's is refused with both widths, and no guess at SD 2.x."""
    path = write_safetensors(tmp_path / "m.safetensors", original_state(*models))
    unet_cfg, vae_cfg, text_cfg = tiny_configs()
    unet_cfg.context_dim = 1024
    with pytest.raises(convert.CheckpointError, match="reads 32-wide contexts, the UNet config given says 1024") as e:
        load_stable_diffusion(path, unet_config=unet_cfg, vae_config=vae_cfg, text_config=text_cfg)
    assert "2.x" not in str(e.value)


def test_sizes_are_read_from_the_shapes_of_original_weights():
    """unet_shapes, vae_shapes and text_shapes give back the SD v1.5 and tiny configs from weights alone."""
    from minildm.unet import UNetConfig
    from minildm.vae import VAEConfig

    with torch.device("meta"):
        for cfg in (UNetConfig.sd15(), UNetConfig(**UNET_3LEVEL), UNetConfig(**dict(UNET_3LEVEL, in_channels=9))):
            shapes = convert.unet_shapes(UNet(cfg).state_dict())
            assert dataclasses.replace(cfg, **shapes) == cfg, shapes
        for cfg in (VAEConfig.sd(), VAEConfig.tiny()):
            shapes = convert.vae_shapes(AutoencoderKL(cfg).state_dict())
            assert dataclasses.replace(cfg, **shapes) == cfg, shapes
        shapes = convert.text_shapes(CLIPTextModel(CLIPTextConfig.vit_l14()).state_dict())
        assert CLIPTextConfig(**shapes) == CLIPTextConfig.vit_l14()


def small_original_model(tmp_path):
    """An original-layout file of a model trained at another size: 64-wide text context, width-32 UNet."""
    from minildm.unet import UNetConfig
    from minildm.vae import VAEConfig

    torch.manual_seed(5)
    # 32 GroupNorm groups, as the original code fixes them (a YAML cannot say otherwise)
    unet_cfg = UNetConfig(**dict(UNET_3LEVEL, context_dim=64, norm_groups=32))
    vae_cfg = VAEConfig(base_channels=32, channel_mult=(1, 2), num_res_blocks=1, z_channels=4, scale_factor=0.7)
    text_cfg = CLIPTextConfig(width=64, num_layers=2, num_heads=1, mlp_width=128)
    models = UNet(unet_cfg).eval(), AutoencoderKL(vae_cfg).eval(), CLIPTextModel(text_cfg).eval()
    path = write_safetensors(tmp_path / "small.safetensors", original_state(*models))
    yaml_dict = original_yaml(unet=unet_cfg, vae=vae_cfg)
    yaml_dict["model"]["params"].update(linear_start=0.00085, linear_end=0.012, timesteps=1000)
    return path, yaml_dict, (unet_cfg, vae_cfg, text_cfg)


def test_original_file_of_another_size_loads_with_its_yaml(tmp_path):
    """Without its YAML such a file is a one-line error asking for it (not a guess at SD 2.x); with it,
    the model is the one explicit configs give; a YAML that disagrees with the weights names both."""
    import yaml

    path, yaml_dict, (unet_cfg, vae_cfg, text_cfg) = small_original_model(tmp_path)
    with pytest.raises(convert.CheckpointError, match="another size than SD v1's.*give the inference YAML") as e:
        load_stable_diffusion(path)
    assert "2.x" not in str(e.value)
    config = tmp_path / "small-inference.yaml"
    config.write_text(yaml.safe_dump(yaml_dict))
    model = load_stable_diffusion(path, config=str(config))
    assert model.unet.cfg == unet_cfg and model.text_encoder.cfg == text_cfg and model.scale_factor == 0.7
    explicit = load_stable_diffusion(path, unet_config=unet_cfg, vae_config=vae_cfg, text_config=text_cfg)
    kw = dict(num_steps=3, seed=3, height=SIZE, width=SIZE, output_type="latent")
    assert torch.equal(model.generate("a red cube", **kw), explicit.generate("a red cube", **kw))
    yaml_dict["model"]["params"]["unet_config"]["params"]["model_channels"] = 64
    config.write_text(yaml.safe_dump(yaml_dict))
    with pytest.raises(convert.CheckpointError, match="disagree: the YAML's UNet has model_channels 64, "
                                                      "the weights have 32"):
        load_stable_diffusion(path, config=str(config))


@pytest.fixture(scope="module")
def model(original_file):
    return load_original(original_file)


def test_same_seed_same_image(model):
    """Generation is deterministic for a seed, and a generator gives the same as its seed."""
    kw = dict(num_steps=3, height=SIZE, width=SIZE, num_images=2, sampler="euler_a")
    a = model.generate("a dog", seed=11, **kw)
    b = model.generate("a dog", generator=torch.Generator().manual_seed(11), **kw)
    c = model.generate("a dog", seed=12, **kw)
    assert a.shape == (2, 3, SIZE, SIZE) and torch.equal(a, b) and not torch.equal(a, c)


def test_several_prompts_several_images_each_with_one_or_many_negative_prompts(model):
    """num_images per prompt; one negative prompt serves every image, or one is given per prompt."""
    kw = dict(num_steps=2, height=SIZE, width=SIZE, num_images=3, seed=0, output_type="latent")
    one = model.generate(["a dog", "a cat"], negative_prompt="blurry", **kw)
    per_prompt = model.generate(["a dog", "a cat"], negative_prompt=["blurry", "blurry"], **kw)
    assert one.shape[0] == 6 and torch.equal(one, per_prompt)
    with pytest.raises(ValueError, match="3 negative prompts for 2 prompts"):
        model.generate(["a dog", "a cat"], negative_prompt=["a", "b", "c"], **kw)


@pytest.mark.parametrize("sampler", ["ddpm", "ddim", "plms", "euler", "euler_a", "heun", "lms", "dpmpp_2m"])
def test_every_sampler_runs_with_a_callback(model, sampler):
    """Each sampler generates finite images and calls the callback once per step with a decodable x0_pred."""
    seen = []

    def callback(info):
        seen.append(model.decode_latents(info["x0_pred"]).shape)

    x = model.generate("", num_steps=3, seed=0, height=SIZE, width=SIZE, sampler=sampler, callback=callback)
    assert torch.isfinite(x).all() and len(seen) == 3 and seen[0] == (1, 3, SIZE, SIZE)


def test_img2img_strength_zero_returns_the_reconstruction(model):
    """With strength 0 img2img runs no step and returns decode(encode(x))."""
    x = torch.rand(1, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(0)) * 2 - 1
    out = model.generate("anything", init_image=x, strength=0.0, num_steps=10)
    rec = model.to_unit(model.decode_latents(model.encode_image(x)))
    assert torch.equal(out, rec)


def test_img2img_runs_the_last_strength_fraction_of_steps(model):
    """img2img with strength s runs int(s * num_steps) steps, starting from the init image's latents."""
    x = torch.rand(1, 3, SIZE, SIZE) * 2 - 1
    steps = []
    model.generate("a", init_image=x, strength=0.5, num_steps=10, seed=0, callback=lambda info: steps.append(info["step"]))
    assert steps == list(range(5, 10))


@pytest.mark.parametrize("sampler", ["ddim", "plms", "euler", "euler_a", "dpmpp_2m"])
def test_inpainting_keeps_the_unmasked_region(model, sampler):
    """Outside the mask the final latents are the init image's own; inside they are repainted."""
    x = torch.rand(1, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(0)) * 2 - 1
    mask = torch.zeros(1, 1, SIZE, SIZE)
    mask[..., 8:20, 4:28] = 1
    z = model.generate("a hole", init_image=x, mask=mask, strength=1.0, num_steps=4, seed=1, sampler=sampler,
                       output_type="latent")
    z0 = model.encode_image(x, torch.Generator().manual_seed(1), sample=True)  # the seed's first draw
    keep = model.latent_mask(mask, 1) == 0
    assert torch.equal(z[keep.expand_as(z)], z0[keep.expand_as(z0)])
    assert (z - z0)[~keep.expand_as(z)].abs().mean() > 1e-3


def test_attention_slicing_and_vae_tiling_change_little(model):
    """Attention slicing gives the same image; VAE tiling with a tile as large as the latent changes nothing."""
    kw = dict(num_steps=2, seed=3, height=SIZE, width=SIZE)
    plain = model.generate("a", **kw)
    model.set_attention_slicing(7)
    sliced = model.generate("a", **kw)
    model.set_attention_slicing(None)
    assert (plain - sliced).abs().max() < 1e-5
    z = torch.randn(1, 4, 16, 16)
    model.set_vae_tiling(16)
    same = model.decode_latents(z)
    model.set_vae_tiling(8)
    tiled = model.decode_latents(z)
    model.set_vae_tiling(None)
    assert torch.equal(same, model.decode_latents(z)) and tiled.shape == same.shape and torch.isfinite(tiled).all()


def test_vae_tiling_blends_to_the_untiled_result_for_a_local_decoder(model, monkeypatch):
    """With a decoder that is pointwise (each latent cell -> its own f x f pixels), tiled decoding must
    equal untiled decoding for any tile size: tiles cover the image, sit at the right offsets, and
    their blend weights sum to one. (The real decoder's attention and GroupNorm see only their tile,
    which is what tiling trades for memory.)"""
    f = model.downsample_factor

    def local_decode(z):
        return torch.tanh(z[:, :3]).repeat_interleave(f, -2).repeat_interleave(f, -1)

    monkeypatch.setattr(model.vae, "decode", local_decode)
    z = torch.randn(2, 4, 16, 24)
    untiled = model.decode_latents(z)
    try:
        for tile in (5, 8, 11, 16):
            model.set_vae_tiling(tile)
            tiled = model.decode_latents(z)
            assert (tiled - untiled).abs().max() < 1e-6, f"tile {tile}: {(tiled - untiled).abs().max():.2g}"
    finally:
        model.set_vae_tiling(None)


def test_float16_weights_generate_close_to_float32(models, tmp_path):
    """A model loaded in float16 generates (float32 images out) within half precision of the float32 model."""
    state = {k: (v.half() if v.is_floating_point() else v) for k, v in original_state(*models).items()}
    path = write_safetensors(tmp_path / "half.safetensors", state)
    kw = dict(num_steps=2, seed=3, height=SIZE, width=SIZE, guidance_scale=5.0)
    image32 = load_original(path).generate("a red cat", **kw)
    image16 = load_original(path, dtype=torch.float16).generate("a red cat", **kw)
    diff = (image32 - image16).abs()
    assert image16.dtype == torch.float32 and torch.isfinite(image16).all()
    assert diff.max() < 0.05, f"max {diff.max():.3g}, mean {diff.mean():.3g}"


def test_bfloat16_fast_path_stays_close_to_float32(original_file, tmp_path):
    """The fast path in bfloat16 (LCM, 4 steps, TAESD in the model's dtype): float32 results out, the
    sampler's state kept in float32, and the image within bfloat16's reach of the float32 one. (How close
    on a trained model is measured, not asserted here: bench/fast_cpu.py --fidelity, bench/RESULTS.md.)"""
    folder, _ = tiny_taesd_folder(tmp_path)
    kw = dict(num_steps=4, seed=3, height=SIZE, width=SIZE, guidance_scale=1.0, sampler="lcm")
    images, states = {}, {}
    for dtype in (torch.float32, torch.bfloat16):
        model = load_original(original_file, dtype=dtype)
        as_denoisers(model.unet)
        model.load_taesd(folder)
        assert next(model.tiny_decoder.parameters()).dtype == dtype
        seen = []
        images[dtype] = model.generate("a red cat", callback=lambda info: seen.append(info["z_t"].dtype), **kw)
        states[dtype] = set(seen)
    assert images[torch.bfloat16].dtype == torch.float32 and states[torch.bfloat16] == {torch.float32}
    diff = (images[torch.float32] - images[torch.bfloat16]).abs()
    assert 0 < diff.max() < 0.05, f"max {diff.max():.3g}, mean {diff.mean():.3g}"


def test_ema_only_ckpt_loads(models, tmp_path):
    """A .ckpt that holds only the EMA weights under the plain UNet keys (as the released pruned-emaonly
    files do) loads, with or without the state_dict wrapper."""
    state = original_state(*models, ema_offset=None)
    assert not any(k.startswith(convert.EMA_PREFIX) for k in state)
    for name, obj in (("wrapped.ckpt", {"state_dict": state}), ("bare.ckpt", state)):
        torch.save(obj, tmp_path / name)
        m = load_original(tmp_path / name)
        k = "out.2.bias"
        assert torch.equal(m.unet.state_dict()[k], models[0].state_dict()[k])


def test_bad_sizes_and_options_are_refused(model):
    """Sizes not divisible by 8, unknown samplers, strengths outside [0, 1] and masks without images raise."""
    with pytest.raises(ValueError, match="multiples of 8"):
        model.generate("a", height=36, width=32)
    with pytest.raises(ValueError, match="unknown sampler"):
        model.generate("a", sampler="nope")
    with pytest.raises(ValueError, match="strength"):
        model.generate("a", init_image=torch.zeros(1, 3, SIZE, SIZE), strength=1.5)
    with pytest.raises(ValueError, match="init image"):
        model.generate("a", mask=torch.zeros(1, 1, SIZE, SIZE))


def test_scale_factor_is_applied_once(model):
    """encode_image multiplies the VAE's latent by the scale factor and decode_latents divides it back."""
    x = torch.rand(1, 3, SIZE, SIZE) * 2 - 1
    z_raw = model.vae.encode(x).mode()
    assert torch.allclose(model.encode_image(x), z_raw * 0.5)
    assert torch.allclose(model.decode_latents(z_raw * 0.5), model.vae.decode(z_raw).clamp(-1, 1))


def test_text_config_round_trips_through_transformers_config():
    """The text encoder config survives the trip through transformers' config.json fields."""
    cfg = CLIPTextConfig.tiny()
    assert convert.text_config_from_diffusers(convert.text_config_to_diffusers(cfg)) == cfg
