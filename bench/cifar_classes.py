"""Do the samples show the class they were asked for? A CIFAR-10 classifier scores a trained model.

    # 1. train the judge on the training split (the last 500 images of each class held out to score it)
    python bench/cifar_classes.py train --data-dir <cifar10/train> --minutes 6 --out runs/judge.pt
    # 2. generate N images per class prompt from a minildm run and classify them
    python bench/cifar_classes.py score runs/cifar30 --judge runs/judge.pt --per-class 50 \\
        --guidance 1 3 5 --grid bench/train_cifar_classes.png

`python -m minildm.evaluate` is the built-in successor of this script (the same judge, a cached one,
and Fréchet distances too). The judge is `minildm.judge.Judge`, a small convolutional network (three
stages of two 3x3 convolutions with batch norm, then global average pooling), trained with random crops and flips for a wall-clock budget, and its
own accuracy on the 5,000 held-out images is printed first: a sample's class accuracy can only be
read against it. Chance is 10%.

Scoring: for each class, N images of the prompt "a photo of a <class>" in one batch from one seed
(the same starting noise for every class and guidance scale), DDIM with the given steps; a sample counts as right when the judge's top class is
the prompted one. The grid has one row per class at the first guidance scale listed after 1 (or the
only one given).
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from minildm import data as data_module
from minildm.judge import Judge, augment
from minildm.ldm import find_latest_checkpoint, load_stable_diffusion


@torch.no_grad()
def accuracy(judge: Judge, images: torch.Tensor, labels: torch.Tensor, batch: int = 500) -> float:
    judge.eval()
    right = 0
    for i in range(0, len(images), batch):
        x = data_module.to_float(images[i:i + batch])
        right += (judge(x).argmax(1) == labels[i:i + batch]).sum().item()
    return right / len(images)


def train(args) -> None:
    data = data_module.load_cifar10(args.data_dir)
    train_set, held = data.split(500)
    labels = torch.as_tensor(train_set.labels)
    torch.manual_seed(0)
    judge = Judge(args.width)
    opt = torch.optim.SGD(judge.parameters(), lr=args.lr, momentum=0.9, nesterov=True, weight_decay=5e-4)
    generator = torch.Generator().manual_seed(0)
    budget, start, step, seen = args.minutes * 60, time.perf_counter(), 0, 0
    judge.train()
    while (elapsed := time.perf_counter() - start) < budget:
        progress = elapsed / budget  # one cycle: linear warm-up over 15% of the budget, then cosine down
        lr = args.lr * (progress / 0.15 if progress < 0.15 else 0.5 * (1 + math.cos(math.pi * (progress - 0.15) / 0.85)))
        for group in opt.param_groups:
            group["lr"] = lr
        idx = torch.randint(0, len(train_set), (args.batch_size,), generator=generator)
        x = augment(data_module.to_float(train_set.images[idx]), generator)
        loss = F.cross_entropy(judge(x), labels[idx], label_smoothing=0.1)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        step, seen = step + 1, seen + args.batch_size
        if step % 100 == 0:
            print(f"step {step}  loss {loss.item():.3f}  lr {lr:.3f}  {seen / elapsed:.0f} images/s", flush=True)
    held_acc = accuracy(judge, held.images, torch.as_tensor(held.labels))
    print(f"trained {step} steps ({seen / len(train_set):.1f} epochs) in {args.minutes} min; "
          f"held-out accuracy {held_acc:.1%} on {len(held)} images")
    torch.save({"state": judge.state_dict(), "width": args.width, "held_out_accuracy": held_acc,
                "class_names": data.class_names}, args.out)
    print(f"saved {args.out}")


@torch.no_grad()
def score(args) -> None:
    saved = torch.load(args.judge, weights_only=True)
    judge = Judge(saved["width"])
    judge.load_state_dict(saved["state"])
    judge.eval()
    class_names = saved["class_names"]
    print(f"judge: held-out accuracy {saved['held_out_accuracy']:.1%} on real images")

    path = args.run
    if path is None:
        path = find_latest_checkpoint("runs")
    elif Path(path).is_dir():
        path = str(Path(path) / "model.safetensors")
    model = load_stable_diffusion(path)
    results, grid_rows = {}, None
    grid_scale = next((g for g in args.guidance if g != 1), args.guidance[0])
    for scale in args.guidance:
        per_class, rows = [], []
        start = time.perf_counter()
        for label, name in enumerate(class_names):
            prompt = f"a photo of {data_module.article(name)} {name}"
            images = model.generate(prompt, num_images=args.per_class, num_steps=args.steps,
                                    guidance_scale=scale, seed=args.seed)
            predicted = judge(images * 2 - 1).argmax(1)
            per_class.append((predicted == label).float().mean().item())
            rows.append(images[:args.grid_columns])
        seconds = time.perf_counter() - start
        mean = sum(per_class) / len(per_class)
        results[str(scale)] = {"accuracy": mean, "per_class": dict(zip(class_names, per_class)),
                               "seconds_per_image": seconds / (len(class_names) * args.per_class)}
        print(f"guidance {scale}: class accuracy {mean:.1%} over {len(class_names) * args.per_class} samples  "
              + "  ".join(f"{n} {a:.0%}" for n, a in zip(class_names, per_class)), flush=True)
        if scale == grid_scale:
            grid_rows = rows
    if args.grid and grid_rows is not None:
        from torchvision.utils import save_image
        save_image(torch.cat(grid_rows), args.grid, nrow=args.grid_columns, padding=1, pad_value=1.0)
        print(f"saved {args.grid}: one row per class ({', '.join(class_names)}), guidance {grid_scale}")
    if args.json:
        Path(args.json).write_text(json.dumps({"checkpoint": path, "steps": args.steps, "per_class": args.per_class,
                                               "judge_held_out_accuracy": saved["held_out_accuracy"],
                                               "guidance": results}, indent=2))


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train", help="train the judge on the CIFAR-10 training split")
    t.add_argument("--data-dir", required=True, help="CIFAR-10 archive/folder or ImageFolder tree")
    t.add_argument("--minutes", type=float, default=6.0, help="wall-clock training budget")
    t.add_argument("--width", type=int, default=32, help="channels of the first stage")
    t.add_argument("--batch-size", type=int, default=128)
    t.add_argument("--lr", type=float, default=0.1, help="peak SGD learning rate")
    t.add_argument("--out", default="runs/judge.pt", help="where to save the judge")
    s = sub.add_parser("score", help="class accuracy of a run's samples")
    s.add_argument("run", nargs="?", default=None, help="run folder or checkpoint (default: the newest run)")
    s.add_argument("--judge", default="runs/judge.pt", help="the judge saved by `train`")
    s.add_argument("--per-class", type=int, default=50, help="samples per class prompt")
    s.add_argument("--steps", type=int, default=50, help="DDIM steps")
    s.add_argument("--seed", type=int, default=0, help="seed of the starting noise")
    s.add_argument("--guidance", type=float, nargs="+", default=[1.0, 3.0], help="guidance scales to score")
    s.add_argument("--grid", default=None, help="save a PNG with one row of samples per class")
    s.add_argument("--grid-columns", type=int, default=10, help="samples per row of the grid")
    s.add_argument("--json", default=None, help="also write the figures to this JSON file")
    args = p.parse_args()
    train(args) if args.command == "train" else score(args)


if __name__ == "__main__":
    main()
