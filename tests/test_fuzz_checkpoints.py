"""Property-based fuzzing of the checkpoint readers: random bytes, and real small checkpoints in every
format with bytes flipped, cut, inserted or overwritten. Whatever the file, loading it either works or
raises CheckpointError (one line): never another exception, never code run from a pickle, and within
bounded time and memory. A fixed number of derandomised examples, so CI runs the same cases every time."""
import os
import resource
import shutil
import time
from pathlib import Path

import pytest
import torch

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from minildm import convert  # noqa: E402
from minildm.ldm import load_stable_diffusion  # noqa: E402
from minildm.schedule import NoiseSchedule  # noqa: E402
from test_convert import original_state, tiny_models  # noqa: E402

EXAMPLES = 60
FUZZ = settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
MARKER = "/tmp/minildm-fuzz-pickle-ran"


@pytest.fixture(scope="module")
def originals(tmp_path_factory):
    """The bytes of a real tiny checkpoint in each format minildm reads."""
    root = tmp_path_factory.mktemp("fuzz")
    unet, vae, text = tiny_models()
    convert.save_checkpoint(root / "minildm.safetensors", unet=unet, vae=vae, text_encoder=text,
                            schedule=NoiseSchedule.sd(), scale_factor=0.5)
    state = original_state(unet, vae, text)
    from safetensors.torch import save_file
    save_file({k: v.contiguous() for k, v in state.items()}, str(root / "original.safetensors"))
    torch.save({"state_dict": state}, root / "original.ckpt")                           # zip
    torch.save({"state_dict": state}, root / "legacy.ckpt", _use_new_zipfile_serialization=False)
    return {name: (root / name).read_bytes() for name in
            ("minildm.safetensors", "original.safetensors", "original.ckpt", "legacy.ckpt")}


def load_and_check(path: Path) -> None:
    """Load `path`; only success or a one-line CheckpointError is allowed, in bounded time and memory."""
    if os.path.exists(MARKER):
        os.remove(MARKER)
    peak_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    started = time.perf_counter()
    try:
        load_stable_diffusion(str(path))
    except convert.CheckpointError as e:
        assert "\n" not in str(e) and str(e), repr(e)
    assert time.perf_counter() - started < 20, "loading took too long"
    grown_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - peak_before) / 1024
    assert grown_mb < 1024, f"loading grew the peak memory by {grown_mb:.0f} MB"
    assert not os.path.exists(MARKER), "a pickle ran code"


def mutate(raw: bytes, edits) -> bytes:
    data = bytearray(raw)
    for kind, where, value in edits:
        if not data:
            break
        i = where % len(data)
        if kind == "flip":
            data[i] ^= 1 << (value % 8)
        elif kind == "set":
            data[i] = value % 256
        elif kind == "cut":
            del data[i:]
        elif kind == "insert":
            data[i:i] = bytes([value % 256]) * (1 + value % 7)
        elif kind == "zero":
            data[i:i + 64] = bytes(len(data[i:i + 64]))
    return bytes(data)


EDITS = st.lists(st.tuples(st.sampled_from(["flip", "set", "cut", "insert", "zero"]),
                           st.integers(0, 2**31), st.integers(0, 2**16)), min_size=1, max_size=6)
# Mostly near the start, where the headers that decide how the rest is read live.
HEADER_EDITS = st.lists(st.tuples(st.sampled_from(["flip", "set", "insert", "zero"]),
                                  st.integers(0, 4096), st.integers(0, 2**16)), min_size=1, max_size=4)


@pytest.mark.parametrize("name", ["minildm.safetensors", "original.safetensors", "original.ckpt", "legacy.ckpt"])
@FUZZ
@given(edits=st.one_of(EDITS, HEADER_EDITS))
def test_a_damaged_checkpoint_is_refused_in_one_line(originals, tmp_path, name, edits):
    path = tmp_path / name
    path.write_bytes(mutate(originals[name], edits))
    load_and_check(path)


@pytest.mark.parametrize("suffix", [".safetensors", ".ckpt", ".bin"])
@FUZZ
@given(raw=st.binary(min_size=0, max_size=4096))
def test_random_bytes_are_refused_in_one_line(tmp_path, suffix, raw):
    path = tmp_path / f"random{suffix}"
    path.write_bytes(raw)
    load_and_check(path)


@FUZZ
@given(prefix=st.sampled_from([b"\x80\x02", b"\x80\x04\x95", b"PK\x03\x04", b"\x08\x00\x00\x00\x00\x00\x00\x00{"]),
       raw=st.binary(min_size=0, max_size=2048))
def test_plausible_starts_with_garbage_after_them_are_refused(tmp_path, prefix, raw):
    """Bytes that begin like a pickle, a zip or a safetensors header get past the first look."""
    path = tmp_path / "plausible.ckpt"
    path.write_bytes(prefix + raw)
    load_and_check(path)


@pytest.fixture(scope="module")
def pipeline_folder(tmp_path_factory):
    """A diffusers pipeline folder of the tiny models, saved by diffusers itself."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline
    from test_ldm import diffusers_parts, write_tokenizer_folder

    root = tmp_path_factory.mktemp("pipe")
    unet, vae, text, tokenizer = diffusers_parts(tiny_models(), write_tokenizer_folder(str(root / "tok")))
    StableDiffusionPipeline(vae=vae, text_encoder=text, tokenizer=tokenizer, unet=unet, scheduler=DDIMScheduler(),
                            safety_checker=None, feature_extractor=None,
                            requires_safety_checker=False).save_pretrained(root / "pipe")
    return root / "pipe"


@pytest.mark.parametrize("part", ["unet/config.json", "vae/config.json", "text_encoder/config.json",
                                  "scheduler/scheduler_config.json", "unet/diffusion_pytorch_model.safetensors"])
@FUZZ
@given(edits=HEADER_EDITS)
def test_a_damaged_diffusers_folder_is_refused_in_one_line(pipeline_folder, tmp_path, part, edits):
    folder = tmp_path / "pipe"
    if folder.exists():
        shutil.rmtree(folder)
    shutil.copytree(pipeline_folder, folder)
    target = folder / part
    target.write_bytes(mutate(target.read_bytes(), edits))
    load_and_check(folder)


def test_a_pickle_that_runs_code_is_refused_even_when_damaged(tmp_path):
    """The weights-only loader refuses a code-running pickle, damaged or not, and never runs it."""
    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {MARKER}",))

    path = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {"x": Evil()}}, path)
    load_and_check(path)
    raw = path.read_bytes()
    for cut in (len(raw) // 2, len(raw) - 10):
        path.write_bytes(raw[:cut])
        load_and_check(path)
