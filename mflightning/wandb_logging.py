"""Weights & Biases for sweeps: offline by default, one run per (width, seed), a summary run.

The mode is ``"offline"`` unless ``WANDB_MODE=online`` is set or the user is logged in (an API
key in ``WANDB_API_KEY`` or ``~/.netrc``); offline runs need no account and no network, and
``wandb sync <folder>`` uploads them later. Limit metrics use ``mf_time`` as their x-axis
(``define_metric``), so runs of different widths line up (docs/theory.md §1.1).
"""

from __future__ import annotations

import os
import shutil
import socket
import threading
import warnings
from collections.abc import Collection, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, get_args
from urllib.parse import urlsplit

WandbMode = Literal["auto", "offline", "online", "disabled"]
WANDB_MODES: tuple[str, ...] = get_args(WandbMode)
ResolvedMode = Literal["offline", "online", "disabled"]
TIME_AXIS_METRICS = ("limit/*", "train/*", "val/*")
DEFAULT_HOST = "https://api.wandb.ai"
PROBE_TIMEOUT_S = 3.0
"""Seconds the connection probe to the W&B host may take before falling back to offline."""
PROJECT_FORBIDDEN = "/\\#?%:"
"""Characters W&B refuses in a project name."""
PROJECT_MAX_LENGTH = 128


class WandbOfflineFallback(UserWarning):
    """Online W&B logging was requested but is impossible (no login or no network)."""


def check_mode(mode: str) -> None:
    """Raise ``ValueError`` naming ``wandb`` unless ``mode`` is one of ``WANDB_MODES``."""
    if mode not in WANDB_MODES:
        raise ValueError(f"unknown `wandb` mode {mode!r}; choose one of {WANDB_MODES}.")


def check_project(project: str) -> None:
    """Raise ``ValueError`` naming ``project`` unless W&B accepts it as a project name.

    W&B refuses empty names, names over ``PROJECT_MAX_LENGTH`` characters and the characters
    of ``PROJECT_FORBIDDEN``; checked up front, a bad name fails before any training instead
    of after the limit pass.
    """
    if not isinstance(project, str) or not project.strip():
        raise ValueError(
            f"`project` must be a non-empty W&B project name, got {project!r}; use e.g. "
            "--sweep.project=mflightning."
        )
    forbidden = sorted(set(PROJECT_FORBIDDEN) & set(project))
    if forbidden:
        raise ValueError(
            f"`project` {project!r} is not a valid W&B project name (it contains "
            f"{' '.join(forbidden)}); use a plain name without {' '.join(PROJECT_FORBIDDEN)}, "
            "e.g. --sweep.project=mflightning."
        )
    if len(project) > PROJECT_MAX_LENGTH:
        raise ValueError(
            f"`project` is {len(project)} characters long but W&B accepts at most "
            f"{PROJECT_MAX_LENGTH}; use a shorter name."
        )


def resolve_mode(mode: str) -> ResolvedMode:
    """Turn ``"auto"`` into ``"online"`` (requested or logged in) or ``"offline"``.

    Online (asked for, or by ``"auto"``) needs an API key and the W&B host answering within
    ``PROBE_TIMEOUT_S``; otherwise a ``WandbOfflineFallback`` warning says why and the
    result is ``"offline"``.

    Raises:
        ValueError: unknown ``mode``.
    """
    check_mode(mode)
    if mode == "online":
        return _online_or_offline()
    if mode != "auto":
        return mode  # type: ignore[return-value]
    env = os.environ.get("WANDB_MODE", "")
    if env in ("offline", "dryrun"):
        return "offline"
    if env == "disabled":
        return "disabled"
    if env == "online" or _api_key():
        return _online_or_offline()
    return "offline"


def _api_key() -> bool:
    """Whether a W&B API key is set (``WANDB_API_KEY``) or stored in ``~/.netrc``."""
    netrc = Path.home() / ".netrc"
    return bool(os.environ.get("WANDB_API_KEY")) or (
        netrc.is_file() and "api.wandb.ai" in netrc.read_text(errors="ignore")
    )


def _reachable(host: str, port: int, timeout: float) -> bool:
    """Whether a TCP connection to ``host:port`` opens within ``timeout`` s (DNS included)."""
    result: list[bool] = []

    def connect() -> None:
        try:
            socket.create_connection((host, port), timeout=timeout).close()
            result.append(True)
        except OSError:
            result.append(False)

    thread = threading.Thread(target=connect, daemon=True)  # bounds a hanging DNS lookup too
    thread.start()
    thread.join(timeout)
    return bool(result and result[0])


def _online_or_offline() -> Literal["online", "offline"]:
    """``"online"`` if logged in and the W&B host answers within ``PROBE_TIMEOUT_S``, else offline.

    Falling back warns once with the reason; the run then logs offline (``wandb sync`` later).
    """
    url = urlsplit(os.environ.get("WANDB_BASE_URL", DEFAULT_HOST))
    host = url.hostname or "api.wandb.ai"
    port = url.port or (80 if url.scheme == "http" else 443)
    if not _api_key():
        reason = "no API key (run `wandb login` or set WANDB_API_KEY)"
    elif not _reachable(host, port, PROBE_TIMEOUT_S):
        reason = f"{host}:{port} is unreachable within {PROBE_TIMEOUT_S:g} s (no network?)"
    else:
        return "online"
    warnings.warn(
        f"W&B online mode was requested but there is {reason}; logging offline instead "
        "(`wandb sync <folder>` uploads the runs later).",
        WandbOfflineFallback,
        stacklevel=3,
    )
    return "offline"


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
    mode: str,
    save_dir: Path,
    project: str,
    group: str,
    name: str,
    config: Mapping[str, Any],
    run_id: str | None = None,
) -> Any:
    """A Lightning ``WandbLogger`` for one sweep run (``None`` when W&B is disabled).

    ``run_id`` fixes the W&B run id (default: a random one).
    """
    if mode == "disabled":
        return None
    from lightning.pytorch.loggers import WandbLogger

    logger = WandbLogger(
        project=project,
        group=group,
        name=name,
        id=run_id,
        save_dir=str(save_dir),
        offline=mode == "offline",
        config=dict(config),
        reinit="finish_previous",
        settings=_quiet_settings(),
    )
    define_time_axis(logger.experiment)
    return logger


def log_run_history(
    mode: ResolvedMode,
    save_dir: Path,
    project: str,
    group: str,
    name: str,
    config: Mapping[str, Any],
    steps: Sequence[Mapping[str, float]],
    run_id: str | None = None,
) -> None:
    """One W&B run replaying a finished run's logged rows (``{"step", "mf_time", ...}``).

    Used for seed-batched sweep runs, which train outside Lightning: the run has the same group,
    name, config and ``mf_time`` axis as a Lightning-logged one. ``run_id`` fixes its W&B id.
    """
    if mode == "disabled":
        return
    import wandb

    run = wandb.init(
        project=project,
        group=group,
        name=name,
        id=run_id,
        dir=str(save_dir),
        mode=mode,
        config=dict(config),
        reinit="finish_previous",
        settings=_quiet_settings(),
    )
    define_time_axis(run)
    for row in steps:
        run.log({k: v for k, v in row.items() if k != "step"}, step=int(row["step"]))
    run.finish()


def log_summary(
    mode: ResolvedMode,
    save_dir: Path,
    project: str,
    group: str,
    tables: Mapping[str, tuple[Sequence[str], Sequence[Sequence[Any]]]],
    figures: Mapping[str, Path],
    config: Mapping[str, Any],
    run_id: str | None = None,
) -> None:
    """One summary run in the sweep's group: ``wandb.Table`` s of the report and the figures.

    With a ``run_id``, a rerun resumes that run (``resume="allow"``) instead of adding one.
    """
    if mode == "disabled":
        return
    import wandb

    run = wandb.init(
        project=project,
        group=group,
        name=f"{group}-summary",
        id=run_id,
        resume="allow" if run_id else None,
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


SET_ASIDE = "set-aside"
"""Folder under ``<save_dir>/wandb`` for offline runs that ``wandb sync`` must not upload."""


def set_aside_offline_runs(save_dir: Path, keep: Collection[str]) -> list[Path]:
    """Move the offline runs not to upload out of ``wandb sync <save_dir>/wandb/offline-run-*``.

    An offline run directory (``offline-run-<date>_<time>-<run id>``) is kept when its id is in
    ``keep`` and it is the newest of that id; the others (a partial run left by a killed
    process, an older copy of a resumed run) move to ``<save_dir>/wandb/set-aside/``.

    Returns:
        The new paths of the moved directories.
    """
    root = save_dir / "wandb"
    runs = sorted(root.glob("offline-run-*"))  # the names sort by start time
    newest = {run.name.split("-", 3)[-1]: run for run in runs}
    moved = []
    for run in runs:
        run_id = run.name.split("-", 3)[-1]
        if run_id in keep and newest[run_id] == run:
            continue
        target = root / SET_ASIDE / run.name
        if target.exists():
            shutil.rmtree(target)  # an older set-aside copy of the same directory
        target.parent.mkdir(exist_ok=True)
        moved.append(run.rename(target))
    return moved
