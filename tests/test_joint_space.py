"""Images and captions in CLIP's joint space (minildm/joint_space.py): the embedding equals the formula
written out on transformers' CLIPVisionModelWithProjection and CLIPModel, the picture drawn from it equals
StableDiffusionImageVariationPipeline's given that embedding, and the command line draws "this photo,
but a cat" and refuses what does not fit, in one line each."""
import json
import os

import numpy
import pytest
import torch
from PIL import Image

from minildm.clip_vision import load_clip
from minildm.joint_space import JointPrompt, joint_embedding
from minildm.ldm import load_stable_diffusion
from minildm.sample import main as sample_main
from minildm.tokenizer import CLIPTokenizer
from test_clip_vision import TINY_TEXT, TINY_VISION, _pooled, _randomize
from test_image_variations import PROJECTION, _photo, folder, parts, reference_parts, reference_pipeline  # noqa: F401
from test_ldm import SIZE, as_denoisers, assert_close_to_reference

transformers = pytest.importorskip("transformers")
diffusers = pytest.importorskip("diffusers")


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    """A random tiny transformers CLIPModel (both towers, PROJECTION wide), saved as openai's folder is."""
    config = transformers.CLIPConfig(text_config=TINY_TEXT, vision_config=TINY_VISION, projection_dim=PROJECTION)
    ref = _randomize(transformers.CLIPModel(config), seed=7)
    path = tmp_path_factory.mktemp("clip") / "clip-vit-large-patch14"
    ref.save_pretrained(path)
    return str(path), ref


@pytest.fixture(scope="module")
def model(folder, clip):
    model = load_stable_diffusion(folder)
    model.load_text_clip(clip[0])
    return model


# Recipes, as JointPrompt fields; "photos" are indices into PHOTOS.
PHOTOS = [(1, 40, 48), (2, 48, 36), (3, 36, 36)]
RECIPES = {
    "photo-but-a-cat": dict(images=[0], minus=["a dog"], plus=["a cat"], weight=0.8),
    "two-photos-mixed": dict(images=[0, 1], image_weights=[0.3, 0.7]),
    "caption-alone": dict(plus=["a cat in a hat"], norm=5.0),
    "photo-lends-its-length": dict(images=[2], image_weights=[0.0], plus=["a red car"]),
    "two-photos-three-captions": dict(images=[0, 1], plus=["a cat", "at night"], minus=["a dog"], weight=1.5),
    "negative-weight": dict(images=[0, 1, 2], image_weights=[1.0, -0.5, 0.25], plus=["a tree"], weight=0.3),
}


def _photos(indices):
    return [_photo(*PHOTOS[i]) for i in indices]


def _recipe(name) -> JointPrompt:
    fields = dict(RECIPES[name])
    return JointPrompt(**{**fields, "images": tuple(_photos(fields.get("images", [])))})


@torch.no_grad()
def reference_embedding(parts, clip_ref, recipe: JointPrompt) -> torch.Tensor:
    """The recipe computed with transformers alone: CLIPImageProcessor and CLIPVisionModelWithProjection
    for the images, CLIPModel.get_text_features for the captions (tokens are data: CLIP's BPE ids)."""
    _, _, image_encoder, feature_extractor = parts
    u = lambda v: v / v.norm(dim=-1, keepdim=True)  # noqa: E731
    e = torch.zeros(PROJECTION)
    if recipe.images:
        pixels = feature_extractor(images=list(recipe.images), return_tensors="pt").pixel_values
        images = image_encoder(pixel_values=pixels).image_embeds                      # (n, D_p)
        n = len(images)
        w = torch.tensor(recipe.image_weights if recipe.image_weights is not None else [1 / n] * n)
        for j in range(n):
            e = e + w[j] * u(images[j])
        share = w.abs() if w.abs().sum() > 0 else torch.ones(n)
        length = sum(share[j] * images[j].norm() for j in range(n)) / share.sum()
    tokenizer = CLIPTokenizer.default()
    for texts, sign in ((recipe.plus, 1.0), (recipe.minus, -1.0)):
        for text in texts:
            t = _pooled(clip_ref.get_text_features(input_ids=tokenizer([text])))[0]
            e = e + sign * recipe.weight * u(t)
    if recipe.norm is not None:
        length = recipe.norm
    return (u(e) * length)[None]                                                         # (1, D_p)


@pytest.mark.parametrize("name", list(RECIPES))
def test_joint_embedding_is_the_formula_on_transformers_models(model, parts, clip, name):
    """Through the loaded folders, each recipe's context equals u(sum w u(image) + a sum u(plus) - a sum
    u(minus)) * L computed on transformers' models, within 1e-5."""
    recipe = _recipe(name)
    expected = reference_embedding(parts, clip[1], recipe)
    ours = model.encode_joint_prompt(recipe)
    assert ours.shape == (1, 1, PROJECTION)
    # float32 rounding, relative to the embedding's size (its length is about 10 here): where the weights
    # nearly cancel, u(e) divides by a short e and the rounding grows with it
    diff, scale = (ours[:, 0] - expected).abs().max(), expected.abs().max()
    assert diff <= 1e-5 * scale, f"{name}: max abs diff {diff:.3g} (the largest value {scale:.3g})"


def test_the_length_is_the_images_and_the_direction_moves(model, parts):
    """An image of weight 0 lends its length alone; with a = 0 the context is the image's own embedding
    (to float rounding); the captions turn it, and turn it further as a grows."""
    photo = _photo(*PHOTOS[0])
    _, _, image_encoder, feature_extractor = parts
    with torch.no_grad():
        image = image_encoder(pixel_values=feature_extractor(images=[photo], return_tensors="pt").pixel_values)
    image = image.image_embeds                                                            # (1, D_p)
    plain = model.encode_joint_prompt(JointPrompt(images=(photo,), plus=("a cat",), weight=0.0))[:, 0]
    assert (plain - image).abs().max() < 1e-5
    cos = []
    for a in (0.3, 1.0, 3.0):
        moved = model.encode_joint_prompt(JointPrompt(images=(photo,), minus=("a dog",), plus=("a cat",),
                                                      weight=a))[:, 0]
        assert abs(moved.norm() - image.norm()) < 1e-4
        cos.append(torch.nn.functional.cosine_similarity(moved, image).item())
    assert 1 > cos[0] > cos[1] > cos[2]
    lent = model.encode_joint_prompt(JointPrompt(images=(photo,), image_weights=(0.0,), plus=("a cat",)))
    assert abs(lent.norm() - image.norm()) < 1e-4


def test_library_refuses_what_does_not_fit(folder, clip, tmp_path):
    """Captions without a text CLIP, no length for a caption alone, a weight per image, a CLIP of another
    width, an image encoder as the text CLIP, a sum that cancels, embeddings of the wrong shape."""
    model = load_stable_diffusion(folder)
    photo = _photo(1)
    with pytest.raises(ValueError, match="LatentDiffusion.load_text_clip"):
        model.encode_joint_prompt(JointPrompt(images=(photo,), plus=("a cat",)))
    model.load_text_clip(load_clip(clip[0]))                                  # a CLIPModel works as well
    assert model.text_clip.text_model is not None
    with pytest.raises(ValueError, match="norm="):
        model.encode_joint_prompt(JointPrompt(plus=("a cat",)))
    with pytest.raises(ValueError, match="1 image weights for 2 images"):
        model.encode_joint_prompt(JointPrompt(images=(photo, photo), image_weights=(1.0,)))
    with pytest.raises(ValueError, match="points nowhere"):
        model.encode_joint_prompt(JointPrompt(images=(photo,), image_weights=(0.0,)))
    with pytest.raises(ValueError, match="points nowhere"):
        model.encode_joint_prompt(JointPrompt(images=(photo, photo), image_weights=(1.0, -1.0)))
    with pytest.raises(ValueError, match=r"this model reads \(n, 24\)"):
        model.generate(image_prompt=torch.zeros(1, 16), num_steps=1, height=SIZE, width=SIZE)
    with pytest.raises(ValueError, match="image encoder alone"):
        model.load_text_clip(folder)                                          # image_encoder/ is read
    narrow = transformers.CLIPModel(transformers.CLIPConfig(text_config=TINY_TEXT, vision_config=TINY_VISION,
                                                            projection_dim=PROJECTION - 8))
    narrow.save_pretrained(tmp_path / "narrow")
    with pytest.raises(ValueError, match=f"projects text to {PROJECTION - 8} wide.*images to {PROJECTION}"):
        model.load_text_clip(tmp_path / "narrow")
    with pytest.raises(ValueError, match="not one joint space"):
        joint_embedding(photo, plus=["a cat"], image_encoder=model.image_encoder,
                        text_clip=load_clip(tmp_path / "narrow"))


def _injected(pipe, embedding):
    """Make the pipeline's image encoder return `embedding` (1, D_p) as image_embeds; returns a call counter."""
    calls = []

    def hook(module, args, out):
        calls.append(1)
        return type(out)(image_embeds=embedding.to(out.image_embeds), last_hidden_state=out.last_hidden_state)
    pipe.image_encoder.register_forward_hook(hook)
    return calls


def _pipeline_images(pipe, photo, seed, steps, **kw):
    """The pipeline's latents and its own decoding of them, in [0, 1]."""
    with torch.no_grad():
        z = pipe(photo, output_type="latent", generator=torch.Generator().manual_seed(seed), num_inference_steps=steps,
                 height=SIZE, width=SIZE, **kw).images
        x = pipe.image_processor.postprocess(pipe.vae.decode(z / pipe.vae.config.scaling_factor, return_dict=False)[0],
                                             output_type="pt")
    return z, x


@pytest.mark.parametrize("name, sampler, scheduler", [
    ("photo-but-a-cat", "ddim", "DDIMScheduler"), ("two-photos-mixed", "ddim", "DDIMScheduler"),
    ("caption-alone", "euler_a", "EulerAncestralDiscreteScheduler")])
def test_matches_diffusers_given_the_same_embedding(folder, clip, name, sampler, scheduler):
    """generate(image_prompt=JointPrompt(...)) gives the latents and images StableDiffusionImageVariationPipeline
    gives, same seed, when its image encoder's output is replaced by the recipe computed with transformers."""
    ours = load_stable_diffusion(folder)
    ours.load_text_clip(clip[0])
    parts = reference_parts()
    pipe = reference_pipeline(parts, scheduler)
    as_denoisers(ours.unet, pipe.unet)
    recipe = _recipe(name)
    calls = _injected(pipe, reference_embedding(parts, clip[1], recipe))
    kw = dict(guidance_scale=5.0, num_images_per_prompt=2)
    z_ref, x_ref = _pipeline_images(pipe, _photo(9), 11, 6, **kw)
    z = ours.generate(image_prompt=recipe, num_images=2, num_steps=6, guidance_scale=5.0, sampler=sampler,
                      height=SIZE, width=SIZE, seed=11, output_type="latent")
    x = ours.to_unit(ours.decode_latents(z))
    assert calls
    for what, a, b in (("latents", z, z_ref), ("images", x, x_ref)):
        assert_close_to_reference(a, b, f"{name} {what}")
    plain = ours.generate(image_prompt=_photo(9), num_steps=6, guidance_scale=5.0, sampler=sampler, height=SIZE,
                          width=SIZE, seed=11, output_type="latent")
    assert (plain - z[:1]).abs().max() > 1e-3                                # the recipe steers the picture


def test_weight_zero_is_the_plain_variation_of_diffusers(folder, clip):
    """With a = 0 the captions vanish: the picture is diffusers' plain variation of the photo (no injection)."""
    ours = load_stable_diffusion(folder)
    ours.load_text_clip(clip[0])
    pipe = reference_pipeline(reference_parts())                              # its own UNet, for the hook
    as_denoisers(ours.unet, pipe.unet)
    photo = _photo(*PHOTOS[0])
    z_ref, _ = _pipeline_images(pipe, photo, 3, 4, guidance_scale=5.0)
    z = ours.generate(image_prompt=JointPrompt(images=(photo,), minus=("a dog",), plus=("a cat",), weight=0.0),
                      num_steps=4, guidance_scale=5.0, height=SIZE, width=SIZE, seed=3, output_type="latent")
    assert_close_to_reference(z, z_ref, "a = 0 latents")
    moved = ours.generate(image_prompt=JointPrompt(images=(photo,), minus=("a dog",), plus=("a cat",), weight=1.0),
                          num_steps=4, guidance_scale=5.0, height=SIZE, width=SIZE, seed=3, output_type="latent")
    assert (moved - z_ref).abs().max() > 1e-3


def test_command_line_draws_this_photo_but_a_cat(folder, clip, parts, tmp_path, capsys):
    """--image-prompt photo.png --minus "a dog" --plus "a cat" --text-weight 0.8 --clip FOLDER writes, under a
    name that says the recipe and with the recipe in its settings, diffusers' picture for the same embedding."""
    photo = tmp_path / "photo.png"
    _photo(7).save(photo)
    out = tmp_path / "out"
    assert sample_main(["--ckpt", folder, "--clip", clip[0], "--image-prompt", str(photo), "--minus", "a dog",
                        "--plus", "a cat", "--text-weight", "0.8", "--steps", "3", "--seed", "4", "--height", str(SIZE),
                        "--width", str(SIZE), "--dtype", "float32", "--out", str(out)]) == 0
    captured = capsys.readouterr()
    paths = captured.out.split()
    assert len(paths) == 1 and os.path.basename(paths[0]) == "variation-of-photo-minus-a-dog-plus-a-cat-4.png"
    written = Image.open(paths[0])
    settings = json.loads(written.text["minildm"])
    recipe = JointPrompt(images=(Image.open(photo),), minus=("a dog",), plus=("a cat",), weight=0.8)
    expected_embedding = reference_embedding(parts, clip[1], recipe)
    assert settings["image_prompt"] == os.path.abspath(photo) and settings["clip"] == os.path.abspath(clip[0])
    assert (settings["plus"], settings["minus"], settings["text_weight"]) == (["a cat"], ["a dog"], 0.8)
    assert abs(settings["embedding_norm"] - expected_embedding.norm().item()) < 1e-3
    assert f"length: {settings['embedding_norm']:g}" in captured.err
    pipe = reference_pipeline(reference_parts())                              # SD v1.5's DDIM, as the command's
    _injected(pipe, expected_embedding)
    _, x_ref = _pipeline_images(pipe, Image.open(photo), 4, 3, guidance_scale=7.5)
    pixels = torch.from_numpy(numpy.asarray(written.convert("RGB"))).permute(2, 0, 1).float()
    assert (pixels - (x_ref[0] * 255).round()).abs().max() <= 1


def test_command_line_mixes_two_photos(folder, tmp_path, capsys):
    """Two --image-prompt with --image-weights need no CLIP and name both photos; the mix is written."""
    for i, name in enumerate(("beach", "forest")):
        _photo(*PHOTOS[i]).save(tmp_path / f"{name}.png")
    assert sample_main(["--ckpt", folder, "--image-prompt", str(tmp_path / "beach.png"), "--image-prompt",
                        str(tmp_path / "forest.png"), "--image-weights", "0.3", "0.7", "--steps", "2", "--seed", "1",
                        "--height", str(SIZE), "--width", str(SIZE), "--dtype", "float32",
                        "--out", str(tmp_path / "out")]) == 0
    (path,) = capsys.readouterr().out.split()
    assert os.path.basename(path) == "variation-of-beach-and-forest-1.png"
    settings = json.loads(Image.open(path).text["minildm"])
    assert settings["image_weights"] == [0.3, 0.7] and len(settings["image_prompt"]) == 2


def test_command_line_refuses_what_does_not_fit(folder, clip, tmp_path, capsys):
    """Captions without --clip, --clip with a text model or an image encoder, a weight count that is not the
    image count, a caption alone without --norm, a missing --clip folder: one line each, exit status 2."""
    from minildm import convert
    from minildm.schedule import NoiseSchedule
    from test_convert import tiny_models

    photo = tmp_path / "photo.png"
    _photo(7).save(photo)
    unet, vae, text = tiny_models(seed=1)
    text_file = convert.save_checkpoint(tmp_path / "text.safetensors", unet=unet, vae=vae, text_encoder=text,
                                        schedule=NoiseSchedule.sd(), scale_factor=0.5)
    base = ["--steps", "2", "--out", str(tmp_path / "out"), "--dtype", "float32", "--height", str(SIZE),
            "--width", str(SIZE)]
    image = ["--image-prompt", str(photo)]
    cases = [
        (["--ckpt", folder, *image, "--plus", "a cat"], "--plus puts a caption into the image embedding through "
                                                         "CLIP's joint space: give a full CLIP folder"),
        (["--ckpt", str(text_file), "--clip", clip[0], "--plus", "a cat", "--norm", "3"],
         "reads text prompts: --clip, --plus and --minus move an image-variations model's image embedding"),
        (["--ckpt", folder, "--clip", folder, *image, "--plus", "a cat"], "is a CLIP image encoder alone"),
        (["--ckpt", folder, *image, *image, "--image-weights", "1"], "--image-weights: 1 weights for 2 --image-prompt"),
        (["--ckpt", folder, "--clip", clip[0], "--plus", "a cat"], "--plus without --image-prompt needs --norm N"),
        (["--ckpt", folder, "--clip", str(tmp_path / "nowhere"), *image, "--minus", "a dog"],
         f"--clip '{tmp_path / 'nowhere'}': does not exist"),
        (["--ckpt", folder, "--clip", clip[0], *image], "give one, or drop --clip"),
        (["--ckpt", folder, *image, "--text-weight", "2"], "--text-weight 2 weighs --plus and --minus captions"),
        (["--ckpt", folder, "--clip", clip[0], "a cat", "--plus", "a hat", "--norm", "3"],
         "reads no prompt: put 'a cat' into the image embedding with --plus"),
        (["--ckpt", folder, "--clip", clip[0], *image, "--plus", "a cat", "--negative", "blurry"],
         "--negative does not go with --image-prompt"),
        (["--ckpt", folder, *image, "--image-weights", "0"], "every weight is 0"),
        (["--ckpt", folder, *image, "--norm", "0"], "--norm 0: must be above 0"),
    ]
    for argv, message in cases:
        with pytest.raises(SystemExit) as e:
            sample_main(argv + base)
        err = capsys.readouterr().err.strip()
        assert e.value.code == 2 and message in err and len(err.splitlines()) == 1, (argv, err)
