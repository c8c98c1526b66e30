"""Figures the course quotes from recorded results, checked against the record they were read from.

Each entry names a file, a sentence or table row exactly as that file states it with its numbers as
{placeholders}, and where each number lives in a bench/*.json file that a benchmark script wrote. The test
formats the recorded value as the text rounds it and requires the filled-in text in the file: a lesson that
drifts from its source, or a rerun whose numbers the lesson does not follow, fails here. These figures are
read from the records, not recomputed (the benchmarks take minutes to an hour, alone on a machine).
"""
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def at(record: dict, path: str):
    """record["a"]["b"]... for the path "a/b/..."; list items by index."""
    value = record
    for part in path.split("/"):
        value = value[int(part)] if isinstance(value, list) else value[part]
    return value


EVAL = "bench/train_cifar_cpu60h_eval.json"           # python -m minildm.evaluate runs/cpu60h (n = 100)
INTERVAL = "bench/guidance_interval_cpu60h.json"      # bench/guidance_sweep.py runs/cpu60h --intervals ...
FINETUNE = "bench/finetune.json"                      # bench/finetune.py runs/cpu60h --n 20
SWEEP = "bench/guidance_sweep.json"                   # bench/guidance_sweep.py runs/cpu60g --n 30
SHAPES = "bench/prompt_shapes.json"                   # bench/prompt_shapes.py runs/cpu60h --n 20


def finetune_cell(case, kind):
    return {f"{case}/{kind}/saturation": ".3f", f"{case}/{kind}/class": ".2f"}


# (file, text with {0}, {1}, ... for the numbers, [(record, key path, format), ...])
QUOTES = [
    ("lessons/06_training.md", "| every step | **{0}** | **{1}** | {2} | {3} | {4} | {5} | {6} |",
     [(EVAL, "mean/accuracy", ".2f"), (EVAL, "mean/unseen_accuracy", ".2f"), (EVAL, "worst_class_over_judge", ".2f"),
      (EVAL, "mean/fd_over_real", ".1f"), (EVAL, "mean/precision", ".2f"), (EVAL, "mean/recall", ".2f"),
      (EVAL, "mean/coverage", ".2f")]),
    ("lessons/06_training.md", "| the VAE's reconstructions of real photos (the floor) | | | | {0} | {1} | {2} | {3} |",
     [(INTERVAL, "vae_floor/fd_reconstructed_over_real", ".1f"), (INTERVAL, "vae_floor/precision_reconstructed", ".2f"),
      (INTERVAL, "vae_floor/recall_reconstructed", ".2f"), (INTERVAL, "vae_floor/coverage_reconstructed", ".2f")]),
    ("lessons/06_training.md", "the prompted class {0} of the time, {1}x the judge's {2} on",
     [(EVAL, "mean/accuracy", ".2f"), (EVAL, "accuracy_over_judge", ".2f"), (EVAL, "judge/held_out_accuracy", ".3f")]),
    ("lessons/06_training.md", "the template was drawn as its class {0} of the time at\n$w = 1.5$ and {1} at $w = 7.5$, "
     "while recall fell from {2} to {3}",
     [(SWEEP, "rows/0/accuracy", ".2f"), (SWEEP, "rows/4/accuracy", ".2f"), (SWEEP, "rows/0/recall", ".2f"),
      (SWEEP, "rows/4/recall", ".2f")]),
    ("lessons/06_training.md", "**The bare word and \"a cat in a hat\"**: {0} each, as the template ({1} at 20 per class)",
     [(SHAPES, "shapes/in a hat/mean", ".2f"), (SHAPES, "shapes/template/mean", ".2f")]),
    ("README.md", "reconstructions of real photos are\n  {0} times as far as real photos",
     [(INTERVAL, "vae_floor/fd_reconstructed_over_real", ".1f")]),
]

# Lesson 11's table: every cell of the fine-tuning cases, and the references.
ROWS_11 = [("| base model | | | {0}, {1} | {2}, {3} |", "base"),
           ("| LoRA (UNet attention) | the 20 grey photos only | {4} | {0}, {1} | **{2}**, {3} |", "LoRA, grey only"),
           ("| LoRA (UNet attention) | grey + colour | {4} | {0}, {1} | {2}, {3} |", "LoRA"),
           ("| LoRA + text encoder (`--text-encoder`) | grey + colour | {4} | **{0}**, {1} | {2}, {3} |",
            "LoRA + text encoder"),
           ("photo of a …\") | the grey photos | {4} | {0}, {1} | {2}, {3} (unchanged) |", "word <bw>")]
for text, case in ROWS_11:
    QUOTES.append(("lessons/11_fine_tuning.md", text,
                   [(FINETUNE, f"cases/{case}/style/saturation", ".3f"), (FINETUNE, f"cases/{case}/style/class", ".2f"),
                    (FINETUNE, f"cases/{case}/plain/saturation", ".3f"), (FINETUNE, f"cases/{case}/plain/class", ".2f"),
                    (FINETUNE, f"cases/{case}/seconds", ".0f")]))
QUOTES.append(("lessons/11_fine_tuning.md", "| *real held-out photos* | | | *grey: 0, judge {0}* | *colour: {1}, judge {2}* |",
               [(FINETUNE, "references/held-out photos in black and white/class", ".2f"),
                (FINETUNE, "references/held-out photos/saturation", ".3f"),
                (FINETUNE, "references/held-out photos/class", ".2f")]))


@pytest.mark.parametrize("path, text, sources", QUOTES, ids=[f"{q[0]}:{q[1][:40]}" for q in QUOTES])
def test_a_quoted_figure_is_its_record(path, text, sources):
    values = []
    for record, key, fmt in sources:
        value = at(json.loads((ROOT / record).read_text()), key)
        values.append(format(value, fmt))
    expected = text.format(*values)
    assert expected in (ROOT / path).read_text(), f"{path} should say {expected!r} ({', '.join(s[0] for s in sources)})"


def test_a_changed_record_is_caught(tmp_path):
    """The check can fail: the same quote against a record with one number moved."""
    path, text, sources = QUOTES[0]
    record = json.loads((ROOT / sources[0][0]).read_text())
    record["mean"]["accuracy"] += 0.01
    values = [format(at(record, key), fmt) for _, key, fmt in sources]
    assert text.format(*values) not in (ROOT / path).read_text()
