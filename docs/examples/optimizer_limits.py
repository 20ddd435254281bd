"""The coupled output gap against the width under SGD, momentum + cosine, and AdamW (§F).

Runs the three CPU recipes ``demo_gaussians``, ``momentum_cosine`` and ``adam`` as width sweeps
(each run coupled to the limit of its own optimizer, docs/guide/optimizers.md) into
``runs/optimizer_limits/<recipe>`` and draws their final output gaps against N on one log-log
plot, with the fitted slopes: ``docs/optimizer_limits.png``. About 5 minutes on 2 CPU cores.

Run: python docs/examples/optimizer_limits.py
"""

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from mflightning.cli import sweep

ROOT = Path(__file__).resolve().parents[2]
RECIPES = {
    "demo_gaussians": "SGD",
    "momentum_cosine": "SGD, Nesterov 0.9, decay, cosine",
    "adam": "AdamW, warm-up (rule adam)",
}

figure, axes = plt.subplots(figsize=(6, 4.2))
for recipe, label in RECIPES.items():
    out = ROOT / "runs" / "optimizer_limits" / recipe
    report = sweep(
        [
            "--config",
            str(ROOT / "recipes" / f"{recipe}.yaml"),
            "--out",
            str(out),
            "--wandb",
            "disabled",
        ]
    )
    widths = report["fitted_widths"]
    gaps = [report["per_width"][str(w)]["output_gap_rms"] for w in widths]
    fit = report["slopes"]["output_gap"]
    axes.loglog(
        widths,
        gaps,
        "o-",
        label=f"{label}: slope {fit['slope']:.2f} [{fit['ci_low']:.2f}, {fit['ci_high']:.2f}]",
    )
reference = [w**-0.5 * gaps[0] * widths[0] ** 0.5 for w in widths]
axes.loglog(widths, reference, "k--", linewidth=0.8, label="N^-1/2")
axes.set_xlabel("width N")
axes.set_ylabel("output gap to its own limit (RMS over seeds)")
axes.set_title("Coupled output gap vs width, three optimizers (§F)")
axes.legend(fontsize=7)
figure.tight_layout()
figure.savefig(ROOT / "docs" / "optimizer_limits.png", dpi=120)
print(f"wrote {ROOT / 'docs' / 'optimizer_limits.png'}")
