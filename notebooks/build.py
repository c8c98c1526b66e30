"""Run the course's notebooks and keep what they show: `python notebooks/build.py [NN ...]`.

Each notebook runs top to bottom in a fresh kernel of this Python, on an idle machine please, and is
saved with its outputs, so the repository shows every printed number and picture without running
anything. A code cell marks the pictures a lesson shows with comment lines at its top,

    # figure: 02_sampler_paths

and the k-th such line names the cell's k-th image output, written to lessons/images/02_sampler_paths.png.

`--check` runs the notebooks without saving and reports where the committed outputs differ from what
the current code prints and draws (tests/test_notebooks.py makes the same comparison):
- text must be the same apart from its numbers (and the random names of temporary folders and memory
  addresses); numbers the same up to one unit in their last printed digit or a relative 1e-3, whichever
  is larger (a cell may allow more with a `# tolerance: 0.05` line); a number followed by a unit of
  time (`12 s`, `0.31s`, `40 ms`) is a wall time and not compared;
- pictures the same size (up to two pixels, the edge of a tight bounding box), with a mean absolute
  pixel difference of at most 1% (2% where a cell declares a tolerance, or what its `# tolerance: 0.05,
  pictures 0.04` line says: rendering text and antialiasing move a few pixels, a changed curve moves many).

A cell that trains a model prints numbers that depend on the CPU's float arithmetic (an AVX2 machine and
an AVX-512 one order their sums differently, and a few hundred optimizer steps amplify that), so such a
cell declares the tolerance its numbers keep across the machines it was run on.

Chapter 05 trains on real photos: set MINILDM_CIFAR to the CIFAR-10 copy (see minildm.data) before
building it. Nothing is downloaded (MINILDM_OFFLINE=1); notebook 11 runs without MINILDM_RUN.
"""
from __future__ import annotations

import argparse
import base64
import io
import os
import re
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = ROOT / "notebooks"
IMAGES = ROOT / "lessons" / "images"
INLINE = "module://matplotlib_inline.backend_inline"

FIGURE_LINE = re.compile(r"^#\s*figure:\s*(\S+)\s*$")
TOLERANCE_LINE = re.compile(r"^#\s*tolerance:\s*([0-9.eE-]+)(?:,\s*pictures\s+([0-9.eE-]+))?")
NUMBER = re.compile(r"(?<![\w.])-?\d+(?:,\d{3})*(?:\.\d+)?(?:[eE][-+]?\d+)?")
WALL_TIME = re.compile(r"\s?(?:s|ms|seconds?|minutes?|min)\b")
ADDRESS = re.compile(r"0x[0-9a-f]{6,}")
TEMPORARY = re.compile(r"\btmp[a-z0-9_]{8}\b")   # the random part of a tempfile.mkdtemp() name
RTOL, PIXEL_TOL, SIZE_TOL = 1e-3, 0.01, 2


def notebook_paths(chapters=()) -> list[Path]:
    """The notebooks, all or those whose file name starts with one of `chapters` ("02", "11")."""
    paths = sorted(NOTEBOOKS.glob("[0-9][0-9]_*.ipynb"))
    if chapters:
        paths = [p for p in paths if any(p.name.startswith(c) for c in chapters)]
        missing = [c for c in chapters if not any(p.name.startswith(c) for p in paths)]
        if missing:
            raise SystemExit(f"no notebook for {', '.join(missing)} in {NOTEBOOKS}")
    return paths


def execute(path: Path, timeout: int = 900):
    """The notebook at `path`, run top to bottom in a fresh kernel: a new nbformat object, outputs filled."""
    import nbclient
    import nbformat

    nb = nbformat.read(path, as_version=4)
    # The kernel inherits this environment for the run (and only for the run): it is this interpreter, so
    # it sees the same installed packages; pictures go inline; nothing downloads.
    saved = dict(os.environ)
    os.environ["PATH"] = os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", "")
    os.environ["MPLBACKEND"] = INLINE
    os.environ["MINILDM_OFFLINE"] = "1"
    os.environ.pop("MINILDM_RUN", None)
    try:
        client = nbclient.NotebookClient(nb, timeout=timeout, kernel_name="python3", record_timing=False,
                                         resources={"metadata": {"path": str(NOTEBOOKS)}})
        client.execute(cwd=str(NOTEBOOKS))
    finally:
        os.environ.clear()
        os.environ.update(saved)
    return nb


def cell_header(cell) -> tuple[list[str], float | None]:
    """The figure names and the tolerance a code cell's leading comment lines declare."""
    names, tolerance, _ = cell_tolerances(cell)
    return names, tolerance


def cell_tolerances(cell) -> tuple[list[str], float | None, float | None]:
    """(figure names, number tolerance, picture tolerance) of a code cell's leading comment lines:
    `# tolerance: 0.05` or `# tolerance: 0.05, pictures 0.04`."""
    names, tolerance, pictures = [], None, None
    for line in cell.source.splitlines():
        if not line.startswith("#"):
            break
        if m := FIGURE_LINE.match(line):
            names.append(m.group(1))
        elif m := TOLERANCE_LINE.match(line):
            tolerance = float(m.group(1))
            pictures = float(m.group(2)) if m.group(2) else None
    return names, tolerance, pictures


def images(cell) -> list[bytes]:
    """The PNG pictures a code cell's outputs hold, in order."""
    return [base64.b64decode(out["data"]["image/png"]) for out in cell.get("outputs", [])
            if "image/png" in out.get("data", {})]


def figures(nb, name: str = "notebook") -> dict[str, bytes]:
    """Every figure the notebook marks: {name: PNG bytes}."""
    found = {}
    for i, cell in enumerate(nb.cells):
        if cell.cell_type != "code":
            continue
        names, _ = cell_header(cell)
        pictures = images(cell)
        if len(names) > len(pictures):
            raise ValueError(f"{name}, cell {i}: {len(names)} '# figure:' lines but {len(pictures)} image outputs")
        found.update(zip(names, pictures))
    return found


def text_of(cell) -> str:
    """What a code cell printed: its stdout and its results' plain text (stderr holds warnings, not results)."""
    parts = []
    for out in cell.get("outputs", []):
        if out.output_type == "stream" and out.name == "stdout":
            parts.append(out.text)
        elif out.output_type == "execute_result" and "text/plain" in out.get("data", {}):
            parts.append(out["data"]["text/plain"] + "\n")
    return "".join(parts)


def _last_digit(token: str) -> float:
    """One unit in the last printed digit of a number as printed: '0.125' -> 0.001, '1,024' -> 1."""
    mantissa, _, exponent = token.lower().partition("e")
    decimals = len(mantissa.split(".")[1]) if "." in mantissa else 0
    return 10.0 ** (int(exponent or 0) - decimals)


def compare_text(old: str, new: str, rtol: float) -> list[str]:
    """Where the printed text `new` differs from `old`: words exactly, numbers within tolerance."""
    old, new = (TEMPORARY.sub("tmp…", ADDRESS.sub("0x…", text)) for text in (old, new))
    if NUMBER.sub("#", old) != NUMBER.sub("#", new):
        old_lines, new_lines = old.splitlines(), new.splitlines()
        for a, b in zip(old_lines, new_lines):
            if NUMBER.sub("#", a) != NUMBER.sub("#", b):
                return [f"text changed: {a!r} -> {b!r}"]
        return [f"text changed: {len(old_lines)} lines -> {len(new_lines)} lines"]
    problems = []
    for a, b in zip(NUMBER.finditer(old), NUMBER.finditer(new)):
        if WALL_TIME.match(old, a.end()):
            continue
        x, y = float(a.group().replace(",", "")), float(b.group().replace(",", ""))
        allowed = max(_last_digit(a.group()), _last_digit(b.group()), rtol * abs(x))
        if abs(x - y) > allowed * (1 + 1e-9):
            line = old[old.rfind("\n", 0, a.start()) + 1:old.find("\n", a.end())]
            problems.append(f"{a.group()} -> {b.group()} in {line.strip()!r}")
    return problems


def compare_images(old: bytes, new: bytes, tolerance: float) -> str | None:
    """Why two PNG pictures differ more than `tolerance` (mean absolute difference, 0..1), or None."""
    import numpy as np
    from PIL import Image

    a, b = (np.asarray(Image.open(io.BytesIO(png)).convert("RGB"), dtype=np.float32) / 255 for png in (old, new))
    dh, dw = b.shape[0] - a.shape[0], b.shape[1] - a.shape[1]
    if max(abs(dh), abs(dw)) > SIZE_TOL:
        return f"picture size {a.shape[1]}x{a.shape[0]} -> {b.shape[1]}x{b.shape[0]}"
    # A printed number a digit wider moves the edge of a tight bounding box: compare the common part at its
    # best alignment when the sizes differ by a pixel or two.
    h, w = min(a.shape[0], b.shape[0]), min(a.shape[1], b.shape[1])
    diff = min(float(np.abs(a[y:y + h, x:x + w] - b[v:v + h, u:u + w]).mean())
               for y in range(max(-dh, 0) + 1) for x in range(max(-dw, 0) + 1)
               for v in range(max(dh, 0) + 1) for u in range(max(dw, 0) + 1))
    return f"picture differs by {diff:.2%} of the pixel range (allowed {tolerance:.0%})" if diff > tolerance else None


def differences(committed, fresh) -> list[str]:
    """Where a fresh run's outputs differ from the committed ones, cell by cell."""
    problems = []
    if len(committed.cells) != len(fresh.cells):
        return [f"{len(committed.cells)} cells committed, {len(fresh.cells)} run"]
    for i, (old, new) in enumerate(zip(committed.cells, fresh.cells)):
        if old.cell_type != "code":
            continue
        _, tolerance, picture_tolerance = cell_tolerances(old)
        where = f"cell {i}"
        problems += [f"{where}: {p}" for p in compare_text(text_of(old), text_of(new), tolerance or RTOL)]
        old_images, new_images = images(old), images(new)
        if len(old_images) != len(new_images):
            problems.append(f"{where}: {len(old_images)} pictures committed, {len(new_images)} drawn")
            continue
        pixel_tol = picture_tolerance or (PIXEL_TOL if tolerance is None else 2 * PIXEL_TOL)
        for k, (a, b) in enumerate(zip(old_images, new_images)):
            if why := compare_images(a, b, pixel_tol):
                problems.append(f"{where}, picture {k + 1}: {why}")
    return problems


def build(path: Path) -> dict[str, bytes]:
    """Run one notebook, save it with its outputs and write its figures; returns the figures."""
    import nbformat

    nb = execute(path)
    errors = [i for i, c in enumerate(nb.cells) if any(o.output_type == "error" for o in c.get("outputs", []))]
    if errors:
        raise RuntimeError(f"{path.name}: cells {errors} raised")
    found = figures(nb, path.name)
    nbformat.write(nb, path)
    IMAGES.mkdir(parents=True, exist_ok=True)
    for name, png in found.items():
        (IMAGES / f"{name}.png").write_bytes(png)
    return found


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("chapters", nargs="*", help="two-digit chapter numbers (default: every notebook)")
    p.add_argument("--check", action="store_true",
                   help="run without saving and report where the committed outputs differ")
    args = p.parse_args(argv)
    paths = notebook_paths(args.chapters)
    if any(p.name.startswith("05") for p in paths) and not os.environ.get("MINILDM_CIFAR"):
        raise SystemExit("notebook 05 trains on CIFAR-10 photos: set MINILDM_CIFAR to a local copy "
                         "(e.g. cifar10-train-jpg.tar.gz or cifar-10-python.tar.gz) and run again")
    status = 0
    for path in paths:
        start = time.time()
        if args.check:
            import nbformat

            problems = differences(nbformat.read(path, as_version=4), execute(path))
            status |= bool(problems)
            print(f"{path.name}: {'; '.join(problems) or 'outputs current'} ({time.time() - start:.0f} s)")
        else:
            found = build(path)
            shown = ", ".join(f"lessons/images/{n}.png" for n in found) or "no figures"
            print(f"{path.name}: {time.time() - start:.0f} s; {shown}")
    return status


if __name__ == "__main__":
    sys.exit(main())
