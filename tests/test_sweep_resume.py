"""Second reliability layer of width sweeps (docs/reliability.md, "Width sweeps: memory, resume").

Memory limits beyond ``MemAvailable``, a default M that does not move, resumes that never delete
finished work of the same recipe, SIGTERM, meaningless comparisons, versions in the recipe and
run files that are cross-checked. Tiny sweeps (2 widths x 2 seeds, 6 steps): seconds each.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from test_sweep import DEMO, TINY

import mflightning.sweep as sweep_module
from mflightning import MeanFieldMLP, MeanFieldModule, Normal
from mflightning.cli import main, sweep
from mflightning.data import IsotropicGaussians
from mflightning.io import atomic_write_json, read_json
from mflightning.limit.memory import _cgroup_available, memory_limits
from mflightning.sweep import SweepSettings, WidthSweep
from mflightning.validity import RunHistory, validity

ROOT = Path(__file__).resolve().parents[1]
NO_WANDB = ("--wandb", "disabled")


def _sweep(out: Path, *extra: str) -> dict[str, Any]:
    return sweep(["--config", DEMO, *TINY, "--out", str(out), "--wandb", "disabled", *extra])


def _one_line_exit(args: list[str], capsys: pytest.CaptureFixture) -> tuple[int, str]:
    with pytest.raises(SystemExit) as info:
        main(args)
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(err) == 1, err
    return int(info.value.code), err[0]


# --- 1. memory: every limit the process is under --------------------------------------------


def test_cgroup_limits_are_read_v2_and_v1_on_the_process_own_path(tmp_path: Path) -> None:
    """A SLURM job's limit sits on the process's own cgroup, not on the hierarchy's root."""
    membership = tmp_path / "proc-self-cgroup"
    membership.write_text("4:memory:/job_7/step_0\n0::/job_7/step_0\n")
    root = tmp_path / "cgroup"
    own = root / "job_7" / "step_0"
    own.mkdir(parents=True)
    (root / "memory.max").write_text("max\n")  # the root sets no limit
    (own / "memory.max").write_text("1073741824\n")
    (own / "memory.current").write_text("73741824\n")
    assert _cgroup_available(root, membership) == 1_000_000_000
    (own / "memory.max").write_text("max\n")
    (root / "job_7" / "memory.max").write_text("2000000000\n")  # a parent's limit counts
    (root / "job_7" / "memory.current").write_text("0\n")
    assert _cgroup_available(root, membership) == 2_000_000_000
    (root / "job_7" / "memory.max").write_text("max\n")
    assert _cgroup_available(root, membership) is None
    v1 = root / "memory" / "job_7" / "step_0"
    v1.mkdir(parents=True)
    (v1 / "memory.limit_in_bytes").write_text("1500000000\n")
    (v1 / "memory.usage_in_bytes").write_text("500000000\n")
    assert _cgroup_available(root, membership) == 1_000_000_000


def test_a_sweep_under_an_address_space_limit_is_refused_in_one_line(tmp_path: Path) -> None:
    """``prlimit --as``: MemAvailable passed the check and the allocator failed with a traceback."""
    script = textwrap.dedent(
        f"""
        import resource, sys
        import torch
        from mflightning.cli import main
        mapped = next(int(l.split()[1]) * 1024 for l in open("/proc/self/status")
                      if l.startswith("VmSize:"))
        limit = mapped + 600 * 2**20
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
        main(["sweep", "--config", {DEMO!r}, "--widths", "512,1024", "--seeds", "2",
              "--particles", "16384", "--trainer.max_steps=2", "--wandb", "disabled",
              "--out", {str(tmp_path / "out")!r}])
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=300, cwd=ROOT
    )
    assert done.returncode == 2, done.stderr[-2000:]
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert "Traceback" not in done.stderr
    assert lines[-1].startswith("error: this sweep needs about") and "RLIMIT_AS" in lines[-1]
    assert "--particles" in lines[-1]
    assert memory_limits(torch.device("cpu"))  # this process reads at least MemAvailable


# --- 2. a default M that does not move ------------------------------------------------------


def _deep_runner(tmp_path: Path, seeds: int) -> WidthSweep:
    network = MeanFieldMLP(
        10,
        [8, 8, 8],
        activations=["relu", "tanh", "tanh", "identity"],
        init=[Normal(0, 1), Normal(1, 0.5), Normal(1, 0.5), Normal(0, 2)],
    )
    settings = SweepSettings(widths=[16, 32], seeds=seeds, out=str(tmp_path), wandb="disabled")
    return WidthSweep(MeanFieldModule(network, lr=0.2), IsotropicGaussians(), 5, settings)


def test_the_reduced_default_m_depends_on_neither_seeds_nor_the_compiler(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    two = _deep_runner(tmp_path, 2).particles
    assert _deep_runner(tmp_path, 16).particles == two  # was: more seeds, smaller M
    from mflightning.limit import native

    monkeypatch.setattr(native, "library", lambda: None)  # a node without a C compiler
    assert _deep_runner(tmp_path, 2).particles == two
    monkeypatch.setattr(sweep_module, "available_memory", lambda device: 2**30)
    capped = _deep_runner(tmp_path, 2).particles  # and it fits the memory it may use
    assert capped < two and capped * 180 < 2**30  # 180 B per atom measured (d = 10)


def test_a_folder_keeps_the_m_it_was_started_with(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    base = [arg for arg in TINY if arg not in ("--particles", "128")] + ["--sweep.particles=null"]
    first = sweep(["--config", DEMO, *base, "--out", str(tmp_path), "--wandb", "disabled"])
    assert first["particles"] == 8 * 32
    trained: list[int] = []
    original = WidthSweep._train_seeds

    def spy(self: WidthSweep, width: int, seeds: list[int], *args: Any) -> Any:
        trained.append(width)
        return original(self, width, seeds, *args)

    monkeypatch.setattr(WidthSweep, "_train_seeds", spy)
    with pytest.warns(UserWarning, match="below 8 x the largest width 64"):
        widened = sweep(
            ["--config", DEMO, *base, "--widths", "16,32,64", "--out", str(tmp_path), *NO_WANDB]
        )
    assert widened["particles"] == 256 and trained == [64]  # was: refused, another M
    assert any("kept on resume" in note for note in widened["notes"])
    assert any("below 8 x" in note for note in widened["notes"])


# --- 3. resume never deletes finished work of the same recipe; SIGTERM ----------------------


def test_overwrite_keeps_runs_of_the_same_recipe(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    original = WidthSweep._train_seeds

    def interrupted(self: WidthSweep, width: int, seeds: list[int], *args: Any) -> Any:
        if width == 32:
            raise KeyboardInterrupt
        return original(self, width, seeds, *args)

    monkeypatch.setattr(WidthSweep, "_train_seeds", interrupted)
    with pytest.raises(KeyboardInterrupt):
        _sweep(tmp_path, "--sweep.overwrite=true")
    kept = {p.name: p.read_bytes() for p in (tmp_path / "runs").glob("*.json")}
    assert sorted(kept) == ["N16-seed0.json", "N16-seed1.json"]
    trained: list[int] = []

    def spy(self: WidthSweep, width: int, seeds: list[int], *args: Any) -> Any:
        trained.append(width)
        return original(self, width, seeds, *args)

    monkeypatch.setattr(WidthSweep, "_train_seeds", spy)
    _sweep(tmp_path, "--sweep.overwrite=true")  # the rerun the hint suggests, overwrite kept
    assert trained == [32]
    assert all((tmp_path / "runs" / name).read_bytes() == data for name, data in kept.items())
    trained.clear()
    _sweep(tmp_path, "--sweep.overwrite=true", "--model.lr=0.1")  # another recipe: replaced
    assert trained == [16, 32]


def test_sigterm_stops_like_ctrl_c_and_the_rerun_resumes(tmp_path: Path) -> None:
    out = tmp_path / "out"
    args = [
        "sweep", "--config", DEMO, "--trainer.max_steps=60", "--widths", "16,32,64,128",
        "--seeds", "2", "--particles", "1024", "--sweep.batch_seeds=false",
        "--data.init_args.n_train=64", "--wandb", "disabled", "--out", str(out),
    ]  # fmt: skip
    process = subprocess.Popen(
        [sys.executable, "-m", "mflightning.cli", *args],
        stderr=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        text=True,
        cwd=ROOT,
    )
    deadline = time.monotonic() + 240
    while not list((out / "runs").glob("*.json")) and time.monotonic() < deadline:
        assert process.poll() is None, process.stderr.read() if process.stderr else ""
        time.sleep(0.05)
    process.send_signal(signal.SIGTERM)
    _, err = process.communicate(timeout=120)
    assert process.returncode == 143, err[-2000:]
    assert err.strip().splitlines()[-1].startswith("interrupted: rerun the same command")
    assert "Traceback" not in err
    finished = {p.name: p.read_bytes() for p in (out / "runs").glob("*.json")}
    assert finished and not list(out.rglob("*.tmp"))
    (out / "runs" / ".N99-seed0.json.abc.tmp").write_text("{")  # a SIGKILL's leftover
    report = main_report(args)
    assert report["seeds"] == 2 and not list(out.rglob("*.tmp"))
    assert all((out / "runs" / name).read_bytes() == data for name, data in finished.items())


def main_report(args: list[str]) -> dict[str, Any]:
    return sweep(args[1:])


# --- 4. meaningless comparisons -------------------------------------------------------------


def test_m_not_above_the_largest_width_is_refused(capsys: pytest.CaptureFixture) -> None:
    code, line = _one_line_exit(
        ["sweep", "--config", DEMO, *TINY[:-8], "--particles", "32", "--wandb", "disabled"],
        capsys,
    )
    assert code == 2 and "`particles` = 32 is not above the largest width 32" in line
    assert "--particles 256" in line


def test_too_few_seeds_or_steps_give_no_horizon() -> None:
    """A 2-seed, 3-step sweep printed "the limit describes the networks up to step ..."."""
    rows = {w: [[{"step": k, "mf_time": 0.1 * k, "limit/output_gap": 0.3} for k in range(3)]
                for _ in range(2)] for w in (16, 64)}  # fmt: skip
    histories = [RunHistory(w, r) for w, runs in rows.items() for r in runs]
    entry = validity(histories, ["output_gap"])["output_gap"]
    assert entry["step_star"] is None and "2 seeds per width" in entry["note"]
    noisy = np.random.default_rng(0)
    rows4 = [
        RunHistory(w, [{"step": k, "mf_time": 0.1 * k,
                        "limit/output_gap": 0.3 + 0.01 * noisy.random()} for k in range(3)])
        for w in (16, 64) for _ in range(4)
    ]  # fmt: skip
    entry = validity(rows4, ["output_gap"])["output_gap"]
    assert entry["step_star"] is None and "3 fitted logged steps" in entry["note"]


# --- 5. absurd seeds and inputs that overflow -----------------------------------------------


def test_absurd_seeds_are_refused_at_once(capsys: pytest.CaptureFixture) -> None:
    start = time.monotonic()
    code, line = _one_line_exit(
        ["sweep", "--config", DEMO, "--seeds", str(10**12), "--wandb", "disabled"], capsys
    )
    assert code == 2 and "`seeds` = 1000000000000" in line
    assert time.monotonic() - start < 30


class HugeInputs(IsotropicGaussians):
    """The isotropic Gaussians, scaled by 1e30."""

    def setup(self, stage: str) -> None:
        super().setup(stage)
        for split in (self.train_set, self.val_set):
            split.tensors[0].mul_(1e30)


def test_inputs_so_large_that_every_gap_overflows_are_refused_up_front(tmp_path: Path) -> None:
    network = MeanFieldMLP(10, [8, 8], activations=["relu", "relu", "identity"])
    settings = SweepSettings(widths=[8, 16], seeds=2, out=str(tmp_path), wandb="disabled")
    runner = WidthSweep(
        MeanFieldModule(network, lr=0.1), HugeInputs(n_train=32, n_val=16), 3, settings
    )
    with pytest.raises(ValueError, match=r"inputs are too large.*standardize"):
        runner.run()
    assert not list((tmp_path / "runs").glob("*.json"))


# --- 6. provenance: versions, cross-checked run files ---------------------------------------


def test_a_new_version_is_refused_unless_allowed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    first = _sweep(tmp_path)
    assert first["recipe"]["versions"]["torch"] == torch.__version__
    monkeypatch.setattr(sweep_module, "version", lambda name: "99.0")
    with pytest.raises(ValueError, match=r"versions\.mflightning.*allow_version_change"):
        _sweep(tmp_path)
    kept = {p.name: p.read_bytes() for p in (tmp_path / "runs").glob("*.json")}
    resumed = _sweep(tmp_path, "--sweep.allow_version_change=true")
    assert resumed["per_width"] == first["per_width"]
    assert all((tmp_path / "runs" / name).read_bytes() == data for name, data in kept.items())


def test_a_run_file_is_cross_checked_against_its_name_and_recipe(tmp_path: Path) -> None:
    _sweep(tmp_path)
    path = tmp_path / "runs" / "N16-seed1.json"
    record = read_json(path)
    record["result"]["seed"] = 0  # another run's result under this name, checksum rewritten
    atomic_write_json(path, record)
    with pytest.raises(ValueError, match=r"N16-seed1\.json holds the result of another run"):
        _sweep(tmp_path)
    record["result"]["seed"] = 1
    record["recipe"]["sweep"]["steps"] = 99  # an edited recipe: the fingerprint says so
    atomic_write_json(path, record)
    with pytest.raises(ValueError, match=r"fingerprint that is not that of its recipe"):
        _sweep(tmp_path)
    assert os.path.exists(path)  # refused, not deleted


def test_zero_gaps_give_no_slope_and_a_note_instead_of_a_crash(tmp_path: Path) -> None:
    """Saturated networks (tanh of 1e30) are all equal: the fit of zero gaps crashed the report."""
    network = MeanFieldMLP(10, [8, 8], activations=["relu", "tanh", "identity"])
    settings = SweepSettings(widths=[8, 16], seeds=2, out=str(tmp_path), wandb="disabled")
    data = HugeInputs(n_train=32, n_val=16)
    report = WidthSweep(MeanFieldModule(network, lr=0.1), data, 3, settings).run()
    skipped = [n.split(":")[0] for n in report["notes"] if n.startswith("no slope for ")]
    assert skipped, report["notes"]
    assert not set(m.removeprefix("no slope for ") for m in skipped) & set(report["slopes"] or {})


def test_the_particle_default_is_lowered_to_the_memory_it_may_use(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    network = MeanFieldMLP(10, [8, 8], activations="relu")  # L = 3: the particle solver
    settings = SweepSettings(widths=[64, 128], seeds=2, out=str(tmp_path), wandb="disabled")
    module = MeanFieldModule(network, lr=0.1)
    data = IsotropicGaussians(n_train=32, n_val=16)
    assert WidthSweep(module, data, 4, settings).particles == 1024  # 8 x 128
    budget = 2 * 8 * 2 * (2 * 512 * 512)  # about two M = 512 layers, with gradients, doubled
    monkeypatch.setattr(sweep_module, "available_memory", lambda device: budget)
    with pytest.warns(UserWarning, match="below 8 x the largest width 128"):
        lowered = WidthSweep(module, data, 4, settings).particles
    assert 128 < lowered < 1024


# --- second review: the nets under the checks ------------------------------------------------


def test_memory_that_runs_out_anyway_is_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    """Allocator overheads the checks cannot count: a traceback through batched.py before."""

    def exhausted(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError(
            "[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: can't allocate "
            "memory: you tried to allocate 848005120 bytes. Error code 12"
        )

    monkeypatch.setattr(WidthSweep, "_train_seeds", exhausted)
    code, line = _one_line_exit(
        ["sweep", "--config", DEMO, *TINY, "--out", str(tmp_path), *NO_WANDB], capsys
    )
    assert code == 2 and "ran out of memory" in line and "--particles" in line
    assert "rerun the same command to resume" in line


def test_a_full_disk_anywhere_is_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    """The lock file, jsonargparse's config.yaml, Lightning's metrics.csv: tracebacks before."""
    import errno

    import mflightning.lock as lock_module

    def full(*args: Any) -> int:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(lock_module.os, "write", full)
    code, line = _one_line_exit(
        ["sweep", "--config", DEMO, *TINY, "--out", str(tmp_path), *NO_WANDB], capsys
    )
    assert code == 2 and line.startswith("error: the disk is full (No space left on device)")


def test_damaged_files_are_replaced_under_overwrite_and_named_otherwise(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    _sweep(tmp_path)
    kept = (tmp_path / "runs" / "N32-seed1.json").read_bytes()
    (tmp_path / "runs" / "N16-seed0.json").write_text('{"trunc')
    with pytest.raises(ValueError, match=r"N16-seed0\.json is not valid JSON"):
        _sweep(tmp_path)
    report = _sweep(tmp_path, "--sweep.overwrite=true")  # the hint's way out now works
    assert len(report["per_width"]["16"]["output_gap_per_seed"]) == 2
    assert (tmp_path / "runs" / "N32-seed1.json").read_bytes() == kept
    path = tmp_path / "runs" / "N16-seed0.json"
    path.unlink()
    path.mkdir()  # not a file at all
    code, line = _one_line_exit(
        ["sweep", "--config", DEMO, *TINY, "--out", str(tmp_path), *NO_WANDB], capsys
    )
    assert code == 2 and "N16-seed0.json cannot be read (Is a directory)" in line


def test_runs_reused_across_versions_are_noted(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _sweep(tmp_path)
    monkeypatch.setattr(sweep_module, "version", lambda name: "99.0")
    report = _sweep(tmp_path, "--sweep.allow_version_change=true")
    notes = [n for n in report["notes"] if "reused under --sweep.allow_version_change" in n]
    assert len(notes) == 1 and "'mflightning': '0.1.0'" in notes[0] and "99.0" in notes[0]


def test_integer_inputs_to_the_limit_name_the_dtype_and_the_fix() -> None:
    from mflightning.limit import ParticleLimitSolver, ReducedLimitSolver

    network = MeanFieldMLP(10, [8], activations=["tanh", "identity"])
    x, y = torch.randint(0, 3, (4, 10)), torch.randn(4, 1)
    for kind in (ParticleLimitSolver, ReducedLimitSolver):
        with pytest.raises(ValueError, match=r"dtype torch\.int64.*x\.float\(\)"):
            kind(network, 0.1).step(x, y)
