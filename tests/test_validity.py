"""The validity horizon: per-step slope fits, the off-rate rule and t* (mflightning.validity)."""

from __future__ import annotations

import numpy as np
import pytest

from mflightning.validity import RunHistory, earliest_horizon, horizon, slope_series, validity


def _entry(step: int, slope: float | None, low: float | None, high: float | None = None) -> dict:
    return {"step": step, "mf_time": 0.1 * step, "slope": slope, "ci_low": low, "ci_high": high}


def _histories(gap: dict[int, list[np.ndarray]]) -> list[RunHistory]:
    """Runs of widths ``gap`` keys, one per seed, logging the values ``gap[width][seed][k]``."""
    histories = []
    for width, seeds in gap.items():
        for values in seeds:
            rows = [
                {"step": 10 * k, "mf_time": 0.5 * k, "limit/output_gap": float(v)}
                for k, v in enumerate(values)
            ]
            histories.append(RunHistory(width, rows))
    return histories


def test_slope_series_matches_numpy_polyfit_at_every_step() -> None:
    rng = np.random.default_rng(3)
    widths = [16, 32, 64, 128]
    gap = {w: [np.abs(rng.normal(1.0, 0.2, 5)) * w**-0.5 for _ in range(6)] for w in widths}
    series = slope_series(_histories(gap), "output_gap")
    assert [e["step"] for e in series] == [0, 10, 20, 30, 40]
    for k, entry in enumerate(series):
        rms = [np.sqrt(np.mean([seed[k] ** 2 for seed in gap[w]])) for w in widths]
        expected = np.polyfit(np.log(widths), np.log(rms), 1)[0]
        assert entry["slope"] == pytest.approx(expected, abs=1e-12)
        assert entry["ci_low"] <= entry["slope"] <= entry["ci_high"]
        assert entry["mf_time"] == pytest.approx(0.5 * k)


def test_zero_gaps_give_no_fit() -> None:
    gap = {16: [np.array([0.0, 0.2])] * 2, 64: [np.array([0.0, 0.1])] * 2}
    series = slope_series(_histories(gap), "output_gap")
    assert series[0]["slope"] is None and series[0]["ci_low"] is None
    assert series[1]["slope"] == pytest.approx(np.log(0.5) / np.log(4))


def test_a_gap_that_keeps_the_mean_field_rate_has_no_horizon() -> None:
    series = [_entry(k, -0.5 + 0.02 * (-1) ** k, -0.6) for k in range(10)]
    assert horizon(series) is None


def test_the_horizon_is_the_first_step_from_which_every_later_step_is_off_rate() -> None:
    series = [_entry(k, -0.5, -0.6) for k in range(5)]
    series += [_entry(5, -0.1, -0.2), _entry(6, -0.45, -0.55)]  # one noisy step, then back
    series += [_entry(k, -0.05, -0.15) for k in range(7, 10)]
    star = horizon(series)
    assert star is not None and star["step"] == 7


def test_wide_intervals_that_contain_the_mean_field_rate_are_not_off_rate() -> None:
    series = [_entry(k, 0.0, -0.8) for k in range(10)]  # two seeds: anything is possible
    assert horizon(series) is None


def test_steps_without_a_fit_are_skipped() -> None:
    series = [_entry(0, None, None)] + [_entry(k, -0.1, -0.2) for k in range(1, 5)]
    star = horizon(series)
    assert star is not None and star["step"] == 1


def test_validity_reports_step_and_time_and_the_earliest_metric() -> None:
    rng = np.random.default_rng(0)
    widths = [16, 32, 64]

    # the gap shrinks like N^-1/2 for 6 logged steps, then is the same at every width
    def values(w: int) -> np.ndarray:
        noise = np.exp(rng.normal(0, 0.05, 12))
        return np.where(np.arange(12) < 6, w**-0.5, 0.5) * noise

    gap = {w: [values(w) for _ in range(8)] for w in widths}
    report = validity(_histories(gap), ["output_gap"])
    assert report["output_gap"]["step_star"] == 60
    assert report["output_gap"]["t_star"] == pytest.approx(3.0)
    assert len(report["output_gap"]["series"]) == 12
    name, entry = earliest_horizon(report)
    assert name == "output_gap" and entry["step_star"] == 60
