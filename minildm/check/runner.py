"""The table of chapters, running a chapter's checks on a file, and `python -m minildm.check`."""
from __future__ import annotations

import importlib.util
import traceback
from pathlib import Path


from .compare import EXERCISE_DIR, CheckFailed, Result
from .chapters_01_05 import CHAPTER_01, CHAPTER_02, CHAPTER_03, CHAPTER_04, CHAPTER_05
from .chapters_06_09 import CHAPTER_06, CHAPTER_07, CHAPTER_08, CHAPTER_09
from .chapter_10 import CHAPTER_10
from .chapter_11 import CHAPTER_11
from .chapter_12 import CHAPTER_12


# ----------------------------------------------------------------------------------------------
# The chapters, running them, and the command line
# ----------------------------------------------------------------------------------------------

# Each chapter is declared (number, exercise file, title, checks, reference) next to its checks,
# in chapters_01_05.py, chapters_06_09.py and chapter_10.py to chapter_12.py.
CHAPTERS = {c.number: c for c in (CHAPTER_01, CHAPTER_02, CHAPTER_03, CHAPTER_04, CHAPTER_05,
                                  CHAPTER_06, CHAPTER_07, CHAPTER_08, CHAPTER_09, CHAPTER_10, CHAPTER_11,
                                  CHAPTER_12)}


def load_impl(path) -> object:
    """Import a Python file as a module (the learner's exercise file)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no such file: {path}")
    spec = importlib.util.spec_from_file_location(f"exercise_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_chapter(number: str, impl=None) -> list:
    """Run a chapter's checks on `impl` (a module or namespace; default: its exercise file)."""
    chapter = CHAPTERS[number]
    if impl is None:
        impl = load_impl(chapter.path)
    results = []
    for name, check in chapter.checks.items():
        try:
            check(impl)
            results.append(Result(number, name, "pass"))
        except NotImplementedError as e:
            results.append(Result(number, name, "todo", str(e) or "not implemented yet (the stub still "
                                                                  "raises NotImplementedError)"))
        except CheckFailed as e:
            results.append(Result(number, name, "fail", str(e)))
        except AttributeError as e:
            results.append(Result(number, name, "fail", f"missing from your file: {e}"))
        except Exception as e:  # the learner's code crashed: show where, briefly
            frames = traceback.extract_tb(e.__traceback__)
            own = [f for f in frames if f.filename == getattr(impl, "__file__", None)]
            where = own[-1] if own else frames[-1]
            results.append(Result(number, name, "error", f"{type(e).__name__}: {e} "
                                  f"(at {Path(where.filename).name}:{where.lineno})"))
    return results


def format_results(results) -> str:
    """One line per exercise, with the failure message indented below it."""
    marks = {"pass": "PASS", "fail": "FAIL", "todo": "TODO", "error": "ERROR"}
    lines = []
    for r in results:
        lines.append(f"[{marks[r.status]:5}] {r.chapter} {r.exercise}")
        if r.message:
            lines.append(f"        {r.message}")
    return "\n".join(lines)


def main(argv=None) -> int:
    from ..cli import Parser

    parser = Parser(
        prog="python -m minildm.check",
        description="Check the exercises of a chapter against the reference implementation in minildm.")
    parser.add_argument("chapter", nargs="?", help="chapter number (e.g. 03) or 'all'")
    parser.add_argument("--impl", help="check this Python file instead of lessons/exercises/exNN_*.py")
    parser.add_argument("--list", action="store_true", help="list the chapters and their exercise files")
    args = parser.parse_args(argv)

    if args.list or not args.chapter:
        print(f"exercise files in {EXERCISE_DIR}" + ("" if EXERCISE_DIR.is_dir() else
              " (not here: set MINILDM_EXERCISES to a clone's lessons/exercises, or check a file with --impl)"))
        for c in CHAPTERS.values():
            print(f"{c.number}  {c.title:28}  {c.path.name}  ({', '.join(c.checks)})")
        return 0
    wanted = list(CHAPTERS) if args.chapter == "all" else [args.chapter.zfill(2)]
    unknown = [w for w in wanted if w not in CHAPTERS]
    from ..cli import USAGE, check_readable_file, fail, usage

    if unknown:
        fail(f"no exercises for chapter {args.chapter}; chapters: {', '.join(CHAPTERS)} or all", USAGE)
    if args.impl and len(wanted) > 1:
        fail(f"--impl {args.impl}: checks one chapter at a time, not all", USAGE)
    check_readable_file("--impl", args.impl)
    if args.impl and not args.impl.endswith(".py"):
        usage("--impl", args.impl, "must be a Python file (.py)")
    results = []
    for number in wanted:
        try:
            impl = load_impl(args.impl) if args.impl else None
            results += run_chapter(number, impl)
        except Exception as e:  # the file itself does not import
            results.append(Result(number, "(import)", "error", f"cannot load the exercise file: "
                                  f"{type(e).__name__}: {e}"))
    print(format_results(results))
    counts = {s: sum(r.status == s for r in results) for s in ("pass", "fail", "todo", "error")}
    print(f"\n{counts['pass']} passed, {counts['fail']} failed, {counts['error']} errors, "
          f"{counts['todo']} not implemented yet")
    return 0 if counts["pass"] == len(results) else 1
