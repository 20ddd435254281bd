"""The demo's numbers quoted in README.md, docs/index.md and docs/recipes.md are the demo's own.

``docs/demo_numbers.json`` holds the numbers of the demo sweep (``make demo``, i.e.
``mfl sweep --config recipes/demo_gaussians.yaml``) as the pages quote them: the output-gap slope
and its interval, the limit's training loss at the start and at the end, the probe accuracy of
the widest networks. The fast test checks every quote of the pages against the file; the slow one
runs the demo (about 1.5 min on 2 CPU cores) and checks the file against its report. After a
change to the demo, regenerate the file from a fresh report and update the pages:

    mfl sweep --config recipes/demo_gaussians.yaml --out runs/demo
    python tests/test_fresh_clone_demo_numbers.py runs/demo/report.json
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
NUMBERS = ROOT / "docs" / "demo_numbers.json"
DEMO = ROOT / "recipes" / "demo_gaussians.yaml"
# page -> the heading of its demo section (None: the whole page quotes the demo only)
PAGES = {
    ROOT / "README.md": None,
    ROOT / "docs" / "index.md": None,
    ROOT / "docs" / "recipes.md": "## `demo_gaussians.yaml`",
}
NUMBER = r"(-?\d+\.\d+)"
QUOTES = {  # what a page quotes -> the keys of demo_numbers.json it must equal
    "slope": (
        re.compile(
            rf"output[-_ ]gap slope(?: at the final step)? {NUMBER}, (\d+%) interval "
            rf"\[{NUMBER}, {NUMBER}\]"
        ),
        ("output_gap_slope", "confidence", "output_gap_ci_low", "output_gap_ci_high"),
    ),
    "loss": (
        re.compile(rf"loss falls from {NUMBER} to {NUMBER}"),
        ("initial_limit_loss", "final_limit_loss"),
    ),
    "accuracy": (re.compile(rf"probe accuracy reaches {NUMBER}"), ("probe_accuracy",)),
}
CONSOLE_SLOPE = re.compile(  # a slope line of the console (mflightning.report.slope_line)
    rf"^([\w/]+) slope (?:at the final step|\([^)]*\)) {NUMBER}, \d+% interval "
    rf"\[{NUMBER}, {NUMBER}\]",
    re.MULTILINE,
)


def demo_numbers(report: dict[str, Any]) -> dict[str, Any]:
    """The demo's numbers from its ``report.json``, formatted as the pages quote them."""
    fit = report["slopes"]["output_gap"]
    losses = report["limit"]["train_loss"]
    widest = str(max(report["fitted_widths"]))
    return {
        "output_gap_slope": f"{fit['slope']:.3f}",
        "confidence": f"{fit['confidence']:.0%}",
        "output_gap_ci_low": f"{fit['ci_low']:.3f}",
        "output_gap_ci_high": f"{fit['ci_high']:.3f}",
        "initial_limit_loss": f"{losses[0]:.2f}",
        "final_limit_loss": f"{losses[-1]:.3f}",
        "probe_accuracy": f"{report['per_width'][widest]['accuracy']:.2f}",
        "slopes": {  # every slope `mfl sweep` prints (README.md shows its console)
            metric: [f"{s['slope']:.3f}", f"{s['ci_low']:.3f}", f"{s['ci_high']:.3f}"]
            for metric, s in report["slopes"].items()
        },
        "widths": report["widths"],
        "seeds": report["seeds"],
        "particles": report["particles"],
        "steps": report["steps"],
    }


def _demo_text(page: Path, heading: str | None) -> str:
    """The page's text (its demo section only, if ``heading``), with Unicode minus signs as '-'."""
    text = page.read_text()
    if heading is not None:
        text = text.split(heading, 1)[1].split("\n## ", 1)[0]
    return text.replace("−", "-")


def test_every_demo_number_quoted_in_the_docs_is_the_committed_one() -> None:
    numbers = json.loads(NUMBERS.read_text())
    for page, heading in PAGES.items():
        text = _demo_text(page, heading)
        for name, (pattern, keys) in QUOTES.items():
            quotes = pattern.findall(text)
            assert quotes, f"{page.name} no longer quotes the demo's {name}"
            for quote in quotes:
                quote = (quote,) if isinstance(quote, str) else quote
                expected = tuple(numbers[key] for key in keys)
                assert quote == expected, f"{page.name} quotes {quote}, the demo gives {expected}"
        for metric, *quote in CONSOLE_SLOPE.findall(text):
            expected = numbers["slopes"][metric]
            assert quote == expected, f"{page.name} prints {metric} {quote}, the demo {expected}"


def test_the_committed_numbers_are_of_the_demo_recipe() -> None:
    """The sweep settings of the file are the recipe's: a changed recipe needs a new demo run."""
    numbers = json.loads(NUMBERS.read_text())
    recipe = yaml.safe_load(DEMO.read_text())
    sweep = recipe["sweep"]
    assert numbers["widths"] == sweep["widths"] and numbers["seeds"] == sweep["seeds"]
    assert numbers["particles"] == sweep["particles"]
    assert numbers["steps"] == recipe["trainer"]["max_steps"]


@pytest.mark.slow
def test_the_committed_numbers_are_those_of_a_fresh_demo_run(tmp_path: Path) -> None:
    from mflightning.cli import sweep

    report = sweep(["--config", str(DEMO), "--out", str(tmp_path / "demo"), "--wandb", "disabled"])
    assert demo_numbers(report) == json.loads(NUMBERS.read_text())


if __name__ == "__main__":  # python tests/test_fresh_clone_demo_numbers.py runs/demo/report.json
    demo_report = json.loads(Path(sys.argv[1]).read_text())
    NUMBERS.write_text(json.dumps(demo_numbers(demo_report), indent=2) + "\n")
    print(f"wrote {NUMBERS}")
