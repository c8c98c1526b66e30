"""Photos as prompts in the studio: an image-variations model varies an uploaded photo, the joint-space panel
draws "this photo, but a cat" at several weights, and a trained run reads a photo beside its prompt through
its image adapter; each image equals what `python -m minildm.sample` writes with the same settings, what does
not fit is one line, and the page's endpoints reach all of it."""
import json
import os

import numpy as np
import pytest
from PIL import Image

from minildm import convert
from minildm.pngtext import read_settings
from minildm.sample import main as sample_main
from minildm.schedule import NoiseSchedule
from minildm.studio import browser
from minildm.studio.session import Request, Studio
from test_convert import tiny_models
from test_studio import page_client, studio_in_browser
from test_image_adapter import adapter_for, small_model
from test_image_variations import _photo
from test_joint_space import clip, folder, parts  # noqa: F401  (fixtures: tiny image-variations folder, CLIP)
from test_ldm import SIZE

COMMON = ["--steps", "3", "--seed", "4", "--dtype", "float32", "--overwrite"]


def pixels(path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB")).astype(int)


def images(events):
    return [e for e in events if e.kind == "image"]


def without_files(settings: dict) -> dict:
    """Settings without the photo's path (the studio keeps its own copy of an upload)."""
    return {k: v for k, v in settings.items() if k != "image_prompt"}


@pytest.fixture(scope="module")
def photo(tmp_path_factory):
    path = tmp_path_factory.mktemp("photos") / "photo.png"
    _photo(7).save(path)
    return path


@pytest.fixture(scope="module")
def variations(folder, clip, tmp_path_factory):  # noqa: F811
    """A studio with the tiny image-variations model loaded and CLIP's text tower for captions."""
    root = tmp_path_factory.mktemp("studio-variations")
    studio = Studio([folder], str(root / "runs"), clip=clip[0], out=str(root / "out"), dtype="float32")
    studio.use(folder)
    return studio


def test_a_variation_equals_the_sample_command(variations, folder, photo, tmp_path):  # noqa: F811
    """An uploaded photo on an image-variations model: the PNG equals `sample --image-prompt` (pixels and
    settings), the upload is kept beside the outputs, and the filmstrip works on it."""
    made = images(variations.generate(Request(image_prompt=str(photo), sampler="ddim", steps=3, seed=4)))
    assert len(made) == 1 and os.path.basename(made[0].path) == "variation-4.png"
    assert sample_main(["--ckpt", folder, "--image-prompt", str(photo), "--out", str(tmp_path), *COMMON]) == 0
    reference = tmp_path / "variation-of-photo-4.png"
    assert np.array_equal(pixels(made[0].path), pixels(reference))
    shown, expected = read_settings(made[0].path), read_settings(reference)
    assert without_files(shown) == without_files(expected)
    kept = shown["image_prompt"]
    assert kept.startswith(os.path.abspath(variations.out)) and open(kept, "rb").read() == photo.read_bytes()
    assert "an image-variations model" in variations.describe() and "joint space" in variations.describe()
    assert "leave the prompts empty" in variations.image_prompt_note()
    assert variations.filmstrip().steps == [0, 1, 2]
    again = images(variations.generate(variations.request_from(shown)))
    assert np.array_equal(pixels(again[0].path), pixels(made[0].path))


def test_a_photo_and_words_equal_the_sample_commands_joint_flags(variations, folder, clip, photo, tmp_path):  # noqa: F811
    """The joint-space panel at the last image's seed and steps: a = 0 is the plain variation, a = 0.5 equals
    `sample --clip --image-prompt --minus "a dog" --plus "a cat" --text-weight 0.5`."""
    images(variations.generate(Request(image_prompt=str(photo), sampler="ddim", steps=3, seed=4)))
    strip = variations.image_arithmetic(str(photo), "a dog", "a cat", [0, 0.5])
    assert strip.labels == ["the photo", "a=0", "a=0.5"] and len(strip.images) == 3
    plain = tmp_path / "plain"
    sample_main(["--ckpt", folder, "--image-prompt", str(photo), "--out", str(plain), *COMMON])
    mixed = tmp_path / "mixed"
    sample_main(["--ckpt", folder, "--image-prompt", str(photo), "--clip", clip[0], "--minus", "a dog", "--plus",
                 "a cat", "--text-weight", "0.5", "--out", str(mixed), *COMMON])
    for drawn, out in ((strip.images[1], plain), (strip.images[2], mixed)):
        written = pixels(next(out.glob("*.png")))
        assert np.abs(drawn.astype(int) - written).max() <= 1          # the view rounds, the PNG rounds
    assert np.abs(strip.images[1].astype(int) - strip.images[2]).max() > 8


def test_what_does_not_fit_is_one_line(variations, folder, photo, tmp_path):  # noqa: F811
    """Text on a variations model, no photo, captions without --clip, the panel on a text model, a photo on a
    text model without an adapter, bad weights: each a ValueError naming what to do."""
    with pytest.raises(ValueError, match="reads the photo, not text: clear the prompt"):
        variations.check(Request(prompt="a cat", image_prompt=str(photo)))
    with pytest.raises(ValueError, match="upload a photo under Image prompt"):
        variations.check(Request())
    with pytest.raises(ValueError, match="this view draws from text"):
        variations.attention()
    for weights, words in (([11], "from -10 to 10"), ([], "one to eight"), ([0] * 9, "one to eight")):
        with pytest.raises(ValueError, match=words):
            variations.image_arithmetic(str(photo), "a dog", "a cat", weights)
    with pytest.raises(ValueError, match="give both captions"):
        variations.image_arithmetic(str(photo), "a dog", " ", [1])
    (tmp_path / "notes.png").write_text("not an image")
    with pytest.raises(ValueError, match="image prompt is not an image"):
        list(variations.generate(Request(image_prompt=str(tmp_path / "notes.png"), steps=2, seed=1)))

    no_clip = Studio([folder], str(tmp_path / "runs"), out=str(tmp_path / "out"), dtype="float32")
    no_clip.use(folder)
    with pytest.raises(ValueError, match="start the studio with --clip"):
        no_clip.image_arithmetic(str(photo), "a dog", "a cat", [1])

    unet, vae, text = tiny_models()
    convert.save_checkpoint(tmp_path / "runs" / "text" / "model.safetensors", unet=unet, vae=vae, text_encoder=text,
                            schedule=NoiseSchedule.sd(), scale_factor=0.5)
    text_only = Studio([], str(tmp_path / "runs"), out=str(tmp_path / "out"), dtype="float32")
    text_only.use(str(tmp_path / "runs" / "text"))
    with pytest.raises(ValueError, match="reads text only"):
        text_only.check(Request(prompt="a cat", image_prompt=str(photo)))
    with pytest.raises(ValueError, match="load one"):
        text_only.image_arithmetic(str(photo), "a dog", "a cat", [1])
    assert "--image-adapter" in text_only.image_prompt_note()


@pytest.fixture(scope="module")
def adapter_runs(tmp_path_factory):
    """runs/cifar: a small CIFAR-shaped model (pooled captions), with an image adapter file made for it;
    runs/other: a model it does not fit."""
    root = tmp_path_factory.mktemp("studio-adapter")
    model = small_model()
    adapter_for(model).save(root / "photo-prompts.safetensors")      # 8x8 latents: photos are read at 16 px
    convert.save_checkpoint(root / "runs" / "cifar" / "model.safetensors", unet=model.unet, vae=model.vae,
                            text_encoder=model.text_encoder, schedule=model.schedule, scale_factor=model.scale_factor)
    unet, vae, text = tiny_models()
    convert.save_checkpoint(root / "runs" / "other" / "model.safetensors", unet=unet, vae=vae, text_encoder=text,
                            schedule=model.schedule, scale_factor=0.5)
    _photo(3, 36, 44).save(root / "cat.png")
    return root


def test_a_run_reads_a_photo_beside_its_prompt_through_its_adapter(adapter_runs, tmp_path):
    """--image-adapter FILE:0.5: the run it fits reads the photo, and the image equals `sample --image-adapter
    FILE:0.5 --image-prompt`; without a photo the run draws what it draws without the adapter; a run it does
    not fit is used without it and the page says so."""
    root = adapter_runs
    file = str(root / "photo-prompts.safetensors")
    studio = Studio([], str(root / "runs"), image_adapter=(file, 0.5), out=str(tmp_path / "out"), dtype="float32")
    studio.use(str(root / "runs" / "cifar"))
    assert "with an image adapter" in studio.describe() and "beside the prompt" in studio.image_prompt_note()
    request = Request(prompt="a cat", image_prompt=str(root / "cat.png"), sampler="ddim", steps=3, seed=4)
    made = images(studio.generate(request))[0]
    assert os.path.basename(made.path) == "a-cat-like-photo-4.png"
    ckpt = str(root / "runs" / "cifar" / "model.safetensors")
    out = tmp_path / "sampled"
    assert sample_main(["a cat", "--ckpt", ckpt, "--image-adapter", f"{file}:0.5", "--image-prompt",
                        str(root / "cat.png"), "--out", str(out), *COMMON]) == 0
    reference = out / "a-cat-like-cat-4.png"
    assert np.array_equal(pixels(made.path), pixels(reference))
    assert without_files(read_settings(made.path)) == without_files(read_settings(reference))

    text_alone = images(studio.generate(Request(prompt="a cat", sampler="ddim", steps=3, seed=4)))[0]
    plain = out / "plain"
    sample_main(["a cat", "--ckpt", ckpt, "--out", str(plain), *COMMON])
    assert np.array_equal(pixels(text_alone.path), pixels(plain / "a-cat-4.png"))
    assert "image_adapter" not in read_settings(text_alone.path)
    assert not np.array_equal(pixels(text_alone.path), pixels(made.path))

    studio.use(str(root / "runs" / "other"))
    assert "the image adapter left out" in studio.describe()
    with pytest.raises(ValueError, match="reads text only"):
        studio.check(Request(prompt="a cat", image_prompt=str(root / "cat.png")))


def test_the_command_line_refuses_a_missing_clip_or_adapter(tmp_path, capsys):
    """--clip that is not a folder, --image-adapter that is not a file or has a SCALE that is not a number:
    usage errors (2) naming the flag, before anything loads."""
    from minildm.studio.cli import main

    (tmp_path / "a.safetensors").write_bytes(b"")
    for flags, words in ((["--clip", str(tmp_path / "nowhere")], "--clip"),
                         (["--image-adapter", str(tmp_path / "none.safetensors")], "--image-adapter"),
                         (["--image-adapter", f"{tmp_path}/a.safetensors:x"], "SCALE after the colon")):
        with pytest.raises(SystemExit) as e:
            main(["--runs-dir", str(tmp_path), *flags])
        assert e.value.code == 2
        assert words in capsys.readouterr().err


@pytest.fixture(scope="module")
def client(variations):
    with page_client(variations) as c:
        yield c


def test_the_page_varies_a_photo_and_draws_the_joint_space_strip(client, variations, photo):
    """/generate with the photo as the image prompt, /image_arithmetic with a photo, two captions and weights;
    text on this model and a bad weight are one-line messages."""
    from gradio_client import handle_file
    from gradio_client.exceptions import AppError

    form = ["", "", "ddim", False, 3, 7.5, 4, SIZE, SIZE, 1, None, 0.75, handle_file(str(photo))]
    status, image, gallery = client.predict(*form, api_name="/generate")
    assert "Done: 1 image" in status and json.loads(Image.open(image).text["minildm"])["seed"] == 4
    strip = client.predict(handle_file(str(photo)), "a dog", "a cat", "0, 1", api_name="/image_arithmetic")
    assert [g["caption"] for g in strip] == ["the photo", "a=0", "a=1"]
    assert np.abs(pixels(strip[1]["image"]) - pixels(image)).max() <= 1      # a = 0: the plain variation
    for args, api, words in ((["a cat", *form[1:]], "/generate", "clear the prompt"),
                             ([handle_file(str(photo)), "a dog", "a cat", "zero"], "/image_arithmetic", "Weights")):
        with pytest.raises(AppError) as info:
            client.predict(*args, api_name=api)
        assert words in str(info.value) and "Traceback" not in str(info.value), str(info.value)


@pytest.fixture(scope="module")
def variations_page(folder, clip, tmp_path_factory):  # noqa: F811
    """`python -m minildm.studio --ckpt FOLDER --clip CLIP` and a headless Chromium page on it."""
    with studio_in_browser("--ckpt", folder, "--clip", clip[0], "--runs-dir", "runs", "--out", "page-out",
                           cwd=tmp_path_factory.mktemp("variations-page")) as page:
        yield page


def test_in_the_browser_a_photo_is_varied_and_moved_towards_a_caption(variations_page, folder, photo, tmp_path):  # noqa: F811
    """Upload a photo under Image prompt and press Generate: the page shows the variation `sample --image-prompt`
    writes; in Look inside, the photo with two captions and two weights draws the photo and two pictures."""
    page = variations_page
    page.locator("#image-prompt input[type=file]").set_input_files(str(photo))
    page.wait_for_selector("#image-prompt img", timeout=30000)
    status = browser.generate(page, "", seed=4, steps=3)
    assert status.startswith("Done: 1 image"), status
    (tmp_path / "shown.png").write_bytes(browser.image_bytes(page, "#output"))
    sample_main(["--ckpt", folder, "--image-prompt", str(photo), "--out", str(tmp_path / "ref"), *COMMON])
    assert np.array_equal(pixels(tmp_path / "shown.png"), pixels(tmp_path / "ref" / "variation-of-photo-4.png"))

    page.click("#tab-inside-button")
    page.locator("#ia-photo input[type=file]").set_input_files(str(photo))
    page.wait_for_selector("#ia-photo img", timeout=30000)
    browser.set_number(page, "ia-weights", "0, 1")
    page.click("#image-arithmetic-button")
    page.wait_for_function("() => document.querySelectorAll('#image-arithmetic img').length >= 3", timeout=60000)
    page.click("#tab-generate-button")
