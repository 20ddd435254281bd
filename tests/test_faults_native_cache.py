"""An unwritable ``MFL_CACHE_DIR`` makes the reduced solver warn once and use the torch ops.

Issue 21, item 5 ("faults are one line, never a traceback"); docs/reliability.md, "The reduced
solver works without a C compiler". The tests run as root in CI, which ignores a folder's mode:
there the OS calls inside the folder are made to fail as they would for a normal user.
"""

from __future__ import annotations

import builtins
import errno
import os
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from test_reduced import LR, reduced_data, reduced_net

from mflightning import ReducedLimitSolver
from mflightning.limit import native

pytestmark = pytest.mark.usefixtures("float64_default")

UNAVAILABLE = "compiled CPU passes are unavailable"


def _refuse(code: int, path: Any) -> OSError:
    return OSError(code, os.strerror(code), os.fsdecode(path))


def _make_unwritable(monkeypatch: pytest.MonkeyPatch, folder: Path, case: str) -> None:
    """Make ``folder`` read-only, unsearchable or full, for root too.

    ``read-only``: mode 0o500 (no file or folder can be created in it). ``unsearchable``: mode
    0o000 (nothing in it can even be looked up). ``full``: creating anything fails with ENOSPC.
    """
    folder.chmod({"read-only": 0o500, "unsearchable": 0o000, "full": 0o700}[case])
    if case != "full" and not os.access(folder, os.W_OK):
        return  # a normal user: the mode is enough
    code = errno.ENOSPC if case == "full" else errno.EACCES

    def inside(path: Any) -> bool:
        return (
            isinstance(path, (str, bytes, os.PathLike)) and Path(os.fsdecode(path)).parent == folder
        )

    real_mkdir, real_open, real_stat, real_builtin_open = os.mkdir, os.open, os.stat, builtins.open

    def mkdir(path: Any, *args: Any, **kwargs: Any) -> None:
        if inside(path):
            raise _refuse(code, path)
        real_mkdir(path, *args, **kwargs)

    def open_fd(path: Any, flags: int, *args: Any, **kwargs: Any) -> int:
        if inside(path) and (flags & os.O_CREAT or case == "unsearchable"):
            raise _refuse(code, path)
        return real_open(path, flags, *args, **kwargs)

    def stat(path: Any, *args: Any, **kwargs: Any) -> os.stat_result:
        if case == "unsearchable" and inside(path):
            raise _refuse(code, path)
        return real_stat(path, *args, **kwargs)

    def open_file(file: Any, mode: str = "r", *args: Any, **kwargs: Any) -> Any:
        if inside(file) and (case == "unsearchable" or set(mode) & set("wax+")):
            raise _refuse(code, file)
        return real_builtin_open(file, mode, *args, **kwargs)

    monkeypatch.setattr(os, "mkdir", mkdir)
    monkeypatch.setattr(os, "open", open_fd)
    monkeypatch.setattr(os, "stat", stat)
    monkeypatch.setattr(builtins, "open", open_file)


@pytest.mark.parametrize("case", ["read-only", "unsearchable", "full"])
def test_an_unwritable_cache_folder_warns_once_and_the_solver_uses_torch_ops(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, case: str
) -> None:
    """One RuntimeWarning naming the folder, MFL_CACHE_DIR and MFL_NATIVE=0; then the torch
    ops, with the trajectory of MFL_NATIVE=0; nothing is left in the folder."""
    cache = tmp_path / "cache"
    cache.mkdir()
    monkeypatch.setenv("MFL_CACHE_DIR", str(cache))
    monkeypatch.setenv("CC", "false")  # were a compilation tried, it would fail another way
    monkeypatch.delenv("MFL_NATIVE", raising=False)
    data = reduced_data()
    native._load.cache_clear()  # and again at the end: the real library is found then
    try:
        with monkeypatch.context() as patch, warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            _make_unwritable(patch, cache, case)
            losses = ReducedLimitSolver(reduced_net([40, 4, 4, 33], 0.5), LR).run(
                data, 3, progress=False
            )
            again = ReducedLimitSolver(reduced_net([40, 4, 4, 33], 0.5), LR).run(
                data, 3, progress=False
            )
            assert native.library() is None
    finally:
        native._load.cache_clear()
        cache.chmod(0o700)
    messages = [str(w.message) for w in caught if UNAVAILABLE in str(w.message)]
    assert len(messages) == 1, messages  # once per process
    assert f"the cache folder {cache} cannot be written" in messages[0]
    assert "set MFL_CACHE_DIR to a writable folder" in messages[0]
    assert "MFL_NATIVE=0" in messages[0]
    assert "could not compile" not in messages[0]  # the folder is the reason, not the compiler
    assert list(cache.iterdir()) == []
    monkeypatch.setenv("MFL_NATIVE", "0")
    plain = ReducedLimitSolver(reduced_net([40, 4, 4, 33], 0.5), LR).run(data, 3, progress=False)
    np.testing.assert_allclose(losses, plain, rtol=0, atol=0)
    np.testing.assert_allclose(again, plain, rtol=0, atol=0)
