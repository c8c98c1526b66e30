"""The judge that scores a trained CIFAR model, and the yardsticks around it.

    Judge, train_judge      a small CNN classifier (0.29M parameters) trained on a run's training split
                            only, with crops and flips; cached on disk by the data it saw
    judge_outputs           (features, predicted classes) of images: the penultimate layer and the argmax
    frechet_distance        the FID recipe in the judge's feature space: ||mu_a - mu_b||^2 +
                            tr(S_a + S_b - 2 (S_a S_b)^(1/2))
    precision_recall        k-nearest-neighbour precision, recall and coverage of a sample set
                            against real images in the same features: fidelity and diversity apart
    blurred                 images averaged over f x f pixel blocks: a reference for "blurry"
    copies                  how close samples come to their nearest training image, against held-out images
    LatentProbe             a ridge classifier on latents, cheap enough to run during training

`python -m minildm.evaluate` (evaluate.py) puts them together into a report.

Notation: K classes, F judge feature width; images x in [-1, 1] (B, 3, H, W) unless said; mu, S mean
and covariance of a feature set.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from . import data as data_module


JUDGE_STEPS = 1500
JUDGE_BATCH = 128


# ----------------------------------------------------------------------------------------------
# The judge


def conv_bn(c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU())


class Judge(nn.Module):
    """Images (B, 3, H, W) in [-1, 1] -> K class logits: three stages of two 3x3 convolutions with
    batch norm, the first two followed by 2x2 max pooling, then global average pooling (F = 4 * width)."""

    def __init__(self, width: int = 32, num_classes: int = 10):
        super().__init__()
        w = width
        self.features = nn.Sequential(
            conv_bn(3, w), conv_bn(w, w), nn.MaxPool2d(2),
            conv_bn(w, 2 * w), conv_bn(2 * w, 2 * w), nn.MaxPool2d(2),
            conv_bn(2 * w, 4 * w), conv_bn(4 * w, 4 * w), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head = nn.Linear(4 * w, num_classes)

    def forward(self, x):
        return self.head(self.features(x))


def augment(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Random horizontal flips and a random crop of the 4-pixel zero-padded batch."""
    B, _, H, W = x.shape
    flip = torch.rand(B, generator=generator) < 0.5
    x = torch.where(flip[:, None, None, None], x.flip(-1), x)
    dy, dx = torch.randint(0, 9, (2,), generator=generator).tolist()   # one offset per batch: cheap
    return F.pad(x, (4, 4, 4, 4))[:, :, dy:dy + H, dx:dx + W]


def train_judge(images: torch.Tensor, labels: torch.Tensor, num_classes: int, steps: int = JUDGE_STEPS,
                batch_size: int = JUDGE_BATCH, lr: float = 0.1, width: int = 32, seed: int = 0,
                progress: bool = True) -> Judge:
    """SGD with Nesterov momentum, label smoothing and a one-cycle learning rate (a linear warm-up over
    15% of the steps, then a cosine to zero) on uint8 `images` (N, 3, H, W) with `labels` (N,)."""
    from tqdm.auto import tqdm

    torch.manual_seed(seed)
    judge = Judge(width, num_classes)
    opt = torch.optim.SGD(judge.parameters(), lr=lr, momentum=0.9, nesterov=True, weight_decay=5e-4)
    g = torch.Generator().manual_seed(seed)
    judge.train()
    for step in tqdm(range(steps), desc="training the judge", unit="step", disable=not progress):
        p = step / steps
        for group in opt.param_groups:
            group["lr"] = lr * (p / 0.15 if p < 0.15 else 0.5 * (1 + math.cos(math.pi * (p - 0.15) / 0.85)))
        idx = torch.randint(len(images), (batch_size,), generator=g)
        x = augment(data_module.to_float(images[idx]), g)
        loss = F.cross_entropy(judge(x), labels[idx], label_smoothing=0.1)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return judge.eval()


@torch.no_grad()
def judge_outputs(judge: Judge, x: torch.Tensor, batch_size: int = 500) -> tuple:
    """(features (N, F) float64, predicted classes (N,)) for images x in [-1, 1]."""
    judge.eval()
    feats, preds = [], []
    for i in range(0, len(x), batch_size):
        f = judge.features(x[i:i + batch_size].float())
        feats.append(f.double())
        preds.append(judge.head(f).argmax(1))
    return torch.cat(feats), torch.cat(preds)


def data_key(images: torch.Tensor, labels: torch.Tensor, **settings) -> str:
    """A short hash of the training images, labels and judge settings: the judge's cache key."""
    h = hashlib.sha256()
    h.update(images.contiguous().numpy().tobytes())
    h.update(labels.numpy().tobytes())
    h.update(json.dumps(settings, sort_keys=True).encode())
    return h.hexdigest()[:16]


def cached_judge_path(runs_dir, train, steps: int = JUDGE_STEPS) -> Path:
    """Where the judge for these training images is cached: <runs_dir>/judges/cifar-<data key>.safetensors."""
    key = data_key(train.images, train.labels, steps=steps, width=32, seed=0)
    return Path(runs_dir) / "judges" / f"cifar-{key}.safetensors"


def load_or_train_judge(path, train, held, steps: int = JUDGE_STEPS, width: int = 32, seed: int = 0,
                        progress: bool = True) -> tuple:
    """(judge, info): the judge cached at `path`, or a new one trained on `train` and saved there.
    info holds its accuracy on the held-out images, overall and per class."""
    from safetensors.torch import load_file, save_file

    path = Path(path)
    if path.exists():
        from safetensors import safe_open
        with safe_open(str(path), "pt") as f:
            info = json.loads(f.metadata()["judge"])
        judge = Judge(info["width"], len(info["class_names"]))
        judge.load_state_dict(load_file(str(path)))
        return judge.eval(), dict(info, cached=True)
    started = time.perf_counter()
    judge = train_judge(train.images, train.labels, len(train.class_names), steps, width=width, seed=seed,
                        progress=progress)
    _, predicted = judge_outputs(judge, data_module.to_float(held.images))
    right = predicted == held.labels
    per_class = {name: right[held.labels == k].float().mean().item() for k, name in enumerate(held.class_names)}
    info = {"width": width, "steps": steps, "batch_size": JUDGE_BATCH, "seed": seed,
            "class_names": list(train.class_names), "train_images": len(train), "held_out_images": len(held),
            "held_out_accuracy": right.float().mean().item(), "held_out_per_class": per_class,
            "train_seconds": round(time.perf_counter() - started, 1)}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".tmp-{os.getpid()}")
    save_file({k: v.contiguous() for k, v in judge.state_dict().items()}, str(tmp), metadata={"judge": json.dumps(info)})
    os.replace(tmp, path)
    return judge, dict(info, cached=False)


# ----------------------------------------------------------------------------------------------
# Fréchet distance


def frechet_distance(a: torch.Tensor, b: torch.Tensor) -> float:
    """||mu_a - mu_b||^2 + tr(S_a) + tr(S_b) - 2 tr((S_a^1/2 S_b S_a^1/2)^1/2) for feature sets (N, F).

    The Fréchet (2-Wasserstein) distance between the Gaussians fitted to two sets: FID's formula.
    Square roots of symmetric positive semi-definite matrices through their eigenvalues, in float64.
    """
    if len(a) < 2 or len(b) < 2:
        raise ValueError("a Fréchet distance needs at least two samples on each side")
    a, b = a.double(), b.double()
    mu_a, mu_b = a.mean(0), b.mean(0)
    S_a, S_b = torch.cov(a.T), torch.cov(b.T)
    w, V = torch.linalg.eigh(S_a)
    root_a = V @ torch.diag(w.clamp_min(0).sqrt()) @ V.T                    # S_a^1/2
    M = root_a @ S_b @ root_a
    cross = torch.linalg.eigvalsh((M + M.T) / 2).clamp_min(0).sqrt().sum()
    return ((mu_a - mu_b).pow(2).sum() + S_a.trace() + S_b.trace() - 2 * cross).item()


def precision_recall(real: torch.Tensor, fake: torch.Tensor, k: int = 5) -> dict:
    """Precision, recall and coverage of feature sets real (N, F) and fake (M, F), with k-NN balls.

    Each point's ball reaches its k-th nearest neighbour in its own set. A Fréchet distance mixes two
    failures; these keep them apart (Kynkäänniemi et al., 2019; coverage: Naeem et al., 2020):

        precision   share of fake points inside some real ball: how many samples look real
        recall      share of real points inside some fake ball: how much of the real variety is drawn
        coverage    share of real balls holding at least one fake point: recall that a few outlying
                    samples with huge balls cannot inflate

    A generator that draws one image per class well has precision near 1 and recall and coverage near 0.
    """
    if len(real) <= k or len(fake) <= k:
        raise ValueError(f"k-NN precision and recall with k = {k} need more than {k} points on each side")
    real, fake = real.double(), fake.double()
    real_radii = torch.cdist(real, real).kthvalue(k + 1, dim=1).values     # k + 1: a point is its own nearest
    fake_radii = torch.cdist(fake, fake).kthvalue(k + 1, dim=1).values
    d = torch.cdist(fake, real)                                             # (M, N)
    inside_real = d <= real_radii[None, :]
    return {"precision": inside_real.any(1).double().mean().item(),
            "recall": (d <= fake_radii[:, None]).any(0).double().mean().item(),
            "coverage": inside_real.any(0).double().mean().item()}


def nearest_distance(x: torch.Tensor, pool: torch.Tensor, chunk: int = 4096) -> torch.Tensor:
    """(N,) for images x (N, 3, H, W) in [-1, 1]: the root-mean-square pixel difference from each to its
    nearest image in `pool` (M, 3, H, W; uint8 as a data set keeps them, or float in [-1, 1])."""
    a = x.flatten(1).double()
    best = torch.full((len(a),), math.inf, dtype=torch.float64)
    for i in range(0, len(pool), chunk):
        part = pool[i:i + chunk]
        b = (data_module.to_float(part) if part.dtype == torch.uint8 else part).flatten(1).double()
        squared = a.pow(2).sum(1, keepdim=True) + b.pow(2).sum(1) - 2 * a @ b.T        # (N, chunk)
        best = torch.minimum(best, squared.min(1).values)
    return (best.clamp_min(0) / a.shape[1]).sqrt()


def copies(samples: torch.Tensor, held: torch.Tensor, train_images: torch.Tensor, quantile: float = 0.01) -> dict:
    """Does a generator copy its training images? Each sample's distance to its nearest training image,
    against the same distance for real held-out images, which the generator never saw (all in [-1, 1]).

        near_copies     share of samples closer to a training image than all but `quantile` of the
                        held-out images are: about `quantile` for a generator that draws new images of
                        the same kind, near 1 for one that returns its training images
        distance_ratio  median nearest distance of the samples / that of the held-out images
    """
    distances = nearest_distance(torch.cat([samples, held]), train_images)     # one pass over the training set
    d_samples, d_held = distances[:len(samples)], distances[len(samples):]
    threshold = torch.quantile(d_held, quantile).item()
    return {"near_copies": (d_samples < threshold).double().mean().item(), "quantile": quantile,
            "threshold": threshold, "nearest_median_samples": d_samples.median().item(),
            "nearest_median_held": d_held.median().item(),
            "distance_ratio": (d_samples.median() / d_held.median().clamp_min(1e-12)).item()}


def blurred(x: torch.Tensor, factor: int = 4) -> torch.Tensor:
    """A blurred copy of images x: averaged over factor x factor blocks, then scaled back up bilinearly."""
    small = F.avg_pool2d(x, factor)
    return F.interpolate(small, size=x.shape[-2:], mode="bilinear", align_corners=False)


# ----------------------------------------------------------------------------------------------
# A cheap probe for training: a linear classifier on latents


class LatentProbe:
    """Class from a latent by ridge regression onto one-hot labels, fitted in closed form.

    Cheap enough to run during training (a 512 x 512 solve for 8x8x8 latents): it cannot tell
    classes apart as well as the judge, so read its accuracy on samples against its accuracy on real
    held-out latents, not against 1.
    """

    def __init__(self, latents: torch.Tensor, labels: torch.Tensor, num_classes: int, ridge: float = 1.0):
        X = self._design(latents)                                          # (N, P + 1)
        Y = F.one_hot(labels, num_classes).double()                        # (N, K)
        A = X.T @ X + ridge * torch.eye(X.shape[1], dtype=X.dtype)
        self.W = torch.linalg.solve(A, X.T @ Y)                            # (P + 1, K)

    @staticmethod
    def _design(latents: torch.Tensor) -> torch.Tensor:
        X = latents.flatten(1).double()
        return torch.cat([X, torch.ones(len(X), 1, dtype=X.dtype)], 1)

    def predict(self, latents: torch.Tensor) -> torch.Tensor:
        return (self._design(latents) @ self.W).argmax(1)

    def accuracy(self, latents: torch.Tensor, labels: torch.Tensor) -> float:
        return (self.predict(latents) == labels).float().mean().item()
