"""What every check is made of: the chapter and result records, and comparisons that say exactly what differs."""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch


ROOT = Path(__file__).resolve().parents[2]
# The exercise files live in the repository (lessons/exercises/), which `pip install` does not copy:
# from an installed package, point MINILDM_EXERCISES at a clone's lessons/exercises, or use --impl FILE.
EXERCISE_DIR = Path(os.environ.get("MINILDM_EXERCISES") or ROOT / "lessons" / "exercises")


class CheckFailed(AssertionError):
    """A check found a difference; the message says what it is."""


@dataclass
class Result:
    """The outcome of one exercise check: status is "pass", "fail", "todo" or "error"."""

    chapter: str
    exercise: str
    status: str
    message: str = ""


@dataclass
class Chapter:
    """One chapter's exercises: the file the learner edits and the checks, by exercise name."""

    number: str
    stem: str
    title: str
    checks: dict        # exercise name -> check function(impl) that raises CheckFailed
    reference: object   # callable() -> namespace of the package's own answers

    @property
    def path(self) -> Path:
        return EXERCISE_DIR / f"ex{self.stem}.py"


# ----------------------------------------------------------------------------------------------
# Comparing tensors and describing the difference
# ----------------------------------------------------------------------------------------------

def describe(x) -> str:
    """A short description of an input for a failure message."""
    if torch.is_tensor(x):
        if x.numel() <= 6:
            return f"tensor({[round(v, 4) for v in x.flatten().tolist()]}, shape {tuple(x.shape)})"
        return f"tensor of shape {tuple(x.shape)}"
    if isinstance(x, float):
        return f"{x:g}"
    return repr(x)


def inputs(**kwargs) -> str:
    """Inputs of a call as `name=description, ...`."""
    return ", ".join(f"{k}={describe(v)}" for k, v in kwargs.items())


def compare(what: str, got, expected, atol: float = 1e-5, rtol: float = 1e-5) -> None:
    """Raise CheckFailed unless `got` is a tensor of the expected shape and close to `expected`."""
    if not torch.is_tensor(got):
        raise CheckFailed(f"{what}: expected a tensor of shape {tuple(expected.shape)}, "
                          f"got {type(got).__name__}")
    if got.shape != expected.shape:
        raise CheckFailed(f"{what}: shape differs: expected {tuple(expected.shape)}, got {tuple(got.shape)}")
    got64, exp64 = got.detach().double(), expected.detach().double()
    if not torch.isfinite(got64).all():
        bad = (~torch.isfinite(got64)).sum().item()
        raise CheckFailed(f"{what}: {bad} of {got.numel()} values are NaN or infinite")
    diff = (got64 - exp64).abs()
    if not (diff <= atol + rtol * exp64.abs()).all():
        worst = int(diff.flatten().argmax())
        index = tuple(int(i) for i in torch.unravel_index(torch.tensor(worst), diff.shape)) if diff.dim() else ()
        raise CheckFailed(
            f"{what}: values differ: max abs diff {diff.max().item():.3g} at index {index} "
            f"(expected {exp64.flatten()[worst].item():.6g}, got {got64.flatten()[worst].item():.6g}), "
            f"mean abs diff {diff.mean().item():.3g}; tolerance {atol:g} + {rtol:g}*|expected|")


def compare_number(what: str, got, expected: float, rel: float = 0.01) -> None:
    """Raise CheckFailed unless `got` is a number within `rel` (relative) of `expected`."""
    try:
        value = float(got)
    except (TypeError, ValueError):
        raise CheckFailed(f"{what}: expected a number, got {got!r}") from None
    if not math.isclose(value, expected, rel_tol=rel, abs_tol=1e-12):
        raise CheckFailed(f"{what}: {value:.6g} is not within {100 * rel:g}% of the right value")


def unchanged(what: str, before: dict, after: dict) -> None:
    """Raise CheckFailed if a function changed one of its input tensors in place."""
    for name, value in before.items():
        if not torch.equal(value, after[name]):
            raise CheckFailed(f"{what} changed its input `{name}` in place; return a new tensor instead")


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _randn(*shape, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=_gen(seed))
