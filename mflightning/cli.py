"""The ``mfl`` command: a LightningCLI for :class:`MeanFieldModule`.

Usage: ``mfl fit --config recipes/demo_gaussians.yaml``.

The optimizer is injected into the model (``model.init_args.optimizer``) so it always receives the
mean-field param groups; a top-level ``optimizer:``/``lr_scheduler:`` entry, which LightningCLI
would apply to ``model.parameters()``, is refused (design.md §3).
"""

from __future__ import annotations

from lightning.pytorch import LightningDataModule
from lightning.pytorch.cli import LightningCLI

from mflightning.module import MeanFieldModule

TOP_LEVEL_OPTIMIZER_MESSAGE = (
    "a top-level `{key}:` entry would train model.parameters() without the mean-field lr "
    "multipliers. Put it under the model instead, e.g.\n"
    "  model:\n    init_args:\n      optimizer:\n        class_path: torch.optim.SGD\n"
    "(and `scheduler:` for an lr scheduler)."
)


class MeanFieldCLI(LightningCLI):
    """LightningCLI that refuses optimizer entries bypassing the mean-field param groups."""

    def _add_configure_optimizers_method_to_model(self, subcommand: str | None) -> None:
        for key in ("optimizer", "lr_scheduler"):
            if self._get(self.config_init, key) is not None:
                self._parser(subcommand).error(TOP_LEVEL_OPTIMIZER_MESSAGE.format(key=key))


def main(args: list[str] | None = None) -> None:
    """Entry point of the ``mfl`` console script."""
    MeanFieldCLI(
        MeanFieldModule,
        LightningDataModule,
        subclass_mode_data=True,
        args=args,
        save_config_kwargs={"overwrite": True},
    )


if __name__ == "__main__":
    main()
