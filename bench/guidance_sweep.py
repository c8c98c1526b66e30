"""How the guidance scale, and the steps it is applied at, trade class accuracy for variety on a trained
CIFAR model.

    python bench/guidance_sweep.py runs/NAME --n 50 --scales 1 2 3 4 5 7.5 --out bench/guidance_sweep
    python bench/guidance_sweep.py runs/NAME --n 100 --scales 7.5 --intervals all 0-800 0-700 0-500 \
        --out bench/guidance_interval

At each scale and guidance interval (`all`: every step; `0-700`: only the steps at timesteps 0..700),
`minildm.evaluate`'s full report (template prompt and held-out phrasings, the same seeds everywhere):
class accuracy of both, Fréchet distance over the real images' own (FD / real), and k-NN precision,
recall and coverage against held-out images; and once, the same figures for the VAE's reconstructions
of real photos, the floor the first stage sets. Prints a table with one row per setting, writes OUT.json
and OUT.png (accuracy and variety against the scale, a line per interval). Run it alone on the machine.
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


def interval_arg(text: str):
    """'all' -> None (every step); 'LO-HI' -> (LO, HI) timesteps."""
    if text == "all":
        return None
    lo, hi = (float(v) for v in text.split("-"))
    return (lo, hi)


def interval_name(interval) -> str:
    return "all" if interval is None else "{:g}-{:g}".format(*interval)


def order(row) -> tuple:
    """Rows by scale, then from every step to the narrowest interval."""
    name = row.get("interval", "all")
    return (row["guidance"], 0 if name == "all" else 1, -interval_arg(name)[1] if name != "all" else 0)


def plot(sweep: dict, path) -> None:
    """Accuracy (left) and variety (right) of a sweep's rows: against the scale when every row guides every
    step, else one tick per setting."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = sorted(sweep["rows"], key=order)
    by_scale = all(r.get("interval", "all") == "all" for r in rows)
    x = [r["guidance"] for r in rows] if by_scale else list(range(len(rows)))
    fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3.4))
    twin = right.twinx()
    left.plot(x, [r["accuracy"] for r in rows], "o-", label="template prompt")
    left.plot(x, [r["unseen_accuracy"] for r in rows], "s-", label="unseen phrasings")
    left.axhline(sweep["judge_held_out_accuracy"], color="grey", ls="--", lw=1, label="judge on real images")
    right.plot(x, [r["fd_over_real"] for r in rows], "o-", color="C3", label="FD / FD real (left axis)")
    if "vae_floor" in sweep:
        right.axhline(sweep["vae_floor"]["fd_reconstructed_over_real"], color="C3", ls=":", lw=1,
                      label="VAE reconstructions (the floor)")
    twin.plot(x, [r["recall"] for r in rows], "^-", color="C2", label="recall")
    twin.plot(x, [r["coverage"] for r in rows], "v-", color="C4", label="coverage")
    label = "guidance scale" if by_scale else "guidance scale w, guided timesteps t"
    if not by_scale:
        ticks = [f"w {r['guidance']:g}\nt {r.get('interval', 'all')}" for r in rows]
        for axis in (left, right):
            axis.set_xticks(x, ticks, fontsize=7)
    left.set_xlabel(label), left.set_ylabel("class accuracy"), left.set_ylim(0, 1), left.legend(fontsize=7)
    right.set_xlabel(label), right.set_ylabel("FD / FD real"), right.set_ylim(bottom=0)
    twin.set_ylim(0, 1), twin.set_ylabel("recall, coverage")
    handles = right.get_legend_handles_labels()[0] + twin.get_legend_handles_labels()[0]
    twin.legend(handles, [h.get_label() for h in handles], fontsize=7, loc="lower center")
    fig.suptitle(f"{Path(sweep['run']).name}: guidance against accuracy and variety ({sweep['n']} samples per class, "
                 f"DDIM {sweep['steps']})", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("run")
    p.add_argument("--runs-dir", default="runs")
    p.add_argument("--n", type=int, default=50, help="samples per class and prompt kind at each scale")
    p.add_argument("--scales", type=float, nargs="+", default=[1, 2, 3, 4, 5, 7.5])
    p.add_argument("--intervals", type=interval_arg, nargs="+", default=[None],
                   help="guidance intervals: all (every step) or LO-HI timesteps")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--out", default="bench/guidance_sweep")
    p.add_argument("--plot-only", action="store_true", help="draw OUT.png again from OUT.json, sampling nothing")
    p.add_argument("--add", action="store_true", help="keep the rows already in OUT.json (same run and n) and add these scales")
    args = p.parse_args(argv)

    out = Path(args.out)
    if args.plot_only:
        plot(json.loads(out.with_suffix(".json").read_text()), out.with_suffix(".png"))
        print(f"saved {out.with_suffix('.png')}")
        return 0
    run = Path(args.run)
    train, held = run_data(run)
    judge, info = load_or_train_judge(cached_judge_path(args.runs_dir, train), train, held)
    model = load_stable_diffusion(str(run / "model.safetensors"))
    rows = []
    if args.add and out.with_suffix(".json").exists():
        earlier = json.loads(out.with_suffix(".json").read_text())
        if earlier["run"] != str(run) or earlier["n"] != args.n or earlier["steps"] != args.steps:
            p.error(f"{out.with_suffix('.json')} is another sweep (run {earlier['run']}, n {earlier['n']})")
        done = {(scale, interval_name(interval)) for scale in args.scales for interval in args.intervals}
        rows = [r for r in earlier["rows"] if (r["guidance"], r.get("interval", "all")) not in done]
    print(f"{'guidance':>8}{'interval':>10}{'template':>10}{'unseen':>8}{'worst':>7}{'FD':>7}{'FD/real':>9}{'precision':>11}"
          f"{'recall':>8}{'coverage':>10}")
    for scale, interval in [(scale, interval) for interval in args.intervals for scale in args.scales]:
        report, _ = evaluate(model, train, held, judge, info, args.n, steps=args.steps, guidance=scale,
                             guidance_interval=interval, progress=False)
        m = report["mean"]
        row = {"guidance": scale, "interval": interval_name(interval), **{k: m[k] for k in COLUMNS},
               "worst_class_over_judge": report["worst_class_over_judge"],
               "per_class": {c: {k: v[k] for k in ("accuracy", "unseen_accuracy", "fd_over_real", "recall", "coverage")}
                             for c, v in report["per_class"].items()}}
        rows.append(row)
        print(f"{scale:>8g}{interval_name(interval):>10}{m['accuracy']:>10.2f}{m['unseen_accuracy']:>8.2f}{report['worst_class_over_judge']:>7.2f}"
              f"{m['fd_samples']:>7.2f}{m['fd_over_real']:>9.1f}{m['precision']:>11.2f}{m['recall']:>8.2f}"
              f"{m['coverage']:>10.2f}", flush=True)
    rows.sort(key=order)
    reference = {k: report["mean"][k] for k in ("fd_train", "precision_real", "recall_real", "coverage_real")}
    floor = {k: report["mean"][k] for k in ("fd_reconstructed", "fd_reconstructed_over_real", "precision_reconstructed",
                                            "recall_reconstructed", "coverage_reconstructed")}
    print(f"real training images against the same held-out ones: FD {reference['fd_train']:.2f}, precision "
          f"{reference['precision_real']:.2f}, recall {reference['recall_real']:.2f}, coverage {reference['coverage_real']:.2f}; "
          f"judge {info['held_out_accuracy']:.3f} on real held-out images")
    print(f"the VAE's reconstructions of those training images (the first stage's floor): FD {floor['fd_reconstructed']:.2f} "
          f"= {floor['fd_reconstructed_over_real']:.1f} x real, precision {floor['precision_reconstructed']:.2f}, recall "
          f"{floor['recall_reconstructed']:.2f}, coverage {floor['coverage_reconstructed']:.2f}")

    out.parent.mkdir(parents=True, exist_ok=True)
    sweep = {"run": str(run), "n": args.n, "steps": args.steps, "judge_held_out_accuracy": info["held_out_accuracy"],
             "real_reference": reference, "vae_floor": floor, "rows": rows}
    out.with_suffix(".json").write_text(json.dumps(sweep, indent=2) + "\n")
    plot(sweep, out.with_suffix(".png"))
    print(f"saved {out.with_suffix('.json')} and {out.with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
