"""The studio's page: Gradio components laid out around a `Studio` (session.py), and nothing else.

Gradio is what ML demos are built with (diffusers' and Hugging Face Spaces' demos, AUTOMATIC1111's web
UI), so a learner has met it, and it brings what a page for a slow model needs: a queue that runs one
generation at a time, generators that stream previews, an image editor to paint masks, and a Python
client for every event (each has an `api_name`). Each callback turns the page's values into a call on
the Studio and its answer into components; a ValueError becomes a one-line message in the page.
"""

import functools
import os
import time
import traceback

import numpy as np

from .session import KARRAS_SAMPLERS, MAX_IMAGES, Request, Studio
from ..samplers import SAMPLERS
from ..pngtext import read_settings

LESSONS = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "lessons")
MEAN = "mean of all layers"
UPDATE_SECONDS = 0.1    # the page's progress and preview change at most this often

CSS = """
#status progress { width: 100%; height: 0.8em; }
.note { font-size: 0.9em; opacity: 0.8; }
#output img { width: 100%; height: 100%; object-fit: contain; image-rendering: pixelated; }
#gallery img, #compare img, #arithmetic img, #image-arithmetic img { image-rendering: pixelated; }
"""


def lesson_link(name: str, text: str) -> str:
    """A link the page can follow to a lesson file (served from the lessons folder)."""
    return f"[{text}](/gradio_api/file={os.path.join(LESSONS, name)})"


def figure_image(fig) -> np.ndarray:
    """A matplotlib figure as a uint8 (H, W, 3) array, and the figure closed."""
    import matplotlib.pyplot as plt

    fig.canvas.draw()
    image = np.asarray(fig.canvas.buffer_rgba())[..., :3].copy()
    plt.close(fig)
    return image


def progress_html(text: str, done: int = 0, total: int = 0, run: int = 0) -> str:
    """The status: a progress bar and one line; data-run numbers the presses of Generate, so a script can
    tell this run's "Done" from the last one's."""
    bar = f'<progress value="{done}" max="{total}"></progress>' if total else ""
    return f'{bar}<div id="status-text" data-run="{run}">{text}</div>'


def build(studio: Studio):
    """The page (a gr.Blocks) for a Studio whose first model is already loaded."""
    import gradio as gr

    def one_line(e: Exception) -> gr.Error:
        """ValueError -> its message; anything else -> its type and first line (the traceback goes to the
        server's terminal, never to the browser)."""
        if isinstance(e, ValueError):
            return gr.Error(str(e), print_exception=False)
        traceback.print_exc()
        return gr.Error(f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else 'failed'}", print_exception=False)

    def guarded(fn):
        """A callback whose errors are one line in the page (functools.wraps keeps its signature, which
        Gradio reads to hand it event data such as gr.SelectData)."""
        @functools.wraps(fn)
        def call(*args):
            try:
                return fn(*args)
            except gr.Error:
                raise
            except Exception as e:  # noqa: BLE001  (the server stays up; the user sees what failed)
                raise one_line(e) from None
        return call

    def guarded_stream(fn):
        """The same for a generating callback: the status line says it did not run, then the message."""
        @functools.wraps(fn)
        def call(*args):
            try:
                yield from fn(*args)
            except gr.Error:
                raise
            except Exception as e:  # noqa: BLE001
                error = one_line(e)
                yield progress_html(f"Not run: {error.message}", run=runs[0]), gr.update(), gr.update()
                raise error from None
        return call

    runs = [0]      # presses of Generate so far (the status's data-run)
    d = studio.defaults()
    with gr.Blocks(title="minildm studio", analytics_enabled=False) as page:
        gr.Markdown("# minildm studio\nType a prompt and press **Generate**; the image forms in front of you. "
                    "The *Look inside* tab shows what the course's chapters explain, on the image you just made.")
        with gr.Row():
            model = gr.Dropdown(studio.models(), value=studio.model_name, label="Model", elem_id="model",
                                allow_custom_value=False, scale=4)
            rescan = gr.Button("Look for new runs", elem_id="rescan", scale=1)
        about = gr.Markdown(studio.describe(), elem_id="about", elem_classes="note")

        with gr.Tab("Generate", elem_id="tab-generate"):
            with gr.Row():
                with gr.Column(scale=1):
                    prompt = gr.Textbox(label="Prompt", lines=2, elem_id="prompt", placeholder="a photo of a cat")
                    negative = gr.Textbox(label="Negative prompt (what guidance steers away from)", elem_id="negative")
                    with gr.Row():
                        sampler = gr.Dropdown(list(SAMPLERS), value=d["sampler"], label="Sampler", elem_id="sampler")
                        karras = gr.Checkbox(False, label="Karras sigmas", elem_id="karras",
                                             info=", ".join(KARRAS_SAMPLERS))
                    with gr.Row():
                        steps = gr.Number(d["steps"], label="Steps", elem_id="steps")
                        guidance = gr.Number(d["guidance"], label="Guidance scale (1 = none)", elem_id="guidance")
                    with gr.Row():
                        seed = gr.Number(-1, label="Seed (-1: random)", elem_id="seed")
                        random_seed = gr.Button("Random", elem_id="random-seed", size="sm")
                        reuse_seed = gr.Button("Reuse last", elem_id="reuse-seed", size="sm")
                    with gr.Row():
                        width = gr.Number(d["size"], label="Width", elem_id="width", step=d["size_step"])
                        height = gr.Number(d["size"], label="Height", elem_id="height", step=d["size_step"])
                        count = gr.Number(1, label=f"Images (1-{MAX_IMAGES})", elem_id="count")
                    with gr.Accordion("Image to image and inpainting", open=False, elem_id="image-to-image"):
                        gr.Markdown("Upload an image to start from it (at its own size, rounded down to a "
                                    "multiple of 8: Width and Height are for text to image); paint over it to "
                                    "repaint only there (inpainting). "
                                    + lesson_link("07_stable_diffusion.md", "Lesson 07"), elem_classes="note")
                        init = gr.ImageEditor(label="Start image (paint the part to repaint)", type="filepath",
                                              format="png", elem_id="init", sources=["upload", "clipboard"],
                                              layers=False, brush=gr.Brush(colors=["#ffffff"], color_mode="fixed"))
                        refuse_unreadable(init, "uploaded image")
                        strength = gr.Slider(0, 1, 0.75, step=0.05, label="Strength (0 keeps the image, 1 ignores it)",
                                             elem_id="strength")
                        inpaint_note = gr.Markdown(studio.inpainting_note(), elem_id="inpaint-note",
                                                   elem_classes="note")
                    with gr.Accordion("Image prompt", open=d["image_prompt"] == "variations",
                                      elem_id="image-prompt-box"):
                        image_note = gr.Markdown(studio.image_prompt_note(), elem_id="image-prompt-note",
                                                 elem_classes="note")
                        image_prompt = gr.Image(label="Photo as the prompt", type="filepath", format="png",
                                                image_mode=None, elem_id="image-prompt",
                                                sources=["upload", "clipboard"])    # as it is, as the CLI reads it
                        refuse_unreadable(image_prompt, "image prompt")
                    with gr.Accordion("Settings from an image", open=False, elem_id="settings-from-image"):
                        dropped = gr.File(label="Drop a PNG made by minildm or AUTOMATIC1111 to restore its settings",
                                          file_types=[".png"], elem_id="dropped")
                with gr.Column(scale=1):
                    with gr.Row():
                        generate = gr.Button("Generate", variant="primary", elem_id="generate")
                        stop = gr.Button("Stop", variant="stop", elem_id="stop")
                    status = gr.HTML(progress_html("Ready."), elem_id="status")
                    output = gr.Image(label="Image", type="filepath", format="png", elem_id="output",
                                      interactive=False, height=384)
                    gallery = gr.Gallery(label="Made since the studio started (newest first; pick one to load its "
                                               "settings)", elem_id="gallery", columns=6, height=220,
                                         allow_preview=False, format="png", object_fit="contain")
                    rerun = gr.Button("Run the picked image again", elem_id="rerun")

        with gr.Tab("Look inside", elem_id="tab-inside"):
            gr.Markdown("Each panel works on the last image made in *Generate*, drawn again from its prompt and seed "
                        "(from text alone, without Karras sigmas) where a panel needs to watch it being made.")
            with gr.Accordion("The image forming, step by step", open=True):
                gr.Markdown("Top row: the noisy latent at each step, decoded; middle: the model's guess of the "
                            "finished image at that step (x0); bottom: the noise it predicts, as colours. The guess "
                            "is rough at first and sharpens as the noise goes. "
                            + lesson_link("08_views.md", "Lesson 08") + ", and "
                            + lesson_link("02_sampling.md", "lesson 02") + " for the samplers.", elem_classes="note")
                film_button = gr.Button("Show the filmstrip of the last image", elem_id="filmstrip-button")
                film = gr.Image(label="Filmstrip", elem_id="filmstrip", interactive=False, format="png")
            with gr.Accordion("Where each word looks", open=True):
                gr.Markdown("Cross-attention: for each token of the prompt, how strongly each part of the image "
                            "attended to it, averaged over the steps (the image is drawn again while the maps are "
                            "recorded, without the negative prompt). " + lesson_link("08_views.md", "Lesson 08")
                            + "; the layers are lesson 03's.", elem_classes="note")
                with gr.Row():
                    attn_button = gr.Button("Show the attention maps of the last image", elem_id="attention-button")
                    layer = gr.Dropdown([MEAN], value=MEAN, label="Layer", elem_id="layer")
                attn = gr.Image(label="Attention per token", elem_id="attention", interactive=False, format="png")
            with gr.Accordion("Same seed, other samplers and guidance scales", open=True):
                gr.Markdown("One row per sampler, one column per guidance scale, all from the last image's prompt, "
                            "seed and steps: what the sampler changes and what guidance trades (fidelity to the "
                            "prompt for variety). " + lesson_link("02_sampling.md", "Lesson 02") + ", "
                            + lesson_link("06_training.md", "lesson 06") + " for guidance.", elem_classes="note")
                with gr.Row():
                    compare_samplers = gr.CheckboxGroup(list(SAMPLERS), value=["ddim", "euler_a"], label="Samplers",
                                                        elem_id="compare-samplers")
                    compare_scales = gr.Textbox("1, 3, 7.5", label="Guidance scales", elem_id="compare-scales")
                compare_button = gr.Button("Compare", elem_id="compare-button")
                compare_out = gr.Gallery(label="Samplers x guidance", elem_id="compare", columns=6, format="png",
                                         allow_preview=False, height="auto")
            with gr.Accordion("Arithmetic on prompts", open=True):
                gr.Markdown("The text encoder turns a prompt into a context; contexts can be added. This draws "
                            "A, B, C and A + weight x (C - B) from the same noise: \"a photo of a cat\" - \"cat\" + "
                            "\"dog\" asks for the dog version of the cat photo. "
                            + lesson_link("08_views.md", "Lesson 08") + ", "
                            + lesson_link("04_text_encoder.md", "lesson 04") + " for contexts.", elem_classes="note")
                with gr.Row():
                    prompt_a = gr.Textbox("a photo of a cat", label="A", elem_id="prompt-a")
                    prompt_b = gr.Textbox("cat", label="B (take away)", elem_id="prompt-b")
                    prompt_c = gr.Textbox("dog", label="C (add)", elem_id="prompt-c")
                    weight = gr.Number(1.0, label="weight", elem_id="weight")
                arith_button = gr.Button("Draw A, B, C and A + weight (C - B)", elem_id="arithmetic-button")
                arith_out = gr.Gallery(label="Arithmetic", elem_id="arithmetic", columns=6, format="png",
                                       allow_preview=False, height="auto")
            with gr.Accordion("A photo and words in CLIP's joint space (image-variations models)", open=True):
                gr.Markdown("CLIP puts photos and captions in one space. This draws the photo's variation moved "
                            "away from one caption and towards another by a weight a: the photo, then a = each "
                            "weight (a = 0 is the plain variation): \"this photo, but a cat\". Needs an "
                            "image-variations model and the studio started with --clip. "
                            + lesson_link("12_images_as_prompts.md", "Lesson 12") + ".", elem_classes="note")
                with gr.Row():
                    ia_photo = gr.Image(label="Photo", type="filepath", format="png", image_mode=None,
                                        elem_id="ia-photo", sources=["upload", "clipboard"], height=160)
                    refuse_unreadable(ia_photo, "photo")
                    with gr.Column():
                        ia_minus = gr.Textbox("a dog", label="Take away", elem_id="ia-minus")
                        ia_plus = gr.Textbox("a cat", label="Add", elem_id="ia-plus")
                        ia_weights = gr.Textbox("0, 0.5, 1", label="Weights a", elem_id="ia-weights")
                ia_button = gr.Button("Draw the photo - a (take away) + a (add)", elem_id="image-arithmetic-button")
                ia_out = gr.Gallery(label="The photo, then each weight", elem_id="image-arithmetic", columns=6,
                                    format="png", allow_preview=False, height="auto")

        fields = [prompt, negative, sampler, karras, steps, guidance, seed, width, height, count, init, strength,
                  image_prompt]
        # What restoring settings fills in: never the image editor, which Gradio would rebuild for the
        # session (as it rebuilds any component an event outputs to), losing refuse_unreadable's wrapper.
        settable = [prompt, negative, sampler, karras, steps, guidance, seed, width, height, count, strength]
        picked = gr.State(None)

        # ----- callbacks: page values -> Studio -> components ------------------------------------

        def request(prompt_, negative_, sampler_, karras_, steps_, guidance_, seed_, width_, height_, count_,
                    init_, strength_, image_prompt_=None) -> Request:
            init_image, mask = editor_files(init_)
            return Request(prompt=prompt_ or "", negative=negative_ or "", sampler=sampler_, karras=bool(karras_),
                           steps=whole(steps_, "Steps"), guidance=number(guidance_, "Guidance scale"),
                           seed=whole(seed_, "Seed") if seed_ is not None else -1,
                           width=None if init_image else whole(width_, "Width"),
                           height=None if init_image else whole(height_, "Height"), count=whole(count_, "Images"),
                           init_image=init_image, strength=float(strength_) if init_image else None, mask=mask,
                           image_prompt=image_prompt_ or None)

        def editor_files(value):
            """The image editor's value -> (start image file, mask file or None)."""
            if not value or not value.get("background"):
                return None, None
            layers = [p for p in (value.get("layers") or []) if p]
            return value["background"], studio.mask_from_layers(value["background"], layers) if layers else None

        def run(*values):
            yield from stream(request(*values))

        def stream(r: Request):
            images = []
            made = None
            runs[0] += 1
            status = lambda text, done=0, total=0: progress_html(text, done, total, runs[0])  # noqa: E731
            yield status("Starting..."), gr.update(), gr.update()
            shown, preview = 0.0, None
            for event in studio.generate(r):
                if event.kind == "step":
                    preview = event.preview if event.preview is not None else preview
                    if time.perf_counter() - shown < UPDATE_SECONDS and event.step > 1:
                        continue                    # the page needs no more than a few pictures a second
                    text = (f"Image {event.index + 1} of {r.count}: step {event.step} of {event.num_steps}, "
                            f"{event.seconds:.1f} s")
                    yield (status(text, event.step, event.num_steps),
                           preview if preview is not None else gr.update(), gr.update())
                    shown, preview = time.perf_counter(), None
                elif event.kind == "image":
                    images.append(event.path)
                    made = event.path
                    yield (status(f"Saved {event.path} (seed {event.settings['seed']}), {event.seconds:.1f} s",
                                  event.step, event.num_steps), event.path, history())
                elif event.kind == "stopped":
                    yield (status(f"Stopped at step {event.step} of {event.num_steps} of image {event.index + 1}; "
                                  f"kept {len(images)} finished image(s)" + ("" if made else " and the last preview")
                                  + "."), event.preview if made is None else made, history())
                else:
                    yield (status(f"Done: {len(images)} image(s) in {event.seconds:.1f} s."), made, history())

        def history():
            return [(path, f"{s['prompt'][:40]} (seed {s['seed']})") for path, s in studio.history]

        def model_fields():
            """What the page shows about the loaded model: the list, the line about it, the form's defaults."""
            if studio.model is None:
                return [gr.update(choices=studio.models(), value=None), studio.describe()] + [gr.update()] * 8
            dd = studio.defaults()
            size = gr.update(value=dd["size"], step=dd["size_step"])
            return [gr.update(choices=studio.models(), value=studio.model_name), studio.describe(), dd["sampler"],
                    dd["steps"], dd["guidance"], size, size, studio.inpainting_note(),
                    1.0 if dd["inpainting_model"] else 0.75, studio.image_prompt_note()]

        def switch(name):
            try:
                studio.use(name)
            except ValueError as e:         # the old model is gone already: say so where the model is named
                gr.Warning(str(e))
            return model_fields()[1:]

        def rescan_models():
            return gr.update(choices=studio.models(), value=studio.model_name)

        def sampler_changed(name, steps_, guidance_):
            values = studio.sampler_defaults(name, number(steps_, "Steps"), number(guidance_, "Guidance scale"))
            return values if values is not None else (gr.update(), gr.update())

        def restore(file):
            if file is None:
                return [gr.update()] * len(settable)
            return settings_updates(read_settings(file))

        def settings_updates(s: dict):
            keys = ["prompt", "negative", "sampler", "karras", "steps", "guidance", "seed", "width", "height"]
            values = [gr.update(value=s[k]) if s.get(k) is not None else gr.update() for k in keys]
            return values + [gr.update(value=1), gr.update(value=s["strength"]) if s.get("strength") is not None
                             else gr.update()]

        def pick(evt: gr.SelectData):
            _, s = studio.history_item(evt.index)
            return [s] + settings_updates(s)

        def run_again(s):
            if s is None:
                raise ValueError("pick an image in the gallery first")
            yield from stream(studio.request_from(s))

        def show_filmstrip():
            return figure_image(studio.filmstrip().figure)

        def show_attention():
            maps = studio.attention()
            figure_image(maps.layer_figure)                 # closes it: the page shows one layer at a time
            return figure_image(maps.figure), gr.update(choices=[MEAN] + list(maps.per_layer), value=MEAN)

        def show_layer(name):
            if studio.last_attention is None:
                return gr.update()
            return figure_image(studio.attention_figure(None if name == MEAN else name))

        def show_compare(names, scales_text):
            try:
                scales = [float(v) for v in scales_text.replace(";", ",").split(",") if v.strip()]
            except ValueError:
                raise ValueError(f"Guidance scales {scales_text!r}: give numbers separated by commas, e.g. 1, 3, 7.5")
            images = studio.compare(list(names or []), scales)
            return [(image, f"{name}, guidance {w:g}") for (name, w), image in images.items()]

        def show_arithmetic(a, b, c, w):
            strip = studio.arithmetic(a, b, c, number(w, "weight"))
            figure_image(strip.figure)
            return [(image, label) for image, label in zip(strip.images, strip.labels)]

        def show_image_arithmetic(photo, minus, plus, weights_text):
            try:
                weights = [float(v) for v in (weights_text or "").replace(";", ",").split(",") if v.strip()]
            except ValueError:
                raise ValueError(f"Weights {weights_text!r}: give numbers separated by commas, e.g. 0, 0.5, 1")
            strip = studio.image_arithmetic(photo, minus or "", plus or "", weights)
            figure_image(strip.figure)
            return [(image, label) for image, label in zip(strip.images, strip.labels)]

        # ----- wiring; every event has an api_name, so gradio_client reaches it ----------------------

        model_outputs = [about, sampler, steps, guidance, width, height, inpaint_note, strength, image_note]
        model.input(guarded(switch), model, model_outputs, api_name="use_model", concurrency_id="model")
        built_with = studio.model_name

        def on_load():
            """A page opened after the model was switched shows the loaded model, not the one it was built
            with (and one opened before leaves what its user may already be typing alone)."""
            if studio.model_name == built_with:
                return [gr.update(choices=studio.models())] + [gr.update()] * len(model_outputs)
            return model_fields()

        page.load(on_load, None, [model] + model_outputs, api_name=False, queue=False)
        rescan.click(guarded(rescan_models), None, model, api_name="models")
        sampler.input(guarded(sampler_changed), [sampler, steps, guidance], [steps, guidance], api_name=False,
                      queue=False)
        generate.click(guarded_stream(run), fields, [status, output, gallery], api_name="generate",
                       concurrency_id="model", concurrency_limit=1, show_progress="hidden")
        stop.click(lambda: studio.stop(), None, None, api_name="stop", queue=False)
        random_seed.click(lambda: -1, None, seed, api_name=False, queue=False)
        reuse_seed.click(guarded(studio.last_seed), None, seed, api_name="last_seed", queue=False)
        dropped.upload(guarded(restore), dropped, settable, api_name="restore")
        gallery.select(guarded(pick), None, [picked] + settable, api_name=False)
        rerun.click(guarded_stream(run_again), picked, [status, output, gallery], api_name=False,
                    concurrency_id="model", show_progress="hidden")
        film_button.click(guarded(show_filmstrip), None, film, api_name="filmstrip", concurrency_id="model")
        attn_button.click(guarded(show_attention), None, [attn, layer], api_name="attention", concurrency_id="model")
        layer.change(guarded(show_layer), layer, attn, api_name="attention_layer")
        compare_button.click(guarded(show_compare), [compare_samplers, compare_scales], compare_out,
                             api_name="compare", concurrency_id="model")
        arith_button.click(guarded(show_arithmetic), [prompt_a, prompt_b, prompt_c, weight], arith_out,
                           api_name="arithmetic", concurrency_id="model")
        ia_button.click(guarded(show_image_arithmetic), [ia_photo, ia_minus, ia_plus, ia_weights], ia_out,
                        api_name="image_arithmetic", concurrency_id="model")
    return page


def refuse_unreadable(component, what: str) -> None:
    """Make an upload that Gradio cannot decode a one-line message (Gradio's own is a long 'Could not
    preprocess input component ...'): the component's preprocess, wrapped on the instance."""
    import gradio as gr

    plain = component.preprocess

    def preprocess(payload):
        try:
            return plain(payload)
        except Exception as e:  # noqa: BLE001  (PIL's errors for a damaged file are of many kinds)
            raise gr.Error(f"the {what} is not an image that can be read ({type(e).__name__})",
                           print_exception=False) from None
    component.preprocess = preprocess


def whole(value, name: str):
    """A page number that must be whole (or empty -> None)."""
    if value is None or value == "":
        return None
    try:
        number_ = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} {value!r}: must be a whole number") from None
    if not number_.is_integer():
        raise ValueError(f"{name} {value:g}: must be a whole number")
    return int(number_)


def number(value, name: str):
    if value is None or value == "":
        return None
    try:
        return float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} {value!r}: must be a number") from None
