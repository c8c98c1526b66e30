"""How the guidance scale trades class accuracy for variety on a trained CIFAR model.

    python bench/guidance_sweep.py runs/NAME --n 50 --scales 1 2 3 4 5 7.5 --out bench/guidance_sweep

At each scale, `minildm.evaluate`'s full report (template prompt and held-out phrasings, the same seeds
at every scale): class accuracy of both, Fréchet distance over the real images' own (FD / real), and
k-NN precision, recall and coverage against held-out images. Prints a table with one row per scale,
writes OUT.json and OUT.png (accuracy and variety against the scale). Run it alone on the machine.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from minildm.evaluate import evaluate, run_data  # noqa: E402
from minildm.judge import cached_judge_path, load_or_train_judge  # noqa: E402
from minildm.ldm import load_stable_diffusion  # noqa: E402

COLUMNS = ("accuracy", "unseen_accuracy", "fd_samples", "fd_over_real", "precision", "recall", "coverage")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("run")
    p.add_argument("--runs-dir", default="runs")
    p.add_argument("--n", type=int, default=50, help="samples per class and prompt kind at each scale")
    p.add_argument("--scales", type=float, nargs="+", default=[1, 2, 3, 4, 5, 7.5])
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--out", default="bench/guidance_sweep")
    p.add_argument("--add", action="store_true", help="keep the rows already in OUT.json (same run and n) and add these scales")
    args = p.parse_args(argv)

    run = Path(args.run)
    train, held = run_data(run)
    judge, info = load_or_train_judge(cached_judge_path(args.runs_dir, train), train, held)
    model = load_stable_diffusion(str(run / "model.safetensors"))
    out = Path(args.out)
    rows = []
    if args.add and out.with_suffix(".json").exists():
        earlier = json.loads(out.with_suffix(".json").read_text())
        if earlier["run"] != str(run) or earlier["n"] != args.n or earlier["steps"] != args.steps:
            p.error(f"{out.with_suffix('.json')} is another sweep (run {earlier['run']}, n {earlier['n']})")
        rows = [r for r in earlier["rows"] if r["guidance"] not in args.scales]
    print(f"{'guidance':>8}{'template':>10}{'unseen':>8}{'worst':>7}{'FD':>7}{'FD/real':>9}{'precision':>11}"
          f"{'recall':>8}{'coverage':>10}")
    for scale in args.scales:
        report, _ = evaluate(model, train, held, judge, info, args.n, steps=args.steps, guidance=scale, progress=False)
        m = report["mean"]
        row = {"guidance": scale, **{k: m[k] for k in COLUMNS}, "worst_class_over_judge": report["worst_class_over_judge"],
               "per_class": {c: {k: v[k] for k in ("accuracy", "unseen_accuracy", "fd_over_real", "recall", "coverage")}
                             for c, v in report["per_class"].items()}}
        rows.append(row)
        print(f"{scale:>8g}{m['accuracy']:>10.2f}{m['unseen_accuracy']:>8.2f}{report['worst_class_over_judge']:>7.2f}"
              f"{m['fd_samples']:>7.2f}{m['fd_over_real']:>9.1f}{m['precision']:>11.2f}{m['recall']:>8.2f}"
              f"{m['coverage']:>10.2f}", flush=True)
    rows.sort(key=lambda r: r["guidance"])
    reference = {k: report["mean"][k] for k in ("fd_train", "precision_real", "recall_real", "coverage_real")}
    print(f"real training images against the same held-out ones: FD {reference['fd_train']:.2f}, precision "
          f"{reference['precision_real']:.2f}, recall {reference['recall_real']:.2f}, coverage {reference['coverage_real']:.2f}; "
          f"judge {info['held_out_accuracy']:.3f} on real held-out images")

    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps({"run": str(run), "n": args.n, "steps": args.steps,
                                                    "judge_held_out_accuracy": info["held_out_accuracy"],
                                                    "real_reference": reference, "rows": rows}, indent=2) + "\n")
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3.4))
    scales = [r["guidance"] for r in rows]
    left.plot(scales, [r["accuracy"] for r in rows], "o-", label="template prompt")
    left.plot(scales, [r["unseen_accuracy"] for r in rows], "s-", label="unseen phrasings")
    left.axhline(info["held_out_accuracy"], color="grey", ls="--", lw=1, label="judge on real images")
    left.set_xlabel("guidance scale"), left.set_ylabel("class accuracy"), left.set_ylim(0, 1), left.legend(fontsize=8)
    right.plot(scales, [r["fd_over_real"] for r in rows], "o-", color="C3", label="FD / FD real (left axis)")
    right.set_xlabel("guidance scale"), right.set_ylabel("FD / FD real")
    twin = right.twinx()
    twin.plot(scales, [r["recall"] for r in rows], "^-", color="C2", label="recall")
    twin.plot(scales, [r["coverage"] for r in rows], "v-", color="C4", label="coverage")
    twin.set_ylim(0, 1), twin.set_ylabel("recall, coverage")
    handles = right.get_legend_handles_labels()[0] + twin.get_legend_handles_labels()[0]
    twin.legend(handles, [h.get_label() for h in handles], fontsize=8, loc="upper center")
    fig.suptitle(f"{run.name}: guidance against accuracy and variety ({args.n} samples per class, DDIM {args.steps})",
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(out.with_suffix(".png"), dpi=100)
    print(f"saved {out.with_suffix('.json')} and {out.with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
