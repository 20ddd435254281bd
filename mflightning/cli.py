"""The ``mfl`` command: a LightningCLI for ``MeanFieldModule``, plus ``mfl sweep``.

Usage::

    mfl fit --config recipes/demo_gaussians.yaml
    mfl sweep --config recipes/demo_gaussians.yaml --widths 32,64,128,256 --seeds 8 --out runs/x

The optimizer is injected into the model (the recipe's ``model.optimizer``) so it always gets the
mean-field param groups; a top-level ``optimizer:``/``lr_scheduler:`` entry, which LightningCLI
would apply to ``model.parameters()``, is refused. A recipe's ``sweep:`` section
(``SweepSettings``) is read by ``mfl sweep`` and ignored by ``mfl fit``.
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

from jsonargparse import Namespace
from lightning.pytorch import LightningDataModule
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from mflightning.module import MeanFieldModule
from mflightning.report import summary_lines
from mflightning.sweep import SweepSettings, WidthSweep
from mflightning.wandb_logging import offline_hint

TOP_LEVEL_OPTIMIZER_MESSAGE = (
    "a top-level `{key}:` entry would train model.parameters() without the mean-field lr "
    "multipliers. Put it under the model instead, e.g.\n"
    "  model:\n    optimizer:\n      class_path: torch.optim.SGD\n"
    "(and `scheduler:` for an lr scheduler)."
)
SWEEP_FLAGS = (
    "widths",
    "seeds",
    "out",
    "particles",
    "every_n_steps",
    "probe_size",
    "wandb",
    "limit",
)
SWEEP_TRAINER_KEYS = ("accelerator", "precision", "deterministic")
RECIPE_KEYS = ("seed_everything", "model", "data")  # with the sweep's own: what a run depends on


class MeanFieldCLI(LightningCLI):
    """LightningCLI that refuses optimizer entries bypassing the mean-field param groups."""

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        """Add the recipe's ``sweep:`` section."""
        parser.add_class_arguments(SweepSettings, "sweep")

    def before_instantiate_classes(self) -> None:
        """Refuse a ``sweep:`` section that is not a mapping (jsonargparse keeps or drops it)."""
        config = self.config[self.subcommand] if self.subcommand else self.config
        section = config.get("sweep")
        fields = {f.name for f in dataclasses.fields(SweepSettings)}
        if not isinstance(section, Namespace) or not fields <= set(section.keys()):
            got = (
                "it is not one (a sweep flag on the command line replaced it)"
                if isinstance(section, Namespace)
                else f"got {section!r}"
            )
            self._parser(self.subcommand).error(
                "the recipe's `sweep:` section must be a mapping of sweep settings, e.g. "
                f"`sweep: {{widths: [32, 64], seeds: 4}}`; {got}."
            )

    def _add_configure_optimizers_method_to_model(self, subcommand: str | None) -> None:
        for key in ("optimizer", "lr_scheduler"):
            if self._get(self.config_init, key) is not None:
                self._parser(subcommand).error(TOP_LEVEL_OPTIMIZER_MESSAGE.format(key=key))


def _sweep_arguments(argv: list[str]) -> list[str]:
    """Rewrite ``--widths 64,128`` (and the other sweep flags) as ``--sweep.widths=[64,128]``."""
    rewritten: list[str] = []
    args = iter(argv)
    for arg in args:
        flag, has_value, value = arg.partition("=")
        name = flag.removeprefix("--")
        if flag.startswith("--") and name in SWEEP_FLAGS:
            value = value if has_value else next(args, "")
            value = f"[{value}]" if name == "widths" and not value.startswith("[") else value
            rewritten.append(f"--sweep.{name}={value}")
        else:
            rewritten.append(arg)
    return rewritten


def sweep(argv: list[str]) -> dict[str, object]:
    """``mfl sweep``: run a recipe over widths x seeds coupled to one limit; print the result."""
    cli = MeanFieldCLI(
        MeanFieldModule,
        LightningDataModule,
        subclass_mode_data=True,
        args=_sweep_arguments(argv),
        run=False,
        save_config_callback=None,
    )
    trainer_config = cli.config.trainer
    steps = trainer_config.max_steps
    if steps is None or steps < 1:
        cli.parser.error(
            "a sweep needs `trainer.max_steps` >= 1 in the recipe or on the command line."
        )
    trainer_kwargs = {
        key: trainer_config[key]
        for key in SWEEP_TRAINER_KEYS
        if trainer_config.get(key) is not None
    }
    config_files = cli.config.get("config") or []
    name = Path(str(config_files[0])).stem if config_files else "sweep"
    settings: SweepSettings = cli.config_init.sweep
    config = cli.config.as_dict()
    recipe = {key: config.get(key) for key in RECIPE_KEYS}
    runner = WidthSweep(
        cli.model, cli.datamodule, steps, settings, trainer_kwargs, name=name, recipe=recipe
    )
    report = runner.run()
    print(f"report: {runner.out / 'report.json'} (figures, curves.csv beside it)")
    hint = offline_hint(runner.wandb_mode, runner.out)
    if hint:
        print(hint)
    for line in summary_lines(report):
        print(line)
    return report


def main(args: list[str] | None = None) -> None:
    """Entry point of the ``mfl`` console script."""
    argv = list(sys.argv[1:] if args is None else args)
    if argv and argv[0] == "sweep":
        sweep(argv[1:])
        return
    MeanFieldCLI(
        MeanFieldModule,
        LightningDataModule,
        subclass_mode_data=True,
        args=argv,
        save_config_kwargs={"overwrite": True},
    )


if __name__ == "__main__":
    main()
