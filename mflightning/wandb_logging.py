"""Weights & Biases for sweeps: offline by default, one run per (width, seed), a summary run.

The mode is ``"offline"`` unless ``WANDB_MODE=online`` is set or the user is logged in (an API
key in ``WANDB_API_KEY`` or ``~/.netrc``); offline runs need no account and no network, and
``wandb sync <folder>`` uploads them later. Limit metrics use ``mf_time`` as their x-axis
(``define_metric``), so runs of different widths line up (mf-theory.md §1.1).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, get_args

WandbMode = Literal["auto", "offline", "online", "disabled"]
WANDB_MODES: tuple[str, ...] = get_args(WandbMode)
TIME_AXIS_METRICS = ("limit/*", "train/*", "val/*")


def resolve_mode(mode: str) -> Literal["offline", "online", "disabled"]:
    """Turn ``"auto"`` into ``"online"`` (requested or logged in) or ``"offline"``.

    Raises:
        ValueError: unknown ``mode``.
    """
    if mode not in WANDB_MODES:
        raise ValueError(f"unknown `wandb` mode {mode!r}; choose one of {WANDB_MODES}.")
    if mode != "auto":
        return mode  # type: ignore[return-value]
    env = os.environ.get("WANDB_MODE", "")
    if env in ("offline", "dryrun"):
        return "offline"
    if env == "disabled":
        return "disabled"
    netrc = Path.home() / ".netrc"
    logged_in = bool(os.environ.get("WANDB_API_KEY")) or (
        netrc.is_file() and "api.wandb.ai" in netrc.read_text(errors="ignore")
    )
    return "online" if env == "online" or logged_in else "offline"


def _quiet_settings() -> Any:
    """W&B settings without the per-run console banners (the sweep has a progress bar)."""
    import wandb

    return wandb.Settings(silent=True)


def define_time_axis(run: Any) -> None:
    """Make ``mf_time`` the x-axis of the limit, train and val metrics of a wandb run."""
    run.define_metric("mf_time")
    for pattern in TIME_AXIS_METRICS:
        run.define_metric(pattern, step_metric="mf_time")


def run_logger(
    mode: str, save_dir: Path, project: str, group: str, name: str, config: Mapping[str, Any]
) -> Any:
    """A Lightning ``WandbLogger`` for one sweep run (``None`` when W&B is disabled)."""
    if mode == "disabled":
        return None
    from lightning.pytorch.loggers import WandbLogger

    logger = WandbLogger(
        project=project,
        group=group,
        name=name,
        save_dir=str(save_dir),
        offline=mode == "offline",
        config=dict(config),
        reinit="finish_previous",
    )
    define_time_axis(logger.experiment)
    return logger


def log_summary(
    mode: str,
    save_dir: Path,
    project: str,
    group: str,
    tables: Mapping[str, tuple[Sequence[str], Sequence[Sequence[Any]]]],
    figures: Mapping[str, Path],
    config: Mapping[str, Any],
) -> None:
    """One summary run in the sweep's group: ``wandb.Table`` s of the report and the figures."""
    if mode == "disabled":
        return
    import wandb

    run = wandb.init(
        project=project,
        group=group,
        name=f"{group}-summary",
        job_type="summary",
        dir=str(save_dir),
        mode=mode,
        config=dict(config),
        reinit="finish_previous",
    )
    payload: dict[str, Any] = {
        key: wandb.Table(columns=list(columns), data=[list(row) for row in rows])
        for key, (columns, rows) in tables.items()
    }
    payload |= {f"figures/{key}": wandb.Image(str(path)) for key, path in figures.items()}
    run.log(payload)
    run.finish()


def offline_hint(mode: str, save_dir: Path) -> str | None:
    """The one-line hint printed after an offline sweep."""
    if mode != "offline":
        return None
    runs = save_dir / "wandb" / "offline-run-*"
    return f"W&B ran offline (no account needed): `wandb sync {runs}` uploads the runs."
