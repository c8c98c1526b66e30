"""The built-in evaluation: the Fréchet distance, the latent probe, and python -m minildm.evaluate end
to end on a fabricated CIFAR-10 tree (ten classes of flat colours) with a tiny trained run."""
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from minildm import data, judge

ROOT = Path(__file__).resolve().parents[1]
ENV = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", PYTHONPATH=str(ROOT))


def test_frechet_distance_matches_its_closed_form():
    """For b = 2a + 3 the covariances are S and 4S, so FD = |mu_a - mu_b|^2 + tr(S) exactly, from
    the sample statistics; a set is at distance 0 from itself; the distance is symmetric."""
    a = torch.randn(500, 6, generator=torch.Generator().manual_seed(0)).double() @ torch.randn(6, 6).double()
    b = 2 * a + 3
    S = torch.cov(a.T)
    expected = (a.mean(0) - b.mean(0)).pow(2).sum() + S.trace()
    assert judge.frechet_distance(a, b) == pytest.approx(expected.item(), rel=1e-6)
    assert judge.frechet_distance(b, a) == pytest.approx(expected.item(), rel=1e-6)
    assert abs(judge.frechet_distance(a, a)) < 1e-6


def test_precision_recall_tell_fidelity_from_variety():
    """The same distribution: all near 1. Samples collapsed onto a few real points: precise, but
    recall and coverage small. Samples far from every real point: all 0."""
    g = torch.Generator().manual_seed(0)
    real, other = torch.randn(400, 8, generator=g), torch.randn(400, 8, generator=g)
    same = judge.precision_recall(real, other)
    assert min(same.values()) > 0.85
    collapsed = real[:4].repeat(100, 1) + 0.01 * torch.randn(400, 8, generator=g)
    narrow = judge.precision_recall(real, collapsed)
    assert narrow["precision"] > 0.95 and narrow["recall"] < 0.05 and narrow["coverage"] < 0.1
    far = judge.precision_recall(real, other + 100)
    assert far == {"precision": 0.0, "recall": 0.0, "coverage": 0.0}
    with pytest.raises(ValueError):
        judge.precision_recall(real[:5], other, k=5)


def test_latent_probe_reads_separable_classes_and_chance_otherwise():
    """Latents whose mean says the class are read right; latents with no class signal at chance level."""
    g = torch.Generator().manual_seed(0)
    labels = torch.arange(4).repeat(50)
    centres = torch.randn(4, 4, 2, 2, generator=g) * 3
    latents = centres[labels] + torch.randn(200, 4, 2, 2, generator=g)
    probe = judge.LatentProbe(latents, labels, 4)
    fresh = centres[labels] + torch.randn(200, 4, 2, 2, generator=g)
    assert probe.accuracy(fresh, labels) > 0.95
    assert probe.accuracy(torch.randn(200, 4, 2, 2, generator=g), labels) < 0.5


def test_class_prompts_are_what_a_user_types():
    assert data.class_prompt("cat") == "a photo of a cat"
    assert data.class_prompt("airplane") == "a photo of an airplane"


def fabricated_image(k: int, g: torch.Generator) -> torch.Tensor:
    """An image (3, 32, 32) uint8 of fabricated class k: the class's own colour, with a little noise."""
    colour = torch.tensor([(k * 97) % 256, (k * 53 + 80) % 256, (k * 29 + 160) % 256])
    return (colour[:, None, None] + torch.randint(-20, 21, (3, 32, 32), generator=g)).clamp(0, 255).to(torch.uint8)


def fabricated_cifar(root: Path, per_class: int = 8) -> Path:
    """cifar10/train/<class>/NNNN.png: each class a colour of its own, with a little noise."""
    g = torch.Generator().manual_seed(0)
    for k, name in enumerate(data.CIFAR10_CLASSES):
        folder = root / "cifar10" / "train" / name
        folder.mkdir(parents=True)
        for j in range(per_class):
            Image.fromarray(fabricated_image(k, g).permute(1, 2, 0).numpy()).save(folder / f"{j:04d}.png")
    return root / "cifar10" / "train"


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A tiny run on the fabricated CIFAR-10 (2 images of each class held out), trained by the CLI."""
    root = tmp_path_factory.mktemp("eval")
    tree = fabricated_cifar(root)
    result = subprocess.run(
        [sys.executable, "-m", "minildm.train", "--dataset", "cifar", "--data-dir", str(tree), "--preset", "tiny",
         "--holdout-per-class", "2", "--max-steps", "3", "--batch-size", "8", "--vae-batch-size", "8",
         "--warmup-steps", "1", "--sample-steps", "2", "--probe-per-class", "2", "--runs-dir", str(root / "runs"),
         "--name", "tiny"], cwd=root, env=ENV, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return root


def evaluate_cli(root, *args):
    return subprocess.run([sys.executable, "-m", "minildm.evaluate", *args], cwd=root, env=ENV,
                          capture_output=True, text=True, timeout=600)


def test_training_logs_the_class_probe(tiny_run):
    """A run on a data set with classes logs the probe's reading of its samples and of real latents."""
    rows = [json.loads(line) for line in (tiny_run / "runs" / "tiny" / "metrics.jsonl").read_text().splitlines()]
    probes = [r for r in rows if r.get("event") == "probe"]
    assert probes and 0 <= probes[-1]["probe_samples"] <= 1 and 0 <= probes[-1]["probe_real"] <= 1


def test_evaluate_cli_reports_trains_and_caches_the_judge(tiny_run):
    """The command prints the table, writes the JSON report and the grid, trains the judge once and
    reuses it; the report holds every figure the README quotes."""
    first = evaluate_cli(tiny_run, "runs/tiny", "--n", "3", "--batch-size", "2", "--steps", "2",
                         "--judge-steps", "5")
    assert first.returncode == 0, first.stderr[-3000:]
    assert "trained now" in first.stderr and "judge:" in first.stdout and "mean" in first.stdout
    report = json.loads((tiny_run / "runs" / "tiny" / "eval" / "n3-ddim2-g7.5-seed0.json").read_text())
    assert set(report["per_class"]) == set(data.CIFAR10_CLASSES)
    for figures in report["per_class"].values():
        assert 0 <= figures["accuracy"] <= 1
        for key in ("fd_samples", "fd_train", "fd_blurred", "fd_noise"):
            assert figures[key] >= -1e-6
    assert report["judge"]["held_out_images"] == 20 and report["judge"]["train_images"] == 60
    assert report["prompts"]["airplane"] == "a photo of an airplane"
    for figures in report["per_class"].values():                      # held-out phrasings and variety
        assert 0 <= figures["unseen_accuracy"] <= 1
        for key in ("precision", "recall", "coverage", "precision_real", "recall_real", "coverage_real",
                    "recall_reconstructed", "coverage_reconstructed"):
            assert 0 <= figures[key] <= 1
        assert figures["fd_reconstructed"] >= -1e-6                    # the first stage's floor
    unseen = report["unseen"]
    assert unseen["count"] >= 300 and unseen["over_template"] >= 0
    frames = data.wording.unseen_phrasings()
    assert unseen["examples"]["airplane"][0] == data.fill_template(frames[0], "airplane")
    assert "unseen phrasings" in first.stdout and "coverage" in first.stdout and "first stage's floor" in first.stdout
    assert report["settings"]["guidance_interval"] is None             # the tiny preset guides every step
    grid = Image.open(tiny_run / "runs" / "tiny" / "eval" / "n3-ddim2-g7.5-seed0.png")
    assert grid.size[1] > 9 * 32                                     # a row per class
    judges = list((tiny_run / "runs" / "judges").glob("*.safetensors"))
    assert len(judges) == 1
    again = evaluate_cli(tiny_run, "--n", "2", "--steps", "2", "--judge-steps", "5")    # the newest run
    assert again.returncode == 0, again.stderr[-3000:]
    assert "cached" in again.stderr and len(list((tiny_run / "runs" / "judges").glob("*.safetensors"))) == 1


def test_evaluate_samples_with_the_runs_guidance_interval(tiny_run):
    """A run whose config.json names a guidance interval (the cifar-cpu preset's [0, 800]) is scored with
    it unless --guidance-interval says otherwise; the report and its file name say which was used."""
    from minildm import train

    assert train.TrainConfig.cifar_cpu().guidance_interval == [0, 800]
    config_path = tiny_run / "runs" / "tiny" / "config.json"
    original = config_path.read_text()
    try:
        config_path.write_text(json.dumps(dict(json.loads(original), guidance_interval=[0, 600])))
        result = evaluate_cli(tiny_run, "runs/tiny", "--n", "2", "--steps", "2", "--judge-steps", "5", "--templates-only")
        assert result.returncode == 0, result.stderr[-3000:]
        report = json.loads((tiny_run / "runs" / "tiny" / "eval" / "n2-ddim2-g7.5-t0-600-seed0.json").read_text())
        assert report["settings"]["guidance_interval"] == [0, 600] and "at timesteps 0-600" in result.stdout
        result = evaluate_cli(tiny_run, "runs/tiny", "--n", "2", "--steps", "2", "--judge-steps", "5", "--templates-only",
                              "--guidance-interval", "0", "1000")
        assert result.returncode == 0, result.stderr[-3000:]
        assert (tiny_run / "runs" / "tiny" / "eval" / "n2-ddim2-g7.5-t0-1000-seed0.json").exists()
    finally:
        config_path.write_text(original)


def test_evaluate_refuses_what_it_cannot_score(tiny_run, tmp_path):
    """No run, a run without classes, a bad flag: one line each, non-zero exit, no traceback."""
    empty = tmp_path / "none.txt"
    empty.write_text("no slot here\n")
    for args in (["--n", "1"], ["--guidance", "nan"], ["--sampler", "nope"], [str(tmp_path)],
                 ["--phrasings", str(empty)], ["--phrasings", str(tmp_path / "missing.txt")]):
        result = evaluate_cli(tiny_run, *args)
        assert result.returncode != 0 and "Traceback" not in result.stderr, args
        assert result.stderr.strip().count("\n") == 0 and result.stderr.startswith("error: "), result.stderr
    shapes = tmp_path / "runs" / "shapes"
    shapes.mkdir(parents=True)
    (shapes / "config.json").write_text(json.dumps({"dataset": "shapes", "holdout_per_class": 0}))
    (shapes / "model.safetensors").write_bytes(b"")
    result = evaluate_cli(tmp_path, "runs/shapes")
    assert result.returncode != 0 and "needs a data set with classes" in result.stderr


class StandIn:
    """A generator whose answer is known: each prompt names one class (found by its word), and
    `draw(k, seed)` gives the image (3, 32, 32) uint8 returned for class k."""

    device = torch.device("cpu")

    def __init__(self, draw):
        self.draw = draw

    def encode_image(self, x):          # a perfect first stage: the image is its own latent
        return x

    def decode_latents(self, z):
        return z

    def generate(self, texts, seeds, output_type="image", **settings):
        images = []
        for text, seed in zip(texts, seeds):
            found = [k for k, name in enumerate(data.CIFAR10_CLASSES) if re.search(rf"\b{name}\b", text.lower())]
            assert len(found) == 1, text
            images.append(self.draw(found[0], seed).float() / 255)
        return torch.stack(images)


@pytest.fixture(scope="module")
def scored(tmp_path_factory):
    """The report of evaluate() for four stand-in generators on a fabricated CIFAR-10 of 100 images a
    class (40 held out), with a judge trained on its training split."""
    from minildm.evaluate import evaluate

    root = tmp_path_factory.mktemp("standins")
    dataset = data.load_dataset("cifar", str(fabricated_cifar(root, per_class=100)), 32)
    train, held = dataset.split(40)
    scorer, info = judge.load_or_train_judge(root / "judge.safetensors", train, held, steps=60, progress=False)
    pools = [train.images[train.labels == k] for k in range(10)]

    def fresh(k, seed):          # new images from the data's own distribution: a perfect generator
        return fabricated_image(k, torch.Generator().manual_seed(10_000 + 100 * k + seed))

    generators = {
        "fresh": fresh,
        "copier": lambda k, seed: pools[k][seed % len(pools[k])],                      # its training images
        "wrong": lambda k, seed: fresh((k + 1) % 10, seed),                              # the next class
        "noise": lambda k, seed: torch.randint(0, 256, (3, 32, 32), generator=torch.Generator().manual_seed(seed),
                                               dtype=torch.uint8),
    }
    return info, {name: evaluate(StandIn(draw), train, held, scorer, info, n=40, progress=False)[0]
                  for name, draw in generators.items()}


def test_a_perfect_generator_scores_as_real_images(scored):
    """New images from the data's own distribution: the judge's held-out accuracy (recomputed here, not
    read from a file), a Fréchet distance as small as real images' own, no copies."""
    info, reports = scored
    r = reports["fresh"]
    assert info["held_out_accuracy"] > 0.95                   # flat colours: the judge must get them
    assert abs(r["mean"]["accuracy"] - info["held_out_accuracy"]) < 0.05
    assert abs(r["unseen"]["accuracy"] - r["mean"]["accuracy"]) < 0.05 and 0.95 < r["unseen"]["over_template"] < 1.05
    # Flat colours leave the judge's features nearly constant, so both distances are at the noise level of
    # the estimate (about 1e-4); measured against noise's distance they are the same and tiny.
    noise_fd = reports["noise"]["mean"]["fd_samples"]
    assert abs(r["mean"]["fd_samples"] - r["mean"]["fd_train"]) < 1e-3 * noise_fd
    assert abs(r["mean"]["recall"] - r["mean"]["recall_real"]) < 0.1
    assert r["copies"]["near_copies"] < 0.05 and 0.8 < r["copies"]["distance_ratio"] < 1.25
    # The stand-ins' first stage is perfect (an image is its own latent): its floor is real images' own.
    for c in r["per_class"].values():
        assert c["fd_reconstructed"] == c["fd_train"] and c["recall_reconstructed"] == c["recall_real"]
    assert all(c["confused_with"] in (None, *data.CIFAR10_CLASSES) for c in r["per_class"].values())


def test_a_copying_generator_is_caught(scored):
    """Training images returned as samples: the judge's accuracy on its training images, and every
    sample a near-copy (distance 0 to a training image)."""
    _, reports = scored
    r = reports["copier"]
    assert abs(r["mean"]["accuracy"] - r["mean"]["judge_on_train"]) < 1e-6
    assert r["copies"]["near_copies"] == 1.0 and r["copies"]["nearest_median_samples"] < 1e-6


def test_the_wrong_class_and_noise_score_as_they_should(scored):
    """The next class's images: accuracy near 0, and each class 'mistaken for' the next one. Uniform noise:
    a classifier that puts every sample in one class is right for one class in ten, so about chance;
    its Fréchet distance is far above real images' own."""
    _, reports = scored
    wrong, noise = reports["wrong"], reports["noise"]
    assert wrong["mean"]["accuracy"] < 0.05
    names = data.CIFAR10_CLASSES
    assert [c["confused_with"] for c in wrong["per_class"].values()] == [names[(k + 1) % 10] for k in range(10)]
    assert abs(noise["mean"]["accuracy"] - 0.1) < 0.1
    assert noise["mean"]["fd_samples"] > 100 * reports["fresh"]["mean"]["fd_samples"]
