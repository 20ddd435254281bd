import numpy as np
import pytest
from scipy import stats

from mflightning import SlopeFit, fit_loglog_slope

WIDTHS = [32, 64, 128, 256, 512]


def test_exact_power_law_gives_exact_slope_and_intercept() -> None:
    values = {n: [3.0 * n**-0.5] * 4 for n in WIDTHS}
    fit = fit_loglog_slope(values)
    assert fit.slope == pytest.approx(-0.5, abs=1e-12)
    assert fit.intercept == pytest.approx(np.log(3.0), abs=1e-12)
    assert fit.ci_low == pytest.approx(-0.5, abs=1e-12)
    assert fit.ci_high == pytest.approx(-0.5, abs=1e-12)


@pytest.mark.parametrize("aggregate", ["rms", "median", "mean"])
def test_matches_scipy_linregress_on_aggregates(aggregate: str) -> None:
    rng = np.random.default_rng(1)
    values = 2.0 * np.array(WIDTHS)[:, None] ** -0.5 * rng.lognormal(0.0, 0.3, (5, 10))
    fit = fit_loglog_slope(WIDTHS, values, aggregate=aggregate)
    reduce = {
        "rms": lambda v: np.sqrt(np.mean(v**2, axis=1)),
        "median": lambda v: np.median(v, axis=1),
        "mean": lambda v: np.mean(v, axis=1),
    }[aggregate]
    ref = stats.linregress(np.log(WIDTHS), np.log(reduce(values)))
    assert fit.slope == pytest.approx(ref.slope, abs=1e-12)
    assert fit.intercept == pytest.approx(ref.intercept, abs=1e-12)
    assert fit.ci_low <= fit.slope <= fit.ci_high
    assert fit.aggregate == aggregate and fit.confidence == 0.9


def test_bootstrap_interval_covers_the_true_slope() -> None:
    """c N^{-1/2} x lognormal noise, 8 seeds: the 90% CI contains -1/2 in most replications."""
    covered, widths = [], []
    for rep in range(40):
        rng = np.random.default_rng(100 + rep)
        values = {n: 0.7 * n**-0.5 * rng.lognormal(0.0, 0.4, 8) for n in WIDTHS}
        fit = fit_loglog_slope(values, n_boot=400, seed=rep)
        covered.append(fit.contains(-0.5))
        widths.append(fit.ci_high - fit.ci_low)
    assert np.mean(covered) >= 0.75
    assert 0.05 < np.median(widths) < 0.5


def test_ragged_seeds_and_determinism() -> None:
    values = [[0.2, 0.25, 0.18], [0.15, 0.14], [0.1, 0.11, 0.09, 0.1]]
    fit = fit_loglog_slope([16, 64, 256], values, seed=3)
    assert isinstance(fit, SlopeFit) and fit.slope < 0
    assert fit == fit_loglog_slope([16, 64, 256], values, seed=3)
    assert fit_loglog_slope([16, 64, 256], [0.2, 0.1, 0.05]).slope == pytest.approx(-0.5)


@pytest.mark.parametrize(
    ("args", "kwargs", "argument"),
    [
        (([32], [[1.0]]), {}, "`widths`"),
        (([32, 32], [[1.0], [2.0]]), {}, "`widths`"),
        (([32, 64], [[1.0], [0.0]]), {}, "`values`"),
        (([32, 64], [[1.0], [np.nan]]), {}, "`values`"),
        (([32, 64], [[1.0]]), {}, "`values`"),
        (([32, 64],), {}, "`values`"),
        (({32: [1.0], 64: [0.5]}, [[1.0]]), {}, "`values`"),
        (([32, 64], [[1.0], [0.5]]), {"aggregate": "max"}, "`aggregate`"),
        (([32, 64], [[1.0], [0.5]]), {"n_boot": 0}, "`n_boot`"),
        (([32, 64], [[1.0], [0.5]]), {"confidence": 1.0}, "`confidence`"),
    ],
)
def test_bad_arguments(args: tuple, kwargs: dict, argument: str) -> None:
    with pytest.raises(ValueError, match=argument):
        fit_loglog_slope(*args, **kwargs)
