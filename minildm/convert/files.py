"""Reading files: safetensors memory-mapped, .ckpt only through the weights-only unpickler, textual
inversions, and what the first bytes of a file say it is."""
from __future__ import annotations

import json
import os
import pickle
import re
import struct

import torch

from .keys import CheckpointError, identify, describe


# ----------------------------------------------------------------------------------------------------
# Reading files: safetensors memory-mapped, .ckpt through the weights-only unpickler


def _safetensors_header(path):
    """The JSON header of a .safetensors file, after checking that the file is complete."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise CheckpointError(f"{path} is not a safetensors file (only {size} bytes)")
        (n,) = struct.unpack("<Q", head)
        if n > size - 8:
            raise CheckpointError(f"{path} is truncated (an incomplete download?): its header alone "
                                  f"needs {n + 8} bytes, the file has {size}")
        try:
            header = json.loads(f.read(n))
        except ValueError:
            raise CheckpointError(f"{path} is not a safetensors file (its header is not JSON)") from None
    try:
        end = max((int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"), default=0)
    except (AttributeError, KeyError, IndexError, TypeError, ValueError):
        raise CheckpointError(f"{path} is damaged: its safetensors header does not describe tensors") from None
    if 8 + n + end > size:
        raise CheckpointError(f"{path} is truncated (an incomplete download?): it should be "
                              f"{8 + n + end:,} bytes but has {size:,}")
    return header


def read_safetensors(path, device="cpu"):
    """(state_dict, metadata) of a .safetensors file; on the CPU the tensors are views of a memory map."""
    from safetensors import SafetensorError, safe_open

    _safetensors_header(path)
    try:
        with safe_open(path, framework="pt", device=str(device)) as f:
            metadata = f.metadata() or {}
            state = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, ValueError, OSError, RuntimeError, MemoryError) as e:  # a header it cannot use
        raise CheckpointError(f"{path} is damaged or not a safetensors file: {_last_line(e)}") from None
    return state, metadata


def first_line(error) -> str:
    """The first non-empty line of an exception's message (at most 200 characters), for one-line errors."""
    return _last_line(error)


def _last_line(error):
    lines = [line for line in str(error).splitlines() if line.strip()]
    return lines[0][:200] if lines else type(error).__name__


def read_ckpt(path):
    """The state dict of a pickled .ckpt, refusing any pickle that wants to run code."""
    obj = load_pickle(path)
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path} does not hold a state dict (found {type(obj).__name__})")
    state = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    return state, {}


def load_pickle(path):
    """Whatever a PyTorch pickle (.ckpt, .pt, .bin) holds, through the weights-only loader: tensors,
    dicts, lists, numbers and strings come back; a pickle that wants to run code is refused."""
    try:
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as e:
            if "mmap" not in str(e):  # legacy (non-zip) pickles cannot be memory-mapped
                raise
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        culprit = re.search(r"GLOBAL ([\w.]+)", str(e))
        if culprit:
            raise CheckpointError(
                f"refusing to load {path}: its pickle wants to call {culprit.group(1)}, which is code, not "
                "tensors. Only load .ckpt files you trust, or use a .safetensors file instead") from None
        raise CheckpointError(f"{path} cannot be read as a PyTorch checkpoint (damaged, or not a "
                              ".ckpt file)") from None
    except (RuntimeError, EOFError, OSError, ValueError, KeyError, IndexError, TypeError, AttributeError,
            MemoryError, struct.error, UnicodeDecodeError, AssertionError) as e:   # PyTorch asserts on some damage
        raise CheckpointError(f"{path} cannot be read as a PyTorch checkpoint (truncated, or not a "
                              f".ckpt file?): {_last_line(e)}") from None
    return obj


# ----------------------------------------------------------------------------------------------------
# Textual-inversion embeddings: a token string and one or more vectors for the text encoder's table

def read_textual_inversion(path):
    """(token or None, vectors (n, D)) of a textual-inversion file, in any of the layouts people share:

        diffusers    {token: (D,) or (n, D)}                      .bin / .safetensors
        A1111 .pt    {"string_to_param": {"*": (n, D)}, "name": token, ...}
        A1111        {"emb_params": (n, D)}                       .safetensors (the token is the file name)

    None for the token means the file does not name one. Pickles go through the weights-only loader.
    """
    kind = sniff(path)
    if kind is not None:
        raise CheckpointError(f"{path} is {kind}, not a textual-inversion embedding")
    if str(path).endswith(".safetensors"):
        state, _ = read_safetensors(path)
    else:
        state = load_pickle(path)
    token, vectors = None, None
    if isinstance(state, torch.Tensor):
        vectors = state
    elif isinstance(state, dict) and isinstance(state.get("string_to_param"), dict):
        params = list(state["string_to_param"].values())
        vectors = params[0] if len(params) == 1 else None
        token = state.get("name") if isinstance(state.get("name"), str) else None
    elif isinstance(state, dict) and "emb_params" in state:
        vectors = state["emb_params"]
    elif isinstance(state, dict) and len(state) == 1:
        token, vectors = next(iter(state.items()))
    if not isinstance(vectors, torch.Tensor) or vectors.dim() not in (1, 2) or not vectors.is_floating_point():
        kind = (identify(state) if isinstance(state, dict) and len(state) > 1
                and all(isinstance(k, str) for k in state) else "unknown")
        raise CheckpointError(f"{path} is not a textual-inversion embedding (one token's vectors)"
                              + (f": it is {describe(kind)}" if kind != "unknown" else ""))
    return token, vectors.detach().reshape(-1, vectors.shape[-1]).float()


# The first bytes of files people mistake for checkpoints, and what to call them.
FILE_SIGNATURES = (
    (b"\x89PNG", "a PNG image"), (b"\xff\xd8\xff", "a JPEG image"), (b"GIF8", "a GIF image"),
    (b"RIFF", "a RIFF file (WebP image or WAV sound)"), (b"%PDF", "a PDF document"),
    (b"\x1f\x8b", "a gzip archive"), (b"BZh", "a bzip2 archive"), (b"\xfd7zXZ", "an xz archive"),
    (b"7z\xbc\xaf", "a 7-Zip archive"), (b"Rar!", "a RAR archive"), (b"\x7fELF", "a program (ELF)"),
    (b"<!DOCTYPE", "an HTML page (a download that saved the web page?)"), (b"<html", "an HTML page"),
    (b"version https://git-lfs", "a Git LFS pointer, not the file itself (run git lfs pull)"),
)


def sniff(path) -> str | None:
    """What a file is, by its first bytes, when it is clearly not a checkpoint: 'a PNG image', ...;
    None for what may be one (safetensors, a zip or pickle .ckpt)."""
    with open(path, "rb") as f:
        head = f.read(512)
    if not head:
        return "an empty file"
    for magic, name in FILE_SIGNATURES:
        if head.lstrip()[:len(magic)].lower() == magic.lower():
            return name
    if head[:2] == b"PK" or head[:1] == b"\x80":       # a zip (torch.save) or a raw pickle
        return None
    if len(head) >= 8 and struct.unpack("<Q", head[:8])[0] < 100_000_000 and head[8:9] == b"{":
        return None                                        # a safetensors header: length, then JSON
    try:
        text = head.decode("utf-8")
        if all(c.isprintable() or c in "\n\r\t" for c in text):
            return "a text file"
    except UnicodeDecodeError as e:
        if e.start >= len(head) - 3:                       # cut in the middle of a character
            return "a text file"
    return "not a format minildm knows (neither safetensors nor a PyTorch .ckpt)"


def read_state_dict(path, device="cpu"):
    """(state_dict, metadata) of a .safetensors or .ckpt/.pt/.pth/.bin file."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint not found: {path}")
    if not os.access(path, os.R_OK):
        raise CheckpointError(f"{path} cannot be read (permission denied)")
    what = sniff(path)
    if what is not None:
        kind = "safetensors file" if path.endswith(".safetensors") else "checkpoint"
        raise CheckpointError(f"{path} is not a {kind}: it is {what}" if what[0] in "ae" else f"{path} is {what}")
    if path.endswith(".safetensors"):
        return read_safetensors(path, device)
    with open(path, "rb") as f:
        magic = f.read(8)
    if len(magic) == 8 and magic[:2] not in (b"PK", b"\x80\x02") and struct.unpack("<Q", magic)[0] < 100_000_000:
        return read_safetensors(path, device)  # a safetensors file with another extension
    return read_ckpt(path)
