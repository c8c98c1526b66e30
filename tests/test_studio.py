"""The studio: its session in plain Python (the same images as `python -m minildm.sample`, Stop, the
preview's budget, one-line messages), every page event through Gradio's Python client, and the page in a
real headless Chromium, as a person uses it."""
import contextlib
import io
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from minildm import convert
from minildm.pngtext import a1111_parameters, parse_a1111, read_settings
from minildm.sample import main as sample_main
from minildm.schedule import NoiseSchedule
from minildm.studio import browser
from minildm.studio.session import PreviewBudget, Request, Studio
from test_convert import tiny_models

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """A tiny run in runs/, a second one, an init image, a mask and a file that is not an image."""
    root = tmp_path_factory.mktemp("studio")
    for name, seed in (("older", 1), ("tiny", 0)):
        unet, vae, text = tiny_models(seed)
        convert.save_checkpoint(root / "runs" / name / "model.safetensors", unet=unet, vae=vae, text_encoder=text,
                                schedule=NoiseSchedule.sd(), scale_factor=0.5)
        os.utime(root / "runs" / name / "model.safetensors", (1e9 + seed * -100, 1e9 + seed * -100))
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(root / "init.png")
    mask = Image.new("L", (32, 32), 0)
    mask.paste(255, (8, 8, 24, 24))
    mask.save(root / "mask.png")
    Image.new("L", (24, 24), 255).save(root / "small_mask.png")
    (root / "notes.png").write_text("not an image")
    return root


@pytest.fixture(scope="module")
def studio(workdir):
    studio = Studio([], str(workdir / "runs"), out=str(workdir / "studio-out"), dtype="float32")
    studio.use(studio.models()[0])
    return studio


def pixels(path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"))


def sampled(workdir, monkeypatch, out, *flags) -> Path:
    """The PNG `python -m minildm.sample` writes with these flags (run in-process, one image)."""
    monkeypatch.chdir(workdir)
    sample_main(["--ckpt", "runs/tiny/model.safetensors", "--out", out, "--dtype", "float32", "--overwrite", *flags])
    return next(p for p in (workdir / out).glob("*.png") if "grid" not in p.name)


def run(studio, request):
    return list(studio.generate(request))


# ----- the settings in a PNG -----------------------------------------------------------------------

def test_a1111_parameters_read_back_and_read_as_a1111_writes_them():
    """Settings -> A1111's parameters text -> the same settings; and a text in A1111's own layout reads."""
    settings = {"prompt": "a cat, in a hat", "negative": "blurry", "seed": 12, "steps": 20, "sampler": "dpmpp_2m",
                "karras": True, "guidance": 7.5, "width": 64, "height": 48, "strength": 0.6,
                "guidance_interval": [0, 800], "checkpoint": "/x/runs/cifar/model.safetensors"}
    text = a1111_parameters(settings)
    assert text.splitlines()[0] == "a cat, in a hat" and text.splitlines()[1] == "Negative prompt: blurry"
    assert "Sampler: DPM++ 2M Karras" in text and "Size: 64x48" in text and "CFG scale: 7.5" in text
    back = parse_a1111(text)
    for key in ("prompt", "negative", "seed", "steps", "sampler", "karras", "guidance", "width", "height",
                "strength", "guidance_interval"):
        assert back[key] == settings[key], key
    a1111 = ("masterpiece, a red car\nNegative prompt: lowres, bad anatomy\nSteps: 28, Sampler: Euler a, "
             'Schedule type: Karras, CFG scale: 6, Seed: 3928102, Size: 512x768, Model hash: 6ce0161689, '
             'Model: v1-5-pruned-emaonly, Lora hashes: "style: 1a2b, other: 3c4d", Version: v1.10.1')
    read = parse_a1111(a1111)
    assert read == {"prompt": "masterpiece, a red car", "negative": "lowres, bad anatomy", "sampler": "euler_a",
                    "karras": True, "steps": 28, "guidance": 6.0, "seed": 3928102, "width": 512, "height": 768}
    assert parse_a1111("just a prompt")["prompt"] == "just a prompt"
    assert parse_a1111("x\nSteps: 5, Sampler: DPM++ SDE")["sampler"] is None   # one minildm does not have


def test_read_settings_refuses_what_holds_none(workdir):
    """A file that is not an image, or a PNG without settings, is one clear ValueError."""
    with pytest.raises(ValueError, match="not an image"):
        read_settings(workdir / "notes.png")
    with pytest.raises(ValueError, match="holds no settings"):
        read_settings(workdir / "mask.png")


# ----- the session -----------------------------------------------------------------------------------

def test_models_are_the_runs_newest_first_then_the_given_files(workdir):
    """models(): runs by modification time, newest first, then --ckpt paths; a bad one is one line."""
    studio = Studio([str(workdir / "runs" / "older" / "model.safetensors")], str(workdir / "runs"))
    assert [os.path.basename(p) for p in studio.models()[:2]] == ["tiny", "older"]
    assert studio.models()[2].endswith("model.safetensors")
    with pytest.raises(ValueError) as info:
        studio.use(str(workdir / "missing.safetensors"))
    assert "not found" in str(info.value) and "\n" not in str(info.value)


@pytest.mark.parametrize("sampler,karras", [("ddim", False), ("euler_a", True), ("dpmpp_2m", False)])
def test_an_image_equals_the_sample_commands(studio, workdir, monkeypatch, sampler, karras):
    """The studio's PNG has the pixels and the settings of `python -m minildm.sample` with the same ones."""
    events = run(studio, Request(prompt="a red car", negative="blur", sampler=sampler, karras=karras, steps=6,
                                 guidance=5.0, seed=11))
    made = [e for e in events if e.kind == "image"]
    assert len(made) == 1 and events[-1].kind == "done"
    flags = ["a red car", "--negative", "blur", "--sampler", sampler, "--steps", "6", "--guidance", "5",
             "--seed", "11"] + (["--karras"] if karras else [])
    reference = sampled(workdir, monkeypatch, f"ref-{sampler}", *flags)
    assert np.array_equal(pixels(made[0].path), pixels(reference))
    ours, theirs = read_settings(made[0].path), read_settings(reference)
    assert ours == theirs
    assert Image.open(made[0].path).text["parameters"] == Image.open(reference).text["parameters"]


def test_image_to_image_and_inpainting_equal_the_sample_commands(studio, workdir, monkeypatch):
    """An uploaded image (and mask) gives the image `sample --init-image (--mask)` gives."""
    for mask, out in ((None, "ref-img2img"), (str(workdir / "mask.png"), "ref-inpaint")):
        events = run(studio, Request(prompt="a red car", steps=8, seed=2, init_image=str(workdir / "init.png"),
                                     strength=0.5, mask=mask))
        path = [e for e in events if e.kind == "image"][0].path
        flags = ["a red car", "--steps", "8", "--seed", "2", "--init-image", "init.png", "--strength", "0.5"]
        reference = sampled(workdir, monkeypatch, out, *(flags + (["--mask", "mask.png"] if mask else [])))
        assert np.array_equal(pixels(path), pixels(reference))


def test_images_of_one_request_are_numbered_by_seed_and_previews_come_every_step(studio):
    """count=3 gives seeds s, s+1, s+2 in the history (newest first), with a step event for every step."""
    events = run(studio, Request(prompt="a boat", steps=5, seed=40, count=3))
    seeds = [e.settings["seed"] for e in events if e.kind == "image"]
    assert seeds == [40, 41, 42]
    assert [s["seed"] for _, s in studio.history[:3]] == [42, 41, 40]
    steps = [(e.index, e.step) for e in events if e.kind == "step"]
    assert steps == [(i, k) for i in range(3) for k in range(1, 6)]
    first = [e for e in events if e.kind == "step"][0]
    assert first.preview is not None and first.preview.dtype == np.uint8 and first.preview.shape[-1] == 3


def test_stop_ends_the_run_at_the_next_step_and_keeps_what_was_finished(studio):
    """Stop asked at the second image's third step: the run ends at the next step the model reaches (the
    last one the page was shown), every image finished before it is saved, and the next run runs."""
    before = len(studio.history)
    events = []
    for event in studio.generate(Request(prompt="a truck", steps=30, seed=5, count=4)):
        events.append(event)
        if event.kind == "step" and event.index == 1 and event.step == 3:
            studio.stop()
    last = events[-1]       # the model's thread may have run a few more steps before it saw the request
    finished = [e for e in events if e.kind == "image"]
    assert last.kind == "stopped" and last.index == len(finished) >= 1 and last.step < 30
    assert [e.step for e in events if e.kind == "step" and e.index == last.index][-1] == last.step
    assert last.settings["stopped_at_step"] == last.step and last.preview is not None
    assert len(studio.history) == before + len(finished)
    again = run(studio, Request(prompt="a truck", steps=2, seed=5))      # the next run is not stopped
    assert again[-1].kind == "done"


def test_closing_the_generation_stops_it(studio):
    """A caller that stops reading (a page closed) stops the run: the next request runs at once."""
    events = studio.generate(Request(prompt="a truck", steps=1000, seed=5, count=16))
    assert next(events).kind == "step"
    events.close()
    assert run(studio, Request(prompt="a truck", steps=2, seed=5))[-1].kind == "done"


def test_image_to_image_counts_the_steps_it_runs(studio, workdir):
    """At strength 0.5 of 8 steps the run has 4 steps, and its progress says 1 to 4 of 4."""
    events = run(studio, Request(prompt="a red car", steps=8, seed=2, init_image=str(workdir / "init.png"),
                                 strength=0.5))
    assert [(e.step, e.num_steps) for e in events if e.kind == "step"] == [(k, 4) for k in range(1, 5)]


def test_the_preview_is_decoded_as_the_budget_allows(studio, monkeypatch):
    """A budget with room for everything decodes every step; a decoder that would take forever decodes
    none, and the page gets the latent's colours instead."""
    from minildm.studio import session

    events = run(studio, Request(prompt="a boat", steps=6, seed=1))
    assert {e.preview_kind for e in events if e.kind == "step"} <= {"decoded", "latent", ""}
    monkeypatch.setattr(session, "PREVIEW_SHARE", 1e9)
    events = run(studio, Request(prompt="a boat", steps=6, seed=1))
    assert [e.preview_kind for e in events if e.kind == "step"] == ["decoded"] * 6
    monkeypatch.setattr(session, "PREVIEW_SHARE", 0.05)
    monkeypatch.setattr(studio, "preview_cost", 1e9)
    events = run(studio, Request(prompt="a boat", steps=6, seed=1))
    assert [e.preview_kind for e in events if e.kind == "step"] == ["latent"] * 6


def test_the_preview_budget_keeps_decoding_within_its_share():
    """PreviewBudget allows a decode only while what the preview took so far plus one more decode fits in
    10% of the sampling time."""
    budget = PreviewBudget(cost=1.0, share=0.1)
    decoded, sampling = 0, 0.0
    for _ in range(100):                        # steps of 2 s each; a callback costs 0.01 s, 1 s more to decode
        sampling += 2.0
        if budget.allows(sampling):
            budget.record(1.01, 1.0)
            decoded += 1
        else:
            budget.record(0.01)
        assert budget.spent <= 0.1 * sampling + 0.01    # over by one callback's own time at most
    assert decoded == 19                        # 200 s of sampling buys 20 s: 19 decodes and 100 callbacks
    assert PreviewBudget(cost=0.001).allows(0.05)


@pytest.mark.parametrize("fields,words", [
    ({"steps": 0}, "Steps 0"), ({"guidance": -1.0}, "Guidance -1"), ({"width": 30}, "Width 30: must be a multiple"),
    ({"height": 4096}, "Height 4096"), ({"count": 17}, "Images 17"), ({"sampler": "ddim", "karras": True}, "Karras"),
    ({"sampler": "nope"}, "Sampler 'nope'"), ({"mask": "mask.png"}, "a mask needs an image"),
    ({"init_image": "notes.png"}, "uploaded image is not an image"),
    ({"init_image": "init.png", "mask": "notes.png"}, "the mask is not an image"),
    ({"init_image": "init.png", "mask": "small_mask.png"}, "the mask is 24x24 but the image 32x32"),
    ({"init_image": "init.png", "strength": 1.5}, "Strength 1.5"),
])
def test_bad_requests_are_one_line_naming_the_field(studio, workdir, fields, words):
    """Every bad value in the form is a ValueError of one line that names the field."""
    fields = {k: str(workdir / v) if k in ("init_image", "mask") else v for k, v in fields.items()}
    with pytest.raises(ValueError) as info:
        run(studio, Request(prompt="a cat", **fields))
    assert words in str(info.value) and "\n" not in str(info.value)


def test_the_views_of_the_last_image(workdir, tmp_path):
    """Filmstrip from the kept steps, attention maps per token, the comparison grid (whose own sampler and
    scale give the last image again, the run's guidance interval included) and prompt arithmetic; a
    model switch forgets the last image."""
    import shutil

    guided = tmp_path / "runs" / "guided"
    guided.mkdir(parents=True)
    shutil.copy(workdir / "runs" / "tiny" / "model.safetensors", guided / "model.safetensors")
    (guided / "config.json").write_text(json.dumps({"guidance_interval": [0, 600]}))
    studio = Studio([], str(tmp_path / "runs"), out=str(tmp_path / "out"), dtype="float32")
    studio.use(str(guided))
    events = run(studio, Request(prompt="a green frog", sampler="ddim", steps=6, guidance=7.5, seed=9))
    assert [e for e in events if e.kind == "image"][0].settings["guidance_interval"] == [0, 600]
    made = pixels([e for e in events if e.kind == "image"][0].path)
    strip = studio.filmstrip()
    assert strip.steps == list(range(6)) and len(strip.x0_pred) == 6
    assert np.array_equal(strip.image, made)
    maps = studio.attention()
    assert [text for _, text in maps.tokens] == ["a", "green", "frog"]
    assert maps.average.shape[-2:] == (32, 32) and maps.per_layer
    grid = studio.compare(["ddim", "euler"], [1.0, 7.5])
    assert list(grid) == [("ddim", 1.0), ("ddim", 7.5), ("euler", 1.0), ("euler", 7.5)]
    assert np.array_equal(grid[("ddim", 7.5)], made)
    assert not np.array_equal(grid[("ddim", 1.0)], made)
    strip = studio.arithmetic("a photo of a cat", "cat", "dog", 0.5)
    assert strip.labels[-1] == "a + 0.5 (c - b)" and len(strip.images) == 4
    with pytest.raises(ValueError, match="at most 24"):
        studio.compare(["ddim"] * 5, [1, 2, 3, 4, 5])
    figure = studio.attention_figure(next(iter(maps.per_layer)))
    assert figure.axes and figure.axes[0].get_title() == "image"
    studio.use(str(workdir / "runs" / "tiny"))
    with pytest.raises(ValueError, match="make an image first"):
        studio.filmstrip()


def test_a_saved_image_re_runs_from_its_settings(studio):
    """request_from(settings of a PNG) makes the same image again."""
    path = [e for e in run(studio, Request(prompt="a deer", steps=4, seed=21)) if e.kind == "image"][0].path
    again = [e for e in run(studio, studio.request_from(read_settings(path))) if e.kind == "image"][0].path
    assert again != path and np.array_equal(pixels(again), pixels(path))
    other = dict(read_settings(path), checkpoint="/elsewhere/model.safetensors")
    with pytest.raises(ValueError, match="pick that model first"):
        studio.request_from(other)


# ----- every page event through Gradio's Python client --------------------------------------------

@contextlib.contextmanager
def page_client(studio):
    """The page of a Studio served on a free port, and a Gradio Python client on it."""
    pytest.importorskip("gradio")
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    from gradio_client import Client

    from minildm.studio.page import build

    page = build(studio)
    page.queue(default_concurrency_limit=1)
    port = browser.free_port()
    page.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True)
    try:
        yield Client(f"http://127.0.0.1:{port}/", verbose=False)
    finally:
        page.close()


@pytest.fixture(scope="module")
def client(workdir):
    studio = Studio([], str(workdir / "runs"), out=str(workdir / "client-out"), dtype="float32")
    studio.use(studio.models()[0])
    with page_client(studio) as c:
        yield c, studio


FORM = dict(negative="", sampler="ddim", karras=False, steps=5, guidance=7.5, width=32, height=32, count=1,
            init=None, strength=0.75)


def form(prompt, seed, **changes):
    values = dict(FORM, **changes)
    return [prompt, values["negative"], values["sampler"], values["karras"], values["steps"], values["guidance"],
            seed, values["width"], values["height"], values["count"], values["init"], values["strength"], None]


def test_every_endpoint_through_the_python_client(client, workdir, monkeypatch):
    """generate, last_seed, restore, filmstrip, attention, attention_layer, compare, arithmetic, models,
    use_model and stop, each called as the page calls it."""
    from gradio_client import handle_file

    c, studio = client
    status, image, gallery = c.predict(*form("a red car", 7), api_name="/generate")
    assert "Done: 1 image" in status and len(gallery) == 1
    reference = sampled(workdir, monkeypatch, "ref-client", "a red car", "--steps", "5", "--seed", "7")
    assert np.array_equal(pixels(image), pixels(reference))
    assert json.loads(Image.open(image).text["minildm"])["seed"] == 7
    assert c.predict(api_name="/last_seed") == 7
    restored = [r.get("value") if isinstance(r, dict) else r
                for r in c.predict(handle_file(str(reference)), api_name="/restore")]
    assert restored[0] == "a red car" and restored[4] == 5 and restored[6] == 7
    film = c.predict(api_name="/filmstrip")
    assert Image.open(film).size[0] > 200
    attention, layers = c.predict(api_name="/attention")
    assert Image.open(attention).size[0] > 200 and len(layers["choices"]) > 1
    layer_image = c.predict(layers["choices"][1][0], api_name="/attention_layer")
    assert Image.open(layer_image).size[0] > 200
    grid = c.predict(["ddim", "euler"], "1, 7.5", api_name="/compare")
    assert [g["caption"] for g in grid] == ["ddim, guidance 1", "ddim, guidance 7.5", "euler, guidance 1",
                                           "euler, guidance 7.5"]
    assert np.array_equal(pixels(grid[1]["image"]), pixels(reference))
    strip = c.predict("a photo of a cat", "cat", "dog", 1.0, api_name="/arithmetic")
    assert [g["caption"] for g in strip] == ["a photo of a cat", "cat", "dog", "a - b + c"]
    models = c.predict(api_name="/models")
    assert [os.path.basename(m[0]) for m in models["choices"]] == ["tiny", "older"]
    older = str(workdir / "runs" / "older")
    about = c.predict(older, api_name="/use_model")[0]
    assert "older" in about and studio.model_name == older
    c.predict(str(workdir / "runs" / "tiny"), api_name="/use_model")
    c.predict(api_name="/stop")


def test_bad_input_through_the_client_is_a_message_and_the_server_lives(client, workdir):
    """A bad number, a file that is not an image, a comparison of nothing: each a one-line message; then
    the page still generates."""
    from gradio_client import handle_file
    from gradio_client.exceptions import AppError

    c, _ = client
    bad_image = {"background": handle_file(str(workdir / "notes.png")), "layers": [], "composite": None}
    for args, api, words in ((form("a cat", 1, steps=0), "/generate", "Steps 0"),
                             (form("a cat", 1, width=33), "/generate", "Width 33"),
                             (form("a cat", 1, init=bad_image), "/generate", "not an image"),
                             ([[], "1"], "/compare", "at least one sampler"),
                             ([["ddim"], "x"], "/compare", "Guidance scales 'x'")):
        with pytest.raises(AppError) as info:
            c.predict(*args, api_name=api)
        assert words in str(info.value) and "Traceback" not in str(info.value), str(info.value)
    status, _, _ = c.predict(*form("a cat", 1), api_name="/generate")
    assert "Done" in status


def test_inpainting_from_a_painted_mask_through_the_client(client, workdir, monkeypatch, tmp_path):
    """The image editor's painted layer becomes the mask: the image equals `sample --mask` with that mask."""
    from gradio_client import handle_file

    c, _ = client
    layer = np.zeros((32, 32, 4), dtype=np.uint8)
    layer[8:24, 8:24] = (255, 255, 255, 255)
    Image.fromarray(layer).save(tmp_path / "layer.png")
    editor = {"background": handle_file(str(workdir / "init.png")), "layers": [handle_file(str(tmp_path / "layer.png"))],
              "composite": handle_file(str(workdir / "init.png"))}
    status, image, _ = c.predict(*form("a red car", 2, steps=8, init=editor, strength=0.5), api_name="/generate")
    assert "Done" in status
    settings = json.loads(Image.open(image).text["minildm"])
    assert np.array_equal(pixels(settings["mask"]), pixels(workdir / "mask.png"))
    reference = sampled(workdir, monkeypatch, "ref-painted", "a red car", "--steps", "8", "--seed", "2",
                        "--init-image", "init.png", "--strength", "0.5", "--mask", "mask.png")
    assert np.array_equal(pixels(image), pixels(reference))


# ----- the page in a real browser ------------------------------------------------------------------

@contextlib.contextmanager
def studio_in_browser(*args, cwd):
    """`python -m minildm.studio ARGS --dtype float32` started in `cwd`, and a headless Chromium page on it."""
    pytest.importorskip("gradio")
    pytest.importorskip("playwright")

    if browser.chromium_path() is None:
        if os.environ.get("MINILDM_REQUIRE_BROWSER"):
            pytest.fail("no Chromium (apt-get install chromium): the browser tests must run here")
        pytest.skip("no Chromium on this machine (apt-get install chromium)")
    with browser.studio_server(*args, "--dtype", "float32", port=browser.free_port(), cwd=str(cwd)) as (url, _), \
            browser.browser_page() as page:
        page.goto(url)
        yield page


@pytest.fixture(scope="module")
def browser_page(workdir):
    """The studio started by its command line, and a headless Chromium page on it."""
    with studio_in_browser("--runs-dir", "runs", "--out", "page-out", cwd=workdir) as page:
        yield page


def test_in_the_browser_generate_shows_the_sample_commands_png(browser_page, workdir, monkeypatch, tmp_path):
    """Type a prompt, press Generate: the page's image is a PNG with the pixels and the settings of
    `python -m minildm.sample` with the same settings and seed."""

    status = browser.generate(browser_page, "a photo of a horse", seed=13, steps=10)
    assert status.startswith("Done: 1 image")
    data = browser.image_bytes(browser_page, "#output")
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    (tmp_path / "shown.png").write_bytes(data)
    reference = sampled(workdir, monkeypatch, "ref-browser", "a photo of a horse", "--seed", "13", "--steps", "10")
    assert np.array_equal(pixels(tmp_path / "shown.png"), pixels(reference))
    shown = Image.open(tmp_path / "shown.png").text
    assert json.loads(shown["minildm"])["seed"] == 13
    assert shown["parameters"] == Image.open(reference).text["parameters"]
    assert browser_page.locator("#gallery img").count() >= 1


def test_in_the_browser_the_views_render(browser_page):
    """Look inside: the filmstrip and the attention maps of the last image appear as images."""

    browser.generate(browser_page, "a green frog", seed=3, steps=6)
    browser_page.click("#tab-inside-button")
    for button, panel in (("#filmstrip-button", "#filmstrip"), ("#attention-button", "#attention")):
        browser_page.click(button)
        browser_page.wait_for_function(f"() => {{ const i = document.querySelector('{panel} img');"
                                       " return i && i.complete && i.naturalWidth > 200; }", timeout=60000)
    href = browser_page.locator("#tab-inside a", has_text="Lesson 08").first.get_attribute("href")
    lesson = browser_page.evaluate("async (href) => (await fetch(href)).text()", href)
    assert lesson.startswith("# 08 ")
    browser_page.click("#tab-generate-button")


def test_in_the_browser_stop_stops_and_keeps_what_was_made(browser_page):
    """Stop during the second image: the status says where it stopped and that the first was kept, the
    gallery has it, and the server answers the next run."""

    shown = browser_page.locator("#gallery img").count()
    browser_page.locator("#prompt textarea").fill("a ship at sea")
    browser.set_number(browser_page, "steps", 300)
    browser.set_number(browser_page, "count", 3)
    browser_page.click("#generate")
    browser_page.wait_for_function("() => /Image 2 of 3: step/.test(document.querySelector('#status-text').innerText)",
                                   timeout=60000)
    browser_page.click("#stop")
    browser_page.wait_for_function("() => document.querySelector('#status-text').innerText.startsWith('Stopped')",
                                   timeout=60000)
    text = browser_page.locator("#status-text").inner_text()
    assert "of 300 of image 2; kept 1 finished image(s)" in text, text
    browser_page.wait_for_function(f"() => document.querySelectorAll('#gallery img').length === {shown + 1}",
                                   timeout=30000)
    browser.set_number(browser_page, "count", 1)
    assert browser.generate(browser_page, "a ship at sea", seed=1, steps=3).startswith("Done")


def test_in_the_browser_a_gallery_image_runs_again(browser_page):
    """Pick an image in the gallery: the form takes its settings; Run again makes the same picture."""

    browser.generate(browser_page, "a blue car", seed=31, steps=5)
    first = browser.image_bytes(browser_page, "#output")
    browser.generate(browser_page, "a red bird", seed=2, steps=4)
    browser_page.locator("#gallery img").nth(1).click()
    browser_page.wait_for_function("() => document.querySelector('#prompt textarea').value === 'a blue car'",
                                   timeout=30000)
    assert browser_page.locator("#seed input").input_value() == "31"
    before = int(browser_page.locator("#status-text").get_attribute("data-run"))
    browser_page.click("#rerun")
    browser_page.wait_for_function(f"() => {{ const s = document.querySelector('#status-text');"
                                   f" return Number(s.dataset.run) > {before} && s.innerText.startsWith('Done'); }}",
                                   timeout=60000)
    again = browser.image_bytes(browser_page, "#output")
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(again))), np.asarray(Image.open(io.BytesIO(first))))


def test_in_the_browser_the_lcm_sampler_sets_its_steps_and_guidance(browser_page):
    """Choosing lcm puts 4 steps and guidance 1 in the form; going back to ddim restores 50 and 7.5."""
    for name, steps, guidance in (("lcm", "4", "1"), ("ddim", "50", "7.5")):
        browser_page.locator("#sampler input").fill(name)
        browser_page.keyboard.press("Enter")
        browser_page.wait_for_function(f"() => document.querySelector('#steps input').value === '{steps}'",
                                       timeout=30000)
        assert browser_page.locator("#guidance input").input_value() == guidance


def test_in_the_browser_a_bad_value_shows_one_line(browser_page):
    """Steps 0 in the form: the page shows the message naming the field, and keeps working."""

    browser.set_number(browser_page, "steps", 0)
    browser_page.click("#generate")
    assert "Steps 0: must be a whole number" in browser.error_message(browser_page)
    assert browser.generate(browser_page, "a cat", seed=1, steps=2).startswith("Done")


def test_in_the_browser_dropping_a_png_restores_its_settings(browser_page, workdir, monkeypatch):
    """A PNG dropped on the page fills the form with its prompt, seed and steps."""
    reference = sampled(workdir, monkeypatch, "ref-drop", "a dog on a hill", "--seed", "77", "--steps", "9")
    browser_page.click("#settings-from-image button")
    browser_page.locator("#dropped input[type=file]").set_input_files(str(reference))
    browser_page.wait_for_function("() => document.querySelector('#prompt textarea').value === 'a dog on a hill'",
                                   timeout=30000)
    assert browser_page.locator("#seed input").input_value() == "77"
    assert browser_page.locator("#steps input").input_value() == "9"


def test_lora_files_and_taesd_go_into_the_models_they_fit(workdir, monkeypatch, tmp_path):
    """--lora and --taesd: merged into / loaded for the tiny run they fit, the image equals `sample --lora
    --taesd`; a model with other latents (8 channels) is used without TAESD and the page says so."""
    pytest.importorskip("diffusers")
    from diffusers import UNet2DConditionModel
    from safetensors.torch import save_file
    from transformers import CLIPTextModel as HFTextModel

    from minildm.clip_text import CLIPTextModel
    from minildm.unet import UNet, UNetConfig
    from minildm.vae import AutoencoderKL, VAEConfig
    from reference_configs import diffusers_unet_config, transformers_text_config
    from test_ldm import tiny_taesd_folder
    from test_lora import random_lora

    unet, _, text = tiny_models()
    lora = tmp_path / "style.safetensors"
    save_file({k: v.contiguous() for k, v in random_lora(UNet2DConditionModel(**diffusers_unet_config(unet.cfg)),
                                                         HFTextModel(transformers_text_config(text.cfg)),
                                                         "kohya").items()}, str(lora))
    taesd, _ = tiny_taesd_folder(tmp_path)
    studio = Studio([], str(workdir / "runs"), taesd=taesd, loras=[(str(lora), 0.5)], out=str(tmp_path / "out"),
                    dtype="float32")
    studio.use(str(workdir / "runs" / "tiny"))
    assert "1 LoRA file(s) merged, decoded by the TAESD" in studio.describe()
    path = [e for e in run(studio, Request(prompt="a cat", steps=3, seed=4)) if e.kind == "image"][0].path
    reference = sampled(workdir, monkeypatch, "ref-addons", "a cat", "--steps", "3", "--seed", "4",
                        "--lora", f"{lora}:0.5", "--taesd", taesd)
    assert np.array_equal(pixels(path), pixels(reference))
    assert read_settings(path) == read_settings(reference)

    torch.manual_seed(3)
    cfg = UNetConfig(**dict(unet.cfg.__dict__, in_channels=8, out_channels=8))
    convert.save_checkpoint(tmp_path / "eight" / "model.safetensors", unet=UNet(cfg),
                            vae=AutoencoderKL(VAEConfig(**dict(VAEConfig.tiny().__dict__, z_channels=8))),
                            text_encoder=CLIPTextModel(text.cfg), schedule=NoiseSchedule.sd(), scale_factor=0.5)
    studio.use(str(tmp_path / "eight"))
    assert "TAESD left out" in studio.describe() and "decoded by the VAE" in studio.describe()
