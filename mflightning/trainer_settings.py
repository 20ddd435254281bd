"""Which Trainer settings of a recipe a width sweep honours, and which it refuses (§F.6).

A sweep builds every run's ``Trainer`` itself (one device, its own logger and tracking callback,
exactly ``max_steps`` optimizer steps) and integrates one limit for all of them. A recipe's
trainer setting is therefore one of:

* honoured (``HONOURED``): passed to every run's Trainer, followed by the limit pass, and
  recorded in the recipe and its fingerprint: ``accelerator``, ``precision``,
  ``deterministic`` and ``accumulate_grad_batches`` (the limit steps once per optimizer step on
  the accumulated batches);
* refused when it is not at its default (``REFUSED``): settings that change the training of a
  run and that the sweep cannot honour: gradient clipping (no limit common to all widths),
  several devices or a distributed strategy, a time or epoch limit that ends runs before
  ``max_steps``, changes of the batch sequence, and callbacks or plugins;
* every other key (loggers, progress bars, validation cadence, checkpointing, profiling) changes
  what is shown or saved, not the training, and is left to ``mfl fit``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

HONOURED = ("accelerator", "precision", "deterministic", "accumulate_grad_batches")
"""The trainer settings every run of a sweep (and its limit) follows."""

_ONE_DEVICE = "a sweep trains every run in one process on one device"


def _is_default(*defaults: Any) -> Callable[[Any], bool]:
    return lambda value: any(value == d and type(value) is type(d) for d in defaults)


REFUSED: dict[str, tuple[Callable[[Any], bool], str]] = {
    "gradient_clip_val": (
        lambda value: not value,
        "clipping acts on the raw gradients, whose norm shrinks like N^-1/2 under the "
        "mean-field parametrization, so it clips narrow networks and not wide ones and the "
        "training has no limit common to all widths (docs/theory.md §F.6); remove it (lower "
        "model.lr instead)",
    ),
    "strategy": (
        _is_default(None, "auto"),
        f"{_ONE_DEVICE}; remove it (run a DDP training with `mfl fit`)",
    ),
    "devices": (
        lambda value: (
            _is_default(None, "auto", 1, "1")(value)
            or (isinstance(value, (list, tuple)) and len(value) == 1)
        ),
        f"{_ONE_DEVICE}; remove it or set trainer.devices=1 (run a DDP training with `mfl fit`)",
    ),
    "num_nodes": (_is_default(None, 1), f"{_ONE_DEVICE}; remove it"),
    "max_epochs": (
        _is_default(None, -1),
        "a sweep runs exactly trainer.max_steps optimizer steps; remove max_epochs and set "
        "max_steps",
    ),
    "max_time": (
        lambda value: value is None,
        "a time limit would end runs of different widths at different steps; remove it",
    ),
    "fast_dev_run": (
        lambda value: not value,
        "a sweep runs exactly trainer.max_steps steps; remove it (try --widths 8,16 --seeds 2)",
    ),
    "overfit_batches": (
        lambda value: not value,
        "it changes the batch sequence the limit is integrated on; remove it",
    ),
    "limit_train_batches": (
        _is_default(None, 1.0),
        "it changes the batch sequence the limit is integrated on; remove it (use a smaller "
        "training set in data:)",
    ),
    "reload_dataloaders_every_n_epochs": (
        lambda value: not value,
        "it changes the batch sequence the limit is integrated on; remove it",
    ),
    "callbacks": (
        lambda value: not value,
        "a sweep runs its own tracking callback only, and a recipe callback may change the "
        "training; remove trainer.callbacks (or run them with `mfl fit`)",
    ),
    "plugins": (lambda value: not value, "a sweep does not run trainer plugins; remove them"),
}
"""``{key: (accepts the value, why a sweep refuses another value and what to do)}``."""


def sweep_trainer_kwargs(config: Mapping[str, Any]) -> dict[str, Any]:
    """The ``HONOURED`` settings of a recipe's ``trainer:`` section, after refusing ``REFUSED``.

    Args:
        config: the trainer configuration (every key of ``Trainer``, at its default or not).

    Returns:
        ``{key: value}`` for the honoured keys that are set (not ``None``; and
        ``accumulate_grad_batches`` only above 1, so recipes without it keep their fingerprint).

    Raises:
        ValueError: one line naming the first refused setting, its value, why and what to do.
    """
    for key, (accepted, why) in REFUSED.items():
        value = config.get(key)
        if not accepted(value):
            raise ValueError(f"trainer.{key}={value!r} cannot be honoured by a sweep: {why}.")
    kwargs = {key: config[key] for key in HONOURED if config.get(key) is not None}
    if kwargs.get("accumulate_grad_batches") == 1:  # the default: not part of the recipe
        del kwargs["accumulate_grad_batches"]
    return kwargs
