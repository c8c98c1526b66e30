"""One source for every number: each measured figure the course states is checked against where it comes from.

The pages checked are every lesson (lessons/*.md, their README, glossary and notation included), the
README, and the markdown cells of the notebooks (read as JSON, never written). On each page the checker
finds every figure that looks measured (`figures` below says exactly what counts: a number with a unit
of time, dB, %, a ratio such as 1.07x or 12×, a throughput, a size such as GB, GFLOP, 8.5M or "N
parameters"; every number written with a decimal point or a thousands separator; a number in scientific
form other than a bare power of ten). Fenced and indented code blocks, inline code spans, link targets and
heading numbers are skipped; math is not (a figure in $...$ is still a figure).

Every figure found must be accounted for in exactly one of three ways:

(a) QUOTES: a sentence or table row as the page states it, with its numbers as {placeholders} read from a
    bench/*.json record the benchmark wrote; the page must contain the sentence filled in with the
    recorded values, formatted as the page rounds them.
(b) SOURCED: a short context on the page (the figure with a few words around it) and its source: a
    passage of bench/RESULTS.md (the one place prose results live; `table(header)` names a whole table
    there), or "notebook NN": the committed outputs of that chapter's notebook. Every number of the
    context must be a number of the source, as the page rounds it (to its decimals, a whole number
    ending in zeros to its last non-zero digit; a percentage may be the source's fraction). A notebook
    without committed outputs skips its check, and says so.
(c) NOT_MEASURED: a context and why its figures are not measurements: a definition, a setting, an
    architecture's size, arithmetic on other figures, an estimate. When the reason says "checked by
    tests/X.py", the figure's numbers must appear in that test file.

A context may be `table(first line)`: the whole markdown table from that line, for tables whose figures
all come from one place; a context inside such a table overrides it for its own figures. A table sourced
to tables of bench/RESULTS.md is checked row by row: the figures of one row must all be in one source row. An unaccounted
figure fails with its page, line and the figure, and says what to do. PENDING lists notebook markdown
that still has to change (the notebooks are edited by hand, elsewhere): the old text's figures count as
accounted, a separate test fails until the new text has replaced it, and the new text's figures are then
checked against the source given. All of this is text processing: no model runs, no torch.
"""
import json
import re
import sys
from decimal import ROUND_HALF_UP, Decimal
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "notebooks"))
import build  # noqa: E402  (notebooks/build.py: which notebook is which, and what a cell printed)
PAGES = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "lessons").glob("*.md")) + ["README.md"] + sorted(
    str(p.relative_to(ROOT)) for p in (ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb"))
RESULTS = "bench/RESULTS.md"


class Table(str):
    """A context that stands for a whole markdown table: the line it starts with and the rows after it."""


def table(first_line: str) -> Table:
    return Table(first_line)


def at(record: dict, path: str):
    """record["a"]["b"]... for the path "a/b/..."; list items by index."""
    value = record
    for part in path.split("/"):
        value = value[int(part)] if isinstance(value, list) else value[part]
    return value


def results(*passages):
    """A SOURCED entry's source: passages (or tables) of bench/RESULTS.md that hold its numbers."""
    return ("RESULTS", passages)


def notebook(chapter: str):
    """A SOURCED entry's source: what notebook NN printed, as committed."""
    return ("notebook", chapter)


# ----------------------------------------------------------------------------------------------------------
# (a) QUOTES: figures read from the bench/*.json records.

EVAL = "bench/train_cifar_cpu60h_eval.json"           # python -m minildm.evaluate runs/cpu60h (n = 100)
INTERVAL = "bench/guidance_interval_cpu60h.json"      # bench/guidance_sweep.py runs/cpu60h --intervals ...
FINETUNE = "bench/finetune.json"                      # bench/finetune.py runs/cpu60h --n 20
SWEEP = "bench/guidance_sweep.json"                   # bench/guidance_sweep.py runs/cpu60g --n 30
SHAPES = "bench/prompt_shapes.json"                   # bench/prompt_shapes.py runs/cpu60h --n 20
EVERY_STEP, PRESET = "rows/0", "rows/4"               # INTERVAL's rows: 7.5 on every step, 7.5 on 0-800


def row(prefix):
    """The seven columns of lesson 06's table for one INTERVAL row."""
    return [(INTERVAL, f"{prefix}/{key}", fmt) for key, fmt in (
        ("accuracy", ".2f"), ("unseen_accuracy", ".2f"), ("worst_class_over_judge", ".2f"), ("fd_over_real", ".1f"),
        ("precision", ".2f"), ("recall", ".2f"), ("coverage", ".2f"))]


# (page, text with {0}, {1}, ... for the numbers, [(record, key path, format), ...])
QUOTES = [
    ("lessons/06_training.md", "| every step | **{0}** | **{1}** | {2} | {3} | {4} | {5} | {6} |",
     [(EVAL, "mean/accuracy", ".2f"), (EVAL, "mean/unseen_accuracy", ".2f"), (EVAL, "worst_class_over_judge", ".2f"),
      (EVAL, "mean/fd_over_real", ".1f"), (EVAL, "mean/precision", ".2f"), (EVAL, "mean/recall", ".2f"),
      (EVAL, "mean/coverage", ".2f")]),
    ("lessons/06_training.md", "| timesteps 0-800 only (the preset's guidance interval, below) | {0} | {1} | {2} | {3} "
     "| {4} | {5} | {6} |", row(PRESET)),
    ("lessons/06_training.md", "| the VAE's reconstructions of real photos (the floor) | | | | {0} | {1} | {2} | {3} |",
     [(INTERVAL, "vae_floor/fd_reconstructed_over_real", ".1f"), (INTERVAL, "vae_floor/precision_reconstructed", ".2f"),
      (INTERVAL, "vae_floor/recall_reconstructed", ".2f"), (INTERVAL, "vae_floor/coverage_reconstructed", ".2f")]),
    ("lessons/06_training.md", "the prompted class {0} of the time, {1}x the judge's {2} on",
     [(EVAL, "mean/accuracy", ".2f"), (EVAL, "accuracy_over_judge", ".2f"), (EVAL, "judge/held_out_accuracy", ".3f")]),
    ("lessons/06_training.md", "the template was drawn as its class {0} of the time at\n$w = 1.5$ and {1} at $w = 7.5$, "
     "while recall fell from {2} to {3}",
     [(SWEEP, "rows/0/accuracy", ".2f"), (SWEEP, "rows/4/accuracy", ".2f"), (SWEEP, "rows/0/recall", ".2f"),
      (SWEEP, "rows/4/recall", ".2f")]),
    ("lessons/06_training.md", "the template's class accuracy {0} → {1} and recall {2} → {3}",
     [(INTERVAL, f"{EVERY_STEP}/accuracy", ".2f"), (INTERVAL, f"{PRESET}/accuracy", ".2f"),
      (INTERVAL, f"{EVERY_STEP}/recall", ".2f"), (INTERVAL, f"{PRESET}/recall", ".2f")]),
    ("lessons/06_training.md", "**The bare word and \"a cat in a hat\"**: {0} each, as the template ({1} at 20 per class)",
     [(SHAPES, "shapes/in a hat/mean", ".2f"), (SHAPES, "shapes/template/mean", ".2f")]),
    ("lessons/06_training.md", "The judge's class histogram has {0} bits of entropy\n  ({1} for the empty prompt",
     [(SHAPES, "no class word/entropy_bits", ".2f"), (SHAPES, "empty prompt/entropy_bits", ".2f")]),
    ("lessons/06_training.md", "empty prompt {0} and {1})",
     [(SHAPES, "empty prompt/histogram/cat", ".0%"), (SHAPES, "empty prompt/histogram/dog", ".0%")]),
    ("lessons/06_training.md", "(the first {0}, the second {1};",
     [(SHAPES, "two classes/first", ".0%"), (SHAPES, "two classes/second", ".0%")]),
    ("lessons/06_training.md", "its samples show the asked class {0} of the time, {1} for phrasings it never saw\n"
     "(guiding every step; {2} and {3} at the preset's guidance interval)",
     [(EVAL, "mean/accuracy", ".0%"), (EVAL, "mean/unseen_accuracy", ".0%"), (INTERVAL, f"{PRESET}/accuracy", ".0%"),
      (INTERVAL, f"{PRESET}/unseen_accuracy", ".0%")]),
    ("README.md", "gave that class {0} of the time and the unseen phrasings {1} (a\n  judge that is right on {2} of real "
     "held-out photos",
     [(INTERVAL, f"{PRESET}/accuracy", ".0%"), (INTERVAL, f"{PRESET}/unseen_accuracy", ".0%"),
      (INTERVAL, "judge_held_out_accuracy", ".0%")]),
    ("README.md", "(guiding every step: {0} and {1}, k-NN recall {2} instead of {3})",
     [(INTERVAL, f"{EVERY_STEP}/accuracy", ".0%"), (INTERVAL, f"{EVERY_STEP}/unseen_accuracy", ".0%"),
      (INTERVAL, f"{EVERY_STEP}/recall", ".2f"), (INTERVAL, f"{PRESET}/recall", ".2f")]),
    ("README.md", "(recall {0} against real photos' {1})",
     [(INTERVAL, f"{PRESET}/recall", ".2f"), (INTERVAL, "real_reference/recall_real", ".2f")]),
    ("README.md", "reconstructions of real photos are\n  {0} times as far as real photos",
     [(INTERVAL, "vae_floor/fd_reconstructed_over_real", ".1f")]),
    ("README.md", "the samples {0} times.", [(INTERVAL, f"{PRESET}/fd_over_real", ".1f")]),
]

# Lesson 11's table: every cell of the fine-tuning cases, and the references.
ROWS_11 = [("| base model | | | {0}, {1} | {2}, {3} |", "base"),
           ("| LoRA (UNet attention) | the 20 grey photos only | {4} | {0}, {1} | **{2}**, {3} |", "LoRA, grey only"),
           ("| LoRA (UNet attention) | grey + colour | {4} | {0}, {1} | {2}, {3} |", "LoRA"),
           ("| LoRA + text encoder (`--text-encoder`) | grey + colour | {4} | **{0}**, {1} | {2}, {3} |",
            "LoRA + text encoder"),
           ("photo of a …\") | the grey photos | {4} | {0}, {1} | {2}, {3} (unchanged) |", "word <bw>")]
for text, name in ROWS_11:
    QUOTES.append(("lessons/11_fine_tuning.md", text,
                   [(FINETUNE, f"cases/{name}/style/saturation", ".3f"), (FINETUNE, f"cases/{name}/style/class", ".2f"),
                    (FINETUNE, f"cases/{name}/plain/saturation", ".3f"), (FINETUNE, f"cases/{name}/plain/class", ".2f"),
                    (FINETUNE, f"cases/{name}/seconds", ".0f")]))
QUOTES.append(("lessons/11_fine_tuning.md",
               "| *real held-out photos* | | | *grey: 0, judge {0}* | *colour: {1}, judge {2}* |",
               [(FINETUNE, "references/held-out photos in black and white/class", ".2f"),
                (FINETUNE, "references/held-out photos/saturation", ".3f"),
                (FINETUNE, "references/held-out photos/class", ".2f")]))


def case(name, prompt, key, fmt):
    """One recorded figure of a fine-tuning case of bench/finetune.json."""
    return (FINETUNE, f"cases/{name}/{prompt}/{key}", fmt)


QUOTES += [
    ("lessons/11_fine_tuning.md", "Both prompts drop from {0} to {1}:",
     [case("base", "style", "saturation", ".2f"), case("LoRA, grey only", "style", "saturation", ".3f")]),
    ("lessons/11_fine_tuning.md", "prompts equally ({0} against {1})",
     [case("LoRA", "style", "saturation", ".3f"), case("LoRA", "plain", "saturation", ".3f")]),
    ("lessons/11_fine_tuning.md", "less colourful than the plain one ({0} against {1})",
     [case("LoRA + text encoder", "style", "saturation", ".3f"), case("LoRA + text encoder", "plain", "saturation", ".3f")]),
    ("lessons/11_fine_tuning.md", "loses some colour ({0} to {1}), and both lose class accuracy ({2} to {3} and\n  {4}; "
     "the judge itself is right on {5} of real grey photos)",
     [case("base", "plain", "saturation", ".3f"), case("LoRA + text encoder", "plain", "saturation", ".3f"),
      case("base", "style", "class", ".2f"), case("LoRA + text encoder", "style", "class", ".2f"),
      case("LoRA + text encoder", "plain", "class", ".2f"),
      (FINETUNE, "references/held-out photos in black and white/class", ".2f")]),
    ("lessons/11_fine_tuning.md", "model's ({0}, {1}), and with it the samples move only from {2} to {3}.",
     [case("word <bw>", "plain", "saturation", ".3f"), case("word <bw>", "plain", "class", ".2f"),
      case("base", "style", "saturation", ".3f"), case("word <bw>", "style", "saturation", ".3f")]),
]

# ----------------------------------------------------------------------------------------------------------
# (b) SOURCED: figures that bench/RESULTS.md or a notebook's committed outputs hold.

ONE_HOUR = (table("| | `cpu60g` (4 text layers, bfloat16 attention) | `cpu60h` (2 text layers, float32 attention) |"),)
FAST_RUNS = table("| size | case | minildm (s) | diffusers (s) | ratio |")       # run 1 and run 2 of bench/fast_cpu.py
PARTS = table("| part (SD v1.5 sizes, 512×512) | float32 (s) |")                # bench/fast_cpu.py --components
FIDELITY = table("| | latents: relative difference (median, max) |")          # bench/fast_cpu.py --fidelity
FIRST_IMAGE = table("| model | run | page answers after start (s) |")          # bench/studio.py
PREVIEW = table("| model, sampler | previews decoded by | run |")               # bench/studio.py

SOURCED = {
    "lessons/03_unet.md": [
        (table("| block | layers | in (C, h, w) | out (C, h, w) | parameters |"), notebook("03")),
        ("(about 1% of the\nUNet's CPU time)", results("−1.3% CPU time")),
        ("took 21.5 s in minildm and 22.3 s in diffusers, a ratio of 0.96 (0.94 in CPU time)",
         results(table("| code at 4eb07d9 | minildm | diffusers |"))),
    ],
    "lessons/05_vae.md": [
        ("held-out PSNR is 26.5 dB at", notebook("05")),
        ("(KL about 1,160 nats\nper image, posterior std 0.13), 25.0 dB at", notebook("05")),
        ("and 19.4 dB\nat", notebook("05")),
        ("L1\nreached 19.4 dB where L2 reached 26.4 dB", results("L1 lags far behind: 19.4 against 26.4 dB")),
        ("the two tied (19.2 and 19.1 dB", results("reached 19.2 dB with L1 and 19.1 dB with squared error")),
        ("held-out PSNR went from 26.45 to 25.88 dB", results(table("| | without | with discriminator |"))),
        ("chance (hinge loss 0.975 of a possible 1.0), yet the adaptive weight (13.6)",
         results(table("| | without | with discriminator |"))),
        ("On 4,500 CIFAR-10 photos (the notebook's section 6\nmodel, 1,500 steps)",
         results("1,500 steps on 4,500 training photos")),
        ("(hinge loss 0.54); PSNR fell from\n24.60 to 22.64 dB", results(table("| | without | with discriminator |"))),
        (table("| candidate: channels per level, ResNet blocks | parameters |"),
         results(table("| channels per level, blocks | parameters |"))),
        (table("| batch | loss | steps in 4 min |"), results(table("| batch | loss | learning rate | Adam betas |"))),
        ("gains almost 3 dB", results("gains about 3 dB")),
        ("scored 19.8 dB with L1 against 20.9 dB", results(table("| batch | loss | learning rate | Adam betas |"))),
        ("trained 9\nminutes by the", results("both VAEs trained 9 minutes")),
        ("about 2,940 steps", results("| 8x8x4 | 2,940 |")),
        (table("| latent | compression | held-out PSNR |"), results(table("| latent | steps in 9 min | held-out PSNR |"))),
        ("(The judge reads 78.6% of the real photos right and 25.4% of them blurred",
         results("photos 78.6%, 4x4-blurred", "photos 25.4%")),
    ],
    "lessons/06_training.md": [
        ("a VAE (21.5 dB on its training images)", notebook("06")),
        ("(0.83, 0.99x)", results("**0.83 = 0.99x** the template")),
        ("The worst class is drawn 0.69 times", results("(worst class 0.69x, dog)")),
        ("(10.1\nfor the floor, 11.6 for the samples): a 12-minute VAE at 27.3 dB",
         results(table("| guidance at timesteps | template | unseen |"), *ONE_HOUR)),
        ("the floor's\nis 0.51, the samples' 0.13", results(table("| guidance at timesteps | template | unseen |"))),
        ("a model that has seen 8.6 epochs", results(*ONE_HOUR)),
        ("(80.6% against 78.4% on", results("78.4% of the 5,000 held-out photos and on 80.6% of 100 training photos")),
        ("(`judge.copies`: 1.5% of the samples were\nnearer than all but 1% of held-out photos",
         results("1.5% of samples nearer than all but 1% of held-out photos")),
        ("self-attention cost 40% of a step", results("attention cost 40% of a step")),
        ("30 minutes of stage 2 drew the prompted class 18.8% of the time (guidance 3, and 18.8%\nat 5 too)",
         results(table("| guidance | class accuracy (chance 10%) |"), "30 minutes each")),
        ("drew it 0.63 of the time",
         results("| changes 1-4, one hour in all, guidance 7.5 (the sampler's default) | 5.0 | 0.63 |")),
        ("11 minutes of stage 2 each, 30 samples per class were the prompted\nclass 0.30 of the time with the weights "
         "against 0.24 without", results("(11 minutes of stage 2\neach", "gave 0.30 against 0.24")),
        ("differ by 0.003 per pixel on average", results("differ by 0.003 per\npixel")),
        ("does (0.55; the judge recognises real cats 0.54 of the", results("(cat 0.55, as the template's cat; the judge's "
                                                                          "on real cats is 0.54)")),
        ("(39% and 35%;", results("cats 39%\nand dogs 35%")),
        ("drawn as their class 0.99x as", results("**0.83 = 0.99x** the template")),
        ("float32 2,090 steps,\nheld-out PSNR 26.47 dB; bfloat16 2,950 steps, 27.08 dB",
         results("float32 2,090 steps, held-out PSNR 26.47 dB; bfloat16 2,950 steps, **27.08 dB**")),
        ("attention, 1.16x faster (1.23x in a first run", results("(**1.16x**; 1.23x in a first run")),
        ("28.25 dB in 12 bfloat16 minutes against 28.15 dB in 18 float32 minutes, stage 2 got 6,533 steps "
         "instead\nof 4,909, "
         "and class accuracy rose from 0.74 to 0.85",
         results(table("| | `cpu60e` (float32, 18 min VAE) | `cpu60f` (bfloat16 autocast, 12 min VAE) |"))),
        ("bfloat16 autocast, 12 minutes for the VAE\")", results("bfloat16 autocast, 12 minutes for the VAE")),
        ("the class probe read 42% at step 4,000 with four layers and 44% with two",
         results("44% at step 4,000 in both runs", "42% at step\n4,000")),
        ("the hour held 46% more steps: 6,021 instead of 4,115", results("46% more\ndiffusion steps on the same machine "
                                                                          "(6,021 against 4,115)")),
        ("give a VAE with 27.3 dB held-out PSNR", results(*ONE_HOUR)),
        ("6,021 steps, 8.6 epochs", results(*ONE_HOUR)),
        ("loss ends at 0.089", results("losses: 0.089")),
        ("flattened at 0.19", results("0.18-0.19 (from 0.99")),
    ],
    "lessons/08_views.md": [
        ("SD's VAE (2.7-3.3 s a decode)", results(PREVIEW)),
    ],
    "lessons/09_break_it.md": [
        ("a distance of about 0.07:", notebook("09")),
        ("| distance to the upper moon's data | 0.40 | 0.03 | 0.26 | 0.39 |", notebook("09")),
        ("(distance\nabout 0.05 against 0.07)", notebook("09")),
        ("| distance | 0.067 | 0.11 | 0.095 |", notebook("09")),
        ("$\\bar\\alpha_{500}$ is 0.078 there and 0.276 in", notebook("09")),
        ("distance 1.55 instead of 0.06", notebook("09")),
        ("give a distance of about 0.09", notebook("09")),
        ("(decay 0.99) about 0.05", notebook("09")),
    ],
    "lessons/10_fast_sampling.md": [
        ("a UNet call 5.1 s → 3.3 s (batch 1)", results(PARTS)),
        ("14.2 s → 0.9 s (float32; bfloat16 7.0 s → 0.5 s)", results(PARTS)),
        ("3.3 s in bfloat16 against 5.1 s in float32", results(PARTS)),
        ("weights\n3.28 s, autocast 3.17 s", results(PARTS)),
        ("(1.43% relative in the noise prediction)", results(PARTS)),
        ("weights win (7.0 s\nagainst 7.9 s)", results(PARTS)),
        ("(a peak of 4.55 GB against 6.54 GB for the whole", results("(process peak 4.55 GB against 6.54 GB)")),
        ("by 1.2% (median, at most 2.3%), and the images\nby a PSNR of 50.3 dB (median; the worst 44.4 dB)",
         results(FIDELITY)),
        ("(50.5 dB)", results(FIDELITY)),
        ("at full resolution: 14 seconds on this CPU in float32", results(PARTS)),
        ("decodes 512×512 in 0.5 s in bfloat16 (0.9 s in float32)", results(PARTS)),
        (table("| 512×512 | minildm | diffusers |"), results(FAST_RUNS)),
        ("takes 18.7 s from the shell", results("**18.7 s** at 512×512, **9.3 s** at")),
        ("(9.3 s at\n256×256)", results("**18.7 s** at 512×512, **9.3 s** at")),
        ("four calls of 3.3 s each", results(PARTS)),
    ],
    "lessons/11_fine_tuning.md": [
        ("(45-58 s, 2 CPU cores; the command line with loading 46-64 s), and a file of 0.31 MB",
         results(table("| case | trained on | seconds |"), "took 64 s and 46 s and wrote files of 0.31 MB")),
        ("or 1.4 kB (the word)", results("and 1.4 kB")),
    ],
    "lessons/12_images_as_prompts.md": [
        ("trains the two towers on 11,000 CIFAR-10 photos", notebook("12")),
        ("falls from 5.07 to 4.17 (mean of the last 50 steps) in 500 steps, and `logit_scale` grows to a scale of\n12.1",
         notebook("12")),
        ("held-out photos right 0.39 of the time", notebook("12")),
        ("before training 0.10)", notebook("12")),
        ("bird (0.12) and cat (0.17), the strongest ship (0.54) and horse (0.50)", notebook("12")),
        (table("| mean cosine | before training | trained |"), notebook("12")),
        ("of any class (0.71), than to the caption of its own class\n(0.53)", notebook("12")),
        ("0.53 against 0.37", notebook("12")),
        ("moved from 1.32 to 0.79", notebook("12")),
        ("points almost the same way (1.00)", notebook("12")),
        ("the captions' (−0.05)", notebook("12")),
        (table("| $a$ | 0 | 0.25 | 0.5 | 0.75 | 1 | 1.5 | 2 | 3 |"), notebook("12")),
        ("of its class 0.31 of the time", notebook("12")),
        ("of a given other class 0.08", notebook("12")),
        ("at $a = 1$, 0.36 of the neighbours are of class B and 0.05 of\nclass A, against 0.25 and 0.17", notebook("12")),
        ("0.48 and 0.52 of class B", notebook("12")),
        ("a ship from $a = 0.5$ to $1.5$,\nthe automobile's a horse from $a = 0.75$", notebook("12")),
        ("reached only 1,553 diffusion steps", results("the diffusion model 1,553 steps")),
        (table("| prompt | class accuracy | FD / real | recall | own / another photo |"),
         results(table("| prompt (n = 50 per class) |"))),
        ("the distance ratio is 0.98", results(table("| prompt (n = 50 per class) |"))),
        ("from 0.0844 to 0.0798 in the 1,000 steps", results("its loss 0.0844\n→ 0.0798", "1,000 steps, batch 32")),
        ("trained on (0.27)", results(table("| prompt (n = 50 per class) |"))),
        ("ratio 0.64)", results(table("| prompt (n = 50 per class) |"))),
        ("some of the class (0.22)", results(table("| prompt (n = 50 per class) |"))),
        ("(recall 0.26-0.36 against 0.10)", results(table("| prompt (n = 50 per class) |"))),
    ],
    "README.md": [
        ("0.99 times as often as", results("**0.83 = 0.99x** the template")),
        ("the hour bought\n  1,553 steps and a model that drew the prompted class 27% of the time",
         results("the diffusion model 1,553 steps", table("| prompt (n = 50 per class) |"))),
        ("(6,021 diffusion steps in the hour", results(*ONE_HOUR)),
        ("about 1.5 hours on a card", results("about 1.5 hours")),
        ("(the share of near-copies: about 1% for new images)", results("(new images: about 1%)")),
        ("13.0 s per 512×512 image (3.3 s at 256×256) and 18.7 s for the whole command", results(
            FAST_RUNS, "**18.7 s** at 512×512")),
        ("and 46.7 s for diffusers in float32", results(FAST_RUNS)),
        ("diffusers in bfloat16 with TAESD takes 14.7 s", results(FAST_RUNS)),
        ("(images 54 dB PSNR from float32's", results("53.8 dB PSNR from its float32 one")),
        ("50 dB on the trained CIFAR run", results(FIDELITY)),
        ("page answers about 5 s after the command and shows an image 1.5-1.9 s after Generate", results(FIRST_IMAGE)),
        ("15-16 s at 512×512 with a preview every step", results(FIRST_IMAGE)),
        ("(−7% to +9% of the sampling time", results(PREVIEW)),
    ],
    "notebooks/05_vae.ipynb": [
        ("a posterior whose spread (about 0.13)", notebook("05")),
        ("this budget gives about 24.6 dB on the held-out photos", notebook("05")),
    ],
    "notebooks/06_training.ipynb": [
        ("the samples showed the prompted class 19% of the time", results("prompted class 19% of the time")),
        ("class 85% of the time on a machine with AMX", results("**0.85 = 1.08x**")),
        ("did 6,021 diffusion steps", results(*ONE_HOUR)),
    ],
}

# Notebook markdown that disagrees with its source and has to be rewritten by hand (notebooks are not edited
# here): (notebook, text now, text it should become, source of the new text's figures).
PENDING = [
    ("notebooks/05_vae.ipynb",
     "`python -m minildm.train --dataset cifar --stage vae --max-minutes 30` reaches 27.5 dB on 5,000 held-out\n"
     "images on a 2-core CPU (see `bench/RESULTS.md`).",
     "the VAE stage of `python -m minildm.train --dataset cifar` (12 minutes under bfloat16 autocast) reaches\n"
     "28.25 dB on the 5,000 held-out images on a 2-core CPU with AVX512-BF16 (see `bench/RESULTS.md`).",
     results("**28.25 dB** (scale factor 0.264)", "12 minutes for the VAE", "(5,000) are held")),
    ("notebooks/05_vae.ipynb",
     "Longer training closes most of the gap (27.5 dB after 30\nminutes).",
     "Longer training closes most of the gap (the preset's VAE: 28.25 dB after 12 minutes).",
     results("**28.25 dB** (scale factor 0.264)", "12 minutes for the VAE")),
]

# ----------------------------------------------------------------------------------------------------------
# (c) NOT_MEASURED: figures that are no measurement, and why.

SCHEDULE = "a property of NoiseSchedule.sd()'s betas, computed, not measured"
ARCHITECTURE = "an architecture's size, counted on the meta device (no run)"
SETTING = "a setting (hyperparameter, default or budget), not a result"
ARITHMETIC = "arithmetic on the figures beside it"

NOT_MEASURED = {
    "lessons/README.md": [
        ("Reading a lesson takes 20 to 40 minutes.", "an estimate of reading time, not a run"),
    ],
    "lessons/01_forward_diffusion.md": [
        ("offset $o = 0.008$, $\\beta \\le 0.999$", "the cosine schedule's definition (Nichol & Dhariwal 2021)"),
        ("$\\bar\\alpha_{999} \\approx 0.0047$, i.e. $\\sqrt{\\bar\\alpha_{999}} \\approx 0.068$", SCHEDULE),
        ("runs from 0.0292 at $t=0$ to 14.61 at $t=999$", "SD v1's sigma range, checked by tests/test_schedule.py"),
        ("still contains 6.8% of the signal", SCHEDULE),
        ("an error of standard deviation 0.1 (bottom)", "the notebook's setting for the picture"),
    ],
    "lessons/02_sampling.md": [
        ("a 19k-parameter MLP", ARCHITECTURE + ": ToyConfig.small(), 19,010 parameters"),
        ("it is about 0.5 at $t = 2$, 0.06 at $t = 10$ and between 0.003 and 0.01 from $t = 61$", SCHEDULE),
        ("$\\sqrt{1-\\bar\\alpha_0} \\approx 0.03$", SCHEDULE),
        ("from $\\sigma \\approx 1.3$-$1.6$ to\n$0.03$", SCHEDULE + " (the sigma grids of 3 steps)"),
        ("about 0.2% smaller for SD v1", SCHEDULE + ": 1 - sigma_max / sqrt(1 + sigma_max^2)"),
        ("(7.5 in SD's scripts)", SETTING),
        ("$\\eta$ 0 and 0.5", SETTING),
        ("falling from 0.5 to below 0.01", SCHEDULE + ": the weight lambda_t drawn"),
        ("at eta 0, 0.5 and 1", SETTING),
        ("at $\\eta$ = 0, 0.5 and 1", SETTING),
        ("for w = 0, 1, 3 and 7.5", SETTING),
        ("for $w$ = 0, 1, 3 and 7.5", SETTING),
        ("to $5\\cdot10^{-5}$", "the test's tolerance, checked by tests/test_samplers.py"),
        ("nearest data point below 0.04) and spread like the data (sliced Wasserstein distance below 0.1;",
         "the test's bounds GOOD_NEAR and GOOD_SW, checked by tests/test_toy.py"),
    ],
    "lessons/03_unet.md": [
        ("is a UNet of 859,520,964 parameters", "SD v1.5's UNet, checked by tests/test_unet.py"),
        ("has 859,520,964 parameters, and its keys", "SD v1.5's UNet, checked by tests/test_unet.py"),
        ("three 2× downsamplings", ARCHITECTURE),
        ("(nearest-neighbour 2×, then", ARCHITECTURE),
        ("the middle hold 84% of them", ARCHITECTURE),
        ("forward pass is 803 GFLOP", ARCHITECTURE + ": FlopCounterMode on the meta model, as notebook 03 draws it"),
        ("38% at 64×64, 29% at 32×32,\n27% at 16×16, 6% at 8×8; 52% of it is convolutions and 22% the self-attention",
         ARCHITECTURE + ": the same count by block and by operator"),
        ("1 GiB in float32", ARITHMETIC + ": 4096 x 4096 floats x 4 bytes x batch 2 x 8 heads"),
        ("| `UNetConfig.sd15()` | 859,520,964 |", "SD v1.5's UNet, checked by tests/test_unet.py"),
        ("| `UNetConfig.cifar()` | 35,052,932 |", ARCHITECTURE),
        ("| `UNetConfig.cifar_cpu()` | 8,516,740 |", ARCHITECTURE),
        ("| `UNetConfig.tiny()` | 1,055,044 |", ARCHITECTURE),
    ],
    "lessons/04_text_encoder.md": [
        ("a vocabulary of 49,408 pieces", "CLIP's vocabulary size, a definition"),
        ("where the 49,408 ids come from", "CLIP's vocabulary size, a definition"),
        ("\\mathrm{sigmoid}(1.702\\, a)", "QuickGELU's definition"),
        ("by up to 0.02 (at\n$a \\approx 2.3$)", "a property of the two functions, computed"),
        ("| 37,945,344 |", ARITHMETIC + ": 49,408 x 768"),
        ("| 59,136 |", ARITHMETIC + ": 77 x 768"),
        ("| 12 × 7,087,872 = 85,054,464 |", ARITHMETIC + ": the row's formula"),
        ("| final layer norm | 1,536 |", ARITHMETIC + ": 2 x 768"),
        ("| **total** | **123,060,480** |", "ViT-L/14's text encoder, checked by tests/test_clip_text.py"),
        ("where the 123,060,480 parameters", "ViT-L/14's text encoder, checked by tests/test_clip_text.py"),
        ("15.8M parameters, most of them the embedding table", ARCHITECTURE + ": CLIPTextConfig.small()"),
        ("keeps two of its layers, 14.2M parameters", ARCHITECTURE + ": the cifar-cpu preset's text encoder"),
    ],
    "lessons/05_vae.md": [
        ("then one on 4,500 CIFAR-10 photos", SETTING + ": notebook 05's split of 5,000 photos"),
        ("a 3,072-number image", ARITHMETIC + ": 32 x 32 x 3"),
        ("a 6× compression", ARITHMETIC + ": 32 x 32 x 3 / (8 x 8 x 8)"),
        ("(83,653,863 parameters", "SD v1's VAE, checked by tests/test_vae.py"),
        ("encoder 34,163,592, decoder 49,490,179", ARCHITECTURE),
        ("over 786,432 values and the KL over\n16,384", ARITHMETIC + ": 512 x 512 x 3 and 64 x 64 x 4"),
        ("(`disc_start` 50,001 steps, `disc_weight` 0.5)", SETTING + ": SD's own configuration"),
        ("(`disc_weight` 0.5). On", SETTING),
        ("deviation of about 5.5)", ARITHMETIC + ": 1 / 0.18215"),
        ("$s = 0.18215$", "SD v1's scale factor, a constant of its files"),
        ("at least 27 dB at 12× compression", "a goal that was set, not a result; 12× is 32 x 32 x 3 / (8 x 8 x 4)"),
        ("compress only 3×", ARITHMETIC),
        ("(4×4×16, also 12×)", ARITHMETIC),
        ("batches of 32 from the 45,000", SETTING + ": the training split"),
        ("scored on 1,000 of the 5,000", SETTING + ": the held-out split"),
        ("it is 0.4 dB better; a second block per level is worth 0.2 dB over one", ARITHMETIC + ": the table's PSNRs"),
        ("Five CPU-minutes are about 10,000 images", ARITHMETIC + ": 34.1 images per CPU-second for 300 s"),
        ("the margins (0.4 dB)", ARITHMETIC),
        ("4 minutes\nper setting", SETTING),
        ("on the same 1,000 images", SETTING),
        ("| steps in 4 min |", SETTING),
        ("`betas` (0.5, 0.9) unless stated", SETTING),
        ("(0.9, 0.999) scored", SETTING),
        ("$(0.5, 0.9)$ with squared error", SETTING),
        ("| 12× |", ARITHMETIC + ": 32 x 32 x 3 / (8 x 8 x 4)"),
        ("| 6× |", ARITHMETIC + ": 32 x 32 x 3 / (8 x 8 x 8)"),
        ("2,136,823 → 2,147,451 parameters", ARCHITECTURE + ": VAEConfig.cifar() with 4 and with 8 latent channels"),
        ("decodes the 5,000 held-out images", SETTING),
        ("at 3× and 48×", ARITHMETIC),
        ("the 48× of SD v1", ARITHMETIC),
    ],
    "lessons/06_training.md": [
        ('for $d_{\\max}$ = 0.99, 0.999 and 0.9999', SETTING + " (the caps the notebook plots)"),
        ('(chance: 25%)', "one colour of four: arithmetic, not a run"),
        ('at guidance 3, 4.5 and 7.5, 30 samples per class', SETTING + " (the sweep's scales and sample count)"),
        ('(guidance 7.5 and 10)', SETTING),
        ("$s = 0.18215$; ours", "SD v1's scale factor, a constant of its files"),
        ("replaces 10% of the captions", SETTING),
        ("to 10% of its peak", SETTING),
        ("(chance: 10%)", "chance for ten classes, a definition"),
        ("one noise word among 34,438", "a fact of the code: the noise words of data/wording.py for CIFAR-10's classes"),
        ("all 34,438 whole words", "a fact of the code: the noise words of data/wording.py for CIFAR-10's classes"),
        ("| guidance $w = 7.5$ at |", SETTING),
        ("at guidance 7.5 on every step", SETTING),
        ("\"1.07x the judge\" mean", "the figure quoted above, named"),
        ("at guidance 7.5\n(bench/RESULTS.md", SETTING),
        ("$d_{\\max} = 0.9999$ (the `cifar` preset) the average spans about 10,000 steps",
         SETTING + "; 1 / (1 - 0.9999) steps"),
        ("$601/610 \\approx 0.985$", ARITHMETIC),
        ("$d_{\\max} = 0.999$, which", SETTING),
        ("after about\n9,000 updates", ARITHMETIC + ": (1 + k) / (10 + k) = 0.999"),
        ("With probability 0.1 a caption", SETTING),
        ("sample at $w = 7.5$", SETTING),
        ("$w$ = 3, 4.5 and 7.5 with 30 samples", SETTING),
        ("samples at 7.5 from timestep 800 down", SETTING),
        ("the other 49,000 token\nembeddings", ARITHMETIC + ": most of the 49,408"),
        ("each with probability 0.3", SETTING),
        ("in 5% of reworded captions", SETTING),
        ("3.32 for all ten classes alike", ARITHMETIC + ": log2(10)"),
        ("named classes 71% of the time", ARITHMETIC + ": 1 - the share of another class, 0.29 in prompt_shapes.json"),
        ("be 20% by chance", ARITHMETIC),
        ("(0.3, so 18\nminutes; 0.2, so 12, when", SETTING),
        ("so 12 minutes\ngive about as many VAE steps", SETTING),
        ("(14.2M parameters,", ARCHITECTURE + ": the cifar-cpu preset's text encoder"),
        ("whole 8.5M-parameter UNet", ARCHITECTURE + ": UNetConfig.cifar_cpu()"),
        ("hardware: 12 minutes under autocast", SETTING),
        ("- Why 10% empty captions", SETTING),
    ],
    "lessons/07_stable_diffusion.md": [
        ('at strengths 0, 0.3, 0.6 and 1 with random weights', SETTING + " (the strengths the notebook draws)"),
        ('at strengths 0, 0.3, 0.6 and 1 (10 DDIM steps)', SETTING),
        ("its 1,066,235,307 numbers", ARITHMETIC + ": the three parameter counts of the table below"),
        ("$s = 0.18215$ is the latent scale", "SD v1's scale factor, a constant of its files"),
        ("$1/s \\approx 5.5$", ARITHMETIC),
        ("| 686 | 859,520,964 |", "SD v1.5's UNet, checked by tests/test_unet.py"),
        ("| 248 | 83,653,863 |", "SD v1's VAE, checked by tests/test_vae.py"),
        ("| 196 | 123,060,480 |", "ViT-L/14's text encoder, checked by tests/test_clip_text.py"),
        ("(2.1 GB instead of 4.3 GB)", ARITHMETIC + ": 1,066,235,307 numbers at 2 and at 4 bytes"),
        ("(8 heads, 0.18215)", "SD v1's configuration"),
        ("run at $w = 7.5$", SETTING),
        ("$\\epsilon = z_t + 0.1\\,\\text{UNet}(z_t)$", "the tests' stand-in, checked by tests/test_ldm.py"),
        ("$\\bar\\alpha_0 =\n0.99915$", SCHEDULE),
        ("comes out $1.3 \\cdot 10^{-5}$ lower (tested)", "checked by tests/test_schedule.py"),
        ("at strength 0.7", SETTING),
        ("the scale factor 0.18215 is applied", "SD v1's scale factor, a constant of its files"),
    ],
    "lessons/08_views.md": [
        ('(DDIM 20 steps, guidance 7.5)', SETTING),
        ('DDIM 8 steps at guidance 7.5', SETTING + " (the views command's)"),
        ('from seed 0 at guidance 7.5 on the one-hour CIFAR run, a row per sampler', SETTING),
        ("img2img with strength 0.3", SETTING),
        ("floats (20 MB in float32)", ARITHMETIC + ": 2 x 8 x 4096 x 77 x 4 bytes"),
        ("Put 1, 3, 7.5 and 15", SETTING),
        ("stays within 5% of the sampling time", "the preview's budget, a setting of PreviewBudget"),
    ],
    "lessons/09_break_it.md": [
        ("each mistake's 1,000\nsamples", SETTING + " (the notebook's sample count)"),
        ('left 5.49 times too large (axes ±10)', "1 / 0.18215 and the plot's axes: arithmetic and a setting"),
        ('guidance 0, 1, 3 and 8, 1,000 DDIM samples each', SETTING + " (the notebook's scales and sample count)"),
        ('at unit variance and 5.49 times larger', "1 / 0.18215, SD v1's latent scale factor: arithmetic"),
        ('at unit\nvariance (top, axes ±2.5) and 5.49 times larger', "the plot's axes and 1 / 0.18215: settings and arithmetic"),
        ('of unit-variance and 5.49 times larger data', "1 / 0.18215: arithmetic"),
        ('at a constant learning rate of 0.01', SETTING),
        ('with their EMA (decay 0.99)', SETTING),
        ("$\\epsilon_\\text{uncond} = 0.2$,\n$\\epsilon_\\text{cond} = 0.5$ and $w = 7.5$", "the question's setting"),
        ("$1/0.18215 = 5.49$", ARITHMETIC),
        ("0.18215 on the way into", "SD v1's scale factor, a constant of its files"),
        ("$k = 5.49$ times larger", ARITHMETIC),
        ("What is $k$ at $\\bar\\alpha = 0.5$?", "the question's setting"),
        ("with $d = 0.999$ from the first step", "the question's setting"),
        ("$\\hat\\epsilon = 0.2 + 7.5\\,(0.5 - 0.2) = 2.45$", ARITHMETIC),
        ("$w \\approx 7.5$ buys", SETTING),
        ("$5.49^2 \\approx 30$", ARITHMETIC),
        ("by the factor, 5.49 times too large", ARITHMETIC),
        ("at $\\bar\\alpha = 0.5$ the gain is $1 + \\sqrt{0.5} \\approx 1.71$", ARITHMETIC),
        ("$d = 0.999$, the initial weights' share after $n$ steps is $d^n$, $0.999^{100} \\approx 0.90$", ARITHMETIC),
        ("guidance scale 0, 1 and 7.5 each do", SETTING),
    ],
    "lessons/10_fast_sampling.md": [
        ('![Histograms of 4,000 samples of the two-point data', SETTING + " (the notebook's sample count)"),
        ('histograms of 4,000 samples (one number each)', SETTING),
        ("takes about 11 seconds in float32", ARITHMETIC + ": bench/RESULTS.md's 563.4 s for 50 steps of DDIM"),
        ("TAESD, 1.2M parameters, instead of the VAE decoder's 49M", ARCHITECTURE),
        ("\\sigma_{\\text{data}} = 0.5", "LCM's constant, a definition"),
        ("4 steps, guidance 8.5", SETTING),
        ("$2^{-8} \\approx 0.4\\%$", ARITHMETIC),
        ("is 49M parameters", ARCHITECTURE),
        ("$s = 0.18215$, so", "SD v1's scale factor, a constant of its files"),
        ("Its decoder has 1,222,531 parameters (the encoder\n1,222,532)", "TAESD's size, checked by tests/test_taesd.py"),
        ("| DDIM 50, guidance 7.5, float32 (the defaults) |", SETTING),
        ("and 7.5 costs two", SETTING),
        ("dividing by 0.18215", "SD v1's scale factor, a constant of its files"),
    ],
    "lessons/11_fine_tuning.md": [
        ('(seed 0, DDIM 50, guidance 7.5)', SETTING + " (bench/finetune.py's sampling)"),
        ("on 45,000 photos in an hour", SETTING + ": the training split"),
        ("share of the UNet's 859,520,964 |", "SD v1.5's UNet, checked by tests/test_finetune.py"),
        ("| 128 | 797,184 |", "a LoRA's size on the meta device, checked by tests/test_finetune.py"),
        ("| 128 + 48 | 1,092,096 |", "a LoRA's size on the meta device, checked by tests/test_finetune.py"),
        ("| 278 | 4,203,264 (at rank 64: 67,252,224,", "LoRA sizes on the meta device, checked by tests/test_finetune.py"),
        ("| 0.09% |", ARITHMETIC + ": 797,184 / 859,520,964"),
        ("| 0.49% |", ARITHMETIC + ": 4,203,264 / 859,520,964"),
        ("DDIM 50 at guidance 7.5;", SETTING),
        ("(500 steps, lr 0.05;", SETTING),
    ],
    "lessons/12_images_as_prompts.md": [
        ("| image tower, `vision_model` | 303,179,776 |", "ViT-L/14's image tower, checked by tests/test_clip_vision.py"),
        ("`image_encoder/` | 303,966,208 |", "ViT-L/14's image encoder, checked by tests/test_clip_vision.py"),
        ("SD v1's text encoder (lesson 04) | 123,060,480 |", "ViT-L/14's text encoder, checked by tests/test_clip_text.py"),
        ("| `text_projection` (768 → 768) | 589,824 |", ARITHMETIC + ": 768 x 768"),
        ("with `logit_scale` | 427,616,513 |", "CLIP ViT-L/14, checked by tests/test_clip_vision.py"),
        ("(chance: 10%", "chance for ten classes, a definition"),
    ],
    "lessons/glossary.md": [
        ("Replacing 10% of training captions", SETTING),
        ("**Scale factor (0.18215).**", "SD v1's scale factor, a constant of its files"),
    ],
    "lessons/notation.md": [
        ("offset, 0.008", "the cosine schedule's definition"),
        ("(14.61 and 0.0292 for SD v1)", "SD v1's sigma range, checked by tests/test_schedule.py"),
        ("LCM's 0.5)", "LCM's constant, a definition"),
        ("(7.5 for SD v1)", SETTING),
        ("0.18215 for SD v1", "SD v1's scale factor, a constant of its files"),
    ],
    "README.md": [
        ('pictures within 1% of the pixel', "the notebook comparison's tolerance (notebooks/build.py): a setting"),
        ("18 minutes for the VAE", SETTING),
        ("8.5M-parameter UNet", ARCHITECTURE + ": UNetConfig.cifar_cpu()"),
        ("chance is 10%", "chance for ten classes, a definition"),
        ("a 35M-parameter UNet, 20,000 VAE steps and 100,000 diffusion", ARCHITECTURE + " and the preset's settings"),
        ("sustains 10 TFLOP/s", "the assumption of the estimate"),
        ("against about 9 minutes", ARITHMETIC + ": bench/RESULTS.md's 563.4 s"),
        ("4 steps and guidance 8.5", SETTING),
        ("at most 5% goes to it by construction", "the preview's budget, a setting of PreviewBudget"),
    ],
    "notebooks/12_images_as_prompts.ipynb": [
        ("loads 12,000 CIFAR-10 training photos", SETTING),
    ],
    "notebooks/01_forward_diffusion.ipynb": [
        ("$\\sqrt{\\bar\\alpha_{999}} \\approx 0.07$", SCHEDULE),
    ],
    "notebooks/02_sampling.ipynb": [
        ("$\\sigma\\approx 14.6$", SCHEDULE),
    ],
    "notebooks/05_vae.ipynb": [
        ("over 20,000 reparameterised samples", SETTING),
        ("8×8×4, 12× compression", ARITHMETIC),
        ("(SD v1's 0.18215 was", "SD v1's scale factor, a constant of its files"),
        ("loads 5,000 CIFAR-10 training images", SETTING),
        ("(0.24M parameters, f = 4,\n12× compression)", ARCHITECTURE),
        ("(2.1M parameters)", ARCHITECTURE + ": VAEConfig.cifar()"),
        ("from SD's 0.18215", "SD v1's scale factor, a constant of its files"),
        ("(f = 2, 3× compression)", ARITHMETIC),
        ("(f = 8, 48×)", ARITHMETIC),
    ],
    "notebooks/06_training.ipynb": [
        ("(chance: 10%)", "chance for ten classes, a definition"),
    ],
    "notebooks/07_stable_diffusion.ipynb": [
        ("859.5M numbers", ARCHITECTURE + ": SD v1.5's UNet, 859,520,964 parameters"),
    ],
    "notebooks/08_views.ipynb": [
        ("At t = 0.5", "the interpolation's midpoint, a definition"),
    ],
    "notebooks/09_break_it.ipynb": [
        ("SD's default of 7.5", SETTING),
        ("multiplies VAE latents by 0.18215", "SD v1's scale factor, a constant of its files"),
        ("1/0.18215 = 5.49 times larger", ARITHMETIC),
        ("5.49 times too large", ARITHMETIC),
        ("decay 0.999 would still be 90% random", ARITHMETIC + ": 0.999^100"),
    ],
    "notebooks/10_fast_sampling.ipynb": [
        ("$2^{-8} \\approx 0.4\\%$", ARITHMETIC),
        ("about 1.5 times as fast", ARITHMETIC + ": bench/RESULTS.md's 5.06 s and 3.28 s per UNet call"),
    ],
}


# ----------------------------------------------------------------------------------------------------------
# The checker. Everything above is data; nothing below names a lesson.

NUMBER = r"\d{1,3}(?:,\d{3})+(?:\.\d+)?|\d+(?:\.\d+)?"
SCIENTIFIC = rf"(?:{NUMBER})(?:e[-+]?\d+|\s?\\cdot\s?10\^\{{?[-−]?\d+\}}?)"
VALUE = rf"(?:{SCIENTIFIC}|{NUMBER})"
SPACED_UNIT = (r"ms|seconds?|sec|s|minutes?|min|hours?|dB|it/s|img/s|(?:training )?images/s"
               r"|images per (?:CPU-)?second|GiB|GB|MB|kB|TFLOP/s|GFLOP/s|GFLOP|PFLOP|parameters")
ATTACHED_UNIT = r"%|x|×|M|k|-parameter"
FIGURE = re.compile(
    rf"(?<![\w.\-/#^{{\\])[−±+-]?(?P<value>{VALUE}(?:\s?(?:-|–|to|→)\s?[−+]?{VALUE})?)"
    rf"(?:(?P<attached>{ATTACHED_UNIT})|\s?(?P<spaced>{SPACED_UNIT}))?(?![\w×]|\.\d)")
ANY_NUMBER = re.compile(rf"(?<![\d.,])(?:{SCIENTIFIC}|\d+(?:_\d{{3}})+|{NUMBER})(?!\d)")


def _blank(match):
    return re.sub(r"[^\n]", " ", match.group(0))


def prose(text: str) -> str:
    """`text` with what is not prose blanked out, offsets kept: fenced and indented code blocks, inline code
    spans, link targets, and the section numbers of headings ("### 1.5 The row of 77")."""
    text = re.sub(r"^```.*?^```[^\n]*$", _blank, text, flags=re.S | re.M)
    text = re.sub(r"(?:(?<=\n\n)|\A)(?:    [^\n]*\n)+", _blank, text)
    text = re.sub(r"`(?:[^`\n]|\n(?!\n))+`", _blank, text)  # a span may wrap, not cross a blank line
    text = re.sub(r"\]\([^)\s]*\)", _blank, text)
    return re.sub(r"^#+ [\d.]+ ", _blank, text, flags=re.M)


def figures(text: str):
    """(start, end, figure) of every measured-looking figure in `text`: a number with a unit of time, dB,
    %, a ratio (1.07x, 12×), a throughput, a size (GB, GFLOP, 8.5M, 19k-parameter, N parameters); any
    number with a decimal point or a thousands separator; a number in scientific form whose mantissa is
    not 1 (3.8e-6, $4.1 \\cdot 10^{-6}$). Not: bare integers (steps, seeds, sizes), a bare power of ten
    (1e-5, $10^{-5}$: tolerances and settings), the sampler name DPM++ 2M, section numbers."""
    clean = prose(text)
    for m in FIGURE.finditer(clean):
        value, unit = m.group("value"), m.group("attached") or m.group("spaced")
        before = clean[max(0, m.start() - 9):m.start()]
        if unit == "M" and value == "2" and before.endswith(("++ ", "++(")):
            continue
        if before.endswith(("section ", "§")):
            continue
        if re.fullmatch(rf"1(?:e-?\d+|\s?\\cdot\s?10\^\{{?-?\d+\}}?)", value):
            continue
        if unit or re.search(r"\d[.,]\d", value) or re.search(r"e-|cdot", value):
            yield m.start(), m.end(), m.group(0)


def values(figure: str) -> list[str]:
    """The numbers a figure states, as decimal strings: "45-58 s" -> ["45", "58"], "$4.1 \\cdot 10^{-6}$" ->
    ["4.1E-6"], "6,021" -> ["6021"]."""
    out = []
    for m in re.finditer(rf"{SCIENTIFIC}|{NUMBER}", figure):
        text = m.group(0).replace(",", "")
        sci = re.fullmatch(r"([\d.]+)(?:e([-+]?\d+)|\s?\\cdot\s?10\^\{?([-−]?\d+)\}?)", text)
        if sci:
            text = f"{sci.group(1)}E{(sci.group(2) or sci.group(3)).replace('−', '-')}"
        out.append(text)
    return out


def numbers_in(text: str) -> list[str]:
    """Every number written in `text` (a source passage, a notebook's output, a test file)."""
    return [v for m in ANY_NUMBER.finditer(text) for v in values(m.group(0).replace("_", ""))]


def agrees(stated: str, recorded: str, percent: bool = False) -> bool:
    """Whether a figure's number is its source's, as the figure rounds it: to its decimals, or for a whole
    number ending in zeros to its last non-zero digit (1,100 is 1,097); a percentage may be a fraction
    (84% is 0.84)."""
    stated, recorded = Decimal(stated), abs(Decimal(recorded))
    exponent = stated.as_tuple().exponent
    if exponent == 0 and stated != 0:
        digits = str(stated).rstrip("0")
        exponent = len(str(stated)) - len(digits)
    candidates = [recorded, recorded * 100, recorded / 100] if percent else [recorded]
    step = Decimal(1).scaleb(exponent)
    return any(abs(c.quantize(step, rounding=ROUND_HALF_UP) - stated) == 0 for c in candidates)


def agrees_with_any(figure: str, recorded: list[str]) -> list[str]:
    """The numbers of `figure` that none of `recorded` agrees with."""
    percent = "%" in figure or "\\%" in figure
    return [v for v in values(figure) if not any(agrees(v, r, percent) for r in recorded)]


def read_page(path: str) -> str:
    """A lesson or README as it is, or a notebook's markdown cells joined by blank lines."""
    if path.endswith(".ipynb"):
        cells = json.loads((ROOT / path).read_text())["cells"]
        return "\n\n".join("".join(c["source"]) for c in cells if c["cell_type"] == "markdown")
    return (ROOT / path).read_text()


def where(path: str, offset: int, text: str) -> str:
    """`path:line` of an offset in the page's `text`, or for a notebook `path, cell k, line n` (cells counted
    from 0, all kinds)."""
    if not path.endswith(".ipynb"):
        return f"{path}:{text.count(chr(10), 0, offset) + 1}"
    cells = json.loads((ROOT / path).read_text())["cells"]
    start = 0
    for index, cell in enumerate(cells):
        if cell["cell_type"] != "markdown":
            continue
        text = "".join(cell["source"])
        if offset <= start + len(text):
            return f"{path}, cell {index}, line {text.count(chr(10), 0, offset - start) + 1}"
        start += len(text) + 2
    return path


def notebook_output(chapter: str) -> str | None:
    """What notebook NN printed, as committed (notebooks/build.py's text_of: stdout and results' plain
    text, the text its re-run is compared on), or None without outputs."""
    import nbformat

    nb = nbformat.read(build.notebook_paths([chapter])[0], as_version=4)
    return "".join(build.text_of(cell) for cell in nb.cells if cell.cell_type == "code") or None


def spans(text: str, context) -> list[tuple[int, int]]:
    """Where `context` stands in `text`: every occurrence of the string, or for table(...) the table."""
    if isinstance(context, Table):
        out = []
        for m in re.finditer(re.escape(context), text):
            end = m.start()
            for line in text[m.start():].split("\n"):
                if not line.startswith("|"):
                    break
                end += len(line) + 1
            out.append((m.start(), end))
        return out
    return [(m.start(), m.end()) for m in re.finditer(re.escape(context), text)]


def source_passage(spec) -> str:
    """The text of bench/RESULTS.md that a SOURCED entry names: one passage, several, or a table."""
    results = (ROOT / RESULTS).read_text()
    parts = []
    for passage in spec:
        found = spans(results, passage)
        assert found, f"bench/RESULTS.md has no passage {passage!r} any more: update the entry"
        parts.extend(results[a:b] for a, b in found)
    return "\n".join(parts)


def accounts(path: str, text: str):
    """Every way a figure of `path` may be accounted for: (start, end, kind, entry) per occurrence."""
    for entry in QUOTES:
        if entry[0] == path:
            for a, b in spans(text, quoted_text(entry)):
                yield a, b, "QUOTES", entry
    for context, source in SOURCED.get(path, []):
        for a, b in spans(text, context):
            yield a, b, "SOURCED", (context, source)
    for context, reason in NOT_MEASURED.get(path, []):
        for a, b in spans(text, context):
            yield a, b, "NOT_MEASURED", (context, reason)
    for page, old, new, source in PENDING:
        if page == path:
            for a, b in spans(text, old):
                yield a, b, "PENDING", (old, new)
            for a, b in spans(text, new):
                yield a, b, "SOURCED", (new, source)


def check_page(path: str, text: str | None = None) -> list[str]:
    """Every problem with the figures of one page: unaccounted, accounted twice, or a SOURCED or NOT_MEASURED
    figure whose number its source does not hold. [] when the page is in order."""
    text = read_page(path) if text is None else text
    problems, accounted = [], []
    covering = list(accounts(path, text))
    for start, end, figure in figures(text):
        here = [c for c in covering if c[0] <= start and end <= c[1]]
        specific = [c for c in here if not isinstance(c[3][0], Table)] or here
        if not specific:
            problems.append(f"{where(path, start, text)}: {figure!r} is not accounted for "
                            f"({text[max(0, start - 50):end + 30]!r}). Quote it from its bench/*.json record "
                            f"(QUOTES), name its source (SOURCED: bench/RESULTS.md or the chapter's notebook "
                            f"output), or say why it is no measurement (NOT_MEASURED); a figure no run backs is "
                            f"reworded without the number")
        elif len({(c[2], str(c[3])) for c in specific}) > 1:
            problems.append(f"{where(path, start, text)}: {figure!r} is accounted for twice: "
                            f"{[(c[2], str(c[3][0])[:40]) for c in specific]}")
        else:
            accounted.append((start, figure, specific[0]))
    for start, figure, account in accounted:
        line = text.count("\n", 0, start)
        row = [f for s, f, a in accounted if a is account and text.count("\n", 0, s) == line]
        problems.extend(f"{where(path, start, text)}: {p}" for p in check_figure(figure, account, row))
    return problems


def check_figure(figure: str, account, row: list[str]) -> list[str]:
    """Problems of one accounted figure against its source (notebook sources are checked apart). A table
    sourced to tables is checked row by row: the figures of one row must all be in one row of the source."""
    kind, entry = account[2], account[3]
    if kind == "SOURCED" and entry[1][0] == "RESULTS":
        passage = source_passage(entry[1][1])
        wrong = agrees_with_any(figure, numbers_in(passage))
        if wrong:
            return [f"{figure!r} disagrees with bench/RESULTS.md: {wrong} is not in {passage[:300]!r}"]
        if isinstance(entry[0], Table) and all(isinstance(p, Table) for p in entry[1][1]):
            lines = [numbers_in(line) for line in passage.split("\n")]
            if not any(not agrees_with_any(f, line) for line in lines for f in [" ".join(row)]):
                return [f"{figure!r}: no row of bench/RESULTS.md's {entry[1][1][0][:40]!r} holds its row {row}"]
    if kind == "NOT_MEASURED":
        test = re.search(r"checked by (tests/\w+\.py)", entry[1])
        if test:
            wrong = agrees_with_any(figure, numbers_in((ROOT / test.group(1)).read_text()))
            if wrong:
                return [f"{figure!r}: {wrong} is not in {test.group(1)}, which the entry says checks it"]
    return []


def quoted_text(entry) -> str:
    """A QUOTES entry's text with the recorded values filled in, as the page rounds them."""
    _, text, sources = entry
    return text.format(*(format(at(json.loads((ROOT / record).read_text()), key), fmt) for record, key, fmt in sources))


# ----------------------------------------------------------------------------------------------------------
# The tests.

@pytest.mark.parametrize("path, text, sources", QUOTES, ids=[f"{q[0]}:{q[1][:40]}" for q in QUOTES])
def test_a_quoted_figure_is_its_record(path, text, sources):
    expected = quoted_text((path, text, sources))
    assert expected in read_page(path), f"{path} should say {expected!r} ({', '.join(s[0] for s in sources)})"


def test_a_changed_record_is_caught():
    """The check can fail: the same quote against a record with one number moved."""
    path, text, sources = QUOTES[0]
    record = json.loads((ROOT / sources[0][0]).read_text())
    record["mean"]["accuracy"] += 0.01
    values = [format(at(record, key), fmt) for _, key, fmt in sources]
    assert text.format(*values) not in read_page(path)


@pytest.mark.parametrize("path", PAGES)
def test_every_figure_is_accounted_for_and_agrees_with_its_source(path):
    problems = check_page(path)
    assert not problems, f"{len(problems)} figure(s) of {path}:\n" + "\n".join(problems)


def test_every_entry_still_names_text_on_its_page():
    """A SOURCED or NOT_MEASURED context that no longer stands on its page (or covers no figure) is stale."""
    stale = []
    for kind, registry in (("SOURCED", SOURCED), ("NOT_MEASURED", NOT_MEASURED)):
        for path, entries in registry.items():
            text = read_page(path)
            found = list(figures(text))
            for context, _ in entries:
                places = spans(text, context)
                if not places:
                    stale.append(f"{kind} {path}: {context!r} is not on the page")
                elif not any(a <= s and e <= b for a, b in places for s, e, _ in found):
                    stale.append(f"{kind} {path}: {context!r} holds no figure")
    assert not stale, "\n".join(stale)


@pytest.mark.parametrize("chapter", sorted({e[1][1] for entries in SOURCED.values() for e in entries
                                            if e[1][0] == "notebook"}))
def test_notebook_figures_are_the_notebooks_output(chapter):
    """A figure sourced to notebook NN is a number that notebook printed (once its outputs are committed)."""
    output = notebook_output(chapter)
    if output is None:
        pytest.skip(f"notebook {chapter} has no committed outputs yet: its figures are checked once it has")
    printed = numbers_in(output)
    problems = []
    for path in PAGES:
        text = read_page(path)
        entries = SOURCED.get(path, []) + [(new, source) for page, _, new, source in PENDING if page == path]
        for context, source in entries:
            if source != notebook(chapter):
                continue
            for a, b in spans(text, context):
                for start, end, figure in figures(text):
                    if a <= start and end <= b and agrees_with_any(figure, printed):
                        problems.append(f"{where(path, start, text)}: {figure!r} is not what notebook {chapter} printed")
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("path, old, new, source", PENDING, ids=[f"{p[0]}:{p[1][:30]}" for p in PENDING])
def test_notebook_markdown_follows_its_source(path, old, new, source):
    """Notebook markdown whose figures disagree with their source has been rewritten (by hand: this test
    file never edits a notebook)."""
    text = read_page(path)
    assert old not in text, (f"{path} still says {old!r}, which disagrees with its source; replace it with "
                             f"{new!r} ({source})")
    assert new in text, f"{path} has neither {old!r} nor its replacement {new!r}: update PENDING"


def test_the_checker_fails_on_a_changed_or_a_new_figure(tmp_path):
    """The checker can fail: a copy of lesson 10 with one sourced figure changed and one new figure added is
    reported at both places, and the unchanged lesson is not."""
    path = "lessons/10_fast_sampling.md"
    text = read_page(path)
    assert check_page(path, text) == []
    changed = text.replace("| **13.0 s** | 14.7 s |", "| **13.0 s** | 17.4 s |", 1)
    changed = changed.replace("TAESD (Ollin Boer Bohan's", "TAESD (5.5 s faster; Ollin Boer Bohan's", 1)
    assert changed.count("17.4 s") == 1 and "5.5 s faster" in changed
    copy = tmp_path / "10_fast_sampling.md"
    copy.write_text(changed)
    problems = check_page(path, copy.read_text())
    line = {f: changed[:changed.index(f)].count("\n") + 1 for f in ("17.4 s", "5.5 s")}
    assert any(p.startswith(f"{path}:{line['17.4 s']}: '17.4 s' disagrees with bench/RESULTS.md") for p in problems)
    assert any(p.startswith(f"{path}:{line['5.5 s']}: '5.5 s' is not accounted for") for p in problems)


def test_the_scanner_finds_what_it_should():
    """What counts as a figure, on made-up prose."""
    found = [f for _, _, f in figures(
        "took 21.5 s, 1.07x the judge, 12× compression, 8.5M-parameter UNet, 84% of it, 6,021 steps, "
        "a 3×3 conv, 50 steps, seed 7, DPM++ 2M, section 1.6, `0.5 in code`, SD v1.5, 1e-5, $10^{-5}$, "
        "$4.1 \\cdot 10^{-6}$, 0.84 = 1.07x, 45-58 s")]
    assert found == ["21.5 s", "1.07x", "12×", "8.5M", "84%", "6,021", "4.1 \\cdot 10^{-6}",
                     "0.84", "1.07x", "45-58 s"]
    assert agrees("0.84", "0.838") and agrees("84", "0.838", percent=True) and agrees("1,100".replace(",", ""), "1097")
    assert not agrees("0.85", "0.838") and not agrees("27.5", "28.25")
