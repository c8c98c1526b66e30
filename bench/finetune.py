"""Fine-tuning a trained CIFAR run on a handful of images: before and after, side by side in one run.

    python bench/finetune.py runs/NAME --n 20 --out bench/finetune

The handful: `finetune.example_set`, the set `python -m minildm.finetune example` writes: two held-out
photos per class in black and white, captioned "a black and white photo of a <class>", and two others per
class left in colour, captioned "a photo of a <class>" (40 images). Then, from the same base model each time:

    base                 no fine-tune
    LoRA, grey only      rank 4 on the UNet's attention, 600 steps at 1e-3 (the command line's defaults),
                         the 20 grey photos alone
    LoRA                 the same on all 40
    LoRA + text encoder  the same plus the text encoder's attention (--text-encoder), all 40
    word <bw>            textual inversion, one vector started from "photo", 500 steps at 0.05, the grey
                         photos captioned "a <bw> photo of a <class>" (a caption without the word trains nothing)

For each, n samples per class (seeds 0..n-1, the run's own sampling defaults) of the style prompt ("a
black and white photo of a <class>", or "a <bw> photo of a <class>" for the word) and of the plain
prompt "a photo of a <class>" (what the fine-tune should leave alone), scored by

    saturation     mean of max(R,G,B) - min(R,G,B) over pixels (`finetune.saturation`): 0 is black and white
    class          the run's judge (evaluate's, cached in runs/judges/): the share drawn as the prompted class

with the real held-out photos in colour and in black and white as references, and the seconds each
fine-tune took. Writes OUT.json and OUT.png (a row per case and prompt, a column per class). Run it alone.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from minildm import finetune  # noqa: E402
from minildm.cli import default_guidance_interval  # noqa: E402
from minildm.data import to_float  # noqa: E402
from minildm.evaluate import run_data, sample_per_class  # noqa: E402
from minildm.judge import cached_judge_path, judge_outputs, load_or_train_judge  # noqa: E402
from minildm.ldm import load_stable_diffusion  # noqa: E402

WORD = "<bw>"


def style_prompts(name, count):
    return [f"a black and white photo of {finetune.article(name)}"] * count


def word_prompts(name, count):
    return [f"a {WORD} photo of {finetune.article(name)}"] * count


def plain_prompts(name, count):
    return [f"a photo of {finetune.article(name)}"] * count


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("run")
    p.add_argument("--runs-dir", default="runs")
    p.add_argument("--n", type=int, default=20, help="samples per class and prompt")
    p.add_argument("--lora-steps", type=int, default=600)
    p.add_argument("--word-steps", type=int, default=500)
    p.add_argument("--out", default="bench/finetune")
    args = p.parse_args(argv)

    run = Path(args.run)
    path = str(run / "model.safetensors")
    train, held = run_data(run)
    judge, info = load_or_train_judge(cached_judge_path(args.runs_dir, train), train, held)
    names, K = list(held.class_names), len(held.class_names)
    images, captions = finetune.example_set(held, per_class=2, seed=0)
    grey_images, grey_captions = finetune.example_set(held, per_class=2, seed=0, colour=False)
    interval = default_guidance_interval(path)
    sampling = dict(seed=0, steps=50, guidance=7.5, guidance_interval=interval, progress=False)

    def score(samples):
        x = torch.cat([samples[c] for c in names])
        predicted = judge_outputs(judge, x * 2 - 1)[1].view(K, -1)
        right = (predicted == torch.arange(K)[:, None]).float().mean().item()
        return {"saturation": finetune.saturation(x * 2 - 1).mean().item(), "class": right}

    real = to_float(held.images)
    references = {
        "held-out photos": {"saturation": finetune.saturation(held.images).mean().item(),
                            "class": (judge_outputs(judge, real)[1] == held.labels).float().mean().item()},
        "held-out photos in black and white": {
            "saturation": 0.0,
            "class": (judge_outputs(judge, to_float(finetune.black_and_white(held.images)))[1]
                      == held.labels).float().mean().item()},
    }
    lora = dict(rank=4, num_steps=args.lora_steps, lr=1e-3, progress=False)    # the command line's defaults
    cases = {
        "base": None,
        "LoRA, grey only": lambda m: finetune.train_lora(m, grey_images, grey_captions, **lora),
        "LoRA": lambda m: finetune.train_lora(m, images, captions, **lora),
        "LoRA + text encoder": lambda m: finetune.train_lora(m, images, captions, text_encoder=True, **lora),
        f"word {WORD}": lambda m: finetune.train_word(
            m, images, [c.replace("black and white", WORD) for c in captions], WORD, num_steps=args.word_steps,
            lr=5e-2, progress=False),
    }
    report = {"run": str(run), "n": args.n, "images": len(images), "sampling": {**sampling, "guidance_interval": interval},
              "judge_held_out_accuracy": info["held_out_accuracy"], "references": references, "cases": {}}
    rows = {}
    print(f"{'case':<18}{'prompt':<34}{'saturation':>11}{'class':>8}{'seconds':>9}")
    for label, ref in references.items():
        print(f"{label:<52}{ref['saturation']:>11.3f}{ref['class']:>8.2f}")
    for case, train_it in cases.items():
        model = load_stable_diffusion(path)
        seconds, first, last = 0.0, None, None
        if train_it is not None:
            start = time.perf_counter()
            _, losses = train_it(model)
            seconds = time.perf_counter() - start
            first, last = sum(losses[:20]) / 20, sum(losses[-20:]) / 20
        kinds = {"style": word_prompts if case.startswith("word") else style_prompts, "plain": plain_prompts}
        entry = {"seconds": seconds, "loss_first_20": first, "loss_last_20": last}
        for kind, prompts in kinds.items():
            samples = sample_per_class(model, names, args.n, prompts=prompts, **sampling)
            entry[kind] = {"prompt": prompts("cat", 1)[0], **score(samples)}
            rows[f"{case}\n{entry[kind]['prompt'].replace(' cat', '')}"] = torch.stack([samples[c][0] for c in names])
            print(f"{case:<18}{entry[kind]['prompt']:<34}{entry[kind]['saturation']:>11.3f}"
                  f"{entry[kind]['class']:>8.2f}{seconds:>9.1f}")
        report["cases"][case] = entry

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(len(rows), K, figsize=(1.1 * K + 2.2, 1.15 * len(rows) + 0.5))
    for r, (label, x) in enumerate(rows.items()):
        for c in range(K):
            ax = axes[r, c]
            ax.imshow(x[c].permute(1, 2, 0).clamp(0, 1).numpy(), interpolation="nearest")
            ax.set_xticks([]), ax.set_yticks([])
            if r == 0:
                ax.set_title(names[c], fontsize=8)
            if c == 0:
                ax.set_ylabel(label, fontsize=6.5, rotation=0, ha="right", va="center")
    fig.suptitle(f"{run.name} fine-tuned on {len(grey_images)} black-and-white photos (+ {len(images) - len(grey_images)} "
                 f"in colour where the row says so): the first sample of each prompt", fontsize=9)
    fig.tight_layout()
    fig.savefig(out.with_suffix(".png"), dpi=100)
    print(f"saved {out.with_suffix('.json')} and {out.with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
