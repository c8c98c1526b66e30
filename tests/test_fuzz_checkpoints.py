"""Property-based fuzzing of the checkpoint readers: random bytes, and real small checkpoints in every
format with bytes flipped, cut, inserted or overwritten. Whatever the file, loading it either works or
raises CheckpointError (one line): never another exception, never code run from a pickle, and within
bounded time and memory. A file that still loads must hold the original's tensors, except as many numbers
as the edits changed bytes. A fixed number of derandomised examples, so CI runs the same cases every time.
hypothesis is a test requirement: without it this file fails to import, and the suite fails."""
import io
import os
import pickletools
import resource
import shutil
import time
import zipfile
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from minildm import convert
from minildm.ldm import load_stable_diffusion
from minildm.schedule import NoiseSchedule
from test_convert import original_state, tiny_models
from test_ldm import load_original

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
    names = ("minildm.safetensors", "original.safetensors", "original.ckpt", "legacy.ckpt")
    return {name: ((root / name).read_bytes(), tensors_of(load(root / name))) for name in names}


def load(path: Path):
    """Load as a user would: minildm's files carry their sizes; an original-layout file of another size
    than SD v1's (these tiny ones) is loaded with its configs, as with --config."""
    if path.name.startswith("minildm") or path.is_dir():
        return load_stable_diffusion(str(path))
    return load_original(str(path))


def tensors_of(model) -> dict:
    """Every weight of a loaded model, by module and name."""
    return {f"{part}.{k}": v.detach().clone() for part in ("unet", "vae", "text_encoder")
            for k, v in getattr(model, part).state_dict().items()}


def load_and_check(path: Path, clean=None, edited_bytes=None) -> None:
    """Load `path`; only success or a one-line CheckpointError is allowed, in bounded time and memory.
    When it loads and `clean` (the undamaged file's tensors) is given, the tensors must be the same names
    and shapes, differing in at most `edited_bytes` numbers (a number changes only if a byte of it did)."""
    if os.path.exists(MARKER):
        os.remove(MARKER)
    peak_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    started = time.perf_counter()
    model = None
    try:
        model = load(path)
    except convert.CheckpointError as e:
        assert "\n" not in str(e) and str(e), repr(e)
    assert time.perf_counter() - started < 20, "loading took too long"
    grown_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - peak_before) / 1024
    assert grown_mb < 1024, f"loading grew the peak memory by {grown_mb:.0f} MB"
    assert not os.path.exists(MARKER), "a pickle ran code"
    if model is not None and clean is not None and edited_bytes is not None:
        loaded = tensors_of(model)
        assert loaded.keys() == clean.keys()
        assert all(loaded[k].shape == v.shape for k, v in clean.items())
        changed = sum(int((loaded[k] != v).sum()) for k, v in clean.items())
        assert changed <= edited_bytes, f"a damaged file loaded with {changed} numbers changed by {edited_bytes} bytes"


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


def bytes_edited(edits):
    """How many bytes length-preserving edits can change (None if an edit cuts or inserts)."""
    if any(kind in ("cut", "insert") for kind, _, _ in edits):
        return None
    return sum(64 if kind == "zero" else 1 for kind, _, _ in edits)


def header_spans(name: str, raw: bytes) -> list:
    """(start, end) of the parts of a file that say how the rest is read: a safetensors file's length
    field and JSON header; a zip checkpoint's pickle (its first entry, local header included) and its
    central directory; a legacy checkpoint's pickles before the raw storages."""
    if name.endswith(".safetensors"):
        return [(0, 8 + int.from_bytes(raw[:8], "little"))]
    if raw[:4] == b"PK\x03\x04":
        with zipfile.ZipFile(io.BytesIO(raw)) as z:
            infos = z.infolist()
        pkl = next(i for i in infos if i.filename.endswith("data.pkl"))
        end_of_pickle = pkl.header_offset + 30 + len(pkl.filename.encode()) + len(pkl.extra) + pkl.compress_size
        central = max(i.header_offset for i in infos)      # the last entry, then the central directory
        return [(0, end_of_pickle), (central, len(raw))]
    stream = io.BytesIO(raw)
    for _ in range(5):             # magic number, protocol, system info, the object, the storage keys
        for _ in pickletools.genops(stream):
            pass
    return [(0, stream.tell())]


EDITS = st.lists(st.tuples(st.sampled_from(["flip", "set", "cut", "insert", "zero"]),
                           st.integers(0, 2**31), st.integers(0, 2**16)), min_size=1, max_size=6)
# Inside the headers, whatever their length: positions are taken modulo the header's span.
HEADER_EDITS = st.lists(st.tuples(st.sampled_from(["flip", "set", "insert", "zero"]),
                                  st.integers(0, 2**31), st.integers(0, 2**16)), min_size=1, max_size=4)


def test_the_headers_are_where_the_fuzz_looks_for_them(originals):
    """The spans header edits land in: a safetensors header is JSON and far longer than 4 KiB here; a
    zip checkpoint's span starts with its pickle, a legacy one's is a whole pickle stream."""
    for name, (raw, _) in originals.items():
        spans = header_spans(name, raw)
        assert all(0 <= a < b <= len(raw) for a, b in spans)
        if name.endswith(".safetensors"):
            (a, b), = spans
            assert raw[8:9] == b"{" and raw[b - 1:b] in (b"}", b" ") and b > 4096
        elif name == "original.ckpt":
            assert spans[0][1] > 4096 and spans[-1][1] == len(raw)
        else:
            assert spans[0][1] > 4096 and raw[spans[0][1]:] and spans[0][1] < len(raw)


@pytest.mark.parametrize("name", ["minildm.safetensors", "original.safetensors", "original.ckpt", "legacy.ckpt"])
@FUZZ
@given(edits=EDITS)
def test_a_damaged_checkpoint_is_refused_in_one_line(originals, tmp_path, name, edits):
    raw, clean = originals[name]
    path = tmp_path / name
    path.write_bytes(mutate(raw, edits))
    load_and_check(path, clean, bytes_edited(edits))


@pytest.mark.parametrize("name", ["minildm.safetensors", "original.safetensors", "original.ckpt", "legacy.ckpt"])
@FUZZ
@given(edits=HEADER_EDITS, span=st.integers(0, 1))
def test_a_damaged_header_is_refused_or_changes_no_tensor(originals, tmp_path, name, edits, span):
    raw, clean = originals[name]
    spans = header_spans(name, raw)
    start, end = spans[span % len(spans)]
    edits = [(kind, start + where % (end - start), value) for kind, where, value in edits]
    path = tmp_path / name
    path.write_bytes(mutate(raw, edits))
    load_and_check(path, clean, bytes_edited(edits))


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
