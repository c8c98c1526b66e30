"""python -m minildm.studio.screenshots: the pictures of the studio in the README and lesson 08, made by
the browser code the tests use (browser.py), on your newest run or any --ckpt.

    python -m minildm.studio.screenshots                       # -> lessons/images/studio-*.png
    python -m minildm.studio.screenshots --ckpt runs/cpu60h --prompt "a photo of a horse" --seed 3
"""
from __future__ import annotations

import argparse
import os
import tempfile

from ..cli import Parser, check_int, check_writable_dir

IMAGES = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "lessons",
                      "images")


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog="python -m minildm.studio.screenshots", formatter_class=argparse.ArgumentDefaultsHelpFormatter,
               description="Screenshots of the studio's two tabs, taken in headless Chromium.")
    p.add_argument("--ckpt", default=None, help="the model to show (default: the newest run in --runs-dir)")
    p.add_argument("--runs-dir", default="runs", help="where `python -m minildm.train` writes runs")
    p.add_argument("--prompt", default="a photo of a horse", help="the prompt typed into the page")
    p.add_argument("--seed", type=int, default=3, help="the seed typed into the page")
    p.add_argument("--out", default=IMAGES, help="folder for studio-generate.png and studio-inside.png")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    check_int("--seed", args.seed, 0)
    check_writable_dir("--out", args.out)
    from . import browser

    port = browser.free_port()
    flags = ["--runs-dir", args.runs_dir] + (["--ckpt", args.ckpt] if args.ckpt else [])
    with tempfile.TemporaryDirectory() as work:
        with browser.studio_server(*flags, "--out", work, port=port, log=os.path.join(work, "server.log"),
                                   timeout=600) as (url, _), \
                browser.browser_page(width=1280, height=1000) as page:
            page.goto(url)
            browser.generate(page, args.prompt, seed=args.seed, count=4, timeout=3600)
            os.makedirs(args.out, exist_ok=True)
            generate_png = os.path.join(args.out, "studio-generate.png")
            page.screenshot(path=generate_png, full_page=True)
            page.click("#tab-inside-button")
            for button, panel in (("#filmstrip-button", "#filmstrip"), ("#attention-button", "#attention"),
                                  ("#compare-button", "#compare"), ("#arithmetic-button", "#arithmetic")):
                page.click(button)
                page.wait_for_function(f"() => {{ const i = document.querySelector('{panel} img');"
                                       " return i && i.complete && i.naturalWidth > 0; }", timeout=3600000)
            inside_png = os.path.join(args.out, "studio-inside.png")
            page.screenshot(path=inside_png, full_page=True)
    print(generate_png)
    print(inside_png)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
