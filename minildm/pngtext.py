"""An image's settings, kept inside its PNG so the image can be made again.

Every PNG minildm writes (`python -m minildm.sample`, the studio) carries three kinds of text chunk:

    minildm      the settings as JSON, exactly as given to the sampler (the one minildm reads first)
    parameters   the same settings in the layout AUTOMATIC1111's web UI writes, which other tools
                 (A1111, ComfyUI's loaders, civitai, exif viewers) read:

                     a cat in a hat
                     Negative prompt: blurry
                     Steps: 20, Sampler: DPM++ 2M Karras, CFG scale: 7.5, Seed: 1, Size: 512x512, Model: sd15

    <key>        one chunk per setting, for people who look with `identify -verbose` or exiftool

`read_settings` goes the other way, from either layout, so an image made elsewhere can be re-made here
as far as its settings mean the same thing (a sampler minildm does not have comes back as None).
"""
from __future__ import annotations

import json
import os
import re

# minildm's sampler names -> AUTOMATIC1111's ("DDPM" is not an A1111 sampler; it is written as itself)
A1111_SAMPLERS = {"ddim": "DDIM", "plms": "PLMS", "euler": "Euler", "euler_a": "Euler a", "heun": "Heun",
                  "lms": "LMS", "dpmpp_2m": "DPM++ 2M", "lcm": "LCM", "ddpm": "DDPM"}


def a1111_parameters(settings: dict) -> str:
    """The `parameters` text A1111 writes, from minildm's settings dict (prompt, negative, steps, ...)."""
    sampler = A1111_SAMPLERS.get(settings.get("sampler"), settings.get("sampler"))
    fields = {"Steps": settings.get("steps"),
              "Sampler": f"{sampler} Karras" if settings.get("karras") else sampler,
              "CFG scale": settings.get("guidance"), "Seed": settings.get("seed")}
    if settings.get("width") and settings.get("height"):
        fields["Size"] = f"{settings['width']}x{settings['height']}"
    if settings.get("checkpoint"):
        fields["Model"] = os.path.splitext(os.path.basename(os.path.normpath(settings["checkpoint"])))[0]
    if settings.get("strength") is not None:
        fields["Denoising strength"] = settings["strength"]
    if settings.get("guidance_interval"):
        fields["Guidance interval"] = "{:g}-{:g}".format(*settings["guidance_interval"])
    for name, scale in settings.get("loras") or []:
        fields[f"Lora {os.path.splitext(os.path.basename(name))[0]}"] = scale
    line = ", ".join(f"{k}: {_quote(v)}" for k, v in fields.items() if v is not None)
    text = settings.get("prompt", "")
    if settings.get("negative"):
        text += f"\nNegative prompt: {settings['negative']}"
    return f"{text}\n{line}"


def _quote(value) -> str:
    value = f"{value:g}" if isinstance(value, float) else str(value)
    return json.dumps(value) if ("," in value or ":" in value or '"' in value) else value


_FIELD = re.compile(r'\s*([\w \-/+]+):\s*("(?:\\.|[^\\"])*"|[^,]*)(?:,|$)')


def parse_a1111(text: str) -> dict:
    """A1111's `parameters` text -> minildm's settings keys (those it can say; unknown fields are dropped)."""
    lines = text.strip().split("\n")
    fields = {}
    if lines and re.match(r"\s*Steps:", lines[-1]):
        for key, value in _FIELD.findall(lines.pop()):
            fields[key.strip()] = json.loads(value) if value.startswith('"') else value.strip()
    prompt, negative = [], []
    for line in lines:
        if line.startswith("Negative prompt:") or negative:
            negative.append(line.removeprefix("Negative prompt:").lstrip() if not negative else line)
        else:
            prompt.append(line)
    settings = {"prompt": "\n".join(prompt), "negative": "\n".join(negative)}
    sampler = fields.get("Sampler", "")
    karras = sampler.endswith(" Karras") or fields.get("Schedule type") == "Karras"
    sampler = sampler.removesuffix(" Karras")
    by_name = {v: k for k, v in A1111_SAMPLERS.items()}
    settings.update(sampler=by_name.get(sampler), karras=karras)
    for key, name, kind in (("Steps", "steps", int), ("CFG scale", "guidance", float), ("Seed", "seed", int),
                            ("Denoising strength", "strength", float)):
        try:
            settings[name] = kind(fields[key])
        except (KeyError, ValueError):
            pass
    size = re.fullmatch(r"(\d+)x(\d+)", fields.get("Size", ""))
    if size:
        settings["width"], settings["height"] = int(size[1]), int(size[2])
    interval = re.fullmatch(r"([\d.]+)-([\d.]+)", fields.get("Guidance interval", ""))
    if interval:
        settings["guidance_interval"] = [float(interval[1]), float(interval[2])]
    return settings


def read_settings(path) -> dict:
    """The settings in a PNG: minildm's JSON when it is there, else A1111's `parameters`; ValueError when
    the file is not an image or holds neither."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            text = dict(getattr(image, "text", {}) or {})
    except (UnidentifiedImageError, OSError) as e:
        raise ValueError(f"{os.path.basename(str(path))} is not an image minildm can read ({type(e).__name__})")
    if "minildm" in text:
        try:
            settings = json.loads(text["minildm"])
            if isinstance(settings, dict):
                return settings
        except json.JSONDecodeError:
            pass
    if "parameters" in text:
        return parse_a1111(text["parameters"])
    raise ValueError(f"{os.path.basename(str(path))} holds no settings (no 'minildm' or 'parameters' text chunk)")


def save_png(image, path: str, settings: dict):
    """Write a PIL image as a PNG with `settings` in its text chunks, atomically (a temporary file renamed
    over it). Settings with a prompt also get A1111's `parameters`."""
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    info.add_text("minildm", json.dumps(settings))
    if "prompt" in settings and "steps" in settings:
        info.add_text("parameters", a1111_parameters(settings))
    for k, v in settings.items():
        info.add_text(k, str(v))
    tmp = f"{path}.tmp-{os.getpid()}.png"
    try:
        image.save(tmp, pnginfo=info)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
