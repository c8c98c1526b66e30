"""Photos as prompts for a trained CIFAR run: an image adapter trained with each pairing, beside the run's own
text prompts, scored the same way in one run.

    python bench/image_prompts.py runs/NAME --n 50 --out bench/image_prompts

For each pairing (`python -m minildm.finetune image-prompt --pairing ...`):

    class   each training photo prompted with another photo of its class: the photo should carry the class
    self    each training photo prompted with itself: the photo should be copied

it trains an adapter for --steps steps (timed; kept in RUN/adapters/ and reused by a later run of this script
with the same settings), then samples n images per class from the class's first n held-out photos, one photo a
sample and no text, and scores them as `python -m minildm.evaluate --image-adapter` does. The template prompt
("a photo of a <class>") is scored beside them with the same seeds, sampler and judge. Printed: class accuracy,
the Fréchet distance to the class's other held-out photos over the real-image floor, recall, and the median
distance of a sample to its own prompt photo over that to another photo of its class (near 0: copied; near 1:
a picture of its own); then the ratios to the text prompt. Writes OUT.json and OUT.png (for four classes: the
prompt photo, then samples of each pairing and of the text prompt). Run it alone on the machine.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from minildm.cli import default_guidance_interval  # noqa: E402
from minildm.evaluate import evaluate, run_data  # noqa: E402
from minildm.finetune import train_image_adapter  # noqa: E402
from minildm.image_adapter import load_image_adapter  # noqa: E402
from minildm.judge import cached_judge_path, load_or_train_judge  # noqa: E402
from minildm.ldm import load_stable_diffusion  # noqa: E402

SHOWN = ("airplane", "cat", "dog", "horse")


def adapter_for(model, run: Path, train, pairing: str, steps: int, seed: int) -> tuple:
    """(adapter, seconds it took to train or 0 when reused, its file) for `pairing`, trained on the run's
    training split."""
    path = run / "adapters" / f"{pairing}-{steps}steps-seed{seed}.safetensors"
    if path.exists():
        print(f"reusing {path}", file=sys.stderr)
        return load_image_adapter(path, model.unet), 0.0, path
    start = time.perf_counter()
    adapter, losses = train_image_adapter(model, train.images, train.labels, pairing=pairing, num_steps=steps,
                                          seed=seed)
    seconds = time.perf_counter() - start
    path.parent.mkdir(exist_ok=True)
    adapter.save(path)
    first, last = losses[:20], losses[-20:]
    print(f"{pairing}: {steps} steps in {seconds:.0f} s, loss {sum(first) / len(first):.4f} -> "
          f"{sum(last) / len(last):.4f}", file=sys.stderr)
    return adapter, seconds, path


def summary(report: dict) -> dict:
    m = report["mean"]
    row = {"accuracy": m["accuracy"], "worst_class": min(c["accuracy"] for c in report["per_class"].values()),
           "fd_over_real": m["fd_over_real"], "fd_samples": m["fd_samples"], "recall": m["recall"],
           "precision": m["precision"], "near_copies": report["copies"]["near_copies"]}
    if "image_prompts" in report:
        row["own_over_another"] = report["image_prompts"]["own_over_another"]
    return row


def figure(photos: dict, samples: dict, path: str, per: int = 3) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    columns = ["prompt photo"] + [f"{kind} {i + 1}" for kind in samples for i in range(per)]
    fig, axes = plt.subplots(len(SHOWN), len(columns), figsize=(1.1 * len(columns), 1.25 * len(SHOWN)))
    for r, name in enumerate(SHOWN):
        row = [photos[name][0].float() / 255] + [samples[kind][name][i] for kind in samples for i in range(per)]
        for c, image in enumerate(row):
            ax = axes[r, c]
            ax.imshow(image.permute(1, 2, 0).clamp(0, 1).numpy(), interpolation="nearest")
            ax.set_xticks([]), ax.set_yticks([])
            if r == 0:
                ax.set_title(columns[c], fontsize=7)
            if c == 0:
                ax.set_ylabel(name, fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("run", help="a CIFAR training run's folder")
    p.add_argument("--runs-dir", default="runs", help="where the cached judges live (judges/)")
    p.add_argument("--n", type=int, default=50, help="samples per class and prompt kind")
    p.add_argument("--steps", type=int, default=1000, help="adapter training steps (the command line's default)")
    p.add_argument("--pairings", nargs="+", default=["class", "self"], choices=["class", "self"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="bench/image_prompts")
    args = p.parse_args(argv)
    run = Path(args.run)
    train, held = run_data(run)
    judge_path = cached_judge_path(args.runs_dir, train)
    judge, info = load_or_train_judge(judge_path, train, held)
    model = load_stable_diffusion(str(run / "model.safetensors"))
    interval = default_guidance_interval(str(run / "model.safetensors"))       # the run's own, as evaluate uses
    options = dict(n=args.n, seed=args.seed, guidance_interval=interval, phrasings=None)
    results, samples, seconds = {}, {}, {}

    start = time.perf_counter()
    report, samples["text"] = evaluate(model, train, held, judge, info, **options)
    seconds["text: sampling and scoring"] = time.perf_counter() - start
    results["text"] = summary(report)
    for pairing in args.pairings:
        adapter, trained, path = adapter_for(model, run, train, pairing, args.steps, args.seed)
        seconds[f"{pairing}: adapter training"] = trained
        model.image_adapter = adapter.eval()
        start = time.perf_counter()
        report, samples[pairing] = evaluate(model, train, held, judge, info, image_prompts=True, **options)
        seconds[f"{pairing}: sampling and scoring"] = time.perf_counter() - start
        results[pairing] = summary(report)
        results[pairing]["adapter"] = str(path)
        model.image_adapter = None

    keys = ["accuracy", "worst_class", "fd_over_real", "recall", "precision", "near_copies", "own_over_another"]
    print(f"\n{run.name}: n {args.n} per class, DDIM 50, guidance 7.5, guidance interval {interval}, judge "
          f"{info['held_out_accuracy']:.1%} on real held-out photos")
    print(f"{'':<20}" + "".join(f"{kind:>12}" for kind in results))
    for key in keys:
        print(f"{key:<20}" + "".join(f"{results[kind].get(key, float('nan')):>12.3f}" for kind in results))
    for pairing in args.pairings:
        print(f"{pairing} / text: accuracy {results[pairing]['accuracy'] / results['text']['accuracy']:.2f}x, "
              f"FD/real {results[pairing]['fd_over_real'] / results['text']['fd_over_real']:.2f}x, "
              f"recall {results[pairing]['recall'] / max(results['text']['recall'], 1e-9):.2f}x")
    for what, s in seconds.items():
        print(f"{what}: {s:.0f} s")
    photos = {name: held.images[held.labels == k][:args.n] for k, name in enumerate(held.class_names)}
    figure(photos, {kind: samples[kind] for kind in ["class", "self", "text"] if kind in samples}, args.out + ".png")
    Path(args.out + ".json").write_text(json.dumps({"run": str(run), "n": args.n, "adapter_steps": args.steps,
                                                    "seed": args.seed, "guidance_interval": interval,
                                                    "judge_accuracy": info["held_out_accuracy"],
                                                    "results": results, "seconds": seconds}, indent=2) + "\n")
    print(f"wrote {args.out}.json and {args.out}.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
