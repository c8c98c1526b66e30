"""SD image variations (lambdalabs/sd-image-variations-diffusers): a diffusers folder with image_encoder/
loads strictly, and the same seed gives StableDiffusionImageVariationPipeline's latents and images with
every sampler; the command line makes variations with --image-prompt and refuses what does not fit."""
import json
import os

import numpy
import pytest
import torch
from PIL import Image

from minildm import convert
from minildm.ldm import load_stable_diffusion
from minildm.sample import main as sample_main
from reference_configs import diffusers_unet_config, diffusers_vae_config
from test_clip_vision import TINY_VISION, _picture, _randomize, _reference_processor
from test_convert import tiny_configs
from test_ldm import PIPELINE_CASES, SIZE, as_denoisers, assert_close_to_reference

transformers = pytest.importorskip("transformers")
diffusers = pytest.importorskip("diffusers")

PROJECTION = TINY_VISION["projection_dim"]  # the image embedding's width: the UNet's context width


def _photo(seed, height=40, width=48):
    """A small RGB picture, not square, so the preprocessing resizes and crops it."""
    return Image.fromarray(_picture(height, width, 3, seed).permute(1, 2, 0).numpy(), "RGB")


def reference_parts():
    """diffusers' and transformers' tiny models, random, built from their own configs: a UNet that
    cross-attends to PROJECTION-wide contexts, a VAE and CLIPVisionModelWithProjection."""
    unet_cfg, vae_cfg, _ = tiny_configs()
    unet_cfg.context_dim = PROJECTION
    torch.manual_seed(0)
    unet = diffusers.UNet2DConditionModel(**diffusers_unet_config(unet_cfg))
    vae = diffusers.AutoencoderKL(**diffusers_vae_config(vae_cfg))
    with torch.no_grad():  # non-zero everywhere, as the other pipeline tests' models
        for p in list(unet.parameters()) + list(vae.parameters()):
            p.add_(0.02 * torch.randn_like(p))
    image_encoder = _randomize(transformers.CLIPVisionModelWithProjection(transformers.CLIPVisionConfig(**TINY_VISION)), 5)
    side = TINY_VISION["image_size"]
    feature_extractor = _reference_processor(size={"shortest_edge": side}, crop_size={"height": side, "width": side})
    return unet.eval(), vae.eval(), image_encoder.eval(), feature_extractor


def reference_pipeline(parts, scheduler="DDIMScheduler", **scheduler_options):
    from test_samplers import SD15_SCHEDULER_CONFIG

    unet, vae, image_encoder, feature_extractor = parts
    pipe = diffusers.StableDiffusionImageVariationPipeline(
        vae=vae, image_encoder=image_encoder, unet=unet,
        scheduler=getattr(diffusers, scheduler).from_config({**SD15_SCHEDULER_CONFIG, **scheduler_options}),
        safety_checker=None, feature_extractor=feature_extractor, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def parts():
    return reference_parts()


@pytest.fixture(scope="module")
def folder(parts, tmp_path_factory):
    """The pipeline saved by diffusers: unet/ vae/ image_encoder/ feature_extractor/ scheduler/, no text_encoder/."""
    path = tmp_path_factory.mktemp("variations") / "pipe"
    reference_pipeline(parts).save_pretrained(path)
    return str(path)


def test_folder_has_the_released_layout(folder):
    """What save_pretrained wrote is the layout of lambdalabs/sd-image-variations-diffusers."""
    index = json.load(open(os.path.join(folder, "model_index.json")))
    assert index["_class_name"] == "StableDiffusionImageVariationPipeline"
    assert {"unet", "vae", "image_encoder", "feature_extractor", "scheduler"} <= set(os.listdir(folder))
    assert not os.path.exists(os.path.join(folder, "text_encoder"))


def test_folder_loads_strictly_as_an_image_variations_model(folder, parts):
    """The folder loads with the image encoder's own weights, no text encoder, and a one-token context."""
    model = load_stable_diffusion(folder)
    assert model.is_image_variations_model and model.text_encoder is None and model.tokenizer is None
    assert model.unet.cfg.context_dim == PROJECTION
    reference = parts[2].state_dict()
    ours = model.image_encoder.state_dict()
    assert set(ours) == set(reference) - {"vision_model.embeddings.position_ids"}
    assert all(torch.equal(ours[k], reference[k]) for k in ours)
    assert model.encode_image_prompt([_photo(1), _photo(2)]).shape == (2, 1, PROJECTION)


@pytest.mark.parametrize("sampler, scheduler, options", PIPELINE_CASES,
                         ids=[f"{s}{'-karras' if o else ''}" for s, _, o in PIPELINE_CASES])
def test_matches_diffusers_image_variation_pipeline(folder, parts, sampler, scheduler, options):
    """Same folder, scheduler and seed (no latents passed: each library draws its own start from it):
    latents and images equal StableDiffusionImageVariationPipeline's, two image prompts, two variations each."""
    ours = load_stable_diffusion(folder)
    extra = {"use_karras_sigmas": True} if options.get("karras") else {}
    pipe = reference_pipeline(reference_parts(), scheduler, **extra)
    as_denoisers(ours.unet, pipe.unet)
    photos = [_photo(1), _photo(2, 48, 36)]
    kw = dict(num_steps=6, guidance_scale=5.0, height=SIZE, width=SIZE, num_images=2, sampler=sampler, **options)
    d_kw = dict(num_inference_steps=6, guidance_scale=5.0, height=SIZE, width=SIZE, num_images_per_prompt=2)
    z = ours.generate(image_prompt=photos, output_type="latent", seed=11, **kw)
    with torch.no_grad():
        z_ref = pipe(photos, output_type="latent", generator=torch.Generator().manual_seed(11), **d_kw).images
        # the pipeline's own decoding of its latents (output_type="pt" would run the whole loop again)
        x_ref = pipe.image_processor.postprocess(
            pipe.vae.decode(z_ref / pipe.vae.config.scaling_factor, return_dict=False)[0], output_type="pt")
    x = ours.to_unit(ours.decode_latents(z))
    for name, a, b in (("latents", z, z_ref), ("images", x, x_ref)):
        assert_close_to_reference(a, b, f"{sampler} {name}")
    # the image prompt steers the result: other pictures give other latents
    other = ours.generate(image_prompt=[_photo(3), _photo(4)], output_type="latent", seed=11, **kw)
    assert (other - z).abs().max() > 1e-3


def test_text_is_refused_and_text_models_refuse_image_prompts(folder):
    """An image-variations model refuses a prompt, a negative prompt or no image; a text model an image prompt."""
    from test_ldm import load_original, original_state, tiny_models, write_safetensors

    model = load_stable_diffusion(folder)
    kw = dict(num_steps=2, height=SIZE, width=SIZE, seed=0)
    with pytest.raises(ValueError, match="reads only the image prompt.*a prompt"):
        model.generate("a cat", image_prompt=_photo(1), **kw)
    with pytest.raises(ValueError, match="reads only the image prompt.*a negative prompt"):
        model.generate(image_prompt=_photo(1), negative_prompt="blurry", **kw)
    with pytest.raises(ValueError, match="give the image to vary as image_prompt"):
        model.generate("a cat", **kw)
    with pytest.raises(ValueError, match="image-variations model"):
        model.encode_prompt("a cat")
    text_model = load_original(write_safetensors(os.path.join(os.path.dirname(folder), "text.safetensors"),
                                                 original_state(*tiny_models(seed=1))))
    with pytest.raises(ValueError, match="reads text prompts: an image prompt needs an image-variations model"):
        text_model.generate(image_prompt=_photo(1), **kw)


def test_seeds_give_each_variation_on_its_own(folder):
    """seeds=[s0, s1] with one image prompt gives the variations that seed=s0 and seed=s1 give alone."""
    model = load_stable_diffusion(folder)
    as_denoisers(model.unet)  # latents O(1), so that float rounding stays far below the tolerance
    kw = dict(num_steps=3, height=SIZE, width=SIZE, sampler="euler_a", output_type="latent")
    both = model.generate(image_prompt=_photo(1), seeds=[5, 6], **kw)
    alone = torch.cat([model.generate(image_prompt=_photo(1), seed=s, **kw) for s in (5, 6)])
    assert both.shape[0] == 2 and (both - alone).abs().max() < 1e-5 and not torch.equal(both[0], both[1])


def test_mismatched_context_width_is_named(folder, tmp_path):
    """An image encoder whose projection is not the UNet's context width is a one-line CheckpointError."""
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(folder, broken)
    image_encoder = transformers.CLIPVisionModelWithProjection(
        transformers.CLIPVisionConfig(**dict(TINY_VISION, projection_dim=PROJECTION + 8)))
    image_encoder.save_pretrained(broken / "image_encoder")
    with pytest.raises(convert.CheckpointError, match=f"projects to {PROJECTION + 8} wide but its UNet reads "
                                                      f"{PROJECTION}-wide contexts"):
        load_stable_diffusion(broken)


def test_command_line_makes_variations(folder, tmp_path, capsys):
    """`python -m minildm.sample --image-prompt photo.png --ckpt folder` writes the variation the library
    gives for the seed, with the image prompt in its settings."""
    photo = tmp_path / "photo.png"
    _photo(7).save(photo)
    out = tmp_path / "out"
    assert sample_main(["--image-prompt", str(photo), "--ckpt", folder, "--steps", "3", "--seed", "4",
                        "--height", str(SIZE), "--width", str(SIZE), "--dtype", "float32", "--out", str(out)]) == 0
    paths = capsys.readouterr().out.split()
    assert len(paths) == 1 and os.path.basename(paths[0]) == "variation-of-photo-4.png"
    written = Image.open(paths[0])
    settings = json.loads(written.text["minildm"])
    assert settings["image_prompt"] == os.path.abspath(photo) and settings["prompt"] == "" and settings["seed"] == 4
    expected = load_stable_diffusion(folder).generate(image_prompt=Image.open(photo).convert("RGB"), seeds=[4],
                                                      num_steps=3, height=SIZE, width=SIZE)
    pixels = torch.from_numpy(numpy.asarray(written.convert("RGB"))).permute(2, 0, 1).float()
    assert (pixels - (expected[0] * 255).round()).abs().max() <= 1


def test_command_line_refuses_what_does_not_fit(folder, tmp_path, capsys):
    """A prompt or --negative with --image-prompt, --image-prompt with a text model, and an image-variations
    model without --image-prompt: one line each, exit status 2."""
    from minildm.schedule import NoiseSchedule
    from test_convert import tiny_models

    photo = tmp_path / "photo.png"
    _photo(7).save(photo)
    unet, vae, text = tiny_models(seed=1)
    text_file = convert.save_checkpoint(tmp_path / "text.safetensors", unet=unet, vae=vae, text_encoder=text,
                                        schedule=NoiseSchedule.sd(), scale_factor=0.5)
    base = ["--steps", "2", "--out", str(tmp_path / "out"), "--dtype", "float32"]
    cases = [(["a cat", "--image-prompt", str(photo), "--ckpt", folder], "replaces the text prompt"),
             (["--negative", "blurry", "--image-prompt", str(photo), "--ckpt", folder], "--negative"),
             (["--image-prompt", str(photo), "--ckpt", str(text_file)], "reads text prompts: --image-prompt needs"),
             (["--ckpt", folder], "is an image-variations model: give the image to vary with --image-prompt"),
             (["--image-prompt", str(tmp_path / "missing.png"), "--ckpt", folder], "does not exist")]
    for argv, message in cases:
        with pytest.raises(SystemExit) as e:
            sample_main(argv + base)
        err = capsys.readouterr().err.strip()
        assert e.value.code == 2 and message in err and len(err.splitlines()) == 1, (argv, err)
