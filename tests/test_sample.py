"""The sampling command line: end to end in a subprocess, PNG names and metadata, and one clear line
for every bad input."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from minildm import convert
from minildm.cli import CommandError
from minildm.sample import main, slug
from minildm.schedule import NoiseSchedule
from test_convert import tiny_models

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """A folder with a tiny trained-looking run in runs/, an init image, masks and a non-image."""
    root = tmp_path_factory.mktemp("cli")
    unet, vae, text = tiny_models()
    convert.save_checkpoint(root / "runs" / "tiny" / "model.safetensors", unet=unet, vae=vae, text_encoder=text,
                            schedule=NoiseSchedule.sd(), scale_factor=0.5)
    Image.new("RGB", (32, 32), (200, 40, 40)).save(root / "init.png")
    mask = Image.new("L", (32, 32), 0)
    mask.paste(255, (8, 8, 24, 24))
    mask.save(root / "mask.png")
    Image.new("L", (24, 24), 255).save(root / "small_mask.png")
    (root / "notes.png").write_text("not an image")
    return root


def run(workdir, *args):
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    return subprocess.run([sys.executable, "-m", "minildm.sample", *args], cwd=workdir, env=env,
                          capture_output=True, text=True, timeout=300)


def cli_error(workdir, monkeypatch, *args):
    """Run main() in-process and return its one-line error (it must exit non-zero)."""
    monkeypatch.chdir(workdir)
    with pytest.raises(CommandError) as info:
        main(list(args))
    assert info.value.code in (1, 2)
    message = info.value.message
    assert message and "\n" not in message
    return message


def test_help_lists_every_flag(workdir):
    """--help exits 0 and documents every flag."""
    result = run(workdir, "--help")
    assert result.returncode == 0
    for flag in ("--ckpt", "--steps", "--sampler", "--guidance", "--negative", "--seed", "--n", "--height",
                 "--width", "--init-image", "--strength", "--mask", "--out", "--device", "--dtype",
                 "--save-intermediates", "--taesd"):
        assert flag in result.stdout


@pytest.mark.slow
def test_end_to_end_in_a_subprocess(workdir):
    """The newest run is found, PNGs are named by prompt and seed, carry their settings, and a grid is written."""
    result = run(workdir, "A cat, in a hat!", "--steps", "3", "--n", "2", "--seed", "5", "--out", "out",
                 "--save-intermediates")
    assert result.returncode == 0, result.stderr
    out = workdir / "out"
    assert {p.name for p in out.glob("*.png")} == {"a-cat-in-a-hat-5.png", "a-cat-in-a-hat-6.png",
                                                 "a-cat-in-a-hat-5-grid.png"}
    settings = json.loads(Image.open(out / "a-cat-in-a-hat-6.png").text["minildm"])
    assert settings["prompt"] == "A cat, in a hat!" and settings["seed"] == 6 and settings["steps"] == 3
    assert settings["checkpoint"].endswith("model.safetensors")
    assert len(list((out / "a-cat-in-a-hat-5-steps").glob("step_*.png"))) == 3
    assert "Traceback" not in result.stderr


def test_same_seed_reproduces_one_image_of_a_batch(workdir, monkeypatch):
    """Image i of --n uses seed + i, so generating seed + i alone gives the same pixels (to one level of 255)."""
    monkeypatch.chdir(workdir)
    main(["a tree", "--steps", "2", "--n", "2", "--seed", "10", "--out", "batch"])
    main(["a tree", "--steps", "2", "--seed", "11", "--out", "single"])
    a = np.asarray(Image.open(workdir / "batch" / "a-tree-11.png"), dtype=np.int16)
    b = np.asarray(Image.open(workdir / "single" / "a-tree-11.png"), dtype=np.int16)
    assert np.abs(a - b).max() <= 1            # float rounding of a batched matmul at most (seen on two threads)


@pytest.mark.parametrize("sampler", ["ddim", "euler_a", "ddpm"])
def test_batches_give_the_images_of_one_at_a_time(workdir, monkeypatch, sampler):
    """Drawn in batches (here 2 + 1), image i is still the image of --n 1 --seed seed + i, also for
    samplers that add noise at every step: each image keeps its own random stream."""
    monkeypatch.chdir(workdir)
    main(["a tree", "--steps", "3", "--n", "3", "--batch-size", "2", "--seed", "20", "--sampler", sampler,
          "--out", f"batch-{sampler}"])
    for i in range(3):
        main(["a tree", "--steps", "3", "--seed", str(20 + i), "--sampler", sampler, "--out", f"single-{sampler}"])
        a = np.asarray(Image.open(workdir / f"batch-{sampler}" / f"a-tree-{20 + i}.png"), dtype=np.int16)
        b = np.asarray(Image.open(workdir / f"single-{sampler}" / f"a-tree-{20 + i}.png"), dtype=np.int16)
        assert np.abs(a - b).max() <= 1, f"image {i} differs"       # float rounding of a batched matmul at most
    other = np.asarray(Image.open(workdir / f"batch-{sampler}" / "a-tree-21.png"), dtype=np.int16)
    assert np.abs(other - np.asarray(Image.open(workdir / f"batch-{sampler}" / "a-tree-20.png"))).max() > 10


def test_an_output_never_replaces_an_earlier_one_unless_asked(workdir, monkeypatch):
    """The same prompt and seed with other settings gets a new file name; --overwrite replaces."""
    monkeypatch.chdir(workdir)
    main(["a boat", "--steps", "2", "--seed", "4", "--out", "again"])
    first = (workdir / "again" / "a-boat-4.png").read_bytes()
    main(["a boat", "--steps", "3", "--seed", "4", "--out", "again"])
    assert (workdir / "again" / "a-boat-4.png").read_bytes() == first
    assert json.loads(Image.open(workdir / "again" / "a-boat-4-2.png").text["minildm"])["steps"] == 3
    main(["a boat", "--steps", "3", "--seed", "4", "--out", "again", "--overwrite"])
    assert json.loads(Image.open(workdir / "again" / "a-boat-4.png").text["minildm"])["steps"] == 3
    assert not (workdir / "again" / "a-boat-4-3.png").exists()


def test_a_run_folder_or_name_is_a_checkpoint(workdir, monkeypatch):
    """--ckpt runs/NAME (a training run's folder) or NAME alone samples from the run's model.safetensors."""
    monkeypatch.chdir(workdir)
    (workdir / "runs" / "tiny" / "config.json").write_text("{}")
    for ckpt in ("runs/tiny", "tiny"):
        assert main(["a tree", "--steps", "2", "--seed", "3", "--ckpt", ckpt, "--out", "by-folder"]) == 0
        settings = json.loads(Image.open(workdir / "by-folder" / "a-tree-3.png").text["minildm"])
        assert settings["checkpoint"] == str(workdir / "runs" / "tiny" / "model.safetensors")


def test_empty_prompt_img2img_and_inpainting(workdir, monkeypatch):
    """An empty prompt is allowed; --init-image with --strength and --mask produce images of the init size."""
    monkeypatch.chdir(workdir)
    assert main(["", "--steps", "2", "--seed", "1", "--out", "o1"]) == 0
    assert (workdir / "o1" / "unconditional-1.png").exists()
    assert main(["red", "--steps", "4", "--seed", "1", "--init-image", "init.png", "--strength", "0.5",
                 "--mask", "mask.png", "--out", "o2", "--sampler", "euler"]) == 0
    image = Image.open(workdir / "o2" / "red-1.png")
    assert image.size == (32, 32) and json.loads(image.text["minildm"])["strength"] == 0.5


def test_no_checkpoint_says_how_to_get_one(workdir, monkeypatch, tmp_path):
    """Without --ckpt and without runs, the error says how to train a model or where SD weights go."""
    message = cli_error(tmp_path, monkeypatch, "a cat")
    assert "python -m minildm.train --dataset cifar" in message and "--ckpt" in message


@pytest.mark.parametrize("args, words", [
    (["--ckpt", "missing.safetensors"], "checkpoint not found: missing.safetensors"),
    (["--ckpt", "notes.png"], "notes.png is not a checkpoint: it is a text file"),
    (["--ckpt", "init.png"], "init.png is not a checkpoint: it is a PNG image"),
    (["--init-image", "notes.png"], "cannot read notes.png as an image"),
    (["--init-image", "nowhere.png"], "--init-image 'nowhere.png': does not exist"),
    (["--init-image", "init.png", "--mask", "small_mask.png"], "the mask is 24x24 but the init image is 32x32"),
    (["--mask", "mask.png"], "--mask needs --init-image"),
    (["--height", "36"], "--height 36: must be a positive multiple of 8"),
    (["--width", "0"], "--width 0: must be a positive multiple of 8"),
    (["--strength", "1.5", "--init-image", "init.png"], "--strength 1.5: must be at least 0 and at most 1"),
    (["--steps", "0"], "--steps 0: must be from 1 to 1000"),
    (["--steps", "51", "--sampler", "lcm"], "--steps 51: must be from 1 to 50"),
    (["--karras"], "--karras works with --sampler euler, euler_a, heun, lms, dpmpp_2m, not the default sampler"),
    (["--taesd", "init.png"], "--taesd 'init.png': must be a folder"),
    (["--taesd", "."], "--taesd .: . holds neither taesd_decoder.pth"),
    (["--device", "cuda:7"] if not torch.cuda.is_available() else ["--device", "nonsense"], "device"),
])
def test_bad_inputs_give_one_clear_line(workdir, monkeypatch, args, words):
    """Each bad input ends with a one-line error naming the problem and a non-zero exit."""
    assert words in cli_error(workdir, monkeypatch, "a cat", "--steps", "2", *args)


def test_other_checkpoint_kinds_are_named(workdir, monkeypatch):
    """A LoRA or a VAE-only file given as --ckpt is named in the error."""
    from safetensors.torch import save_file

    save_file({"lora_unet_x.lora_down.weight": torch.zeros(2, 2)}, str(workdir / "lora.safetensors"))
    assert "LoRA" in cli_error(workdir, monkeypatch, "x", "--ckpt", "lora.safetensors")
    _, vae, _ = tiny_models()
    convert.save_checkpoint(workdir / "vae.safetensors", vae=vae)
    assert "VAE-only" in cli_error(workdir, monkeypatch, "x", "--ckpt", "vae.safetensors")


def _safetensors_with_header(path, header, payload=b"\0" * 16):
    raw = json.dumps(header).encode()
    path.write_bytes(len(raw).to_bytes(8, "little") + raw + payload)


def test_damaged_safetensors_are_named(workdir, monkeypatch):
    """A safetensors file whose header is JSON but not a tensor table, or names an unknown dtype,
    gives one line saying the file is damaged (not a KeyError or a safetensors traceback)."""
    _safetensors_with_header(workdir / "no_offsets.safetensors", {"w": {"dtype": "F32", "shape": [4]}})
    _safetensors_with_header(workdir / "bad_dtype.safetensors",
                             {"w": {"dtype": "F99", "shape": [4], "data_offsets": [0, 16]}})
    for name in ("no_offsets.safetensors", "bad_dtype.safetensors"):
        message = cli_error(workdir, monkeypatch, "x", "--ckpt", name)
        assert "damaged" in message and name in message


def test_bad_input_in_a_subprocess_prints_no_traceback(workdir):
    """The process exits with status 1 and one line on stderr, no traceback."""
    result = run(workdir, "x", "--init-image", "notes.png")
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr.strip() == "error: cannot read notes.png as an image (UnidentifiedImageError)"


def test_slug_names_files_by_prompt():
    """Prompts become short lower-case file names; an empty prompt is 'unconditional'."""
    assert slug("A cat, in a hat!") == "a-cat-in-a-hat"
    assert slug("") == "unconditional" and len(slug("word " * 40)) <= 60


def test_inpainting_model_of_another_size_from_the_command_line(workdir, monkeypatch):
    """An original-layout 9-channel inpainting model of a non-SD size runs with --config (its YAML),
    --init-image and --mask, at strength 1 by default; without the YAML or the mask it says what it needs."""
    import yaml

    from minildm.clip_text import CLIPTextConfig, CLIPTextModel
    from minildm.unet import UNet, UNetConfig
    from minildm.vae import AutoencoderKL, VAEConfig
    from reference_configs import original_yaml
    from test_convert import UNET_3LEVEL, original_state, write_safetensors

    torch.manual_seed(2)
    unet_cfg = UNetConfig(**dict(UNET_3LEVEL, in_channels=9, context_dim=64, norm_groups=32))
    vae_cfg = VAEConfig(base_channels=32, channel_mult=(1, 2), num_res_blocks=1, z_channels=4, scale_factor=0.7)
    models = UNet(unet_cfg), AutoencoderKL(vae_cfg), CLIPTextModel(CLIPTextConfig(width=64, num_layers=2,
                                                                                  num_heads=1, mlp_width=128))
    write_safetensors(workdir / "inpaint.safetensors", original_state(*models))
    (workdir / "inpaint.yaml").write_text(yaml.safe_dump(original_yaml(unet=unet_cfg, vae=vae_cfg)))
    result = run(workdir, "a red door", "--ckpt", "inpaint.safetensors", "--config", "inpaint.yaml",
                 "--init-image", "init.png", "--mask", "mask.png", "--steps", "2", "--seed", "1", "--out", "inp")
    assert result.returncode == 0, result.stderr
    settings = json.loads(Image.open(workdir / "inp" / "a-red-door-1.png").text["minildm"])
    assert settings["strength"] == 1.0
    message = cli_error(workdir, monkeypatch, "a red door", "--ckpt", "inpaint.safetensors", "--init-image", "init.png",
                        "--mask", "mask.png")
    assert "another size than SD v1's" in message and "--config" in message
    message = cli_error(workdir, monkeypatch, "a red door", "--ckpt", "inpaint.safetensors", "--config", "inpaint.yaml",
                        "--init-image", "init.png")
    assert "is an inpainting model" in message and "--mask" in message


def test_img2img_with_plms_or_lms_says_it_is_not_diffusers_img2img(workdir):
    """PLMS and LMS start img2img as lesson 07 describes, not as diffusers' img2img pipeline does: the
    command says so in a note (and still runs); with the other samplers it says nothing of the kind."""
    for sampler, noted in (("plms", True), ("lms", True), ("ddim", False)):
        result = run(workdir, "x", "--init-image", "init.png", "--strength", "0.5", "--steps", "4", "--sampler",
                     sampler, "--out", str(workdir / f"out-{sampler}"))
        assert result.returncode == 0, result.stderr[-2000:]
        assert ("not compared with diffusers" in result.stderr) is noted, result.stderr[-2000:]


def test_a_runs_guidance_interval_is_the_default(workdir, monkeypatch):
    """A run whose config.json names a guidance interval samples with it unless --guidance-interval says
    otherwise; the PNG records the interval used, and 0 1000 guides every step as no interval does."""
    import shutil

    monkeypatch.chdir(workdir)
    run_dir = workdir / "interval-run"
    run_dir.mkdir()
    shutil.copy(workdir / "runs" / "tiny" / "model.safetensors", run_dir / "model.safetensors")
    (run_dir / "config.json").write_text(json.dumps({"guidance_interval": [0, 600]}))
    common = ["a tree", "--steps", "4", "--seed", "2", "--ckpt", str(run_dir), "--overwrite"]

    def image(out, *flags):
        main(common + ["--out", out, *flags])
        path = workdir / out / "a-tree-2.png"
        return np.asarray(Image.open(path), dtype=np.int16), json.loads(Image.open(path).text["minildm"])

    default, settings = image("gi-default")
    explicit, _ = image("gi-explicit", "--guidance-interval", "0", "600")
    every, every_settings = image("gi-every", "--guidance-interval", "0", "1000")
    assert settings["guidance_interval"] == [0, 600] and every_settings["guidance_interval"] == [0, 1000]
    assert np.array_equal(default, explicit) and np.abs(default - every).max() > 0
    (run_dir / "config.json").write_text("{}")
    none, none_settings = image("gi-none")
    assert none_settings["guidance_interval"] is None and np.array_equal(none, every)


def test_lcm_defaults_and_the_tiny_decoder_from_the_command_line(workdir, monkeypatch, tmp_path):
    """--sampler lcm alone means 4 steps at guidance 1 (the LCM-LoRA's way); --taesd decodes with a TAESD
    folder and the PNG says so; an LCM-distilled model samples with lcm, 4 steps, guidance 8.5 by default."""
    from test_ldm import lcm_distilled_folder, tiny_taesd_folder

    monkeypatch.chdir(workdir)
    taesd, _ = tiny_taesd_folder(tmp_path)
    main(["a tree", "--sampler", "lcm", "--seed", "1", "--out", "lcm", "--overwrite", "--taesd", taesd])
    settings = json.loads(Image.open(workdir / "lcm" / "a-tree-1.png").text["minildm"])
    assert (settings["sampler"], settings["steps"], settings["guidance"]) == ("lcm", 4, 1.0)
    assert settings["taesd"] == str(tmp_path / "taesd")
    main(["a tree", "--seed", "1", "--out", "plain", "--overwrite", "--steps", "2"])
    settings = json.loads(Image.open(workdir / "plain" / "a-tree-1.png").text["minildm"])
    assert (settings["sampler"], settings["guidance"]) == ("ddim", 7.5) and "taesd" not in settings
    folder, _ = lcm_distilled_folder(tiny_models(seed=1), tmp_path)
    main(["a tree", "--seed", "1", "--out", "distilled", "--overwrite", "--ckpt", folder])
    settings = json.loads(Image.open(workdir / "distilled" / "a-tree-1.png").text["minildm"])
    assert (settings["sampler"], settings["steps"], settings["guidance"]) == ("lcm", 4, 8.5)


def test_auto_dtype_is_bfloat16_only_for_sd_sized_models_on_cpus_that_multiply_it(workdir, monkeypatch, tmp_path):
    """--dtype auto on the CPU loads a model of SD's width (320 channels) straight into bfloat16 where the
    CPU has bfloat16 in hardware, and keeps the small models, and every model where bfloat16 would be
    emulated, in float32; sample says which it chose."""
    from minildm import cli, plumbing
    from minildm.clip_text import CLIPTextConfig, CLIPTextModel
    from minildm.unet import UNet, UNetConfig
    from minildm.vae import AutoencoderKL, VAEConfig

    wide = UNetConfig(model_channels=320, channel_mult=(1,), num_res_blocks=1, attention_levels=(), num_heads=8,
                      context_dim=32, norm_groups=32)
    path = tmp_path / "wide" / "model.safetensors"
    convert.save_checkpoint(path, unet=UNet(wide), vae=AutoencoderKL(VAEConfig.tiny()),
                            text_encoder=CLIPTextModel(CLIPTextConfig.tiny()), schedule=NoiseSchedule.sd(),
                            scale_factor=0.5)
    small = workdir / "runs" / "tiny" / "model.safetensors"
    for hardware in (True, False):
        monkeypatch.setattr(plumbing, "cpu_has_bfloat16", lambda: hardware)
        assert cli.load_model(str(path), "runs", "cpu", "auto")[0].dtype == (torch.bfloat16 if hardware else torch.float32)
        assert cli.load_model(str(small), "runs", "cpu", "auto")[0].dtype == torch.float32
        assert cli.load_model(str(path), "runs", "cpu", "float32")[0].dtype == torch.float32
    monkeypatch.setattr(plumbing, "cpu_has_bfloat16", lambda: True)
    monkeypatch.chdir(workdir)
    main(["a tree", "--ckpt", str(path), "--steps", "1", "--height", "16", "--width", "16", "--seed", "0",
          "--out", "wide", "--overwrite"])
    assert json.loads(Image.open(workdir / "wide" / "a-tree-0.png").text["minildm"])["dtype"] == "bfloat16"
