"""What the studio page does, without the page: find models, generate with a live preview and a stop,
keep a history, and run the course's views on the last image.

Everything here is plain Python over the library the command lines use (`cli.load_model`,
`LatentDiffusion.generate`, `minildm.views`, `pngtext`), so the tests reach every number the page shows
without a browser, and `page.py` only lays it out.

    Studio(ckpts, runs_dir)            the models on offer: training runs (newest first), then --ckpt files
      .use(name)                       load one (the last one stays loaded; switching frees it)
      .defaults()                      sampler, steps, guidance, size limits of the loaded model
      .generate(request)               a generator of Events: a preview per step, then each image saved
      .stop()                          end the running generation at its next step
      .filmstrip() / .attention(...) / .compare(...) / .arithmetic(...)    the views, on the last image
      .image_arithmetic(photo, minus, plus, weights)     a photo and captions in CLIP's joint space

Photos as prompts: an image-variations model reads one in place of the text (and, given a full CLIP,
captions mixed into it in CLIP's joint space); a run you trained reads one beside the text through its
image adapter (`python -m minildm.finetune image-prompt`).

One thread does all the model's work (loading, sampling, the views), one job at a time, so the page's
requests queue behind it. It is one thread for a reason beyond order: PyTorch's CPU kernels run on an
OpenMP team per calling thread, and once two threads have teams there are more OpenMP threads than
cores, the teams stop spin-waiting and a small model's many short kernels take about twice as long
(bench/RESULTS.md). The command line's main thread never runs a kernel.
"""
from __future__ import annotations

import glob
import math
import os
import queue
import random
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field

import numpy as np
import torch

from .. import views
from ..cli import CommandError, default_guidance_interval, find_checkpoint, load_model, slug
from ..pngtext import save_png
from ..sample import KARRAS_SAMPLERS, default_sampling, to_pil, to_tensor
from ..samplers import LCM_ORIGINAL_STEPS, SAMPLERS

PREVIEW_SHARE = 0.05   # at most this share of the sampling time goes to the preview (the rest of the
                       # studio's work, saving the PNG and passing events, added 4% on the CIFAR run:
                       # bench/studio.py)
MAX_IMAGES = 16        # images per press of Generate


@dataclass
class Request:
    """One press of Generate: the settings of `python -m minildm.sample` that the page offers."""

    prompt: str = ""
    negative: str = ""
    sampler: str | None = None          # None: the model's default (ddim; lcm for LCM-distilled models)
    karras: bool = False
    steps: int | None = None
    guidance: float | None = None
    seed: int = -1                      # -1: a random seed
    width: int | None = None            # None: the model's own size (or the init image's)
    height: int | None = None
    count: int = 1                      # images, seeds seed .. seed + count - 1
    init_image: str | None = None       # a file: image to image
    strength: float | None = None
    mask: str | None = None             # a file, white = repaint
    image_prompt: str | None = None     # a file: the photo an image-variations model varies, or a run's
                                        # image adapter reads beside the text


@dataclass
class Event:
    """What the generation reports: kind "step" (a preview), "image" (one saved), "stopped" or "done"."""

    kind: str
    index: int = 0                      # which image of the request
    step: int = 0
    num_steps: int = 0
    preview: np.ndarray | None = None   # uint8 (H, W, 3)
    preview_kind: str = ""              # "decoded" or "latent" (the latent's first channels as colours)
    path: str | None = None
    settings: dict = field(default_factory=dict)
    seconds: float = 0.0


class Stopped(Exception):
    """Raised inside the sampler's callback to end a run at a step."""


class PreviewBudget:
    """Decides, step by step, whether to decode a preview: only while the time the preview has taken so
    far (`spent`: the whole callback, keeping the filmstrip's steps and reporting included) plus one more
    decode (`cost`, as last measured) stays within PREVIEW_SHARE of the sampling time, so watching never
    slows sampling by more than that share."""

    def __init__(self, cost: float, share: float | None = None):
        self.cost, self.share = cost, PREVIEW_SHARE if share is None else share
        self.spent = 0.0

    def allows(self, sampling_seconds: float) -> bool:
        return self.spent + self.cost <= self.share * sampling_seconds

    def record(self, seconds: float, decode_seconds: float | None = None) -> None:
        """One callback took `seconds`, of which `decode_seconds` decoding (None: it decoded nothing)."""
        self.spent += seconds
        if decode_seconds is not None:
            self.cost = decode_seconds


class Studio:
    def __init__(self, ckpts=(), runs_dir: str = "runs", *, taesd: str | None = None, loras=(), clip: str | None = None,
                 image_adapter: tuple | None = None, device: str = "auto", dtype: str = "auto",
                 out: str = "studio-outputs"):
        """taesd: a TAESD folder every SD-sized model decodes with; loras: (file, scale) pairs merged into
        every SD-sized model when it is loaded (the small CIFAR-sized runs are left as trained); clip: a
        full CLIP folder whose text tower puts captions into an image-variations model's prompt;
        image_adapter: (file, scale), attached to the run it was trained for."""
        self.ckpts, self.runs_dir, self.taesd, self.loras = list(ckpts), runs_dir, taesd, list(loras)
        self.clip, self.image_adapter = clip, image_adapter
        self.device, self.dtype, self.out = device, dtype, out
        self.model = None
        self.model_name = None
        self.ckpt_path = None
        self.guidance_interval = None   # the timesteps the loaded model's run guides (None: every step)
        self.skipped = []               # the add-ons (LoRA files, TAESD) that do not fit the loaded model
        self.preview_cost = 0.0
        self.history = []               # (path, settings), newest first
        self.last = None                # the last finished image: settings and its filmstrip steps
        self.last_attention = None      # the last attention maps (views.AttentionMaps)
        self._stop = threading.Event()
        self._jobs = queue.Queue()
        self._model_thread = threading.Thread(target=self._work, name="minildm-model", daemon=True)
        self._model_thread.start()

    def _work(self) -> None:
        while True:
            job = self._jobs.get()
            job()

    def on_model_thread(self, fn, *args, **kwargs):
        """fn(*args, **kwargs) run by the model's thread after the jobs before it; its result or its exception."""
        if threading.current_thread() is self._model_thread:
            return fn(*args, **kwargs)
        done, box = threading.Event(), {}

        def job():
            try:
                box["result"] = fn(*args, **kwargs)
            except BaseException as e:  # noqa: BLE001  (handed to the caller's thread)
                box["error"] = e
            done.set()
        self._jobs.put(job)
        done.wait()
        if "error" in box:
            raise box["error"]
        return box["result"]

    # ----- models ---------------------------------------------------------------------------------

    def models(self) -> list[str]:
        """Training runs in runs_dir, newest first, then every --ckpt as given."""
        found = glob.glob(os.path.join(self.runs_dir, "*", "model.safetensors"))
        runs = [os.path.dirname(p) for p in sorted(found, key=os.path.getmtime, reverse=True)]
        return runs + [c for c in self.ckpts if c not in runs]

    def use(self, name: str):
        """Load `name` (a run folder or a checkpoint) unless it is the loaded one; ValueError with one
        line when it cannot be loaded. Returns the model."""
        if not name:
            raise ValueError("pick a model in the Model list")
        if name == self.model_name and self.model is not None:
            return self.model
        return self.on_model_thread(self._use, name)

    def _use(self, name: str):
        self.model, self.model_name = None, None            # free the old weights before the new ones
        self.last = self.last_attention = None              # the views belong to the model that made them
        try:
            run_file = os.path.join(name, "model.safetensors")
            path = run_file if os.path.isfile(run_file) else find_checkpoint(name, self.runs_dir)
            model, path = load_model(path, self.runs_dir, self.device, self.dtype)
            model, self.skipped = self._add_ons(model, path)
        except CommandError as e:                           # its line is already on the terminal
            self.model_name = None
            raise ValueError(e.message) from e
        except ValueError:
            self.model_name = None
            raise
        self.model, self.model_name, self.ckpt_path = model, name, path
        self.guidance_interval = default_guidance_interval(path)    # the run's own, read once
        self.preview_cost = self._time_preview()
        return model

    def _add_ons(self, model, path):
        """Merge the LoRA files and load TAESD into `model` where they fit: a Stable Diffusion-sized model
        they do not fit is an error, a small run is used without them (returned as the list of what
        was left out, which the page shows). The LoRA files are for text-to-image models: an
        image-variations model takes the CLIP text tower of --clip instead; the image adapter goes into
        the run it was trained for and is left out of the others."""
        sd_sized, skipped = model.default_size >= 512, []
        variations = model.is_image_variations_model
        if variations and self.clip:
            try:
                model.load_text_clip(self.clip)
            except ValueError as e:
                raise ValueError(f"--clip {self.clip}: {e}") from None
        if variations and self.loras:
            skipped.append("the LoRA files")
        for file, scale in self.loras if not variations else ():
            try:
                model.load_lora(file, scale)
            except ValueError as e:
                if sd_sized:
                    raise ValueError(f"--lora {file}: {e}") from None
                model, _ = load_model(path, self.runs_dir, self.device, self.dtype)     # no half-merged weights
                skipped.append("the LoRA files")
                break
        if self.taesd:
            try:
                model.load_taesd(self.taesd)
            except ValueError as e:
                if sd_sized:
                    raise ValueError(f"--taesd {self.taesd}: {e}") from None
                skipped.append("TAESD")
        if self.image_adapter:
            try:
                if variations:
                    raise ValueError("an image-variations model reads photos already")
                model.load_image_adapter(*self.image_adapter)
            except ValueError:                              # made for another run (CheckpointError included)
                skipped.append("the image adapter")
        return model, skipped

    def _time_preview(self) -> float:
        """Seconds of one preview decode at the model's own size (timed once, on zeros)."""
        model = self.model
        f = model.downsample_factor
        z = torch.zeros(1, model.vae.cfg.z_channels, model.default_size // f, model.default_size // f)
        views.decode_preview(model, z)
        start = time.perf_counter()
        views.decode_preview(model, z)
        return time.perf_counter() - start

    def defaults(self) -> dict:
        """What the page's controls should say for the loaded model."""
        model = self.model
        sampler, steps, guidance = default_sampling(model.takes_guidance)
        return {"sampler": sampler, "steps": steps, "guidance": guidance, "size": model.default_size,
                "size_step": math.lcm(8, model.size_multiple), "max_size": 4 * model.default_size,
                "inpainting_model": model.is_inpainting_model, "takes_guidance": model.takes_guidance,
                "image_prompt": ("variations" if model.is_image_variations_model else
                                 "adapter" if model.image_adapter is not None else None),
                "captions": model.text_clip is not None,
                "decoder": "TAESD" if model.tiny_decoder is not None else "VAE",
                "guidance_interval": self.guidance_interval, "dtype": str(model.dtype)[6:]}

    def describe(self) -> str:
        """One line about the loaded model, for the page."""
        if self.model is None:
            return "No model loaded: pick one in the Model list."
        d = self.defaults()
        kind = ("an inpainting model (9-channel UNet)" if d["inpainting_model"] else
                "an image-variations model (a photo is its prompt" + (", captions through CLIP's joint space)"
                                                                      if d["captions"] else ")")
                if d["image_prompt"] == "variations" else
                "an LCM-distilled model" if d["takes_guidance"] else "a text-to-image model")
        if d["image_prompt"] == "adapter":
            kind += " with an image adapter (a photo beside the prompt)"
        interval = d["guidance_interval"]
        guided = (f"; guidance at timesteps {interval[0]:g}-{interval[1]:g} (this run's default)" if interval else "")
        loras = (f", {len(self.loras)} LoRA file(s) merged" if self.loras and "the LoRA files" not in self.skipped
                 else "")
        skipped = f" ({' and '.join(self.skipped)} left out: made for another model)" if self.skipped else ""
        return (f"{self.ckpt_path}: {kind}, {d['size']}x{d['size']} px, {d['dtype']}{loras}, decoded by the "
                f"{d['decoder']}, previews {self.preview_cost * 1000:.0f} ms each{guided}{skipped}")

    # ----- generating -----------------------------------------------------------------------------

    def image_prompt_note(self) -> str:
        """How the loaded model reads a photo prompt, for the page."""
        kind = self.defaults()["image_prompt"] if self.model is not None else None
        if kind == "variations":
            return ("This image-variations model draws variations of the photo: it reads the photo in place of "
                    "text (leave the prompts empty). Lesson 12.")
        if kind == "adapter":
            return ("This run reads the photo beside the prompt (which may be empty) through its image adapter. "
                    "Lesson 12.")
        return ("This model reads text only: photos are read by an image-variations model, or by a run you "
                "trained with its image adapter (python -m minildm.finetune image-prompt; start the studio with "
                "--image-adapter FILE). Lesson 12.")

    def inpainting_note(self) -> str:
        """How the loaded model inpaints, for the page."""
        if self.model is not None and self.model.is_inpainting_model:
            return "Inpainting here: the model's own 9-channel inpainting UNet (strength 1 by default)."
        return "Inpainting here: latent blending (the kept part is put back at every step)."

    def sampler_defaults(self, sampler: str, steps, guidance):
        """(steps, guidance) the form should show after the sampler changes to `sampler`, or None to keep
        them: LCM takes 4 steps and its own guidance (1 for the LCM-LoRA, the model's for an LCM-distilled
        UNet); leaving LCM with its values untouched restores the model's usual ones."""
        takes_guidance = self.model.takes_guidance
        if sampler == "lcm" or (not takes_guidance and (steps, guidance) == default_sampling(False, "lcm")[1:]):
            return default_sampling(takes_guidance, sampler)[1:]
        return None

    def check(self, r: Request) -> Request:
        """The request with the model's defaults filled in, or ValueError naming the bad field."""
        model = self.model
        if model is None:
            raise ValueError("no model loaded: pick one in the Model list")
        d = self.defaults()
        r = Request(**asdict(r))
        r.sampler, steps, guidance = default_sampling(d["takes_guidance"], r.sampler)
        if r.sampler not in SAMPLERS:
            raise ValueError(f"Sampler {r.sampler!r}: choose one of {', '.join(SAMPLERS)}")
        if r.karras and r.sampler not in KARRAS_SAMPLERS:
            raise ValueError(f"Karras sigmas work with {', '.join(KARRAS_SAMPLERS)}, not {r.sampler}")
        r.steps = r.steps if r.steps is not None else steps
        top = LCM_ORIGINAL_STEPS if r.sampler == "lcm" else model.schedule.num_timesteps
        if not (isinstance(r.steps, int) and 1 <= r.steps <= top):
            raise ValueError(f"Steps {r.steps}: must be a whole number from 1 to {top}")
        r.guidance = r.guidance if r.guidance is not None else guidance
        if not (math.isfinite(r.guidance) and 0 <= r.guidance <= 100):
            raise ValueError(f"Guidance {r.guidance}: must be a number from 0 to 100")
        if not (isinstance(r.count, int) and 1 <= r.count <= MAX_IMAGES):
            raise ValueError(f"Images {r.count}: must be a whole number from 1 to {MAX_IMAGES}")
        if r.seed is None or r.seed < 0:
            r.seed = random.SystemRandom().randrange(2**31)
        if not (isinstance(r.seed, int) and r.seed + r.count <= 2**63):
            raise ValueError(f"Seed {r.seed}: must be a whole number from 0 (or -1 for a random one)")
        if d["image_prompt"] == "variations":
            if not r.image_prompt:
                raise ValueError("this is an image-variations model: upload a photo under Image prompt")
            if r.prompt or r.negative:
                raise ValueError("an image-variations model reads the photo, not text: clear the "
                                 + ("prompt" if r.prompt else "negative prompt")
                                 + " (captions go in through Look inside, with --clip)")
        elif r.image_prompt and d["image_prompt"] is None:
            raise ValueError("this model reads text only: an image prompt needs an image-variations model, or "
                             "for a run you trained an image adapter (start the studio with --image-adapter)")
        if r.mask and not r.init_image:
            raise ValueError("a mask needs an image to paint it on: upload one under Image to image")
        if d["inpainting_model"] and not (r.init_image and r.mask):
            raise ValueError("this is an inpainting model: upload an image and paint what to repaint")
        if r.init_image is None:
            r.strength = None
        elif r.strength is None:
            r.strength = 1.0 if d["inpainting_model"] else 0.75
        if r.strength is not None and not 0 <= r.strength <= 1:
            raise ValueError(f"Strength {r.strength}: must be from 0 to 1")
        m, limit = d["size_step"], d["max_size"]
        for name in ("width", "height"):
            value = getattr(r, name)
            if value is not None and not (isinstance(value, int) and m <= value <= limit and value % m == 0):
                raise ValueError(f"{name.capitalize()} {value}: must be a multiple of {m} from {m} to {limit} "
                                 f"for this model")
        return r

    def read_images(self, r: Request):
        """(init, mask) tensors for the request: init (1, 3, H, W) in [-1, 1], mask (1, 1, H, W) in [0, 1],
        resized to the request's size (default: the init image's, rounded down to the size step);
        ValueError for a file that is not an image."""
        from PIL import Image, UnidentifiedImageError

        if r.init_image is None:
            return None, None

        def read(path, mode, what):
            try:
                with Image.open(path) as im:
                    im.load()
                    return im.convert(mode)
            except (UnidentifiedImageError, OSError, ValueError) as e:
                raise ValueError(f"the {what} is not an image that can be read ({type(e).__name__})") from None

        image = read(r.init_image, "RGB", "uploaded image")
        m = self.defaults()["size_step"]
        width = r.width or image.size[0] // m * m
        height = r.height or image.size[1] // m * m
        if width < m or height < m:
            raise ValueError(f"the uploaded image is {image.size[0]}x{image.size[1]}: too small for this model "
                             f"(at least {m}x{m} pixels)")
        limit = self.defaults()["max_size"]
        if max(width, height) > limit:
            raise ValueError(f"the uploaded image is {image.size[0]}x{image.size[1]}: at most {limit} pixels a side "
                             f"for this model (4x the {self.model.default_size} it was trained at); make it smaller")
        r.width, r.height = width, height
        init = to_tensor(image.resize((width, height))) * 2 - 1
        mask = None
        if r.mask is not None:
            mask_image = read(r.mask, "L", "mask")
            if mask_image.size != image.size:
                raise ValueError(f"the mask is {mask_image.size[0]}x{mask_image.size[1]} but the image "
                                 f"{image.size[0]}x{image.size[1]}: they must be the same size")
            mask = to_tensor(mask_image.resize((width, height)))
            if mask.max() == 0:
                raise ValueError("the mask is empty: paint over the part of the image to repaint")
        return init, mask

    def settings(self, r: Request, seed: int) -> dict:
        """The PNG's settings: the keys `python -m minildm.sample` writes."""
        s = {"prompt": r.prompt, "negative": r.negative, "seed": seed, "steps": r.steps, "sampler": r.sampler,
             "karras": r.karras, "guidance": r.guidance,
             "guidance_interval": list(self.guidance_interval) if self.guidance_interval else None,
             "height": r.height, "width": r.width, "checkpoint": os.path.abspath(self.ckpt_path), "ema": True,
             "dtype": str(self.model.dtype)[6:]}
        if self.loras and "the LoRA files" not in self.skipped:
            s["loras"] = [[os.path.abspath(path), scale] for path, scale in self.loras]
        if self.model.tiny_decoder is not None:
            s["taesd"] = os.path.abspath(self.taesd)
        if r.image_prompt is not None and self.model.image_adapter is not None:
            s["image_adapter"] = [os.path.abspath(self.image_adapter[0]), self.image_adapter[1]]
        if r.image_prompt is not None:
            s["image_prompt"] = os.path.abspath(r.image_prompt)
        if r.init_image is not None:
            s.update(init_image=os.path.abspath(r.init_image), strength=r.strength)
        if r.mask is not None:
            s["mask"] = os.path.abspath(r.mask)
        return s

    def stop(self) -> None:
        """End the running generation at its next step (what is finished is kept)."""
        self._stop.set()

    def generate(self, r: Request):
        """Make the request's images one by one, each from its own seed (image i: seed + i, equal to
        `python -m minildm.sample --n 1 --seed <seed + i>` with the same settings); yields Events while it
        runs. Closing the generator early (a page closed, a client gone) stops the run."""
        r = self.check(r)
        events = queue.Queue()
        self._jobs.put(lambda: self._run(r, events))
        finished = False
        try:
            while True:
                event = events.get()
                if isinstance(event, BaseException):
                    finished = True
                    raise event
                if event.kind in ("done", "stopped"):
                    finished = True
                yield event
                if finished:
                    return
        finally:
            if not finished:
                self.stop()

    def _run(self, r: Request, events: queue.Queue) -> None:
        self._stop.clear()                  # a Stop ends the generation that is running when it is pressed
        try:
            init, mask = self.read_images(r)
            r.init_image = self.keep_input(r.init_image, "image") if r.init_image else None
            r.mask = self.keep_input(r.mask, "mask") if r.mask else None
            photo = self.read_photo(r.image_prompt) if r.image_prompt else None
            r.image_prompt = self.keep_input(r.image_prompt, "prompt") if r.image_prompt else None
            r.width = r.width or self.model.default_size
            r.height = r.height or self.model.default_size
            self.model.check_size(r.height, r.width)
            os.makedirs(self.out, exist_ok=True)
            self._generate(r, init, mask, events, photo)
        except BaseException as e:  # noqa: BLE001  (reported to the page's side of the queue)
            events.put(e)

    def read_photo(self, path: str):
        """An image prompt's file as a PIL image, as it is (as `python -m minildm.sample` reads it)."""
        from PIL import Image, UnidentifiedImageError

        try:
            with Image.open(path) as im:
                return im.copy()
        except (UnidentifiedImageError, OSError, ValueError) as e:
            raise ValueError(f"the image prompt is not an image that can be read ({type(e).__name__})") from None

    def _generate(self, r: Request, init, mask, events: queue.Queue, photo=None) -> None:
        model = self.model
        cost = self.preview_cost
        steps_run = r.steps if init is None else int(r.steps * r.strength)
        first_step = r.steps - steps_run    # img2img runs the last steps_run of the sampler's r.steps
        started = time.perf_counter()
        for index in range(r.count):
            seed = r.seed + index
            caught, state = [], {"decoded": False}
            keep = views.keep_steps(caught)
            budget = PreviewBudget(cost)
            begun = time.perf_counter()

            def callback(info, index=index, state=state, keep=keep, begun=begun, budget=budget):
                entered = time.perf_counter()
                done = info["step"] - first_step + 1            # steps of this run finished, 1 to steps_run
                if self._stop.is_set():
                    raise Stopped(done - 1)                     # the last step the page was shown
                keep(info)
                preview, kind, decoding = None, "", None
                if budget.allows(entered - begun - budget.spent):
                    preview, kind = views.decode_preview(model, info["x0_pred"]), "decoded"
                    decoding = time.perf_counter() - entered
                    state["decoded"] = True
                elif not state["decoded"]:
                    preview, kind = views.to_hwc_uint8(views.latent_to_image(info["x0_pred"][:1]))[0], "latent"
                state["preview"] = preview if preview is not None else state.get("preview")
                events.put(Event("step", index, done, steps_run, preview, kind, seconds=time.perf_counter() - started))
                budget.record(time.perf_counter() - entered, decoding)

            settings = self.settings(r, seed)
            try:
                x = model.generate(r.prompt, negative_prompt=r.negative, image_prompt=photo, num_steps=r.steps,
                                   sampler=r.sampler,
                                   guidance_scale=r.guidance, guidance_interval=self.guidance_interval,
                                   height=r.height, width=r.width, seeds=[seed], init_image=init,
                                   strength=r.strength if init is not None else 0.8, mask=mask, callback=callback,
                                   **({"karras": True} if r.karras else {}))
            except Stopped as e:
                step = e.args[0]
                settings["stopped_at_step"] = step
                events.put(Event("stopped", index, step, steps_run, state.get("preview"), settings=settings,
                                 seconds=time.perf_counter() - started))
                return
            cost = budget.cost                      # the next image's budget starts from the last measured decode
            path = self._save(x[0], settings)
            self.last = {"settings": settings, "caught": caught, "x": x[:1].cpu(), "path": path}
            events.put(Event("image", index, steps_run, steps_run, views.to_hwc_uint8(x[0] * 2 - 1), path=path,
                             settings=settings, seconds=time.perf_counter() - started))
        events.put(Event("done", r.count, seconds=time.perf_counter() - started))

    def _save(self, x: torch.Tensor, settings: dict) -> str:
        from ..cli import free_path

        path = free_path(os.path.join(self.out, f"{file_stem(settings)}-{settings['seed']}.png"))
        save_png(to_pil(x), path, settings)
        self.history.insert(0, (path, settings))
        return path

    def request_from(self, settings: dict) -> Request:
        """A Request that re-makes an image from its saved settings (the fields a Request has); ValueError
        when it needs what is not here: another model, or a start image that is gone."""
        made_with = settings.get("checkpoint")
        if made_with and self.ckpt_path and os.path.abspath(made_with) != os.path.abspath(self.ckpt_path):
            raise ValueError(f"this image was made with {made_with}: pick that model first")
        keys = {k: settings[k] for k in ("prompt", "negative", "sampler", "karras", "steps", "guidance", "seed",
                                         "width", "height", "strength") if settings.get(k) is not None}
        for name in ("init_image", "mask", "image_prompt"):
            if settings.get(name):
                if not os.path.isfile(settings[name]):
                    raise ValueError(f"this image started from {settings[name]}, which is gone: upload it again")
                keys[name] = settings[name]
        if "init_image" not in keys:
            keys.pop("strength", None)
        return Request(**keys)

    def keep_input(self, path: str, kind: str) -> str:
        """A copy of an uploaded file in the output folder (inputs/<kind>-<content hash>.png), so the
        settings of the images made from it name a file that stays."""
        import hashlib
        import shutil

        with open(path, "rb") as f:
            digest = hashlib.sha256(f.read()).hexdigest()[:16]
        suffix = os.path.splitext(path)[1] or ".png"
        kept = os.path.join(os.path.abspath(self.out), "inputs", f"{kind}-{digest}{suffix}")
        if not os.path.exists(kept):
            os.makedirs(os.path.dirname(kept), exist_ok=True)
            shutil.copyfile(path, kept)
        return kept

    def mask_from_layers(self, background: str, layers) -> str | None:
        """The image editor's painted layers (RGBA files the size of the background) -> a mask file,
        white where any layer has paint, kept in the output folder; None when nothing was painted."""
        from PIL import Image

        try:
            with Image.open(background) as image:
                painted = np.zeros(image.size[::-1], dtype=bool)
            for path in layers:
                with Image.open(path) as layer:
                    alpha = np.asarray(layer.convert("RGBA"))[..., 3]
                if alpha.shape != painted.shape:
                    raise ValueError("the painted layer is not the image's size")
                painted |= alpha > 0
        except (OSError, ValueError) as e:
            raise ValueError(f"the painted mask cannot be read ({type(e).__name__})") from None
        if not painted.any():
            return None
        os.makedirs(self.out, exist_ok=True)
        with tempfile.NamedTemporaryFile(suffix=".png", dir=self.out, delete=False) as f:
            Image.fromarray(painted.astype(np.uint8) * 255).save(f, format="PNG")
        try:
            return self.keep_input(f.name, "mask")
        finally:
            os.remove(f.name)

    def history_item(self, index: int):
        """(path, settings) of the index-th image of the gallery (newest first)."""
        if not 0 <= index < len(self.history):
            raise ValueError("that image is no longer in the gallery")
        return self.history[index]

    def last_seed(self) -> int:
        if not self.history:
            raise ValueError("no image made yet: there is no last seed")
        return self.history[0][1]["seed"]

    # ----- the views, on the last image -----------------------------------------------------------

    def _last_settings(self, from_text: bool = True) -> dict:
        """The last image's settings; from_text: for a view that draws it again from its prompt."""
        if from_text:
            self._text_to_image_model()
        elif self.model is None:
            raise ValueError("no model loaded: pick one in the Model list")
        if self.last is None:
            raise ValueError("make an image first: the views look inside the last image generated")
        return self.last["settings"]

    def _text_to_image_model(self) -> None:
        if self.model is None:
            raise ValueError("no model loaded: pick one in the Model list")
        if self.model.is_inpainting_model:
            raise ValueError("the views draw from text alone, which an inpainting model cannot: pick another model")
        if self.model.is_image_variations_model:
            raise ValueError("this view draws from text, which an image-variations model does not read: its panel "
                             "is the photo and words in CLIP's joint space")

    def filmstrip(self, max_columns: int = 8):
        """The last image's filmstrip (views.filmstrip_from_steps) from the steps kept while it was made,
        decoded at the preview's size (256 px for SD: 16 decodes of SD's VAE at 512 px would take minutes)."""
        s = self._last_settings(from_text=False)
        what = f'"{s["prompt"]}"' if s["prompt"] else "variation of " + os.path.basename(s.get("image_prompt") or "")
        return self.on_model_thread(views.filmstrip_from_steps,
                                    self.model, self.last["caught"], self.last["x"] * 2 - 1, max_columns=max_columns,
                                    shown_only=True, max_latent_side=32,
                                    title=f'{what}, {s["sampler"]}, {s["steps"]} steps, seed {s["seed"]}')

    def attention(self):
        """Cross-attention maps of the last image's prompt and seed (views.attention_maps_view), regenerated
        from text while recording (no negative prompt, no Karras sigmas); kept for attention_figure."""
        s = self._last_settings()
        if not s["prompt"].strip():
            raise ValueError("the last image has no prompt: attention maps show where each word of a prompt looks")
        maps = self.on_model_thread(views.attention_maps_view, self.model, s["prompt"], num_steps=s["steps"],
                                    sampler=s["sampler"], guidance_scale=s["guidance"], seed=s["seed"],
                                    height=s["height"], width=s["width"], guidance_interval=self.guidance_interval)
        self.last_attention = maps
        return maps

    def attention_figure(self, layer: str | None = None):
        """The last attention maps' figure: each token over the image, for one layer or (None, or a name
        it does not have) the mean of all layers."""
        maps = self.last_attention
        if maps is None:
            raise ValueError("show the attention maps first")
        chosen = maps.per_layer.get(layer, maps.average) if layer else maps.average
        title = layer if layer in maps.per_layer else "mean of all layers"
        return self.on_model_thread(views.plot_token_maps, maps.image, chosen, maps.tokens, title=title)

    def compare(self, samplers_: list, scales: list):
        """The last image's prompt and seed under each sampler (rows) and guidance scale (columns):
        uint8 images by (sampler, scale)."""
        if not samplers_ or not scales:
            raise ValueError("pick at least one sampler and one guidance scale")
        bad = [n for n in samplers_ if n not in SAMPLERS]
        if bad:
            raise ValueError(f"unknown sampler {bad[0]!r}")
        if len(samplers_) * len(scales) > 24:
            raise ValueError(f"{len(samplers_)} samplers x {len(scales)} scales is {len(samplers_) * len(scales)} "
                             "images: at most 24")
        for w in scales:
            if not (math.isfinite(w) and 0 <= w <= 100):
                raise ValueError(f"guidance scale {w:g}: must be from 0 to 100")
        return self.on_model_thread(self._compare, self._last_settings(), samplers_, scales)

    @torch.no_grad()
    def _compare(self, s, samplers_, scales):
        images = {}
        noise = views.make_noise(self.model, [s["seed"]], s["height"], s["width"])
        context = views.encode(self.model, [s["prompt"]])
        uncond = self.model.encode_prompt([s["negative"]])
        for name in samplers_:
            for w in scales:
                steps = min(s["steps"], LCM_ORIGINAL_STEPS) if name == "lcm" else s["steps"]
                x = views.generate_from(self.model, context, noise, uncond_context=uncond, guidance_scale=w,
                                        sampler=name, num_steps=steps, seed=s["seed"],
                                        guidance_interval=self.guidance_interval)
                images[(name, w)] = views.to_hwc_uint8(x)[0]
        return images

    def arithmetic(self, prompt_a: str, prompt_b: str, prompt_c: str, weight: float = 1.0):
        """views.context_arithmetic at the last image's seed, steps and sampler (or the model's defaults)."""
        if not all(p.strip() for p in (prompt_a, prompt_b, prompt_c)):
            raise ValueError("give all three prompts: A, and B to take away, C to add")
        if not (math.isfinite(weight) and -10 <= weight <= 10):
            raise ValueError(f"weight {weight:g}: must be from -10 to 10")
        self._text_to_image_model()
        s = self.last["settings"] if self.last else {**asdict(self.check(Request())), "seed": 0}
        return self.on_model_thread(views.context_arithmetic, self.model, prompt_a, prompt_b, prompt_c, seed=s["seed"],
                                    weight=weight, sampler=s["sampler"], num_steps=s["steps"],
                                    guidance_scale=s["guidance"], height=s.get("height"), width=s.get("width"),
                                    guidance_interval=self.guidance_interval)

    def image_arithmetic(self, photo: str, minus: str, plus: str, weights):
        """views.image_arithmetic: the photo, then u(u(photo) - a u(minus) + a u(plus)) at the photo's length
        for each weight a, at the last image's seed, steps and sampler (or the model's defaults). Needs an
        image-variations model and, for the captions, the studio's --clip."""
        model = self.model
        if model is None:
            raise ValueError("no model loaded: pick one in the Model list")
        if not model.is_image_variations_model:
            raise ValueError("this panel moves an image-variations model's photo embedding: load one (a diffusers "
                             "folder with image_encoder/, such as lambdalabs/sd-image-variations-diffusers)")
        if model.text_clip is None:
            raise ValueError("the captions need CLIP's text tower: start the studio with --clip FOLDER "
                             "(openai/clip-vit-large-patch14)")
        if not photo:
            raise ValueError("upload the photo to start from")
        if not (minus.strip() and plus.strip()):
            raise ValueError("give both captions: the one to take away and the one to add")
        weights = list(weights)
        if not 1 <= len(weights) <= 8 or not all(math.isfinite(a) and -10 <= a <= 10 for a in weights):
            raise ValueError("weights: one to eight numbers from -10 to 10")
        image = self.read_photo(photo)
        if self.last is not None:
            s = self.last["settings"]
        else:
            d = self.defaults()
            s = {"seed": 0, "sampler": d["sampler"], "steps": d["steps"], "guidance": d["guidance"]}
        return self.on_model_thread(views.image_arithmetic, model, image, minus.strip(), plus.strip(), weights=weights,
                                    seed=s["seed"], sampler=s["sampler"], num_steps=s["steps"],
                                    guidance_scale=s["guidance"], guidance_interval=self.guidance_interval)


def file_stem(settings: dict) -> str:
    """An image's file name before its seed: the prompt; for a photo prompt, whose upload has no name of its
    own here, 'variation' (an image-variations model) or '<prompt>-like-photo' (a run's image adapter)."""
    if settings.get("image_prompt") and "image_adapter" not in settings:
        return "variation"
    if settings.get("image_prompt"):
        return "-".join(part for part in (slug(settings["prompt"]) if settings["prompt"] else "", "like-photo") if part)
    return slug(settings["prompt"])
