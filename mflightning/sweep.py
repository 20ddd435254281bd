"""Width sweeps: a recipe over widths x seeds, each run coupled to one limit (docs/theory.md §C.8).

``WidthSweep`` integrates the particle limit **once** (M particles, default 8 x the largest
width), couples every (width, seed) run to it by subsampling the particles (§B.4: a seed is an
independent subsample), records the limit at the logging steps, then trains each run with
Lightning on the same batch sequence and logs its gaps to the recorded limit (§C.1-§C.3) against
``mf_time``. The report folder gets ``report.json`` (final and sup-over-time gaps per width,
log-log slopes with bootstrap intervals and whether the expected -1/2 lies inside), ``curves.csv``,
PNG figures and, unless disabled, one W&B run per (width, seed) plus a summary run.

Finished runs are saved one by one (``runs/<name>.json``, written atomically): an interrupted sweep
started again with the same folder skips them. Each run file and ``limit.json`` hold the sweep's
*recipe*: everything that determines a run (the model, data and seed configuration, a digest of
the training batches and of the probe, steps, M, the limit kind, the solver dtype, the logging
interval, the probe size, the training engine and the trainer settings) and its fingerprint
(``mflightning.fingerprint``); a run's own file adds its width and seed. A folder whose files hold
another recipe is refused with the keys that differ, before anything is trained, unless
``overwrite`` starts it afresh. One sweep at a time writes into a folder (``mflightning.lock``).
"""

from __future__ import annotations

import csv
import hashlib
import io
import itertools
import logging
import math
import os
import secrets
import shutil
import tempfile
import warnings
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager, suppress
from dataclasses import asdict, dataclass, field
from functools import cached_property
from importlib.metadata import version
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import LightningDataModule, Trainer, seed_everything
from torch import Tensor, nn
from torch.utils.data import DataLoader, IterableDataset
from tqdm.auto import tqdm

from mflightning.batched import SeedBatch
from mflightning.callbacks import RecordedLimitTracker
from mflightning.fingerprint import differences, fingerprint, plain, qualified_name
from mflightning.functional import neuron_spread, relative_output_gap
from mflightning.guards import DivergenceError
from mflightning.io import atomic_write_json, atomic_write_text, read_json
from mflightning.limit import ReducedLimitSolver
from mflightning.limit.choice import (
    LIMIT_KINDS,
    MIN_REDUCED_DEPTH,
    AnyCoupling,
    LimitSolver,
    build_solver,
    exact_beside,
    has_degenerate_exact_limit,
    resolve_limit,
    solver_widths,
)
from mflightning.limit.cost import COMPILED_COST, default_atoms
from mflightning.limit.memory import (
    available_memory,
    mlp_parameter_count,
    solver_step_bytes,
    tightest_limit,
)
from mflightning.limit.snapshot import LimitSnapshot, gaps_to_limit, take_snapshot
from mflightning.limit.solver import check_solver_dtype
from mflightning.lock import folder_lock
from mflightning.losses import correct_predictions, mean_field_loss
from mflightning.mlp import MeanFieldMLP
from mflightning.module import MeanFieldModule
from mflightning.nn import check_positive_int
from mflightning.optim import describe_update, state_tensors_per_parameter
from mflightning.report import (
    FIGURES,
    MIN_SEEDS,
    RunResult,
    build_report,
    curves_rows,
    report_tables,
    write_figures,
)
from mflightning.scaling import get_preset
from mflightning.stack import MeanFieldStack
from mflightning.trainer_settings import HONOURED
from mflightning.wandb_logging import (
    WandbMode,
    check_mode,
    check_project,
    log_run_history,
    log_summary,
    resolve_mode,
    run_logger,
    set_aside_offline_runs,
)

REDUCED_BUDGET_S = 60.0  # target time of a reduced limit pass with default M
MAX_RUNS = 100_000  # widths x seeds a sweep can hold (each run keeps its network in memory)
MIN_PARTICLES_PER_WIDTH = 8  # M >= 8 N (§B.4): below it the limit's own error shows in slopes
MEMORY_SHARE = 0.5  # of the available memory a default M may fill (the step needs the rest)
SUGGESTION_SHARE = 0.8  # of the memory left by the runs that a suggested --particles may fill
# per run beyond its numbers: the module objects, tensors' headers, the coupling and its
# snapshots' dictionaries (100 000 tiny runs held 13 GB: about 130 kB each)
RUN_OVERHEAD_BYTES = 160_000
DEFAULT_BATCH = 256  # batch size assumed by the cost model when the data module has none
FRESH_START = (
    "start afresh with --sweep.overwrite true (`overwrite=True`: deletes the runs and limit of "
    "other configurations in the folder, with their W&B runs, and keeps this one's) or choose a "
    "new --out"
)


def limit_times(limit: Mapping[str, Any], steps: int) -> list[float]:
    """``mf_time`` after 0 .. ``steps`` steps, from the limit's record (``limit.json``).

    The sum of the scheduled steps (§F.3); a record written before the times were recorded has
    constant steps of ``time_step``.
    """
    if "times" in limit:
        return [float(t) for t in limit["times"]]
    return [k * float(limit["time_step"]) for k in range(steps + 1)]


class _Replay(IterableDataset[tuple[Tensor, Tensor]]):
    """The first ``total`` batches of ``batches()`` as a dataset (``WidthSweep._replay_loader``)."""

    def __init__(self, batches: Callable[[], Iterator[tuple[Tensor, Tensor]]], total: int) -> None:
        self.batches = batches
        self.total = total

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        return itertools.islice(self.batches(), self.total)

    def __len__(self) -> int:
        return self.total


@dataclass
class SweepSettings:
    """The ``sweep:`` section of a recipe; ``mfl sweep --widths ... --seeds ...`` overrides it.

    Attributes:
        widths: hidden widths N (every hidden layer of a run gets width N), each once.
        seeds: independent subsamples of the particles per width (>= 2: the slope intervals
            resample them).
        particles: M of the limit solver that runs: neurons per hidden layer of the particle
            solver (default 8 x the largest width, §B.4), atoms per end layer of the reduced
            solver (default: a measured cost model, ``_default_particles``).
        limit: ``"auto"`` (the exact reduced limit for every deep iid MLP it supports, the
            particle solver otherwise), ``"particles"`` or ``"reduced"``
            (``mflightning.limit.choice``).
        every_n_steps: log the gaps every this many steps (default: steps // 20).
        probe_size: number of validation inputs the gaps are measured on (at most the
            validation set: a smaller set is used whole, and the report says so).
        out: report folder (default ``runs/sweep-<recipe name>``).
        wandb: ``"auto"`` (offline unless online is requested or logged in), ``"offline"``,
            ``"online"`` or ``"disabled"``.
        project: W&B project name.
        solver_dtype: ``"float64"`` (default, §E.2) or ``"float32"``.
        batch_seeds: train the seeds of one width as one vmapped model (``SeedBatch``, stepped
            by the recipe's own optimizer and scheduler) unless the precision is mixed;
            otherwise every run is its own Lightning fit.
        overwrite: delete the runs and limit already in ``out`` that belong to another recipe
            (needed to rerun a folder with another recipe); runs of this recipe are kept.
        allow_version_change: resume a folder written by another mflightning or torch version
            (the versions are part of the recipe, so by default such a folder is refused).
    """

    widths: list[int] = field(default_factory=lambda: [32, 64, 128, 256])
    seeds: int = 6
    particles: int | None = None
    every_n_steps: int | None = None
    probe_size: int = 512
    out: str | None = None
    wandb: WandbMode = "auto"
    project: str = "mflightning"
    batch_seeds: bool = True
    solver_dtype: str = "float64"
    limit: str = "auto"
    overwrite: bool = False
    allow_version_change: bool = False

    def validate(self) -> None:
        """Raise ``ValueError`` naming the first bad setting."""
        if not self.widths:
            raise ValueError("`widths` must list at least two widths, e.g. --widths 64,128,256.")
        for i, width in enumerate(self.widths):
            check_positive_int(f"widths[{i}]", width)
        repeated = sorted({w for w in self.widths if self.widths.count(w) > 1})
        if repeated:
            unique = ",".join(map(str, sorted(set(self.widths))))
            raise ValueError(
                f"`widths` = {self.widths} lists {repeated} more than once; give each width "
                f"once, e.g. --widths {unique}."
            )
        if len(self.widths) < 2:
            raise ValueError(
                f"`widths` needs two distinct widths to fit a slope, got {self.widths}."
            )
        check_positive_int("seeds", self.seeds)
        if self.seeds * len(self.widths) > MAX_RUNS:
            raise ValueError(
                f"`seeds` = {self.seeds} gives {self.seeds * len(self.widths)} runs over "
                f"{len(self.widths)} widths, more than a sweep can hold ({MAX_RUNS}); use --seeds "
                "8 (a useful interval) to 64."
            )
        if self.seeds < MIN_SEEDS:
            raise ValueError(
                f"`seeds` = {self.seeds}: the slope intervals resample the seeds of each width, "
                f"so they need at least {MIN_SEEDS} (one seed gives a zero-width interval); use "
                "--seeds 2 or more (8 for a useful interval)."
            )
        check_positive_int("probe_size", self.probe_size)
        if self.every_n_steps is not None:
            check_positive_int("every_n_steps", self.every_n_steps)
        if self.particles is not None:
            check_positive_int("particles", self.particles)
            if self.particles <= max(self.widths):
                raise ValueError(
                    f"`particles` = {self.particles} is not above the largest width "
                    f"{max(self.widths)}: the limit's own O(M^-1/2) error is then as large as the "
                    "gaps it measures (M = N gives meaningless slopes); use --particles "
                    f"{MIN_PARTICLES_PER_WIDTH * max(self.widths)} (M >= 8N, §B.4)."
                )
        check_solver_dtype(self.solver_dtype, "solver_dtype")
        check_mode(self.wandb)
        check_project(self.project)
        if self.limit not in LIMIT_KINDS:
            raise ValueError(
                f"`limit` must be one of {', '.join(LIMIT_KINDS)}, not {self.limit!r}."
            )


@contextmanager
def _quiet_lightning() -> Iterator[None]:
    """Silence Lightning's per-fit banners while the sweep's progress bar runs."""
    loggers = [logging.getLogger(name) for name in ("lightning.pytorch", "lightning.fabric")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)


def _digest(hasher: Any, tensor: Tensor) -> None:
    """Feed a tensor's dtype, shape and bytes to a hashlib hasher."""
    data = tensor.detach().cpu().contiguous()
    hasher.update(f"{data.dtype}{tuple(data.shape)}".encode())
    hasher.update(data.reshape(-1).view(torch.uint8).numpy().tobytes())


def _non_finite(tensor: Tensor) -> int:
    """How many entries of a floating tensor are NaN or infinite (0 for integer tensors)."""
    return int((~torch.isfinite(tensor)).sum()) if tensor.is_floating_point() else 0


def _take(loader: Any, size: int) -> tuple[Tensor, Tensor]:
    """The first ``size`` examples of a data loader, as two tensors."""
    xs, ys, count = [], [], 0
    for x, y in loader:
        xs.append(x)
        ys.append(y)
        count += len(x)
        if count >= size:
            break
    if not xs:
        raise ValueError("the data module's val_dataloader() yielded no batch to probe with.")
    return torch.cat(xs)[:size], torch.cat(ys)[:size]


class WidthSweep:
    """Runs a recipe over widths x seeds, all coupled to one particle limit, and reports.

    Args:
        module: the recipe's module; its network (a MeanFieldMLP or MeanFieldConvNet) gives the
            architecture, and its lr, loss, optimizer and preset are used for every run.
        datamodule: the data; ``train_dataloader()`` must give the same batch sequence at every
            call (seeded shuffling), so every run and the limit see the same data order.
        steps: optimizer steps per run (the recipe's ``trainer.max_steps``).
        settings: widths, seeds, M, logging and output options.
        trainer_kwargs: ``accelerator``, ``precision``, ``deterministic`` and
            ``accumulate_grad_batches`` for each run's Trainer (``trainer_settings.HONOURED``;
            the limit pass steps on the accumulated batches).
        name: sweep name (W&B group, default folder name).
        recipe: the configuration the module and data module were built from, as plain data
            (``mfl sweep`` passes the resolved ``model``, ``data`` and ``seed_everything`` of its
            LightningCLI config). Default: described from the module's ``hparams``, optimizer and
            scheduler and the data module's class and ``hparams``. The sweep adds its own
            settings, the trainer settings and a data digest (keys ``sweep``, ``trainer``,
            ``data_digest``) to make the recipe stored with every run (module docstring).

    Raises:
        ValueError: bad settings, a network or preset the sweep cannot run, or runs and a limit
            that cannot fit in memory (checked before anything is built).
    """

    def __init__(
        self,
        module: MeanFieldModule,
        datamodule: LightningDataModule,
        steps: int,
        settings: SweepSettings,
        trainer_kwargs: dict[str, Any] | None = None,
        name: str = "sweep",
        recipe: Mapping[str, Any] | None = None,
    ) -> None:
        settings.validate()
        check_positive_int("steps", steps)
        if not isinstance(module.network, MeanFieldStack):
            raise ValueError(
                "`module.network` must be a MeanFieldMLP or MeanFieldConvNet to sweep its widths."
            )
        if get_preset(module.preset).width_dependent_clock:
            raise ValueError(
                f"`module.preset` {module.preset!r} ties the time step to the width "
                "(eps = lr/N_1), "
                "so runs of different widths would need different step counts: sweep with "
                "preset='nguyen_pham' (the same limit, eps = lr) instead."
            )
        unknown = set(trainer_kwargs or {}) - set(HONOURED)
        if unknown:
            raise ValueError(
                f"`trainer_kwargs` accepts {HONOURED} (the settings a sweep honours, "
                f"mflightning.trainer_settings), got {sorted(unknown)}."
            )
        accumulate = (trainer_kwargs or {}).get("accumulate_grad_batches")
        if accumulate is not None:
            check_positive_int("trainer_kwargs['accumulate_grad_batches']", accumulate)
        self.module = module
        self.network: MeanFieldStack = module.network
        self.datamodule = datamodule
        self.steps = steps
        self.settings = settings
        self.trainer_kwargs = dict(trainer_kwargs or {})
        self.name = name
        self.out = Path(settings.out or f"runs/sweep-{name}")
        self.limit_kind = resolve_limit(settings.limit, self.network, module.update_factories)
        self.every = settings.every_n_steps or max(1, steps // 20)
        self.log_steps = sorted({*range(0, steps + 1, self.every), steps})
        self._notes: list[str] = []  # what the report must say about this sweep's settings
        # files reused under allow_version_change: {fingerprint: (their versions, file names)}
        self._older_versions: dict[str, tuple[Any, list[str]]] = {}
        if self.limit_kind == "particles" and settings.limit == "auto":
            if has_degenerate_exact_limit(self.network):
                self._notes.append(
                    "limit 'auto' took the particle solver: the reduced solver does not follow "
                    "this optimizer (weight decay, docs/theory.md §F.5), and a finite-M particle "
                    "solver of a deep iid network can leave the exact limit (§D.4)."
                )
        self.particles = self._choose_particles()
        self._source = plain(recipe) if recipe is not None else self._described_recipe()
        self._check_memory()
        self.wandb_mode = resolve_mode(settings.wandb)
        self._wandb_ids: dict[tuple[int, int], str] = {}

    # --- what determines a run ----------------------------------------------------------------

    def _described_recipe(self) -> dict[str, Any]:
        """The model and data configuration, described from the objects (no recipe given)."""
        module, data = self.module, self.datamodule
        model = dict(module.hparams) | {
            "optimizer": module.optimizer_factory,
            "scheduler": module.scheduler_factory,
        }
        data_config = {"class_path": qualified_name(type(data)), "init_args": dict(data.hparams)}
        return plain({"model": model, "data": data_config})

    def _recipe(self, data_digest: dict[str, str], probe_size: int) -> dict[str, Any]:
        """Everything that determines a run but its width and seed (module docstring)."""
        return self._source | {
            "sweep": {
                "steps": self.steps,
                "particles": self.particles,
                "limit": self.limit_kind,
                "solver_dtype": self.settings.solver_dtype,
                "every_n_steps": self.every,
                "probe_size": probe_size,
                "engine": "seed_batch" if self._batchable() else "lightning",
            },
            "trainer": plain(self.trainer_kwargs),
            "data_digest": data_digest,
            "versions": {"mflightning": version("mflightning"), "torch": torch.__version__},
        }

    def _device(self) -> torch.device:
        """Where the limit solver runs: the GPU when the trainer asks for one and it exists."""
        accelerator = str(self.trainer_kwargs.get("accelerator", "cpu"))
        gpu = accelerator in ("gpu", "cuda") and torch.cuda.is_available()
        return torch.device("cuda" if gpu else "cpu")

    def _run_dtype(self) -> torch.dtype:
        """The dtype of the runs' networks (float64 under ``precision="64-true"``)."""
        return torch.float64 if self.trainer_kwargs.get("precision") == "64-true" else torch.float32

    def _parameters(self, widths: list[int]) -> float:
        """Parameters of the network at hidden widths ``widths``, counted without building it.

        Exact for a ``MeanFieldMLP``; other stacks are built on the ``meta`` device (no memory),
        and one too large for a tensor counts as infinite.
        """
        if isinstance(self.network, MeanFieldMLP):
            return mlp_parameter_count(self.network, widths)
        try:
            with torch.device("meta"):
                network = self.network.with_widths(widths)
        except RuntimeError:  # a tensor with more than 2^63 entries
            return math.inf
        return sum(p.numel() for p in network.parameters())

    def _check_memory(self, points: int | None = None) -> None:
        """Refuse a sweep whose limit and networks cannot fit in memory, before building any.

        Counted: the solver's particles, with their gradients and optimizer states (for a
        ``MeanFieldMLP`` particle solver and ``points`` training points per batch, the bound of
        one step, ``mflightning.limit.memory.solver_step_bytes``), every run's network and its
        recorded limit snapshots (its ideal particles at each logging step), all held before
        training.
        """
        device = self._device()
        available = available_memory(device)
        if available is None:
            return
        solver = self._solver_bytes(self.particles, points)
        runs = self._runs_bytes()
        need = solver + runs
        if need <= available:
            return
        fitting = self._largest_fitting_particles(SUGGESTION_SHARE * (available - runs), points)
        largest = max(self.settings.widths)
        fix = (
            f"pass --particles {fitting} (the largest M that fits), lower --widths (largest now "
            f"{largest}) or log less often (--every_n_steps)"
            if fitting > largest
            else f"no M above the largest width {largest} fits beside the runs: lower --widths "
            "or --seeds, or log less often (--every_n_steps)"
        )
        raise ValueError(
            f"this sweep needs about {need / 2**30:.3g} GiB before training (the limit solver "
            f"with M = {self.particles}: {solver / 2**30:.3g} GiB; the {len(self._runs())} runs' "
            f"networks with a limit snapshot at each of {len(self.log_steps)} logging steps: "
            f"{runs / 2**30:.3g} GiB), more than the {available / 2**30:.3g} GiB this process may "
            f"use on {device.type} (limited by {tightest_limit(device)}); {fix}."
        )

    @cached_property
    def _optimizer_states(self) -> int:
        """The optimizer's state tensors per parameter (``optim.state_tensors_per_parameter``)."""
        return state_tensors_per_parameter(self.module.optimizer_factory, self.module.rule)

    def _runs_bytes(self) -> float:
        """Memory of every run's network and its limit snapshots, all held before training."""
        depth = len(self.network.widths)
        solver_dtype = getattr(torch, self.settings.solver_dtype)
        per_run = self._run_dtype().itemsize + len(self.log_steps) * solver_dtype.itemsize
        per_seed = sum(
            self._parameters([w] * depth) * per_run + RUN_OVERHEAD_BYTES
            for w in self.settings.widths
        )
        return per_seed * self.settings.seeds

    def _solver_bytes(self, particles: int, points: int | None = None) -> float:
        """Memory of the limit solver with M = ``particles`` (``_check_memory``)."""
        solver_dtype = getattr(torch, self.settings.solver_dtype)
        wide = solver_widths(self.network, self.limit_kind, max(particles, 1))
        states = self._optimizer_states
        if self.limit_kind == "particles" and isinstance(self.network, MeanFieldMLP) and points:
            return float(
                solver_step_bytes(self.network, points, solver_dtype, widths=wide, states=states)
            )
        count = self._parameters(wide) if particles > 0 else 0.0
        # fields, their gradients (the particles) or a copy in the optimizer step (reduced), states
        return (2 + states) * count * solver_dtype.itemsize

    def _largest_fitting_particles(self, budget: float, points: int | None) -> int:
        """The largest M whose solver fits in ``budget`` bytes (0 if none does)."""
        low, high = 0, 1
        while self._solver_bytes(high, points) <= budget:
            low, high = high, 2 * high
        while high - low > 1:
            middle = (low + high) // 2
            low, high = (
                (middle, high) if self._solver_bytes(middle, points) <= budget else (low, middle)
            )
        return low

    # --- folders and runs ---------------------------------------------------------------------

    def _prepare_folder(self) -> None:
        """Create ``out/runs`` and check that files can be written there (a unique probe file)."""
        try:
            (self.out / "runs").mkdir(parents=True, exist_ok=True)
            fd, probe = tempfile.mkstemp(dir=self.out, prefix=".write-test-")
            os.close(fd)
            os.unlink(probe)
        except OSError as error:
            raise ValueError(
                f"the report folder `out` = {self.out} is not writable ({error.strerror}); "
                "choose another with --out."
            ) from None

    def _runs(self) -> list[tuple[int, int]]:
        return [(w, s) for w in sorted(self.settings.widths) for s in range(self.settings.seeds)]

    @staticmethod
    def run_name(width: int, seed: int) -> str:
        """``N<width>-seed<seed>``."""
        return f"N{width}-seed{seed}"

    def _run_path(self, width: int, seed: int) -> Path:
        return self.out / "runs" / f"{self.run_name(width, seed)}.json"

    def _stored(self) -> list[Path]:
        """The files of earlier runs in ``out``: ``limit.json`` and ``runs/*.json``."""
        limit = [self.out / "limit.json"] if (self.out / "limit.json").is_file() else []
        return limit + sorted((self.out / "runs").glob("*.json"))

    def _comparable(self, recipe: dict[str, Any]) -> dict[str, Any]:
        """``recipe`` as compared with a stored one: without versions if a change is allowed."""
        if not self.settings.allow_version_change:
            return recipe
        return {key: value for key, value in recipe.items() if key != "versions"}

    def _foreign(self, recipe: dict[str, Any]) -> tuple[list[Path], list[str]]:
        """The stored files that do not hold this sweep's ``recipe``, and what differs.

        A run file is foreign when its recipe differs, when its name, its ``run`` entry and its
        result disagree on the width and seed, or when its fingerprint is not that of its recipe
        and run (an edited file).
        """
        changed: dict[str, None] = {}
        files = []
        for path in self._stored():
            try:
                data = read_json(path)
            except (ValueError, OSError) as error:  # damaged, or not a readable file
                if self.settings.overwrite and path.is_file():  # replaced, as the hint says
                    files.append(path)
                    changed[f"({path.name} is damaged)"] = None
                    continue
                if isinstance(error, ValueError):  # names the file and the two ways out
                    raise
                raise ValueError(
                    f"{path} cannot be read ({error.strerror}): it is not a run file; remove it "
                    "(the run is then retrained)."
                ) from None
            stored = data.get("recipe") if isinstance(data, dict) else None
            if stored is None:
                files.append(path)
                changed["(no recipe: written by an older mflightning)"] = None
                continue
            if path.parent.name == "runs" and (reason := self._run_file_mismatch(path, data)):
                files.append(path)
                changed[f"(runs/{path.name} {reason})"] = None
            elif self._comparable(stored) != self._comparable(recipe):
                files.append(path)
                changed |= dict.fromkeys(differences(stored, recipe))
            elif stored.get("versions") != recipe.get("versions"):
                older = fingerprint(stored.get("versions"))
                self._older_versions.setdefault(older, (stored.get("versions"), []))
                self._older_versions[older][1].append(path.name)
        return files, list(changed)

    def _run_file_mismatch(self, path: Path, data: dict[str, Any]) -> str | None:
        """Why a run file cannot be trusted (name, run entry, result, fingerprint), or ``None``."""
        run = data.get("run")
        if not isinstance(run, dict) or path.stem != self.run_name(
            run.get("width", -1), run.get("seed", -1)
        ):
            return f"holds run {run}"
        result = data.get("result")
        if not isinstance(result, dict) or (result.get("width"), result.get("seed")) != (
            run["width"],
            run["seed"],
        ):
            return f"holds the result of another run than {run}"
        if data.get("fingerprint") != fingerprint(data["recipe"] | {"run": run}):
            return "has a fingerprint that is not that of its recipe and run (edited)"
        return None

    def _clear(self, files: list[Path]) -> None:
        """``overwrite``: delete ``files`` (of another recipe), their W&B runs and the report.

        Runs of this sweep's recipe stay: an interrupted ``overwrite`` sweep resumes them.
        """
        ids = []
        for path in files:
            if path.parent.name == "runs":
                with suppress(ValueError, OSError):  # a damaged file has no id
                    ids.append(str(read_json(path).get("wandb_id")))
            path.unlink(missing_ok=True)
        outputs = ["report.json", "curves.csv", *(f"{name}.png" for name in FIGURES)]
        for path in (self.out / name for name in outputs):
            path.unlink(missing_ok=True)
        wandb = self.out / "wandb"
        for run in [*wandb.glob("offline-run-*"), *wandb.glob("run-*")]:
            if any(run.name.endswith(f"-{run_id}") for run_id in ids):
                shutil.rmtree(run, ignore_errors=True)

    def _check_stored(self, recipe: dict[str, Any]) -> None:
        """Refuse a folder holding files of another recipe, naming the keys that differ.

        Under ``overwrite`` those files are deleted instead (``_clear``).
        """
        files, changed = self._foreign(recipe)
        for older, reused in self._older_versions.values():
            shown = ", ".join(reused[:3]) + (" ..." if len(reused) > 3 else "")
            self._notes.append(
                f"{len(reused)} files ({shown}) were written by other versions, "
                f"{older or 'unrecorded'}, and reused under --sweep.allow_version_change (this "
                f"sweep: {recipe.get('versions')})."
            )
        if not files:
            return
        if self.settings.overwrite:
            self._clear(files)
            return
        more = f"; and {len(changed) - 10} more" if len(changed) > 10 else ""
        names = ", ".join(p.name for p in files[:3])
        names += f" and {len(files) - 3} more" if len(files) > 3 else ""
        versions = (
            " (or, for a new mflightning or torch version only, --sweep.allow_version_change "
            "true to keep the finished runs)"
            if any(key.startswith("versions.") for key in changed)
            else ""
        )
        raise ValueError(
            f"the report folder `out` = {self.out} holds results of another configuration "
            f"({names}), which this sweep must not mix with its own: "
            f"{'; '.join(changed[:10])}{more}. A run is reused only when everything that "
            f"determines it is identical: {FRESH_START}{versions}."
        )

    def _remove_stale_temporaries(self) -> None:
        """Delete temporary files that a killed sweep left in ``out`` (held lock: none in use)."""
        for pattern in (".*.tmp", ".write-test-*"):
            for path in [*self.out.glob(pattern), *(self.out / "runs").glob(pattern)]:
                path.unlink(missing_ok=True)

    def _load_finished(self, width: int, seed: int) -> RunResult | None:
        """A finished run's result (its recipe was checked by ``_check_stored``), if saved."""
        path = self._run_path(width, seed)
        if not path.is_file():
            return None
        return RunResult(**read_json(path)["result"])

    # --- the limit ----------------------------------------------------------------------------

    def _choose_particles(self) -> int:
        """M: ``--particles``, else the M the folder was started with, else the default.

        A folder keeps its M on resume (stated in the report), so that a default that would come
        out differently today (other widths, another machine's memory) does not turn finished
        runs into "another configuration". M must exceed the largest width; below 8 N the sweep
        warns and the report says so.

        Raises:
            ValueError: a kept M that is not above the largest width (naming the value to pass).
        """
        largest = max(self.settings.widths)
        particles = self.settings.particles
        if particles is None and (kept := self._stored_particles()) is not None:
            particles = kept
            self._notes.append(
                f"M = {kept} is the M this folder was started with (limit.json), kept on resume; "
                "pass --particles to choose another (with --sweep.overwrite true)."
            )
            if kept <= largest:
                raise ValueError(
                    f"this folder was started with M = {kept} particles, not above the largest "
                    f"width {largest} now asked for; resume with the widths it was started with, "
                    f"or start afresh with --particles {MIN_PARTICLES_PER_WIDTH * largest} "
                    "--sweep.overwrite true."
                )
        kept = particles is not None and self.settings.particles is None
        particles = particles or self._default_particles()
        if particles < MIN_PARTICLES_PER_WIDTH * largest:
            afresh = " --sweep.overwrite true (a new limit: every run is retrained)" if kept else ""
            note = (
                f"M = {particles} is below {MIN_PARTICLES_PER_WIDTH} x the largest width "
                f"{largest}: the limit's own O(M^-1/2) error is a visible part of the widest runs' "
                f"gaps and flattens the slopes (§B.4); use --particles "
                f"{MIN_PARTICLES_PER_WIDTH * largest} or more{afresh}."
            )
            warnings.warn(note, stacklevel=3)
            self._notes.append(note)
        return particles

    def _particles_that_fit(self, particles: int) -> int:
        """``particles``, lowered to what fits in ``MEMORY_SHARE`` of the memory left by the runs.

        Never to the largest width or below: then ``_check_memory`` refuses the sweep with the
        value that fits. A lowered M is noted by ``_choose_particles`` (below 8 N).
        """
        available = available_memory(self._device())
        if available is None:
            return particles
        fitting = self._largest_fitting_particles(
            MEMORY_SHARE * available - self._runs_bytes(), None
        )
        return fitting if max(self.settings.widths) < fitting < particles else particles

    def _stored_particles(self) -> int | None:
        """The M recorded in the folder's ``limit.json``, if the folder has one that is readable."""
        path = self.out / "limit.json"
        if not path.is_file():
            return None
        try:
            particles = read_json(path)["recipe"]["sweep"]["particles"]
        except (ValueError, KeyError, TypeError):  # damaged or older files: _check_stored says
            return None
        return particles if isinstance(particles, int) and particles > 0 else None

    def _default_particles(self) -> int:
        """M when neither the recipe nor the folder gives one (``_choose_particles``).

        The particle solver: 8 x the largest width (§B.4). The reduced solver (L >= 4): the
        largest number of end atoms whose limit pass, with one network of the largest width
        coupled, takes about ``REDUCED_BUDGET_S`` seconds under the reference cost model of the
        compiled passes (``mflightning.limit.cost.default_atoms`` with ``COMPILED_COST``), at
        least 16 x the largest width, and at most what fills ``MEMORY_SHARE`` of the memory
        available; the particle solver's is lowered the same way (``_particles_that_fit``). It
        does not depend on the number of seeds or on whether this machine compiled the passes,
        and a folder keeps it on resume (``_choose_particles``).
        """
        largest = max(self.settings.widths)
        depth = len(self.network.widths) + 1
        if self.limit_kind != "reduced" or depth < MIN_REDUCED_DEPTH:
            return self._particles_that_fit(MIN_PARTICLES_PER_WIDTH * largest)
        batch = getattr(self.datamodule, "batch_size", None) or DEFAULT_BATCH
        features = int(self.network.to_config()["init_args"]["in_features"])
        timed = default_atoms(
            features,
            int(batch),
            depth,
            self.steps,
            [[largest] * (depth - 1)],
            REDUCED_BUDGET_S,
            cost=COMPILED_COST,
        )
        available = available_memory(self._device())
        if available is None:
            return timed
        per_atom = self._solver_bytes(1) - self._solver_bytes(0)
        fitting = 64 * int(MEMORY_SHARE * available / max(per_atom, 1.0) / 64)
        return max(16 * largest, min(timed, fitting))

    def _solver(self) -> LimitSolver:
        """The limit solver, stepping with the module's optimizer, scheduler and rule (§F)."""
        return build_solver(
            self.network,
            self.limit_kind,
            self.particles,
            lr=self.module.time_step,
            loss=self.module.loss_name,
            dtype=getattr(torch, self.settings.solver_dtype),
            device=self._device(),
            **self.module.update_factories,
        )

    def _scan_training_data(self) -> tuple[str, int]:
        """Check the training batches a sweep uses; returns their digest and the batch size P.

        Reads one pass of ``train_dataloader()`` (at most ``steps`` batches): every batch must
        be finite, and a second call must give the same first batch (the same data order for
        every run and the limit).

        Raises:
            ValueError: a batch with NaN or infinite values (naming it), or a data order that
                changes from call to call.
        """
        hasher = hashlib.sha256()
        first: Tensor | None = None
        loader = self.datamodule.train_dataloader()
        sizes: set[int] = set()
        for index, (x, y) in enumerate(loader):
            if index == self.steps * self._accumulation():
                break
            sizes.add(len(x))
            for name, tensor in (("inputs", x), ("targets", y)):
                if bad := _non_finite(tensor):
                    raise ValueError(
                        f"the training data is not finite: batch {index} of the data module's "
                        f"train_dataloader() has {bad} NaN or infinite {name}, and the limit and "
                        "every run would train on them; clean the data (drop or impute those "
                        "rows) before sweeping."
                    )
                _digest(hasher, tensor)
            first = x if first is None else first
        if first is None:
            raise ValueError("the data module's train_dataloader() yielded no batch to train on.")
        self._check_accumulation(loader, sizes)
        if not torch.equal(first, next(iter(self.datamodule.train_dataloader()))[0]):
            raise ValueError(
                "the data module's train_dataloader() gives a different first batch at each call; "
                "seed its shuffling so every run and the limit see the same data order."
            )
        return hasher.hexdigest(), len(first)

    def _check_accumulation(self, loader: Any, sizes: set[int]) -> None:
        """Refuse accumulation windows that Lightning would weight unlike the limit's step.

        With ``accumulate_grad_batches = k`` Lightning steps on k batches (and on a shorter
        window at the end of an epoch whose length k does not divide), each loss divided by k;
        the limit steps on their union. The two agree only for full windows of equal batches.

        Raises:
            ValueError: an epoch length that k does not divide, or batches of different sizes.
        """
        k = self._accumulation()
        if k == 1:
            return
        epoch = len(loader) if hasattr(loader, "__len__") else None
        if epoch is not None and epoch % k:
            raise ValueError(
                f"trainer.accumulate_grad_batches={k} does not divide the {epoch} batches of an "
                "epoch: Lightning would step on a shorter window at each epoch's end, unlike the "
                f"limit; choose a batch size giving a multiple of {k} batches per epoch."
            )
        if len(sizes) > 1:
            raise ValueError(
                f"trainer.accumulate_grad_batches={k} with batches of sizes {sorted(sizes)}: "
                "Lightning averages the batches' mean losses, which is the mean loss of their "
                "union only for equal batches; use a batch size that divides the training set "
                "(or drop_last=True)."
            )

    def _probe(self) -> tuple[Tensor, Tensor]:
        """The first ``probe_size`` validation examples (all of them if fewer), checked finite.

        Raises:
            ValueError: NaN or infinite values in the probe.
        """
        probe = _take(self.datamodule.val_dataloader(), self.settings.probe_size)
        for name, tensor in zip(("inputs", "targets"), probe, strict=True):
            if bad := _non_finite(tensor):
                raise ValueError(
                    f"the probe is not finite: the first {len(tensor)} examples of the data "
                    f"module's val_dataloader(), on which every gap is measured, have {bad} NaN "
                    f"or infinite {name}; clean the validation data."
                )
        size = len(probe[0])
        if size < self.settings.probe_size:
            note = (
                f"probe_size {self.settings.probe_size} was asked for but val_dataloader() has "
                f"{size} examples: the gaps are measured on those {size}."
            )
            warnings.warn(note, stacklevel=3)
            self._notes.append(note)
        return probe

    def _batches(self) -> Iterator[tuple[Tensor, Tensor]]:
        """The batch of every optimizer step: one loader re-iterated, one pass per epoch.

        Under ``accumulate_grad_batches = k`` a step's batch is the union of the k loader
        batches that Lightning accumulates (the mean of equal batches' mean losses is the mean
        loss of their union).
        """
        batches = self._loader_batches()
        k = self._accumulation()
        if k == 1:
            return batches
        return (
            (torch.cat([x for x, _ in group]), torch.cat([y for _, y in group]))
            for group in iter(lambda: list(itertools.islice(batches, k)), [])
        )

    def _loader_batches(self) -> Iterator[tuple[Tensor, Tensor]]:
        """The loader's batches, one pass per epoch, as the limit pass and every run read them."""
        loader = self.datamodule.train_dataloader()
        return itertools.chain.from_iterable(loader for _ in itertools.count())

    def _replay_loader(self) -> DataLoader[Any]:
        """A loader that gives a Lightning run exactly the limit pass's batch sequence.

        Lightning re-iterates a loader in its own way (and a data module that shuffles with a
        generator of its own may then give it another order from the second epoch on), so the
        runs it trains read the sweep's sequence instead: ``steps`` optimizer steps of batches.
        """
        total = self.steps * self._accumulation()
        return DataLoader(_Replay(self._loader_batches, total), batch_size=None)

    def _accumulation(self) -> int:
        """Loader batches per optimizer step (the trainer's ``accumulate_grad_batches``)."""
        return int(self.trainer_kwargs.get("accumulate_grad_batches") or 1)

    def _record_limit(
        self,
        solver: LimitSolver,
        couplings: dict[tuple[int, int], AnyCoupling],
        probe: tuple[Tensor, Tensor],
        exact: ReducedLimitSolver | None,
    ) -> tuple[dict[tuple[int, int], dict[int, LimitSnapshot]], dict[str, Any]]:
        """One solver pass: per-run snapshots at the logging steps and the limit's record.

        The record (``limit.json``) holds the limit's loss curve and, when ``exact`` (the reduced
        solver on the particle solver's own atoms) runs beside it, the particle solver's relative
        output gap to the exact limit at every logging step.
        """
        probe_x = probe[0]
        snapshots: dict[tuple[int, int], dict[int, LimitSnapshot]] = {key: {} for key in couplings}
        batches = self._batches()
        limit_loss, exact_gap, times = [], [], []
        label = f"limit ({self.limit_kind}, M = {self.particles})"
        for step in tqdm(range(self.steps + 1), desc=label, leave=False):
            times.append(solver.time)
            if step in self.log_steps:
                shared = take_snapshot(solver, probe_x, probe)
                for key, coupling in couplings.items():
                    snapshots[key][step] = LimitSnapshot(
                        shared.time, shared.output, shared.loss, coupling.ideal_weights()
                    )
                if exact is not None:
                    gap = relative_output_gap(shared.output, exact(probe_x))
                    exact_gap.append(
                        {"step": step, "mf_time": shared.time, "relative_gap": float(gap)}
                    )
            if step < self.steps:
                x, y = next(batches)
                limit_loss.append(solver.step(x, y))
                if exact is not None:
                    exact.step(x, y)
        record: dict[str, Any] = {
            "train_loss": limit_loss,
            "time_step": self.module.time_step,
            "update": solver.update,
            "times": times,
        }
        if exact is not None:
            record["exact_relative_gap"] = exact_gap
        return snapshots, record

    def _check_scale(self, solver: LimitSolver, probe: tuple[Tensor, Tensor]) -> None:
        """Refuse inputs so large that the outputs or the loss overflow before any training.

        At t = 0 the limit's outputs on the probe, and their loss in the runs' dtype, must be
        finite: otherwise every gap of every run would be infinite or NaN.

        Raises:
            ValueError: naming the size of the inputs and of the outputs, and the fix.
        """
        x, y = probe
        output = solver(x)
        run_dtype = self._run_dtype()
        target = y.to(run_dtype) if y.is_floating_point() else y
        loss = mean_field_loss(self.module.loss_name, output.to(run_dtype), target)
        if bool(torch.isfinite(output).all()) and bool(torch.isfinite(loss)):
            return
        raise ValueError(
            f"the inputs are too large for the networks: at initialization the limit's outputs "
            f"on the probe reach {output.abs().max().item():.3g} and the {self.module.loss_name} "
            f"loss in {str(run_dtype).removeprefix('torch.')} is {loss.item()} (largest input "
            f"|x| = {x.abs().max().item():.3g}), so every gap would overflow; standardize the "
            "inputs (subtract the mean, divide by the standard deviation) in the data module."
        )

    # --- one run ------------------------------------------------------------------------------

    def _config(self, width: int, seed: int, network: MeanFieldStack) -> dict[str, Any]:
        """The W&B config of one run, under ``sweep`` (Lightning adds the module's hparams)."""
        return {
            "sweep": {
                "name": self.name,
                "width": width,
                "seed": seed,
                "widths": self.settings.widths,
                "seeds": self.settings.seeds,
                "particles": self.particles,
                "steps": self.steps,
                "lr": self.module.lr,
                "time_step": self.module.time_step,
                "loss": self.module.loss_name,
                "preset": self.module.preset,
                "rule": self.module.rule,
                "multipliers": {
                    f"layer{i}": m.lr_multiplier for i, m in enumerate(network.layers, 1)
                },
            }
        }

    def _train(
        self,
        width: int,
        seed: int,
        network: MeanFieldStack,
        snapshots: dict[int, LimitSnapshot],
        probe: tuple[Tensor, Tensor],
    ) -> RunResult:
        seed_everything(seed, verbose=False)
        module = self.module.with_network(network)
        tracker = RecordedLimitTracker(snapshots, probe[0], probe)
        name = self.run_name(width, seed)
        wandb_logger = run_logger(
            self.wandb_mode,
            self.out,
            self.settings.project,
            self.name,
            name,
            self._config(width, seed, network),
            self._wandb_ids.get((width, seed)),
        )
        trainer = Trainer(
            **self.trainer_kwargs,
            devices=1,
            max_steps=self.steps,
            logger=wandb_logger or False,
            callbacks=[tracker],
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            limit_val_batches=0,
            log_every_n_steps=1,
            default_root_dir=self.out,
        )
        diverged = False
        try:
            trainer.fit(module, train_dataloaders=self._replay_loader())
        except DivergenceError as error:
            warnings.warn(f"run {name} is recorded as diverged: {error}", stacklevel=2)
            diverged = True
        finally:
            if wandb_logger is not None:
                wandb_logger.experiment.finish()
        return self._result(
            (width, seed), module.network, tracker.history, tracker.train_losses, probe, diverged
        )

    @torch.no_grad()
    def _result(
        self,
        key: tuple[int, int],
        network: nn.Module,
        history: list[dict[str, float]],
        train_loss: list[float],
        probe: tuple[Tensor, Tensor],
        diverged: bool,
    ) -> RunResult:
        """A run's result: its logged gaps and losses, final accuracy and neuron spread (§C.6)."""
        assert isinstance(network, MeanFieldStack)
        if diverged:
            return RunResult(*key, True, history, train_loss, math.nan, {})
        weight = next(network.parameters())
        x, y = probe[0].to(weight), probe[1].to(weight.device)
        correct = correct_predictions(self.module.loss_name, network(x), y)
        hidden = network.hidden_preactivations(x)[:-1]
        spread = {f"layer{i + 1}": float(neuron_spread(h)) for i, h in enumerate(hidden)}
        return RunResult(*key, False, history, train_loss, float(correct.mean()), spread)

    # --- seed-batched runs --------------------------------------------------------------------

    def _batchable(self) -> bool:
        """Whether ``SeedBatch`` reproduces the recipe's training (full precision, asked for).

        It steps with the module's own optimizer and scheduler (any torch optimizer acts element
        by element, so seeds stay independent); mixed precision trains run by run.
        """
        return bool(self.settings.batch_seeds) and self.trainer_kwargs.get("precision") in (
            None,
            "32-true",
            "32",
            32,
            "64-true",
            "64",
            64,
        )

    def _train_seeds(
        self,
        width: int,
        seeds: list[int],
        networks: dict[tuple[int, int], MeanFieldStack],
        snapshots: dict[tuple[int, int], dict[int, LimitSnapshot]],
        probe: tuple[Tensor, Tensor],
    ) -> list[RunResult]:
        """Train the ``seeds`` of one width as one ``SeedBatch`` on the runs' batches.

        A seed whose loss or probe output turns non-finite is recorded as diverged; the others
        go on (the seeds do not mix inside the vmapped step).
        """
        keys = [(width, seed) for seed in seeds]
        module = self.module
        batch = SeedBatch(
            [networks[k] for k in keys],
            module.lr,
            module.loss_name,
            module.preset,
            optimizer=module.optimizer_factory,
            scheduler=module.scheduler_factory,
            rule=module.rule,
        )
        weight = next(batch.template.parameters())
        history: dict[tuple[int, int], list[dict[str, float]]] = {k: [] for k in keys}
        losses: dict[tuple[int, int], list[float]] = {k: [] for k in keys}
        diverged: set[tuple[int, int]] = set()
        batches = self._batches()
        times = []
        for step in range(self.steps + 1):
            times.append(batch.clock.time)
            if step in self.log_steps:
                for s, key in enumerate(keys):
                    if key not in diverged:
                        try:
                            gaps = gaps_to_limit(
                                batch.network(s),
                                self.module.loss_name,
                                snapshots[key][step],
                                probe[0],
                                probe,
                            )
                        except DivergenceError:
                            diverged.add(key)
                            continue
                        mf_time = batch.clock.time
                        history[key].append({"step": step} | gaps | {"mf_time": mf_time})
            if step < self.steps:
                x, y = next(batches)
                y = y.to(weight.device, weight.dtype) if y.is_floating_point() else y
                step_losses = batch.step(x.to(weight), y.to(weight.device)).tolist()
                for key, value in zip(keys, step_losses, strict=True):
                    losses[key].append(value)
                    if not math.isfinite(value):
                        diverged.add(key)
        results = []
        for s, key in enumerate(keys):
            if key in diverged:
                warnings.warn(f"run {self.run_name(*key)} is recorded as diverged", stacklevel=2)
            network = batch.network(s)
            assert isinstance(network, MeanFieldStack)  # a copy of networks[key]
            results.append(
                self._result(key, network, history[key], losses[key], probe, key in diverged)
            )
            self._log_replayed_run(key, network, history[key], losses[key], times)
        return results

    def _log_replayed_run(
        self,
        key: tuple[int, int],
        network: MeanFieldStack,
        history: list[dict[str, float]],
        losses: list[float],
        times: list[float],
    ) -> None:
        """One W&B run for a seed-batched run: its gap rows and per-step training losses.

        ``times[k]`` is ``mf_time`` after k steps.
        """
        rows = [dict(row) for row in history]
        rows += [
            {"step": step, "train/loss": value, "mf_time": times[step]}
            for step, value in enumerate(losses)
        ]
        rows.sort(key=lambda row: row["step"])
        log_run_history(
            self.wandb_mode,
            self.out,
            self.settings.project,
            self.name,
            self.run_name(*key),
            self._config(*key, network),
            rows,
            self._wandb_ids.get(key),
        )

    # --- the sweep ----------------------------------------------------------------------------

    def _save(self, result: RunResult, recipe: dict[str, Any]) -> RunResult:
        """Write a finished run with its recipe and W&B id (atomically): a rerun keeps it."""
        run = {"width": result.width, "seed": result.seed}
        record = {
            "fingerprint": fingerprint(recipe | {"run": run}),
            "run": run,
            "recipe": recipe,
            "wandb_id": self._wandb_ids.get((result.width, result.seed)),
            "result": asdict(result),
        }
        atomic_write_json(self._run_path(result.width, result.seed), record)
        return result

    def run(self) -> dict[str, Any]:
        """Run (or finish) the sweep and write the report folder; returns the report.

        Holds the folder's lock throughout. Before anything is trained it checks the data
        (finite, same order at every call), the memory, and that the files already in the
        folder hold this sweep's recipe (or deletes them under ``overwrite``).

        Raises:
            ValueError: unusable data, too little memory, a folder holding another recipe or
                locked by another sweep, or an unwritable folder (each message says what to do).
        """
        self._prepare_folder()
        with folder_lock(self.out):
            return self._run_locked()

    def _run_locked(self) -> dict[str, Any]:
        self.datamodule.setup("fit")
        train_digest, points = self._scan_training_data()
        probe = self._probe()
        self._check_memory(points)
        probe_hash = hashlib.sha256()
        for tensor in probe:
            _digest(probe_hash, tensor)
        digest = {"train": train_digest, "probe": probe_hash.hexdigest()}
        recipe = self._recipe(digest, len(probe[0]))
        self._remove_stale_temporaries()
        self._check_stored(recipe)
        results = {key: r for key in self._runs() if (r := self._load_finished(*key)) is not None}
        todo = [key for key in self._runs() if key not in results]
        if self.wandb_mode != "disabled":
            self._wandb_ids = {key: f"{self.run_name(*key)}-{secrets.token_hex(4)}" for key in todo}
        limit_path = self.out / "limit.json"
        if todo or not limit_path.is_file():
            solver = self._solver()
            self._check_scale(solver, probe)
            exact = exact_beside(solver)
            couplings: dict[tuple[int, int], AnyCoupling] = {}
            networks: dict[tuple[int, int], MeanFieldStack] = {}
            for width, seed in self._runs():
                generator = torch.Generator().manual_seed(seed)
                widths = [width] * len(self.network.widths)
                networks[width, seed], couplings[width, seed] = solver.couple(
                    widths, generator=generator, dtype=self._run_dtype()
                )
            snapshots, record = self._record_limit(solver, couplings, probe, exact)
            record = {"fingerprint": fingerprint(recipe), "recipe": recipe} | record
            atomic_write_json(limit_path, record)
            if self._batchable():
                for width in tqdm(sorted({w for w, _ in todo}), desc=f"sweep {self.name} (widths)"):
                    seeds = [s for w, s in todo if w == width]
                    for result in self._train_seeds(width, seeds, networks, snapshots, probe):
                        results[result.width, result.seed] = self._save(result, recipe)
            else:
                with _quiet_lightning():
                    for width, seed in tqdm(todo, desc=f"sweep {self.name}"):
                        result = self._train(
                            width, seed, networks[width, seed], snapshots[width, seed], probe
                        )
                        results[width, seed] = self._save(result, recipe)
        return self._write_report(results, read_json(limit_path), recipe)

    # --- report -------------------------------------------------------------------------------

    def _meta(self, recipe: dict[str, Any], horizon: float) -> dict[str, Any]:
        """The report's header: the sweep's settings, its recipe, ``horizon`` (final mf_time)."""
        return {
            "name": self.name,
            "widths": sorted(self.settings.widths),
            "seeds": self.settings.seeds,
            "particles": self.particles,
            "limit_solver": self.limit_kind,
            "steps": self.steps,
            "time_step": self.module.time_step,
            "horizon": horizon,
            "update": describe_update(self.module.optimizer_factory, self.module.scheduler_factory),
            "rule": self.module.rule,
            "lr": self.module.lr,
            "loss": self.module.loss_name,
            "preset": self.module.preset,
            "every_n_steps": self.every,
            "probe_size": recipe["sweep"]["probe_size"],
            "wandb": self.wandb_mode,
            "fingerprint": fingerprint(recipe),
            "recipe": recipe,
            "notes": list(self._notes),
        }

    def _write_report(
        self,
        results: dict[tuple[int, int], RunResult],
        limit: dict[str, Any],
        recipe: dict[str, Any],
    ) -> dict[str, Any]:
        limit_loss = limit["train_loss"]
        times = limit_times(limit, self.steps)
        report = build_report(results, limit, self._meta(recipe, times[-1]))
        atomic_write_json(self.out / "report.json", report)
        buffer = io.StringIO()
        csv.writer(buffer).writerows(curves_rows(results, limit_loss, times))
        atomic_write_text(self.out / "curves.csv", buffer.getvalue())
        paths = write_figures(report, results, limit_loss, times, self.out)
        for name in set(FIGURES) - set(paths):  # an earlier report's figure this one lacks
            (self.out / f"{name}.png").unlink(missing_ok=True)
        tables = report_tables(report)
        config = {"widths": sorted(self.settings.widths), "seeds": self.settings.seeds}
        key = [str(self.out.resolve()), report["fingerprint"], self.name, config]
        summary_id = f"summary-{fingerprint(key)[:16]}"  # a rerun into this folder resumes it
        log_summary(
            self.wandb_mode,
            self.out,
            self.settings.project,
            self.name,
            tables,
            paths,
            config,
            summary_id,
        )
        run_files = (self.out / "runs").glob("*.json")
        finished = {str(read_json(path).get("wandb_id")) for path in run_files}
        set_aside_offline_runs(self.out, finished | {str(summary_id)})
        return report
