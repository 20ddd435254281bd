"""The sweep's console summary gives every slope with its interval, and why one misses -1/2.

Issue 21 item 7: ``mfl sweep`` printed the output-gap slope only, and a slope outside its
expected value left ``notes`` empty. Each metric of ``report["slopes"]`` now gets one line, and a
slope whose interval misses -1/2 gets its known cause (docs/theory.md §C "Expected slopes at a
glance": the loss gap mixes an N^-1 bias with the N^-1/2 fluctuation, §C.2; coupled deviations
are noisy and under Adam shrink more slowly, §C.3, §F.4), in ``notes`` and on the console.
"""

from __future__ import annotations

import numpy as np
import pytest

from mflightning.report import RunResult, build_report, summary_lines

WIDTHS, SEEDS = (16, 64, 256), 4
# per metric, the exponent of the synthetic gaps: the output gap at the mean-field rate, the loss
# gap dominated by its N^-1 bias, the layer-1 deviation too shallow
EXPONENTS = {"output_gap": -0.5, "loss_gap": -1.0, "dev/layer1": -0.2}


def _results() -> dict[tuple[int, int], RunResult]:
    rng = np.random.default_rng(0)
    results = {}
    for width in WIDTHS:
        for seed in range(SEEDS):
            rows = []
            for step in (0, 5, 10):
                row = {"step": float(step), "mf_time": 0.1 * step}
                for metric, exponent in EXPONENTS.items():
                    noise = 1 + 0.02 * rng.standard_normal()
                    row[f"limit/{metric}"] = (1 + step) * width**exponent * noise
                rows.append(row)
            results[width, seed] = RunResult(
                width, seed, False, rows, [0.5] * 11, 0.9, {"layer1": 0.1}
            )
    return results


def _report(rule: str) -> dict:
    meta = {"steps": 10, "rule": rule, "notes": []}
    limit = {"train_loss": [0.5] * 11}
    return build_report(_results(), limit, meta | {"limit_solver": "particles", "particles": 2048})


@pytest.mark.parametrize("rule", ["sgd", "adam"])
def test_every_slope_is_printed_and_a_missed_one_is_explained(rule: str) -> None:
    report = _report(rule)
    slopes = report["slopes"]
    assert set(slopes) == {"output_gap", "sup_output_gap", "loss_gap", "dev/layer1"}
    assert slopes["output_gap"]["contains_expected"]
    assert not slopes["loss_gap"]["contains_expected"]
    assert not slopes["dev/layer1"]["contains_expected"]

    notes = report["notes"]
    assert len(notes) == 2, notes
    loss_note = next(note for note in notes if note.startswith("loss_gap slope"))
    assert "misses the expected -0.5" in loss_note and "N^-1 bias" in loss_note
    assert "§C.2" in loss_note
    dev_note = next(note for note in notes if note.startswith("dev/layer1 slope"))
    assert ("§F.4" in dev_note) == (rule == "adam") and ("§C.3" in dev_note) == (rule == "sgd")

    lines = summary_lines(report)
    for metric, fit in slopes.items():
        (line,) = [line for line in lines if line.startswith(f"{metric} slope ")]
        assert (
            f"{fit['slope']:.3f}" in line and f"[{fit['ci_low']:.3f}, {fit['ci_high']:.3f}]" in line
        )
        index = lines.index(line)
        explained = index + 1 < len(lines) and lines[index + 1].startswith("  why: ")
        assert explained == (not fit["contains_expected"]), (metric, lines)
    loss_line = next(i for i, line in enumerate(lines) if line.startswith("loss_gap slope"))
    assert lines[loss_line + 1] == "  why: " + loss_note.split(": ", 1)[1]
    assert not any(line in notes for line in lines)  # each cause printed once, under its slope


def test_a_report_written_before_the_notes_still_prints_the_causes() -> None:
    report = _report("sgd") | {"notes": []}
    lines = summary_lines(report)
    assert sum(line.startswith("  why: ") for line in lines) == 2
