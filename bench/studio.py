"""The studio on a CPU: how long the first image takes, what the live preview costs, how soon Stop stops.

    preview     sampling with the studio's live preview (Studio.generate: a decoded x0 whenever the
                preview's budget allows, else nothing new) against the same image made by
                LatentDiffusion.generate with no callback, as `python -m minildm.sample` makes it;
                sides alternate, `--repeat` times each, the median ratio is the preview's cost
    first       `python -m minildm.studio` from the shell until the page answers (imports, loading the
                model), then in headless Chromium: type the prompt, press Generate, until the image is
                shown; and the time to the first preview in the page
    stop        with Stable Diffusion weights: press Generate (DDIM 50), press Stop at step 2, the
                seconds until the page says it stopped (at most one step's time is the promise)

Cases: the CIFAR run (--cifar RUN: DDIM 50 at 32x32, the VAE decodes previews) and Stable Diffusion at
its size with random weights in the real layout (bench/fast_cpu.py's files in --work): the fast path
(LCM-LoRA, 4 LCM steps, guidance 1, TAESD) and DDIM with the VAE (--sd-steps steps).

    flock ../heavy.lock python bench/studio.py --cifar runs/cpu60h                 # everything
    python bench/studio.py --cifar runs/cpu60h --cases preview --no-sd --repeat 1  # a quick look
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from minildm.studio import Request, Studio  # noqa: E402
from minildm.studio import browser  # noqa: E402

PROMPT = "a photo of a horse"


def preview_cost(studio: Studio, request: Request, repeat: int):
    """(seconds plain, seconds with the studio's preview, decoded previews per image), medians. Both run on
    the studio's one model thread (the bench's own thread runs no kernel: a second OpenMP team would
    slow both, see session.py)."""
    model = studio.model
    r = studio.check(request)
    plain, live, previews = [], [], []
    for _ in range(repeat):
        start = time.perf_counter()             # on the studio's model thread, as its own images are made
        studio.on_model_thread(model.generate, r.prompt, num_steps=r.steps, sampler=r.sampler,
                               guidance_scale=r.guidance, guidance_interval=studio.guidance_interval, seeds=[r.seed])
        plain.append(time.perf_counter() - start)
        start = time.perf_counter()
        events = list(studio.generate(r))
        live.append(time.perf_counter() - start)
        previews.append(sum(1 for e in events if e.kind == "step" and e.preview_kind == "decoded"))
    return statistics.median(plain), statistics.median(live), statistics.median(previews)


def first_image(flags, form: dict, work: str):
    """(seconds until the page answers, then for the first and the second press of Generate: seconds to
    the first step shown, to the image shown)."""
    start = time.perf_counter()
    with browser.studio_server(*flags, "--out", os.path.join(work, "out"), port=browser.free_port(),
                               log=os.path.join(work, "server.log"), timeout=600) as (url, _):
        ready = time.perf_counter() - start
        with browser.browser_page() as page:
            page.goto(url)
            if "sampler" in form:
                page.locator("#sampler input").fill(form.pop("sampler"))
                page.keyboard.press("Enter")
            page.locator("#prompt textarea").fill(PROMPT)
            for elem_id, value in form.items():
                browser.set_number(page, elem_id, value)
            times = []
            for run in (1, 2):                  # the first image of the process, then the next
                page.click("#generate")
                clicked = time.perf_counter()
                page.wait_for_function(f"() => {{ const s = document.querySelector('#status-text');"
                                       f" return s.dataset.run == '{run}' && /step [0-9]+ of/.test(s.innerText); }}",
                                       timeout=600000)
                preview = time.perf_counter() - clicked
                page.wait_for_function(f"() => {{ const s = document.querySelector('#status-text');"
                                       f" return s.dataset.run == '{run}' && s.innerText.startsWith('Done'); }}",
                                       timeout=1200000)
                times += [preview, time.perf_counter() - clicked]
    return (ready, *times)


def stop_latency(flags, work: str):
    """Seconds from pressing Stop (at step 2 of DDIM 50) to the page saying it stopped; and one step's time."""
    with browser.studio_server(*flags, "--out", os.path.join(work, "out"), port=browser.free_port(),
                               log=os.path.join(work, "server.log"), timeout=600) as (url, _):
        with browser.browser_page() as page:
            page.goto(url)
            page.locator("#prompt textarea").fill(PROMPT)
            browser.set_number(page, "steps", 50)
            browser.set_number(page, "seed", 1)
            page.click("#generate")
            page.wait_for_function("() => /step 1 of 50/.test(document.querySelector('#status-text').innerText)",
                                   timeout=600000)
            t1 = time.perf_counter()
            page.wait_for_function("() => /step 2 of 50/.test(document.querySelector('#status-text').innerText)",
                                   timeout=600000)
            step = time.perf_counter() - t1
            page.click("#stop")
            pressed = time.perf_counter()
            page.wait_for_function("() => document.querySelector('#status-text').innerText.startsWith('Stopped')",
                                   timeout=600000)
            return time.perf_counter() - pressed, step, page.locator("#status-text").inner_text()


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cifar", default="runs/cpu60h", help="a CIFAR training run")
    p.add_argument("--work", default="/tmp/minildm-fast-cpu", help="bench/fast_cpu.py's files (made if missing)")
    p.add_argument("--cases", nargs="+", default=["preview", "first", "stop"], choices=["preview", "first", "stop"])
    p.add_argument("--no-sd", action="store_true", help="only the CIFAR run")
    p.add_argument("--sd-steps", type=int, default=10, help="DDIM steps of the SD case with the VAE")
    p.add_argument("--repeat", type=int, default=3)
    args = p.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}",
          flush=True)
    sd = None
    if not args.no_sd:
        import fast_cpu

        ckpt, lora, taesd = fast_cpu.files(args.work, "sd15")
        sd = {"ckpt": ckpt, "lora": lora, "taesd": taesd}

    if "preview" in args.cases:
        print("\n| model, sampler | decoder of the previews | one preview (s) | plain (s) | with the live preview (s) "
              "| cost | decoded previews per image |\n|---|---|---|---|---|---|---|", flush=True)
        rows = [("CIFAR run, DDIM 50", Studio([], os.path.dirname(args.cifar)), args.cifar,
                 Request(prompt=PROMPT, seed=1))]
        if sd:
            rows.append(("SD v1.5 size, LCM-LoRA 4 steps, bfloat16", Studio([sd["ckpt"]], "/nonexistent", taesd=sd["taesd"],
                         loras=[(sd["lora"], 1.0)]), sd["ckpt"], Request(prompt=PROMPT, seed=1, sampler="lcm")))
            rows.append((f"SD v1.5 size, DDIM {args.sd_steps}, bfloat16", Studio([sd["ckpt"]], "/nonexistent"),
                         sd["ckpt"], Request(prompt=PROMPT, seed=1, steps=args.sd_steps)))
        for name, studio, path, request in rows:
            with tempfile.TemporaryDirectory() as out:
                studio.out = out
                studio.use(path)
                plain, live, previews = preview_cost(studio, request, args.repeat)
            decoder = studio.defaults()["decoder"]
            print(f"| {name} | {decoder} | {studio.preview_cost:.3f} | {plain:.2f} | {live:.2f} | "
                  f"{live / plain - 1:+.1%} | {previews:g} |", flush=True)
            studio.model = None

    if "first" in args.cases:
        print("\n| model | page ready after start (s) | Generate to first step shown (s) | Generate to image shown (s) |"
              " the next image: first step, image shown (s) |\n|---|---|---|---|---|", flush=True)
        rows = [("CIFAR run, DDIM 50, 32x32", ["--ckpt", args.cifar, "--runs-dir", "/nonexistent"], {"seed": 1})]
        if sd:
            rows.append(("SD v1.5 size, LCM-LoRA 4 steps, TAESD, 512x512",
                         ["--ckpt", sd["ckpt"], "--runs-dir", "/nonexistent", "--lora", sd["lora"], "--taesd", sd["taesd"]],
                         {"sampler": "lcm", "seed": 1}))
        for name, flags, form in rows:
            with tempfile.TemporaryDirectory() as work:
                ready, preview, shown, preview2, shown2 = first_image(flags, dict(form), work)
            print(f"| {name} | {ready:.1f} | {preview:.1f} | {shown:.1f} | {preview2:.1f}, {shown2:.1f} |", flush=True)

    if "stop" in args.cases and sd:
        with tempfile.TemporaryDirectory() as work:
            latency, step, text = stop_latency(["--ckpt", sd["ckpt"], "--runs-dir", "/nonexistent"], work)
        print(f"\nStop with SD v1.5 size, DDIM 50 (bfloat16, VAE): pressed at step 2, the page said it stopped "
              f"{latency:.1f} s later (one step: {step:.1f} s): \"{text}\"", flush=True)


if __name__ == "__main__":
    main()
