"""Timing, sizing and table printing shared by every benchmark.

Each benchmark builds a few ``Case`` s (ours, the baseline, sometimes a third reference),
times them with ``measure`` — interleaved repeats, so machine noise hits every case alike,
``torch.cuda.synchronize`` around each sample on a GPU — and returns a ``Table`` of rows that
``format_table`` prints as Markdown.
"""

from __future__ import annotations

import dataclasses
import datetime
import gc
import math
import os
import platform
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

Profile = Literal["tiny", "quick", "full"]
PROFILES: tuple[Profile, ...] = ("tiny", "quick", "full")
# repeats, warm-up runs and minimum sample length (ms) of each profile
DEFAULTS: dict[Profile, tuple[int, int, float]] = {
    "tiny": (2, 1, 0.0),
    "quick": (9, 2, 10.0),
    "full": (15, 3, 20.0),
}


@dataclass(frozen=True)
class Settings:
    """What every benchmark is told: where to run and how big.

    Attributes:
        device: ``"cpu"`` or ``"cuda"``.
        profile: ``"tiny"`` (CI smoke: minimal sizes, 1-2 repeats), ``"quick"`` or ``"full"``.
        repeats: timed samples per case (the median is reported).
        warmup: untimed runs of every case before the samples.
        min_sample_ms: a sample repeats its case until it lasts at least this long, so that
            microsecond-scale cases are not timer noise.
    """

    device: str
    profile: Profile
    repeats: int
    warmup: int
    min_sample_ms: float

    @classmethod
    def make(cls, device: str, profile: Profile) -> Settings:
        """The default repeats and warm-up of ``profile`` on ``device``."""
        repeats, warmup, min_ms = DEFAULTS[profile]
        return cls(device, profile, repeats, warmup, min_ms)

    @property
    def cuda(self) -> bool:
        """Whether the benchmarks run on a CUDA device."""
        return torch.device(self.device).type == "cuda"

    def pick(self, tiny: Any, cpu: Any, cuda: Any) -> Any:
        """The size for this run: ``tiny`` for the smoke profile, else by device."""
        if self.profile == "tiny":
            return tiny
        return cuda if self.cuda else cpu


@dataclass
class Case:
    """One thing to time.

    Attributes:
        run: the timed work.
        prepare: untimed set-up called before every sample (e.g. a fresh ``Trainer``).
        inner: calls of ``run`` per sample; ``None`` calibrates it from ``min_sample_ms``.
        warmup: untimed runs before the samples, if more than the settings' (``torch.compile``
            compiles the forward and the backward over the first calls).
    """

    run: Callable[[], object]
    prepare: Callable[[], object] | None = None
    inner: int | None = None
    warmup: int = 0


def synchronize(device: str) -> None:
    """Wait for the device's queued work (a no-op on CPU)."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def _sample_ms(case: Case, inner: int, device: str) -> float:
    if case.prepare is not None:
        case.prepare()
    gc.collect()  # collect the previous samples' garbage (Trainers hold cycles) outside the timing
    synchronize(device)
    start = time.perf_counter()
    for _ in range(inner):
        case.run()
    synchronize(device)
    return (time.perf_counter() - start) * 1e3 / inner


class Timings(dict[str, float]):
    """Median milliseconds per ``run`` of each case (the mapping), and every sample.

    Attributes:
        samples: ``{name: [ms per run of each timed sample]}``.
    """

    def __init__(self, medians: dict[str, float], samples: dict[str, list[float]]) -> None:
        super().__init__(medians)
        self.samples = samples


def measure(cases: Mapping[str, Case], settings: Settings) -> Timings:
    """Median milliseconds per ``run`` of every case, measured with interleaved repeats.

    Every case is warmed up, then each round times one sample of every case, in an order that
    is reversed on odd rounds so that neither case always follows the other.

    Args:
        cases: the cases, by name.
        settings: repeats, warm-up and the minimum sample length.

    Returns:
        ``{name: median ms per run}``, with the samples in ``samples``.
    """
    inner: dict[str, int] = {}
    for name, case in cases.items():
        for _ in range(max(settings.warmup, case.warmup, 1)):
            once = _sample_ms(case, 1, settings.device)
        if case.inner is not None:
            inner[name] = case.inner
        else:
            inner[name] = max(1, math.ceil(settings.min_sample_ms / max(once, 1e-3)))
    samples: dict[str, list[float]] = {name: [] for name in cases}
    names = list(cases)
    for round_ in range(settings.repeats):
        for name in names if round_ % 2 == 0 else reversed(names):
            samples[name].append(_sample_ms(cases[name], inner[name], settings.device))
    medians = {name: statistics.median(values) for name, values in samples.items()}
    return Timings(medians, samples)


@dataclass
class Table:
    """The rows of one benchmark, printed as one Markdown table.

    Attributes:
        name: the benchmark's name (``layers``, ``module``...).
        title: one line saying what is compared.
        target: the target ratio, e.g. ``"ratio <= 1.03"``.
        columns: the column names, in order; each row maps these to values.
        rows: the rows.
        notes: lines printed under the table.
    """

    name: str
    title: str
    target: str
    columns: list[str]
    rows: list[dict[str, Any]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def add(self, **values: Any) -> None:
        """Append a row; every key must be one of ``columns``."""
        unknown = set(values) - set(self.columns)
        if unknown:
            raise ValueError(f"unknown columns {sorted(unknown)} for table {self.name}")
        self.rows.append(values)


def ratio_row(ours_ms: float, base_ms: float, limit: float) -> dict[str, Any]:
    """The ``ours ms``, ``baseline ms``, ``ratio`` and ``ok`` cells of a comparison row."""
    ratio = ours_ms / base_ms
    return {
        "ours ms": ours_ms,
        "baseline ms": base_ms,
        "ratio": ratio,
        "ok": "yes" if ratio <= limit else "no",
    }


COMPARISON_COLUMNS = ["ours ms", "baseline ms", "ratio", "ok"]


def _cell(value: Any) -> str:
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        if value == 0 or not math.isfinite(value):
            return f"{value:g}"
        if abs(value) >= 100:
            return f"{value:.1f}"
        if abs(value) >= 0.01:
            return f"{value:.3f}"
        return f"{value:.2e}"
    return "-" if value is None else str(value)


def format_table(table: Table) -> str:
    """The table as Markdown: a heading with the target, the pipe table and its notes."""
    header = f"### {table.name}: {table.title} (target: {table.target})"
    lines = [header, "", "| " + " | ".join(table.columns) + " |"]
    aligns = ["---:" if _numeric(table, c) else "---" for c in table.columns]
    lines.append("|" + "|".join(aligns) + "|")
    for row in table.rows:
        lines.append("| " + " | ".join(_cell(row.get(c)) for c in table.columns) + " |")
    lines.extend(["", *table.notes] if table.notes else [])
    return "\n".join(lines)


def _numeric(table: Table, column: str) -> bool:
    values = [row.get(column) for row in table.rows if row.get(column) is not None]
    return bool(values) and all(isinstance(v, (int, float)) for v in values)


def environment(settings: Settings) -> dict[str, Any]:
    """Machine, versions, date and settings, printed above the tables and saved in the JSON."""
    if settings.cuda:
        machine = torch.cuda.get_device_name()
    else:
        machine = f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs"
    return {
        "date": datetime.date.today().isoformat(),
        "device": settings.device,
        "machine": machine,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "python": platform.python_version(),
    } | {k: v for k, v in dataclasses.asdict(settings).items() if k != "device"}


def rows_for_json(tables: Sequence[Table]) -> list[dict[str, Any]]:
    """Every row of every table, tagged with its benchmark name."""
    return [{"benchmark": t.name, "target": t.target} | row for t in tables for row in t.rows]
