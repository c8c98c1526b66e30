"""The README's two commands are the ones CI and new users run."""
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _readme_commands():
    text = (ROOT / "README.md").read_text()
    return re.findall(r"```(?:bash|sh)\n(.+?)\n```", text, flags=re.S)[:2]


def test_readme_starts_with_two_commands():
    """The README opens with an install-and-run command and an install-and-test command."""
    commands = _readme_commands()
    assert len(commands) == 2
    assert "requirements.txt" in commands[0] and "python -m minildm." in commands[0]
    assert "pytest" in commands[1]


def test_ci_runs_the_readme_test_command():
    """`.ci/run` runs exactly the README's test command."""
    ci = (ROOT / ".ci" / "run").read_text()
    assert f"TEST_COMMAND='{_readme_commands()[1]}'" in ci


def test_reference_libraries_are_installed():
    """The independent references (which the README's test command installs) are importable, so no
    parity test or notebook run is skipped for want of them: a skipped parity test proves nothing."""
    import importlib

    for name in ("diffusers", "diffusers.loaders.single_file_utils", "transformers", "scipy", "peft", "nbformat",
                 "nbclient", "gradio", "gradio_client", "playwright.sync_api"):
        importlib.import_module(name)
