"""The studio: a local web page to experiment with any model minildm loads, and to watch it work.

    python -m minildm.studio                               your training runs (newest first)
    python -m minildm.studio --ckpt v1-5-pruned-emaonly.safetensors --taesd taesd/
    python -m minildm.studio --ckpt sd-image-variations-diffusers/ --clip clip-vit-large-patch14/
    python -m minildm.studio --image-adapter photo-prompts.safetensors      photos as prompts for your run

It needs the optional dependencies: `pip install -r requirements-studio.txt` (Gradio).

In files: session.py (what the page does, in plain Python: models, generation with a live preview and
a stop, the history, the views on the last image), page.py (the Gradio page around it), cli.py (the
command line), browser.py (a headless Chromium that drives the page: the tests and the screenshots).
"""
from .session import Event, PreviewBudget, Request, Studio  # noqa: F401
