"""Does the model draw what the prompt asks for, in any words, and in variety? `python -m minildm.evaluate RUN`.

A trained text-to-image model is only useful if its captions steer it. For a run on a data set with
classes (CIFAR-10), this command asks the model for n images of every class, twice: with the prompt
"a photo of a <class>" (a training template) and with phrasings that training never used (300 of
them in data/unseen_phrasings.txt: "a muddy cat near a lake", "THE CAT ON A HILL"), and lets a
judge that never saw a generated image say what they show:

    judge           a small CNN classifier trained on the run's own training split (the images the
                    generator learnt from; never on the held-out ones), cached on disk. Its accuracy on
                    held-out real images is what a generator of new images, as good as real photos,
                    would get; "x the judge's" divides by it. On its own training images the judge is
                    right more often (printed too): a generator that returned training images would
                    score that, so a ratio above 1 means copying or unusually typical images
    class accuracy  the fraction of a class's samples the judge puts in that class (chance: 1 / classes),
                    for the template prompt and for the unseen phrasings; their ratio says whether the
                    model reads text or learnt its training sentences
    FD              Fréchet distance between two sets of images in the judge's penultimate features
                    (the FID recipe, with this judge in place of Inception): 0 for the same
                    distribution; also how far real training images are from the held-out ones
                    (the floor, "FD real"), and a blurred copy of them and pure noise (to show the
                    scale). FD / FD real is the scale-free figure
    copies          each sample's distance to its nearest training image in pixels, against the
                    same for held-out images: the share of samples nearer than all but 1% of held-out
                    images is about 1% for a generator of new images, near 100% for one that copies
    precision,      k-NN precision (samples that look real), recall and coverage (how much of the real
    recall, cov.    variety the samples reach) against n held-out images, k = 4; real training images
                    against the same held-out ones give the reference

    python -m minildm.evaluate                    # the newest run, 100 samples per class and prompt kind
    python -m minildm.evaluate runs/NAME --n 20   # a quick look
    python -m minildm.evaluate runs/NAME --image-adapter photo-prompts.safetensors   # image prompts instead

With --image-adapter (python -m minildm.finetune image-prompt) the prompts are photos instead of text:
each class's first n held-out photos, one a sample, with the class's other held-out photos as the real
images to compare with. The report adds how far a sample is from its own prompt photo against another
photo of the class: near 0 the model copied the photo; near 1 it drew a picture of its own, which with a
high class accuracy means the photo gave the class (a model that ignored the photo would also be near 1,
at chance accuracy).

Samples use the sampling command line's defaults (DDIM, 50 steps, guidance 7.5; bench/RESULTS.md
sweeps the scale) and seeds seed + i, so image i of every class starts from the same noise and
`python -m minildm.sample PROMPT --seed SEED+i` redraws it. Everything is written to RUN/eval/: a JSON
report and a grid with a row per class (template prompts).

Notation: n samples per class, K classes, F judge feature width; images x in [-1, 1] (B, 3, H, W)
unless said; mu, S mean and covariance of a feature set.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

from . import data as data_module
from .cli import Parser, default_guidance_interval
from .data import class_prompt, fill_template
from .data.wording import UNSEEN_PHRASINGS, unseen_phrasings
from .judge import (JUDGE_STEPS, blurred, cached_judge_path, copies, frechet_distance, judge_outputs,
                    load_or_train_judge, precision_recall)

KNN = 4   # neighbours of the k-NN precision, recall and coverage (fewer only when a set is smaller)

# ----------------------------------------------------------------------------------------------
# Sampling n images per class prompt


def template_prompts(name: str, n: int) -> list:
    """n times the training template a user types: "a photo of a cat"."""
    return [class_prompt(name)] * n


def unseen_prompts(name: str, n: int, frames: list, offset: int = 0) -> list:
    """n held-out phrasings of `name`, frames offset, offset + 1, ... in turn (wrapping around)."""
    return [fill_template(frames[(offset + i) % len(frames)], name) for i in range(n)]


def most_frequent_other(predicted: torch.Tensor, k: int, names: list):
    """The class other than k the judge named most often for class k's samples (None if it never erred)."""
    counts = torch.bincount(predicted, minlength=len(names))
    counts[k] = 0
    return names[int(counts.argmax())] if counts.sum() else None


@torch.no_grad()
def sample_per_class(model, class_names, n: int, *, prompts=template_prompts, batch_size: int = 100,
                     seed: int = 0, steps: int = 50, sampler: str = "ddim", guidance: float = 7.5,
                     guidance_interval=None, output_type: str = "image", progress: bool = True,
                     desc: str = "sampling", image_prompts: dict | None = None) -> dict:
    """{class name: n images (n, 3, H, W) in [0, 1]} (or latents); image i of each class uses seed + i
    and the i-th of `prompts(name, n)` (by default n times "a photo of a <class>"), or with `image_prompts`
    ({class name: n uint8 photos}, for a model with an image adapter) the i-th photo and no text."""
    from tqdm.auto import tqdm

    out = {}
    bar = tqdm(total=len(class_names) * n, desc=desc, unit="image", disable=not progress)
    for name in class_names:
        texts, parts = (prompts(name, n) if image_prompts is None else [""] * n), []
        for start in range(0, n, batch_size):
            seeds = list(range(seed + start, seed + min(n, start + batch_size)))
            photos = None if image_prompts is None else image_prompts[name][start:start + len(seeds)]
            parts.append(model.generate(texts[start:start + len(seeds)], image_prompt=photos, seeds=seeds,
                                        num_steps=steps, sampler=sampler, guidance_scale=guidance,
                                        guidance_interval=guidance_interval, output_type=output_type).cpu())
            bar.update(len(seeds))
        out[name] = torch.cat(parts)
    bar.close()
    return out


# ----------------------------------------------------------------------------------------------
# The report


def evaluate(model, train, held, judge, judge_info: dict, n: int = 100, *, batch_size: int = 100,
             seed: int = 0, steps: int = 50, sampler: str = "ddim", guidance: float = 7.5, guidance_interval=None,
             phrasings=UNSEEN_PHRASINGS, image_prompts: bool = False, progress: bool = True) -> tuple:
    """(report dict, samples {class: images}) for `model` on the classes of `held`: the template
    prompt's samples, and (unless `phrasings` is None) as many again from held-out phrasings.
    guidance_interval: the timesteps (t_lo, t_hi) that are guided, None for every step.

    image_prompts (a model with an image adapter): each class's samples are prompted instead by its first n
    held-out photos, one photo a sample and no text; the real images they are compared with are the class's
    other held-out photos, so no sample is scored against its own prompt."""
    names = list(held.class_names)
    options = dict(batch_size=batch_size, seed=seed, steps=steps, sampler=sampler, guidance=guidance,
                   guidance_interval=guidance_interval, progress=progress)
    started = time.perf_counter()
    photos = None
    if image_prompts:
        photos = {name: held.images[held.labels == k][:n] for k, name in enumerate(names)}
        fewest = min(int((held.labels == k).sum()) for k in range(len(names)))
        if fewest - n < 2:  # a Fréchet distance needs two images a side
            raise data_module.DataError(f"image prompts take n held-out photos of each class and compare the samples "
                                        f"with the others (two at least): --n must be at most {fewest - 2} here, "
                                        f"where a class has {fewest} held-out photos")
        phrasings = None
    samples = sample_per_class(model, names, n, desc="sampling (image prompts)" if photos else "sampling (template)",
                               image_prompts=photos, **options)
    unseen = {}
    if phrasings is not None:
        frames = unseen_phrasings(phrasings)
        unseen = sample_per_class(model, names, n, desc="sampling (unseen phrasings)", **options,
                                  prompts=lambda name, count: unseen_prompts(name, count, frames,
                                                                             names.index(name) * count))
    sampling_seconds = time.perf_counter() - started
    g = torch.Generator().manual_seed(seed)
    per_class, all_samples, all_held, held_n, ks = {}, [], [], [], []
    for k, name in enumerate(names):
        real_held = data_module.to_float(held.images[held.labels == k][n if photos else 0:])
        pool = (train.labels == k).nonzero().flatten()
        real_train = data_module.to_float(train.images[pool[torch.randperm(len(pool), generator=g)[:n]]])
        noise = torch.rand(n, *real_held.shape[1:], generator=g) * 2 - 1
        f_held, _ = judge_outputs(judge, real_held)
        f_samples, predicted = judge_outputs(judge, samples[name] * 2 - 1)
        f_train, predicted_train = judge_outputs(judge, real_train)
        f_blur, _ = judge_outputs(judge, blurred(real_train))
        f_rec, _ = judge_outputs(judge, reconstruct(model, real_train, batch_size))
        f_noise, _ = judge_outputs(judge, noise)
        # Precision and recall compare sets of one size: n held-out images against n samples (or n training images).
        pick = torch.randperm(len(f_held), generator=g)[:n]
        f_held_n = f_held[pick]
        held_n.append(real_held[pick])
        c = per_class[name] = {
            "accuracy": (predicted == k).float().mean().item(),
            "judge_on_real": judge_info["held_out_per_class"].get(name),
            "judge_on_train": (predicted_train == k).float().mean().item(),
            "confused_with": most_frequent_other(predicted, k, names),
            "fd_samples": frechet_distance(f_samples, f_held), "fd_train": frechet_distance(f_train, f_held),
            "fd_blurred": frechet_distance(f_blur, f_held), "fd_noise": frechet_distance(f_noise, f_held),
            "fd_reconstructed": frechet_distance(f_rec, f_held)}
        c["fd_over_real"] = c["fd_samples"] / max(c["fd_train"], 1e-12)
        c["fd_reconstructed_over_real"] = c["fd_reconstructed"] / max(c["fd_train"], 1e-12)
        k_nn = min(KNN, len(f_held_n) - 1, len(f_samples) - 1, len(f_train) - 1)
        ks.append(k_nn)
        c.update(precision_recall(f_held_n, f_samples, k_nn))
        c.update({key + "_real": value for key, value in precision_recall(f_held_n, f_train, k_nn).items()})
        c.update({key + "_reconstructed": value for key, value in precision_recall(f_held_n, f_rec, k_nn).items()})
        if unseen:
            c["unseen_accuracy"] = (judge_outputs(judge, unseen[name] * 2 - 1)[1] == k).float().mean().item()
        all_samples.append(f_samples)
        all_held.append(f_held)
    judge_acc = judge_info["held_out_accuracy"]
    accs = [c["accuracy"] for c in per_class.values()]
    keys = ["accuracy", "judge_on_train", "fd_samples", "fd_train", "fd_blurred", "fd_noise", "fd_over_real",
            "fd_reconstructed", "fd_reconstructed_over_real", "precision", "recall", "coverage", "precision_real",
            "recall_real", "coverage_real", "precision_reconstructed", "recall_reconstructed",
            "coverage_reconstructed"] + (["unseen_accuracy"] if unseen else [])
    mean = {key: sum(c[key] for c in per_class.values()) / len(per_class) for key in keys}
    report = {
        "prompts": {name: "image prompts" if photos else class_prompt(name) for name in names},
        "settings": {"n": n, "seed": seed, "steps": steps, "sampler": sampler, "guidance": guidance,
                     "guidance_interval": list(guidance_interval) if guidance_interval else None, "knn_k": min(ks)},
        "judge": {k: judge_info[k] for k in ("held_out_accuracy", "held_out_per_class", "width", "steps",
                                              "train_images", "held_out_images") if k in judge_info},
        "per_class": per_class, "mean": mean,
        "fd_all_classes": frechet_distance(torch.cat(all_samples), torch.cat(all_held)),
        "copies": copies(torch.cat([samples[name] for name in names] + [unseen[name] for name in unseen]) * 2 - 1,
                         torch.cat(held_n), train.images),
        "accuracy_over_judge": mean["accuracy"] / judge_acc,
        "worst_class_over_judge": min(accs) / judge_acc,
        "sampling_seconds_per_image": sampling_seconds / (n * len(names) * (2 if unseen else 1)),
    }
    if photos:  # does a sample follow its own prompt photo more than another photo of the class?
        x = torch.cat([samples[name] for name in names]) * 2 - 1
        prompt = torch.cat([data_module.to_float(photos[name]) for name in names])
        other = torch.cat([data_module.to_float(photos[name].roll(1, 0)) for name in names])
        own_d, other_d = ((x - prompt).pow(2).flatten(1).mean(1).sqrt().median().item(),
                          (x - other).pow(2).flatten(1).mean(1).sqrt().median().item())
        report["image_prompts"] = {"photos": "the first n held-out photos of each class, one a sample",
                                   "distance_to_own_prompt": own_d, "distance_to_another_photo": other_d,
                                   "own_over_another": own_d / max(other_d, 1e-12)}
    if unseen:
        report["unseen"] = {"phrasings": str(phrasings), "count": len(frames),
                            "examples": {name: unseen_prompts(name, 3, frames, k * n) for k, name in enumerate(names)},
                            "accuracy": mean["unseen_accuracy"],
                            "over_template": mean["unseen_accuracy"] / max(mean["accuracy"], 1e-12)}
    return report, samples


def format_report(report: dict) -> str:
    """The report as the table the command prints."""
    judge = report["judge"]
    unseen = "unseen" in report
    m = report["mean"]
    on_train = (f", {m['judge_on_train']:.1%} on {report['settings']['n']} of its training images per class"
                if "judge_on_train" in m else "")
    lines = [f"judge: {judge['held_out_accuracy']:.1%} right on {judge['held_out_images']} held-out real images{on_train} "
             f"(a CNN trained on the {judge['train_images']} training images only, the generator's training images)",
             f"{'class':<12}{'image' if 'image_prompts' in report else 'template':>9}{'unseen':>8}{'judge real':>11}{'mistaken for':>14}{'FD samples':>12}"
             f"{'FD real':>9}{'FD blurred':>12}{'FD noise':>10}{'FD/real':>9}{'precision':>11}{'recall':>8}"
             f"{'coverage':>10}"]

    def row(label, c, judge_real, confused):
        return (f"{label:<12}{c['accuracy']:>9.2f}{c['unseen_accuracy'] if unseen else float('nan'):>8.2f}"
                f"{judge_real:>11.2f}{confused:>14}{c['fd_samples']:>12.2f}{c['fd_train']:>9.2f}"
                f"{c['fd_blurred']:>12.2f}{c['fd_noise']:>10.2f}{c['fd_over_real']:>9.1f}{c['precision']:>11.2f}"
                f"{c['recall']:>8.2f}{c['coverage']:>10.2f}")

    for name, c in report["per_class"].items():
        lines.append(row(name, c, c["judge_on_real"], c["confused_with"] or "-"))
    lines.append(row("mean", m, judge["held_out_accuracy"], ""))
    s = report["settings"]
    if "image_prompts" in report:
        i = report["image_prompts"]
        lines.append(f"image prompts (a held-out photo of the class, no text): class accuracy {m['accuracy']:.2f} = "
                     f"{report['accuracy_over_judge']:.2f} x the judge's on real images (worst class "
                     f"{report['worst_class_over_judge']:.2f} x); a sample is {i['distance_to_own_prompt']:.3f} from its "
                     f"prompt photo and {i['distance_to_another_photo']:.3f} from another photo of the class (RMS pixel "
                     f"difference, median; ratio {i['own_over_another']:.2f}: near 0 copies the photo; near 1 draws the class "
                     "if the class accuracy says the photo is read at all)")
    else:
        lines.append(f"template prompt (\"{next(iter(report['prompts'].values()))}\"): class accuracy {m['accuracy']:.2f} = "
                     f"{report['accuracy_over_judge']:.2f} x the judge's on real images (worst class "
                     f"{report['worst_class_over_judge']:.2f} x)")
    if unseen:
        u = report["unseen"]
        lines.append(f"unseen phrasings ({u['count']} that training never used, e.g. \"{u['examples'][next(iter(u['examples']))][0]}\"): "
                     f"class accuracy {u['accuracy']:.2f} = {u['over_template']:.2f} x the template's")
    lines.append(f"variety: FD {m['fd_samples']:.2f} = {m['fd_over_real']:.1f} x real images' own (FD real); precision "
                 f"{m['precision']:.2f}, recall {m['recall']:.2f}, coverage {m['coverage']:.2f} (real images: "
                 f"{m['precision_real']:.2f}, {m['recall_real']:.2f}, {m['coverage_real']:.2f}); FD over all classes "
                 f"{report['fd_all_classes']:.2f}")
    if "fd_reconstructed" in m:
        lines.append(f"the first stage's floor: the VAE's reconstructions of the same training images are at FD "
                     f"{m['fd_reconstructed']:.2f} = {m['fd_reconstructed_over_real']:.1f} x real (recall "
                     f"{m['recall_reconstructed']:.2f}, coverage {m['coverage_reconstructed']:.2f}); samples are "
                     "decoded by the same VAE, so their FD can hardly go below it")
    if "copies" in report:
        c = report["copies"]
        lines.append(f"copies: a sample's nearest training image is {c['nearest_median_samples']:.3f} away (RMS pixel "
                     f"difference, median), a held-out image's {c['nearest_median_held']:.3f} (ratio "
                     f"{c['distance_ratio']:.2f}); {c['near_copies']:.1%} of samples are nearer than all but "
                     f"{c['quantile']:.0%} of held-out images (a generator of new images: about {c['quantile']:.0%})")
    interval = s.get("guidance_interval")
    lines.append(f"{s['n']} samples per class and prompt kind, {s['sampler']} {s['steps']} steps, guidance "
                 f"{s['guidance']:g}" + (" at timesteps {:g}-{:g}".format(*interval) if interval else "") +
                 f", seeds {s['seed']}..{s['seed'] + s['n'] - 1}")
    return "\n".join(lines)


def save_grid(samples: dict, path, columns: int = 10) -> None:
    """A PNG with one row per class: its first `columns` samples."""
    from torchvision.utils import save_image

    rows = [images[:columns] for images in samples.values()]
    save_image(torch.cat(rows), path, nrow=min(columns, len(rows[0])), padding=1, pad_value=1.0)


# ----------------------------------------------------------------------------------------------
# Command line


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog="python -m minildm.evaluate",
                                description="Class accuracy and Fréchet distance of a run's samples, "
                                            "scored by a judge trained on the run's training images.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("run", nargs="?", default=None, help="a run folder (default: the newest run in --runs-dir)")
    p.add_argument("--runs-dir", default="runs", help="where runs (and the cached judges, in judges/) live")
    p.add_argument("--data-dir", default=None, help="the data set's local copy (default: the run's own)")
    p.add_argument("--n", type=int, default=100, help="samples per class prompt (at least 2)")
    p.add_argument("--batch-size", type=int, default=100, help="images sampled at once")
    p.add_argument("--steps", type=int, default=50, help="sampler steps")
    p.add_argument("--sampler", default="ddim", help="sampling method (as python -m minildm.sample)")
    p.add_argument("--guidance", type=float, default=7.5, help="classifier-free guidance scale")
    p.add_argument("--guidance-interval", type=float, nargs=2, default=None, metavar=("T_LO", "T_HI"),
                   help="guide only the steps at timesteps T_LO..T_HI (0 1000: every step); default: the run's own")
    p.add_argument("--seed", type=int, default=0, help="image i of each class uses seed + i")
    p.add_argument("--phrasings", default=str(UNSEEN_PHRASINGS),
                   help="held-out phrasings, one a line with {} for the class word (default: the 300 training never used)")
    p.add_argument("--templates-only", action="store_true", help="score the template prompt only (half the sampling)")
    p.add_argument("--image-adapter", default=None, metavar="FILE",
                   help="score image prompts instead of text: each class's first n held-out photos as prompts, with "
                        "this adapter (python -m minildm.finetune image-prompt)")
    p.add_argument("--judge", default=None, help="the judge file (default: <runs-dir>/judges/<data hash>.safetensors, "
                                                 "trained there on first use)")
    p.add_argument("--judge-steps", type=int, default=JUDGE_STEPS, help="training steps of a new judge")
    p.add_argument("--no-ema", action="store_true", help="score the raw weights instead of the EMA ones")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, ... (auto: cuda when available)")
    p.add_argument("--overwrite", action="store_true", help="replace an earlier report of the same settings "
                                                             "(default: a new name)")
    return p


@torch.no_grad()
def reconstruct(model, images: torch.Tensor, batch_size: int = 100) -> torch.Tensor:
    """decode(encode(x)) of images in [-1, 1] through the model's VAE (posterior mean), on the CPU."""
    parts = []
    for i in range(0, len(images), batch_size):
        x = images[i:i + batch_size].to(model.device)
        parts.append(model.decode_latents(model.encode_image(x)).clamp(-1, 1).float().cpu())
    return torch.cat(parts)


def run_data(run_dir: Path, data_dir=None) -> tuple:
    """(train, held_out) exactly as the run split its data set, from its config.json."""
    config = json.loads((run_dir / "config.json").read_text())
    if config.get("dataset") != "cifar":
        raise data_module.DataError(f"{run_dir} was trained on --dataset {config.get('dataset')}; evaluation "
                                    "needs a data set with classes (--dataset cifar)")
    holdout = int(config.get("holdout_per_class") or 0)
    if holdout <= 0:
        raise data_module.DataError(f"{run_dir} trained on every image; evaluation needs held-out images "
                                    "(train with --holdout-per-class N)")
    data = data_module.load_dataset("cifar", data_dir or config.get("data_dir"), config.get("resolution", 32))
    train, held = data.split(holdout)
    if config.get("num_images") is not None and config["num_images"] < len(train):
        train = train.subset(torch.arange(config["num_images"]))
    return train, held


def evaluate_run(run_dir, *, runs_dir="runs", data_dir=None, n: int = 100, batch_size: int = 100, steps: int = 50,
                 sampler: str = "ddim", guidance: float = 7.5, guidance_interval="run", seed: int = 0, judge_path=None,
                 judge_steps: int = JUDGE_STEPS, use_ema: bool = True, device="cpu", model=None,
                 phrasings=UNSEEN_PHRASINGS, image_adapter=None, progress: bool = True, overwrite: bool = False) -> dict:
    """Evaluate the run in `run_dir` (or the given LatentDiffusion `model`); print the table, write
    RUN/eval/<settings>.json and .png, and return the report. guidance_interval: (t_lo, t_hi), None for
    every step, or "run" for the run's own default (cli.default_guidance_interval)."""
    from .ldm import load_stable_diffusion

    run_dir = Path(run_dir)
    train, held = run_data(run_dir, data_dir)
    if judge_path is None:
        judge_path = cached_judge_path(runs_dir, train, judge_steps)
    judge, info = load_or_train_judge(judge_path, train, held, steps=judge_steps, progress=progress)
    print(f"judge: {judge_path} ({'cached' if info['cached'] else 'trained now'})", file=sys.stderr)
    if model is None:
        model = load_stable_diffusion(str(run_dir / "model.safetensors"), device=device, use_ema=use_ema)
    if image_adapter is not None:
        model.load_image_adapter(image_adapter)
    if guidance_interval == "run":
        guidance_interval = default_guidance_interval(str(run_dir / "model.safetensors"))
    report, samples = evaluate(model, train, held, judge, info, n, batch_size=batch_size, seed=seed, steps=steps,
                               sampler=sampler, guidance=guidance, guidance_interval=guidance_interval,
                               phrasings=phrasings, image_prompts=image_adapter is not None, progress=progress)
    report["checkpoint"] = str(run_dir / "model.safetensors")
    if image_adapter is not None:
        report["image_adapter"] = str(image_adapter)
    report["judge"]["path"] = str(judge_path)
    out = run_dir / "eval"
    out.mkdir(exist_ok=True)
    from .cli import free_path
    stem = (f"n{n}-{sampler}{steps}-g{guidance:g}" + ("-t{:g}-{:g}".format(*guidance_interval) if guidance_interval
                                                      else "") + f"-seed{seed}" + ("-raw" if not use_ema else "")
            + (f"-image-{Path(image_adapter).stem}" if image_adapter is not None else ""))
    stem = free_path(str(out / f"{stem}.json"), overwrite)[:-5]
    tmp = f"{stem}.json.tmp-{os.getpid()}"
    Path(tmp).write_text(json.dumps(report, indent=2) + "\n")
    os.replace(tmp, f"{stem}.json")
    save_grid(samples, f"{stem}.png")
    print(format_report(report))
    print(f"saved {stem}.json and {stem}.png (a row per class)")
    report["files"] = [f"{stem}.json", f"{stem}.png"]
    return report


def main(argv=None) -> int:
    from .cli import (USAGE, check_choice, check_float, check_guidance_interval, check_int, check_readable_file,
                      check_seed, fail, named_path, resolve_device, usage)
    from .convert import CheckpointError
    from .ldm import find_latest_checkpoint
    from .samplers import SAMPLERS

    args = build_parser().parse_args(argv)
    check_int("--n", args.n, 2)                  # a Fréchet distance needs two samples at least
    for flag in ("batch_size", "judge_steps"):
        check_int("--" + flag.replace("_", "-"), getattr(args, flag), 1)
    check_int("--steps", args.steps, 1, 1000)
    check_float("--guidance", args.guidance, 0, 100)
    check_guidance_interval("--guidance-interval", args.guidance_interval)
    check_seed("--seed", args.seed, args.n)
    check_choice("--sampler", args.sampler, list(SAMPLERS))
    if args.data_dir is not None and not os.path.exists(args.data_dir):
        usage("--data-dir", args.data_dir, "does not exist")
    if not args.templates_only:
        check_readable_file("--phrasings", args.phrasings)
        try:
            unseen_phrasings(args.phrasings)
        except (ValueError, UnicodeDecodeError) as e:
            usage("--phrasings", args.phrasings, str(e).split(": ", 1)[-1])
    check_readable_file("--image-adapter", args.image_adapter)
    if args.judge is not None and os.path.isdir(args.judge):
        usage("--judge", args.judge, "is a folder, not a judge file")
    device, _ = resolve_device(args.device)
    if args.run is None:
        found = find_latest_checkpoint(args.runs_dir)
        if found is None:
            fail(f"no run found in {args.runs_dir}/; train one with `python -m minildm.train --dataset cifar` "
                 "or name a run folder", USAGE)
        run_dir = Path(found).parent
    else:
        run_dir = Path(named_path(args.run, args.runs_dir))
    if not (run_dir / "config.json").exists() or not (run_dir / "model.safetensors").exists():
        usage("run", str(run_dir), "is not a finished training run (it needs config.json and model.safetensors)")
    try:
        evaluate_run(run_dir, runs_dir=args.runs_dir, data_dir=args.data_dir, n=args.n, batch_size=args.batch_size,
                     steps=args.steps, sampler=args.sampler, guidance=args.guidance, seed=args.seed,
                     guidance_interval="run" if args.guidance_interval is None else tuple(args.guidance_interval),
                     judge_path=args.judge, judge_steps=args.judge_steps, use_ema=not args.no_ema, device=device,
                     phrasings=None if args.templates_only else args.phrasings, image_adapter=args.image_adapter,
                     overwrite=args.overwrite)
    except (data_module.DataError, CheckpointError) as e:
        fail(str(e))
    return 0


if __name__ == "__main__":
    sys.exit(main())
