"""Every bad input a user could type is refused in one line before any work starts, across all the
command lines, and leaves no file behind; a file that is not a checkpoint is named for what it is.

Each row runs the command in a subprocess, from a folder that holds a tiny run and a few files, and
checks: a non-zero exit (2 for usage errors, 1 for failures at run time), no traceback, exactly one
line on stderr that starts with "error:" and names the problem, and the folder unchanged.
"""
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from PIL import Image

from minildm import convert
from minildm.schedule import NoiseSchedule
from test_convert import tiny_models

ROOT = Path(__file__).resolve().parents[1]
ENV = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", PYTHONPATH=str(ROOT))
SAMPLE, TRAIN, VIEWS, EVALUATE, CHECK = ("minildm.sample",), ("minildm.train",), ("minildm.views",), \
    ("minildm.evaluate",), ("minildm.check",)
STUDIO = ("minildm.studio",)
FINETUNE = ("minildm.finetune",)
LORA = ["lora", "--images", ".", "--out", "new.safetensors"]
TINY_TRAIN = ["--dataset", "shapes", "--preset", "tiny", "--max-steps", "1"]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """runs/tiny (a sampleable run), images, and files that only look like checkpoints."""
    root = tmp_path_factory.mktemp("bad")
    unet, vae, text = tiny_models()
    run = root / "runs" / "tiny"
    convert.save_checkpoint(run / "model.safetensors", unet=unet, vae=vae, text_encoder=text,
                            schedule=NoiseSchedule.sd(), scale_factor=0.5)
    (run / "config.json").write_text(json.dumps({"dataset": "cifar", "holdout_per_class": 1, "resolution": 32}))
    Image.new("RGB", (32, 32), (200, 40, 40)).save(root / "picture.png")
    Image.new("L", (32, 32), 255).save(root / "mask.png")
    (root / "x.ckpt").write_text("hello\n")
    (root / "text.safetensors").write_text("this is not a tensor file\n")
    (root / "random.safetensors").write_bytes(torch.randint(0, 256, (4096,), generator=torch.Generator().manual_seed(0),
                                                            dtype=torch.uint8).numpy().tobytes())
    (root / "empty.safetensors").write_bytes(b"")
    (root / "page.ckpt").write_text("<!DOCTYPE html><html><body>Sign in to download</body></html>")
    (root / "lfs.safetensors").write_text("version https://git-lfs.github.com/spec/v1\noid sha256:00\nsize 4\n")
    (root / "notes.txt").write_text("a file, not a folder")
    (root / "empty_folder").mkdir()
    (root / "mine.py").write_text("x = 1\n")
    return root


# (command, arguments, words the one line must contain)
ROWS = [
    # sampling: ranges
    (SAMPLE, ["x", "--steps", "1001"], "--steps 1001: must be from 1 to 1000"),
    (SAMPLE, ["x", "--steps", "2000"], "--steps 2000"),
    (SAMPLE, ["x", "--steps", "0"], "--steps 0"),
    (SAMPLE, ["x", "--steps", "-5"], "--steps -5"),
    (SAMPLE, ["x", "--steps", "ten"], "invalid int value: 'ten'"),
    (SAMPLE, ["x", "--guidance", "nan"], "--guidance nan: must be a finite number"),
    (SAMPLE, ["x", "--guidance", "inf"], "--guidance inf"),
    (SAMPLE, ["x", "--guidance", "1e400"], "--guidance inf"),
    (SAMPLE, ["x", "--guidance", "-3"], "--guidance -3"),
    (SAMPLE, ["x", "--guidance-interval", "700", "0"], "--guidance-interval 700 0: must be two timesteps"),
    (SAMPLE, ["x", "--guidance-interval", "0", "nan"], "--guidance-interval 0 nan"),
    (SAMPLE, ["x", "--guidance-interval", "-5", "700"], "--guidance-interval -5 700"),
    (SAMPLE, ["x", "--guidance-interval", "700"], "--guidance-interval: expected 2 arguments"),
    (SAMPLE, ["x", "--seed", "1180591620717411303424"], "--seed 1180591620717411303424"),
    (SAMPLE, ["x", "--seed", "-1"], "--seed -1"),
    (SAMPLE, ["x", "--seed", str(2**63 - 1), "--n", "2"], "seed + i must fit"),
    (SAMPLE, ["x", "--n", "0"], "--n 0: must be at least 1"),
    (SAMPLE, ["x", "--n", "-2"], "--n -2"),
    (SAMPLE, ["x", "--batch-size", "0"], "--batch-size 0"),
    (SAMPLE, ["x", "--height", "100000"], "--height 100000: must be a positive multiple of 8, at most 4096"),
    (SAMPLE, ["x", "--height", "256"], "--height 256: at most 128 for this model"),
    (SAMPLE, ["x", "--width", "12"], "--width 12"),
    (SAMPLE, ["x", "--width", "0"], "--width 0"),
    (SAMPLE, ["x", "--strength", "2", "--init-image", "picture.png"], "--strength 2"),
    (SAMPLE, ["x", "--attention-slicing", "0"], "--attention-slicing 0"),
    (SAMPLE, ["x", "--vae-tiling", "0"], "--vae-tiling 0"),
    (SAMPLE, ["x", "--sampler", "nope"], "invalid choice: 'nope'"),
    (SAMPLE, ["x", "--dtype", "float64"], "invalid choice: 'float64'"),
    (SAMPLE, ["x", "--device", "tpu"], "--device 'tpu'"),
    (SAMPLE, ["x", "--no-such-flag"], "unrecognized arguments: --no-such-flag"),
    # sampling: combinations and files
    (SAMPLE, ["x", "--strength", "0.5"], "--strength 0.5 needs --init-image"),
    (SAMPLE, ["x", "--mask", "mask.png"], "--mask needs --init-image"),
    (SAMPLE, ["x", "--init-image", "missing.png"], "--init-image 'missing.png': does not exist"),
    (SAMPLE, ["x", "--init-image", "empty_folder"], "is a folder, not a file"),
    (SAMPLE, ["x", "--init-image", "notes.txt"], "cannot read notes.txt as an image"),
    (SAMPLE, ["x", "--out", "notes.txt"], "--out"),
    (SAMPLE, ["x", "--out", "/proc/x"], "--out"),
    (SAMPLE, ["x", "--out", "notes.txt/inside"], "is a file, not a folder"),
    (SAMPLE, ["x", "--ckpt", "x.ckpt"], "x.ckpt is not a checkpoint: it is a text file"),
    (SAMPLE, ["x", "--ckpt", "text.safetensors"], "text.safetensors is not a safetensors file: it is a text file"),
    (SAMPLE, ["x", "--ckpt", "random.safetensors"], "not a format minildm knows"),
    (SAMPLE, ["x", "--ckpt", "empty.safetensors"], "it is an empty file"),
    (SAMPLE, ["x", "--ckpt", "picture.png"], "it is a PNG image"),
    (SAMPLE, ["x", "--ckpt", "page.ckpt"], "it is an HTML page"),
    (SAMPLE, ["x", "--ckpt", "lfs.safetensors"], "Git LFS pointer"),
    (SAMPLE, ["x", "--ckpt", "missing.safetensors"], "checkpoint not found: missing.safetensors"),
    (SAMPLE, ["x", "--runs-dir", "empty_folder"], "no run found in empty_folder/"),
    # training (each would otherwise read data or train a stage first)
    (TRAIN, [*TINY_TRAIN, "--batch-size", "0"], "--batch-size 0: must be at least 1"),
    (TRAIN, [*TINY_TRAIN, "--vae-batch-size", "0"], "--vae-batch-size 0"),
    (TRAIN, [*TINY_TRAIN, "--lr", "nan"], "--lr nan: must be a finite number"),
    (TRAIN, [*TINY_TRAIN, "--lr", "0"], "--lr 0: must be above 0"),
    (TRAIN, [*TINY_TRAIN, "--lr=-1e-4"], "--lr -0.0001"),
    (TRAIN, [*TINY_TRAIN, "--vae-lr", "inf"], "--vae-lr inf"),
    (TRAIN, [*TINY_TRAIN, "--runs-dir", "/proc/x"], "--runs-dir"),
    (TRAIN, [*TINY_TRAIN, "--runs-dir", "notes.txt"], "--runs-dir"),
    (TRAIN, [*TINY_TRAIN, "--max-minutes", "0"], "--max-minutes 0: must be above 0"),
    (TRAIN, [*TINY_TRAIN, "--max-minutes", "nan"], "--max-minutes nan"),
    (TRAIN, [*TINY_TRAIN, "--vae-share", "1.5"], "--vae-share 1.5"),
    (TRAIN, [*TINY_TRAIN, "--max-steps", "0"], "--max-steps 0"),
    (TRAIN, [*TINY_TRAIN, "--ldm-steps", "-1"], "--ldm-steps -1"),
    (TRAIN, [*TINY_TRAIN, "--resolution", "30"], "--resolution 30: must be a multiple of"),
    (TRAIN, [*TINY_TRAIN, "--resolution", "4096"], "--resolution 4096"),
    (TRAIN, [*TINY_TRAIN, "--unet-channels", "7"], "--unet-channels 7"),
    (TRAIN, [*TINY_TRAIN, "--ema-decay", "1"], "--ema-decay 1: must be at least 0 and below 1"),
    (TRAIN, [*TINY_TRAIN, "--caption-dropout", "1.5"], "--caption-dropout 1.5"),
    (TRAIN, [*TINY_TRAIN, "--grad-accum", "3", "--batch-size", "8"], "--batch-size 8: must divide by --grad-accum 3"),
    (TRAIN, [*TINY_TRAIN, "--grad-clip", "-1"], "--grad-clip -1"),
    (TRAIN, [*TINY_TRAIN, "--warmup-steps", "-1"], "--warmup-steps -1"),
    (TRAIN, [*TINY_TRAIN, "--seed", "-5"], "--seed -5"),
    (TRAIN, [*TINY_TRAIN, "--seed", str(2**70)], "--seed"),
    (TRAIN, [*TINY_TRAIN, "--dtype", "float64"], "--dtype 'float64'"),
    (TRAIN, [*TINY_TRAIN, "--device", "tpu"], "--device 'tpu'"),
    (TRAIN, [*TINY_TRAIN, "--guidance", "nan"], "--guidance nan"),
    (TRAIN, [*TINY_TRAIN, "--guidance-interval", "800", "100"], "--guidance-interval 800 100"),
    (TRAIN, [*TINY_TRAIN, "--sample-steps", "0"], "--sample-steps 0"),
    (TRAIN, [*TINY_TRAIN, "--log-every", "0"], "--log-every 0"),
    (TRAIN, [*TINY_TRAIN, "--preset", "huge"], "invalid choice: 'huge'"),
    (TRAIN, ["--dataset", "folder", "--max-steps", "1"], "--dataset folder needs --data-dir"),
    (TRAIN, ["--dataset", "cifar", "--data-dir", "nowhere"], "--data-dir 'nowhere': does not exist"),
    (TRAIN, ["--resume", "nowhere"], "--resume 'nowhere': is not a run"),
    (TRAIN, ["--resume", "runs/tiny", "--resolution", "16"], "--resolution 16: cannot change a run being resumed"),
    (TRAIN, [*TINY_TRAIN, "--stage", "ldm", "--vae", "missing.safetensors"], "--vae 'missing.safetensors': does not exist"),
    (TRAIN, [*TINY_TRAIN, "--vae", "mask.png"], "is for --stage ldm"),
    (TRAIN, [*TINY_TRAIN, "--stage", "ldm"], "--stage ldm needs a trained VAE"),
    (TRAIN, [*TINY_TRAIN, "--name", "a/b"], "--name 'a/b': must be a plain folder name"),
    (TRAIN, [*TINY_TRAIN, "--name", "tiny"], "holds a run already"),
    # views
    (VIEWS, ["seeds", "x", "--num", "0"], "--num 0: must be from 2 to 64"),
    (VIEWS, ["interpolate", "x"], "the interpolate view takes 2 prompts, got 1"),
    (VIEWS, ["filmstrip", "x", "--steps", "0"], "--steps 0"),
    (VIEWS, ["filmstrip", "x", "--guidance", "nan"], "--guidance nan"),
    (VIEWS, ["filmstrip", "x", "--size", "12"], "--size 12"),
    # the studio: its flags, and a model it cannot load, refused before the page starts
    (STUDIO, ["--port", "0"], "--port 0: must be from 1 to 65535"),
    (STUDIO, ["--port", "70000"], "--port 70000"),
    (STUDIO, ["--taesd", "notes.txt"], "--taesd 'notes.txt': must be a folder"),
    (STUDIO, ["--ckpt", "missing.safetensors"], "--ckpt missing.safetensors: not found"),
    (STUDIO, ["--runs-dir", "empty_folder"], "no model to offer: no run in empty_folder/"),
    (STUDIO, ["--out", "notes.txt"], "notes.txt is a file, not a folder"),
    (STUDIO, ["--dtype", "float8"], "--dtype"),
    (STUDIO, ["--runs-dir", "empty_folder", "--ckpt", "x.ckpt"], "is not a checkpoint"),
    (VIEWS, ["filmstrip", "x", "--seed", "-1"], "--seed -1"),
    (VIEWS, ["filmstrip", "x", "--out", "notes.txt"], "--out"),
    (VIEWS, ["filmstrip", "x", "--ckpt", "x.ckpt"], "x.ckpt is not a checkpoint"),
    (VIEWS, ["nothing", "x"], "invalid choice: 'nothing'"),
    # fine-tuning
    (FINETUNE, LORA + ["--steps", "0"], "--steps 0: must be at least 1"),
    (FINETUNE, LORA + ["--rank", "0"], "--rank 0"),
    (FINETUNE, LORA + ["--lr", "0"], "--lr 0"),
    (FINETUNE, LORA + ["--batch-size", "-2"], "--batch-size -2"),
    (FINETUNE, LORA + ["--targets", "everything"], "invalid choice: 'everything'"),
    (FINETUNE, ["lora", "--images", "notes.txt", "--out", "new.safetensors"], "--images notes.txt is not a folder"),
    (FINETUNE, ["lora", "--images", "empty_folder", "--out", "new.safetensors"], "no images"),
    (FINETUNE, ["lora", "--images", ".", "--out", "new.pt"], "--out new.pt: write a .safetensors file"),
    (FINETUNE, LORA + ["--ckpt", "missing.safetensors"], "checkpoint not found: missing.safetensors"),
    (FINETUNE, LORA + ["--ckpt", "x.ckpt"], "x.ckpt is not a checkpoint"),
    (FINETUNE, ["embedding", "--images", ".", "--word", "<bw>", "--out", "w.safetensors"],
     "no caption contains the new word '<bw>'"),
    (FINETUNE, ["embedding", "--images", ".", "--word", "cat", "--caption", "a cat", "--out", "w.safetensors"],
     "--word 'cat': must be a new word"),
    (FINETUNE, ["example", "--per-class", "0", "--out", "bw"], "--per-class 0"),
    (FINETUNE, ["example", "--data-dir", "nowhere", "--out", "bw"], "--data-dir 'nowhere': does not exist"),
    (FINETUNE, ["example", "--out", "runs"], "--out 'runs': must be a new or empty folder"),
    # evaluation
    (EVALUATE, ["--n", "0"], "--n 0"),
    (EVALUATE, ["runs/tiny", "--guidance", "nan"], "--guidance nan"),
    (EVALUATE, ["runs/tiny", "--guidance-interval", "0", "inf"], "--guidance-interval 0 inf"),
    (EVALUATE, ["runs/tiny", "--steps", "5000"], "--steps 5000"),
    (EVALUATE, ["runs/tiny", "--sampler", "nope"], "--sampler 'nope'"),
    (EVALUATE, ["runs/tiny", "--seed", "-1"], "--seed -1"),
    (EVALUATE, ["runs/tiny", "--data-dir", "nowhere"], "--data-dir 'nowhere'"),
    (EVALUATE, ["nowhere"], "is not a finished training run"),
    (EVALUATE, ["--runs-dir", "empty_folder"], "no run found in empty_folder/"),
    # the data inspector
    (("minildm.data",), ["--num-images", "0"], "--num-images 0"),
    (("minildm.data",), ["--resolution", "3"], "--resolution 3: must be from 8 to 1024"),
    (("minildm.data",), ["--dataset", "cifar", "--data-dir", "nowhere"], "--data-dir 'nowhere': does not exist"),
    (("minildm.data",), ["--grid", "/proc/x/grid.png"], "--grid"),
    # the exercise checker
    (CHECK, ["42"], "no exercises for chapter 42"),
    (CHECK, ["03", "--impl", "missing.py"], "--impl 'missing.py': does not exist"),
    (CHECK, ["03", "--impl", "notes.txt"], "must be a Python file"),
    (CHECK, ["all", "--impl", "mine.py"], "checks one chapter at a time"),
]


def snapshot(root: Path) -> dict:
    """Every file's size and time, and every folder's name."""
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns) if p.is_file() else "folder"
            for p in root.rglob("*")}


# Where a command could write without being asked: home, caches, temporary files. Each row runs with
# these pointed at empty folders of its own, which must stay empty.
ELSEWHERE = ("HOME", "XDG_CACHE_HOME", "TMPDIR", "TORCH_HOME", "HF_HOME", "MPLCONFIGDIR")
# A refusal comes before any work: far sooner than the quickest training step or model load would end
# (a generous bound on a busy machine; the time of one import of torch and the command's module).
REFUSAL_SECONDS = 60


# The rows whose file exists but is not what the flag needs: found only by reading it.
RUNTIME_MARKERS = ("cannot read notes.txt as an image", "is not a checkpoint", "is not a safetensors file",
                   "not a format minildm knows", "it is an empty file", "it is a PNG image", "it is an HTML page",
                   "Git LFS pointer")


def expected_status(module, args, words) -> int:
    """2 for a usage error (a value or a combination of flags that cannot work, or a path that does not
    exist or holds no run); 1 for a failure found while working: a file that exists but turns out not to
    be what the flag needs."""
    return 1 if any(marker in words for marker in RUNTIME_MARKERS) else 2


@pytest.mark.parametrize("module, args, words", ROWS, ids=[f"{m[0].split('.')[1]}:{' '.join(a)[:60]}" for m, a, _ in ROWS])
def test_a_bad_input_is_one_line_before_any_work(workdir, tmp_path, module, args, words):
    before = snapshot(workdir)
    env = dict(ENV)
    for name in ELSEWHERE:
        env[name] = str(tmp_path / name.lower())
        os.makedirs(env[name])
    started = time.perf_counter()
    result = subprocess.run([sys.executable, "-m", *module, *args], cwd=workdir, env=env, capture_output=True,
                            text=True, timeout=300)
    seconds = time.perf_counter() - started
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr[-2000:]
    assert words in lines[0], lines[0]
    assert result.returncode == expected_status(module, args, words), (result.returncode, lines[0])
    assert snapshot(workdir) == before, "the command left files behind"
    for name in ELSEWHERE:
        assert not os.listdir(env[name]), f"the command wrote to ${name}: {os.listdir(env[name])}"
    assert seconds < REFUSAL_SECONDS, f"refused only after {seconds:.0f} s"


def test_usage_errors_exit_2_and_failures_exit_1(workdir):
    """A value the flag does not allow is a usage error (2, as argparse's own); a file that turns out
    unreadable while working is a failure (1)."""
    def status(*args):
        return subprocess.run([sys.executable, "-m", "minildm.sample", *args], cwd=workdir, env=ENV,
                              capture_output=True, text=True, timeout=300).returncode

    assert status("x", "--steps", "0") == 2 and status("x", "--sampler", "nope") == 2
    assert status("x", "--ckpt", "x.ckpt") == 1


def test_the_table_is_long_enough():
    """The rows of the issue and forty more."""
    assert len(ROWS) >= 13 + 40
