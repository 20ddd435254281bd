"""Shared test helpers."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pytest
import torch


def loglog_slope(widths: list[int] | np.ndarray, values: list[float] | np.ndarray) -> float:
    """Least-squares slope of log(value) against log(width)."""
    return float(np.polyfit(np.log(widths), np.log(values), 1)[0])


@pytest.fixture(autouse=True)
def _wandb_offline(monkeypatch: pytest.MonkeyPatch) -> None:
    """Keep W&B quiet and offline in every test."""
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")


@pytest.fixture
def float64_default() -> Iterator[None]:
    """Run a test with float64 as torch's default dtype, then restore the previous default."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(previous)
