"""The README's Python blocks run as written, in order, in one namespace (as a reader pastes)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tests.conftest import single_thread

README = Path(__file__).resolve().parents[1] / "README.md"
BLOCK = re.compile(r"^```python\n(.*?)^```", re.DOTALL | re.MULTILINE)


def python_blocks() -> list[tuple[int, str]]:
    """``(first line number, code)`` of every fenced ```python block of README.md."""
    text = README.read_text()
    return [(text.count("\n", 0, m.start(1)) + 1, m.group(1)) for m in BLOCK.finditer(text)]


def test_readme_has_python_blocks() -> None:
    assert len(python_blocks()) >= 3  # before/after, Lightning, limit tracking


def test_readme_python_blocks_run_as_written(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)  # Lightning writes lightning_logs/ into the working directory
    namespace: dict[str, object] = {"__name__": "__readme__"}
    with single_thread():
        for line, code in python_blocks():
            # padded so that a traceback names the README's own line numbers
            exec(compile("\n" * (line - 1) + code, str(README), "exec"), namespace)
