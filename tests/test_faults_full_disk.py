"""A full disk (or quota) while writing is one line, keeps what was written, and resumes.

Issue 21, item 5 ("faults are one line, never a traceback"). A real full file system needs a
mount, so the writes are made to fail the way a full disk fails them: ``OSError(ENOSPC)`` (or
``EDQUOT``) after half of the bytes reached the temporary file.
"""

from __future__ import annotations

import errno
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from matplotlib.figure import Figure
from test_sweep import DEMO, TINY

from mflightning.cli import main, sweep
from mflightning.io import DiskFullError, atomic_target, atomic_write_json, read_json
from mflightning.sweep import WidthSweep


def _no_space(code: int, path: Path) -> OSError:
    return OSError(code, os.strerror(code), str(path))


def _fill_disk_on(
    monkeypatch: pytest.MonkeyPatch, target: Callable[[str], bool], code: int = errno.ENOSPC
) -> list[Path]:
    """Make the atomic writes of the targets whose name ``target`` accepts fail half-way.

    The temporary file (``.<name>.<random>.tmp``) receives half of the text or image, then the
    write raises ``OSError(code)``, as on a full disk. Returns the temporary files it wrote.
    """
    half_written: list[Path] = []

    def failing(path: Path) -> bool:
        return path.name.endswith(".tmp") and target(path.name[1:].rsplit(".", 2)[0])

    write_text = Path.write_text

    def write_text_then_fail(self: Path, data: str, *args: Any, **kwargs: Any) -> int:
        if not failing(self):
            return write_text(self, data, *args, **kwargs)
        write_text(self, data[: len(data) // 2], *args, **kwargs)
        half_written.append(self)
        raise _no_space(code, self)

    savefig = Figure.savefig

    def savefig_then_fail(self: Figure, fname: Any, *args: Any, **kwargs: Any) -> None:
        if not (isinstance(fname, Path) and failing(fname)):
            return savefig(self, fname, *args, **kwargs)
        fname.write_bytes(b"\x89PNG\r\n\x1a\n")  # the first bytes of an image
        half_written.append(fname)
        raise _no_space(code, fname)

    monkeypatch.setattr(Path, "write_text", write_text_then_fail)
    monkeypatch.setattr(Figure, "savefig", savefig_then_fail)
    return half_written


def _temporary_files(folder: Path) -> list[Path]:
    return [p for p in folder.rglob(".*") if p.name.endswith(".tmp")]


def _args(out: Path) -> list[str]:
    return ["--config", DEMO, *TINY, "--out", str(out), "--wandb", "disabled"]


@pytest.fixture(scope="module")
def finished(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished tiny sweep folder; tests work on copies of it."""
    out = tmp_path_factory.mktemp("finished") / "out"
    sweep(_args(out))
    return out


def test_a_full_disk_while_saving_a_run_keeps_the_finished_runs_and_resumes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Width 16's runs are written, width 32's fail: one line, N16 kept, the rerun trains N32."""
    out = tmp_path / "out"
    with monkeypatch.context() as patch:
        half_written = _fill_disk_on(patch, lambda name: name.startswith("N32-"))
        with pytest.raises(DiskFullError) as refused:
            sweep(_args(out))
    message = str(refused.value)
    assert half_written  # the failure happened mid-write, with bytes in the temporary file
    assert "\n" not in message
    assert f"could not write {out / 'runs' / 'N32-seed0.json'}: the disk is full" in message
    assert "No space left on device" in message
    assert "finished runs) are kept" in message
    assert "free some space, then rerun the same command to resume" in message
    assert isinstance(refused.value.__cause__, OSError)
    assert isinstance(refused.value, OSError) and refused.value.errno == errno.ENOSPC
    assert sorted(p.name for p in (out / "runs").glob("*")) == ["N16-seed0.json", "N16-seed1.json"]
    assert not _temporary_files(out)  # nothing half-written left behind
    kept = {p.name: p.read_bytes() for p in (out / "runs").glob("*.json")}

    saved: list[tuple[int, int]] = []
    save = WidthSweep._save

    def spy(self: WidthSweep, result: Any, *args: Any) -> Any:
        saved.append((result.width, result.seed))
        return save(self, result, *args)

    monkeypatch.setattr(WidthSweep, "_save", spy)
    report = sweep(_args(out))  # space freed: the same command resumes
    assert saved == [(32, 0), (32, 1)]  # only the runs that were not written are redone
    assert all((out / "runs" / name).read_bytes() == data for name, data in kept.items())
    assert {w: v["seeds"] for w, v in report["per_width"].items()} == {"16": 2, "32": 2}
    assert not _temporary_files(out)


@pytest.mark.parametrize(
    ("name", "code", "cause"),
    [
        ("report.json", errno.ENOSPC, "the disk is full (No space left on device)"),
        ("curves.csv", errno.ENOSPC, "the disk is full"),
        ("output_gap.png", errno.ENOSPC, "the disk is full"),
        ("report.json", errno.EDQUOT, "the disk quota is exceeded (Disk quota exceeded)"),
    ],
    ids=["report-json", "curves-csv", "figure-png", "report-json-quota"],
)
def test_mfl_sweep_on_a_full_disk_is_one_error_line_with_exit_code_2(
    finished: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    name: str,
    code: int,
    cause: str,
) -> None:
    """A rerun whose report cannot be written: `error: ...` on one line, exit 2, no traceback;
    the previous file and every run are intact, no temporary file is left."""
    out = tmp_path / "out"
    shutil.copytree(finished, out)
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    half_written = _fill_disk_on(monkeypatch, lambda target: target == name, code)
    with pytest.raises(SystemExit) as exit_info:
        main(["sweep", *_args(out)])
    assert exit_info.value.code == 2
    assert half_written
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert "Traceback" not in err
    assert lines == [lines[0]] and lines[0].startswith(f"error: could not write {out / name}: ")
    assert cause in lines[0]
    assert "rerun the same command to resume" in lines[0]
    assert not _temporary_files(out)
    assert (out / name).read_bytes() == before[out / name]  # the previous version is intact
    for path in (out / "runs").glob("*.json"):
        assert path.read_bytes() == before[path]


def test_atomic_writes_turn_only_a_full_disk_into_the_one_line_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """ENOSPC on creating the temporary file or on renaming it too; other errors stay as they
    are (a permission error is not a full disk, Ctrl-C is not an error)."""
    path = tmp_path / "limit.json"
    atomic_write_json(path, {"a": 1})
    with monkeypatch.context() as patch:
        _fill_disk_on(patch, lambda name: name == "limit.json")
        with pytest.raises(DiskFullError, match=r"could not write .*limit\.json: the disk is full"):
            atomic_write_json(path, {"a": 2})
    assert read_json(path) == {"a": 1}
    assert not _temporary_files(tmp_path)

    def fail(code: int) -> Callable[..., Any]:
        def raising(*args: Any, **kwargs: Any) -> Any:
            raise OSError(code, os.strerror(code))

        return raising

    for function in ("mkstemp", "replace"):
        module: Any = __import__("tempfile") if function == "mkstemp" else os
        with monkeypatch.context() as patch:
            patch.setattr(module, function, fail(errno.ENOSPC))
            with pytest.raises(DiskFullError, match=r"limit\.json: the disk is full"):
                atomic_write_json(path, {"a": 3})
        assert read_json(path) == {"a": 1}
        assert not _temporary_files(tmp_path)

    with monkeypatch.context() as patch:
        patch.setattr(os, "replace", fail(errno.EACCES))
        with pytest.raises(PermissionError):
            atomic_write_json(path, {"a": 4})
    with pytest.raises(KeyboardInterrupt), atomic_target(path) as tmp:
        tmp.write_text("partial")
        raise KeyboardInterrupt
    assert read_json(path) == {"a": 1}
    assert not _temporary_files(tmp_path)


def test_mfl_fit_on_a_full_disk_names_the_checkpoint_in_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A checkpoint that cannot be saved ends `mfl fit` with one line and exit code 2."""
    from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO

    def full(self: Any, checkpoint: Any, path: Any, storage_options: Any = None) -> None:
        raise _no_space(errno.ENOSPC, Path(path))

    monkeypatch.setattr(TorchCheckpointIO, "save_checkpoint", full)
    args = [
        "fit",
        "--config",
        DEMO,
        "--trainer.max_steps=2",
        "--data.init_args.n_train=32",
        "--data.init_args.n_val=32",
        f"--trainer.default_root_dir={tmp_path}",
        f"--trainer.logger.init_args.save_dir={tmp_path}",
        "--trainer.enable_progress_bar=false",
        "--trainer.check_val_every_n_epoch=1",  # a checkpoint after each epoch's validation
    ]
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert "Traceback" not in err
    assert len(lines) == 1 and lines[0].startswith("error: could not write checkpoint ")
    assert ".ckpt: the disk is full (No space left on device)" in lines[0]
    assert "--ckpt_path=last" in lines[0]
