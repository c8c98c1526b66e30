"""The notebooks are committed with their outputs, and those outputs are what the current code prints and draws.

`python notebooks/build.py` runs every notebook and saves it with its outputs; the figures the lessons show
are cut from those outputs into lessons/images/. The fast tests here check the committed files agree with
each other (one complete run per notebook, every lesson picture is its notebook's picture, every picture a
lesson links exists and says how it was made). The slow test runs each notebook again and compares: words
exactly, numbers within their printed precision (wall times excepted), pictures within 1% of the pixel
range (notebooks/build.py's docstring gives the rules).
"""
import base64
import io
import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "notebooks"))
import build  # noqa: E402  (notebooks/build.py)

NOTEBOOKS = build.notebook_paths()
LESSONS = sorted((ROOT / "lessons").glob("[0-9][0-9]_*.md"))
PAGES = LESSONS + [ROOT / "README.md", ROOT / "lessons" / "README.md"]
IMAGE_LINK = re.compile(r"!\[[^\]]*\]\(([^)\s]+\.png)\)")

nbformat = pytest.importorskip("nbformat")


def read(path):
    return nbformat.read(path, as_version=4)


def test_notebooks_exist():
    """The course has notebooks to run, one per lesson."""
    assert NOTEBOOKS, "no notebooks found in notebooks/"
    assert [p.stem for p in NOTEBOOKS] == [p.stem for p in LESSONS]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_is_committed_as_one_complete_run(path):
    """Every code cell ran, in order, in one kernel, and none raised."""
    nb = read(path)
    counts = [c.execution_count for c in nb.cells if c.cell_type == "code"]
    assert counts == list(range(1, len(counts) + 1)), (
        f"{path.name} is not one top-to-bottom run (execution counts {counts}): run python notebooks/build.py "
        f"{path.name[:2]}")
    for i, cell in enumerate(nb.cells):
        for out in cell.get("outputs", []):
            assert out.output_type != "error", f"{path.name}, cell {i} raised {out.ename}: {out.evalue}"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_lesson_figures_are_the_notebooks_pictures(path):
    """Each `# figure: NAME` cell's picture is lessons/images/NAME.png, byte for byte."""
    for name, png in build.figures(read(path), path.name).items():
        image = build.IMAGES / f"{name}.png"
        assert image.exists(), f"{image} is missing: run python notebooks/build.py {path.name[:2]}"
        assert image.read_bytes() == png, f"{image} is not the picture {path.name} holds: rebuild it"


def test_every_linked_picture_exists_and_every_picture_is_shown():
    linked = set()
    for page in PAGES:
        for target in IMAGE_LINK.findall(page.read_text()):
            image = (page.parent / target).resolve()
            assert image.exists(), f"{page.relative_to(ROOT)} shows {target}, which does not exist"
            linked.add(image)
    for image in build.IMAGES.glob("*.png"):
        assert image.resolve() in linked, f"{image.relative_to(ROOT)} is shown by no lesson"
    marked = {name for path in NOTEBOOKS for name in build.figures(read(path), path.name)}
    for name in marked:
        assert (build.IMAGES / f"{name}.png").resolve() in linked, f"figure {name} is marked but no lesson shows it"


@pytest.mark.parametrize("lesson", LESSONS, ids=[p.stem for p in LESSONS])
def test_every_lesson_shows_pictures_with_the_command_that_made_them(lesson):
    """A lesson embeds at least one picture, and the caption under each (the paragraph the embed starts, or the
    one after it) names the command that made it."""
    text = lesson.read_text()
    shown = list(IMAGE_LINK.finditer(text))
    assert shown, f"{lesson.name} shows no picture"
    for link in shown:
        paragraphs = text[text.rfind("\n\n", 0, link.start()) + 2:].split("\n\n")
        caption = " ".join(paragraphs[:2])
        line = text.count("\n", 0, link.start()) + 1
        assert re.search(r"`python\s", caption), f"{lesson.name}:{line}: say which command made {link[1]}"


def test_the_comparison_can_fail():
    """Changed numbers and pictures are reported; a changed wall time is not."""
    assert build.compare_text("loss 0.125 after 12.3 s\n", "loss 0.125 after 40.1 s\n", 1e-3) == []
    assert build.compare_text("loss 0.125\n", "loss 0.126\n", 1e-3) == []            # one unit in the last digit
    assert build.compare_text("loss 0.125\n", "loss 0.128\n", 1e-3)
    assert build.compare_text("1,024 parameters\n", "1,025 parameters\n", 1e-3) == []
    assert build.compare_text("1,024 parameters\n", "1,030 parameters\n", 1e-3)
    assert build.compare_text("PSNR 24.1 dB\n", "PSNR 24.1 dB (best)\n", 1e-3)        # words must match
    np = pytest.importorskip("numpy")
    from PIL import Image

    def png(array):
        buffer = io.BytesIO()
        Image.fromarray(array).save(buffer, format="PNG")
        return buffer.getvalue()

    picture = np.random.default_rng(0).integers(0, 256, (40, 60, 3), dtype=np.uint8)
    moved = picture.copy()
    moved[:20] = 255 - moved[:20]                                                  # half the picture changed
    assert build.compare_images(png(picture), png(picture), 0.01) is None
    assert build.compare_images(png(picture), png(moved), 0.01)
    assert build.compare_images(png(picture), png(picture[:30]), 0.01)
    # A tight bounding box a pixel narrower (a printed number a digit shorter) is the same picture at the best
    # alignment; three pixels off, or a changed picture of the edge's size, is not.
    assert build.compare_images(png(picture), png(picture[:, 1:]), 0.01) is None
    assert build.compare_images(png(picture), png(picture[1:, :-1]), 0.01) is None
    assert build.compare_images(png(picture), png(picture[:, 3:]), 0.01)
    assert build.compare_images(png(picture), png(moved[:, 1:]), 0.01)
    # A cell's tolerance line: numbers, and optionally pictures.
    cell = type("Cell", (), {"source": "# tolerance: 0.05, pictures 0.04\n# figure: x\nprint(1)"})
    assert build.cell_tolerances(cell) == (["x"], 0.05, 0.04)
    cell.source = "# tolerance: 0.1\nprint(1)"
    assert build.cell_tolerances(cell) == ([], 0.1, None) and build.cell_header(cell) == ([], 0.1)


def test_a_stale_notebook_is_caught():
    """The comparison finds a committed notebook whose printed number or picture is not what a run gives."""
    path = next(p for p in NOTEBOOKS if build.figures(read(p)))
    committed, fresh = read(path), read(path)
    assert build.differences(committed, fresh) == []
    cell = next(c for c in fresh.cells if c.cell_type == "code" and build.images(c))
    out = next(o for o in cell.outputs if "image/png" in o.get("data", {}))
    from PIL import Image

    picture = Image.open(io.BytesIO(base64.b64decode(out.data["image/png"]))).convert("RGB")
    buffer = io.BytesIO()
    Image.eval(picture, lambda v: 255 - v).save(buffer, format="PNG")
    out.data["image/png"] = base64.b64encode(buffer.getvalue()).decode()
    assert build.differences(committed, fresh)


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_outputs_are_current(path):
    """Run again in a fresh kernel, the notebook prints and draws what is committed."""
    pytest.importorskip("nbclient")
    if path.name.startswith("05") and not build.os.environ.get("MINILDM_CIFAR"):
        pytest.skip("notebook 05's committed outputs are from real CIFAR-10 photos: set MINILDM_CIFAR")
    problems = build.differences(read(path), build.execute(path))
    assert not problems, f"{path.name} is stale (run python notebooks/build.py {path.name[:2]}):\n" + "\n".join(problems)
