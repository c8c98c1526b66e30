"""Does a trained CIFAR model read text, or did it learn its training sentences? One run, many prompt shapes.

    python bench/prompt_shapes.py runs/NAME --n 25 --guidance 7.5 --out bench/prompt_shapes

For every class, n samples (seeds 0..n-1, DDIM 50) of each prompt shape, scored by the run's judge
(`minildm.evaluate`'s, cached in runs/judges/):

    template        "a photo of a cat"                       a training caption
    unseen          the held-out phrasings, one per sample   data/unseen_phrasings.txt
    bare word       "cat"
    in a hat        "a cat in a hat"                         the example prompt of the README

and, without one class word, what the model does instead:

    no class word   a few prompts that name no class         the judge's class histogram over all of them,
    empty prompt    ""                                       against the empty prompt's (guidance's zero)
    two classes     "a cat and a dog" for pairs of classes   how often the first, the second or another
                                                             class is drawn

It prints a table, writes OUT.json and OUT.png (a row per prompt shape, a column per class: the
first sample of each) and the command. Run it alone on the machine: it samples for several minutes.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from minildm.data import fill_template  # noqa: E402
from minildm.data.wording import unseen_phrasings  # noqa: E402
from minildm.evaluate import run_data, sample_per_class, template_prompts, unseen_prompts  # noqa: E402
from minildm.judge import cached_judge_path, judge_outputs, load_or_train_judge  # noqa: E402
from minildm.ldm import load_stable_diffusion  # noqa: E402

NO_CLASS = ("a photo", "something nice in the garden", "a picture of a thing", "an old photograph",
            "blue sky and green grass", "a photo of my holiday", "zzz qqq", "hello")


def histogram(predicted: torch.Tensor, k: int) -> list:
    return (torch.bincount(predicted, minlength=k).double() / len(predicted)).tolist()


def entropy_bits(p: list) -> float:
    return -sum(q * math.log2(q) for q in p if q > 0)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("run")
    p.add_argument("--runs-dir", default="runs")
    p.add_argument("--n", type=int, default=25, help="samples per class and prompt shape")
    p.add_argument("--guidance", type=float, default=7.5)
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--out", default="bench/prompt_shapes")
    args = p.parse_args(argv)

    run = Path(args.run)
    train, held = run_data(run)
    judge, info = load_or_train_judge(cached_judge_path(args.runs_dir, train), train, held)
    model = load_stable_diffusion(str(run / "model.safetensors"))
    names, n, K = list(held.class_names), args.n, len(held.class_names)
    frames = unseen_phrasings()
    shapes = {
        "template": template_prompts,
        "unseen": lambda name, count: unseen_prompts(name, count, frames, names.index(name) * count),
        "bare word": lambda name, count: [name] * count,
        "in a hat": lambda name, count: [fill_template("a {} in a hat", name)] * count,
    }
    options = dict(seed=0, steps=args.steps, guidance=args.guidance, progress=False)
    report = {"run": str(run), "n": n, "guidance": args.guidance, "steps": args.steps,
              "judge_held_out_accuracy": info["held_out_accuracy"], "shapes": {}}
    firsts = {}
    print(f"{'prompt shape':<14}" + "".join(f"{c[:8]:>9}" for c in names) + f"{'mean':>7}")
    for shape, prompts in shapes.items():
        samples = sample_per_class(model, names, n, prompts=prompts, **options)
        acc = {c: (judge_outputs(judge, samples[c] * 2 - 1)[1] == k).float().mean().item() for k, c in enumerate(names)}
        mean = sum(acc.values()) / K
        report["shapes"][shape] = {"per_class": acc, "mean": mean, "example": prompts(names[3], 1)[0]}
        firsts[shape] = torch.stack([samples[c][0] for c in names])
        print(f"{shape:<14}" + "".join(f"{acc[c]:>9.2f}" for c in names) + f"{mean:>7.2f}")

    # Prompts with no class word, and the empty prompt: which classes come out?
    per_prompt = max(n * K // len(NO_CLASS), 2)
    pooled = []
    for text in NO_CLASS:
        pooled.append(judge_outputs(judge, model.generate(text, seeds=list(range(per_prompt)), num_steps=args.steps,
                                                          guidance_scale=args.guidance) * 2 - 1)[1])
    empty = judge_outputs(judge, model.generate("", seeds=list(range(n * K // 2)), num_steps=args.steps,
                                                guidance_scale=args.guidance) * 2 - 1)[1]
    for label, predicted in (("no class word", torch.cat(pooled)), ("empty prompt", empty)):
        h = histogram(predicted, K)
        report[label] = {"histogram": dict(zip(names, h)), "entropy_bits": entropy_bits(h), "images": len(predicted)}
        print(f"{label:<14}" + "".join(f"{q:>9.2f}" for q in h) + f"   entropy {entropy_bits(h):.2f} of "
              f"{math.log2(K):.2f} bits, {len(predicted)} images")

    # Two class words: "a cat and a dog" for pairs (k, k + 1), (k, k + 5).
    first = second = other = 0
    pairs = [(k, (k + step) % K) for k in range(K) for step in (1, 5)]
    count = max(n // 2, 2)
    for a, b in pairs:
        text = f"{fill_template('a {}', names[a])} and {fill_template('a {}', names[b])}"
        predicted = judge_outputs(judge, model.generate(text, seeds=list(range(count)), num_steps=args.steps,
                                                        guidance_scale=args.guidance) * 2 - 1)[1]
        first += (predicted == a).sum().item()
        second += (predicted == b).sum().item()
        other += ((predicted != a) & (predicted != b)).sum().item()
    total = first + second + other
    report["two classes"] = {"first": first / total, "second": second / total, "other": other / total,
                             "images": total, "example": f"{fill_template('a {}', names[3])} and {fill_template('a {}', names[5])}"}
    print(f"two classes ({len(pairs)} pairs, {total} images): first named {first / total:.2f}, second {second / total:.2f}, "
          f"another class {other / total:.2f}")

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(len(firsts), K, figsize=(1.2 * K + 1.6, 1.3 * len(firsts) + 0.4))
    for r, (shape, images) in enumerate(firsts.items()):
        for c in range(K):
            ax = axes[r, c]
            ax.imshow(images[c].permute(1, 2, 0).clamp(0, 1).numpy(), interpolation="nearest")
            ax.set_xticks([]), ax.set_yticks([])
            if r == 0:
                ax.set_title(names[c], fontsize=8)
            if c == 0:
                ax.set_ylabel(f"{shape}\n{report['shapes'][shape]['mean']:.2f}", fontsize=8)
    fig.suptitle(f"{run.name}: the first sample of each prompt shape (judge's class accuracy over {n} per class)",
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(out.with_suffix(".png"), dpi=100)
    print(f"saved {out.with_suffix('.json')} and {out.with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
