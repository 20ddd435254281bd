"""The ``mfl`` command: a LightningCLI for ``MeanFieldModule``, plus ``mfl sweep``.

Usage::

    mfl sweep --config recipes/demo_gaussians.yaml --widths 32,64,128,256 --seeds 8 --out runs/x
    mfl fit --config recipes/demo_gaussians.yaml
    mfl test --config recipes/demo_gaussians.yaml --ckpt_path path/to.ckpt

The optimizer is injected into the model (the recipe's ``model.optimizer``) so it always gets the
mean-field param groups; a top-level ``optimizer:``/``lr_scheduler:`` entry, which LightningCLI
would apply to ``model.parameters()``, is refused. A recipe's ``sweep:`` section
(``SweepSettings``) is read by ``mfl sweep`` and ignored by ``mfl fit``.

``mfl predict`` saves the outputs in ``predictions.pt`` under the log directory and prints its
path (``PredictionFile``).

User errors (a bad recipe, flag or file) print one line ``error: ...`` on stderr and exit with
code 2; ``--debug`` (or ``MFL_DEBUG=1``) shows the traceback instead. Ctrl-C prints how to resume
and exits with code 130.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import difflib
import errno
import importlib
import inspect
import os
import re
import signal
import sys
import threading
import traceback
from collections.abc import Iterator, Sequence
from pathlib import Path
from types import FrameType
from typing import Any

import torch
import yaml
from jsonargparse import Namespace
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch import LightningDataModule, LightningModule, Trainer
from lightning.pytorch.callbacks import BasePredictionWriter
from lightning.pytorch.cli import ArgsType, LightningArgumentParser, LightningCLI
from lightning.pytorch.utilities.model_helpers import is_overridden
from torch import Tensor

from mflightning.guards import DivergenceError
from mflightning.io import atomic_target, verify_checkpoint
from mflightning.limit.memory import tightest_limit
from mflightning.module import MeanFieldModule
from mflightning.report import summary_lines
from mflightning.sweep import SweepSettings, WidthSweep
from mflightning.trainer_settings import sweep_trainer_kwargs
from mflightning.wandb_logging import offline_hint

TOP_LEVEL_OPTIMIZER_MESSAGE = (
    "a top-level `{key}:` entry would train model.parameters() without the mean-field lr "
    "multipliers; put it under the model instead, e.g. "
    "`model: {{optimizer: {{class_path: torch.optim.SGD}}}}` (and `scheduler:` for an lr "
    "scheduler)."
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
SUBCOMMANDS = {
    "sweep": "train a recipe over widths x seeds, every run coupled to one infinite-width "
    "limit; report the gaps and their slopes",
    "fit": "train a recipe (a Lightning fit with the mean-field learning rates)",
    "validate": "evaluate a model or checkpoint on the validation split (loss, accuracy, mf_time)",
    "test": "evaluate a model or checkpoint on the test split (the validation split if none)",
    "predict": "the network's outputs on the predict split (the validation inputs if none), "
    "saved to predictions.pt under the log directory",
}
USER_ERRORS: tuple[type[BaseException], ...] = (
    ValueError,  # mflightning's refusals, jsonargparse's validation, corrupt files
    argparse.ArgumentError,  # jsonargparse parse errors (the parsers do not exit on error)
    FileNotFoundError,  # a missing recipe or data set
    MisconfigurationException,  # Lightning's refusals of a configuration
    DivergenceError,  # the lr is too large for the recipe
)
DEBUG_ENV = "MFL_DEBUG"
KEY_PATTERN = re.compile(r'Parser key "([^"]+)":\s*')
CLASS_PATH_PATTERN = re.compile(r"Problem with given class_path '([^']+)':\s*\n\s*(.+)")
CLASS_PATTERN = re.compile(r"<class '([\w.]+)'>")


class MeanFieldArgumentParser(LightningArgumentParser):
    """A parser that raises ``argparse.ArgumentError`` instead of printing usage and exiting.

    ``main`` turns the error into one line; ``--help`` still prints and exits normally.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("exit_on_error", False)
        super().__init__(*args, **kwargs)


RECIPE_KEYS = ("seed_everything", "model", "data")  # with the sweep's own: what a run depends on


class PredictionFile(BasePredictionWriter):
    """Saves ``mfl predict``'s outputs in ``<trainer.log_dir>/predictions.pt`` (``torch.save``).

    The file holds the batches' outputs concatenated along the batch dimension: one tensor, or a
    list of tensors with several predict dataloaders. With several processes each writes its own
    ``predictions-rank<k>.pt``. The write is atomic (``mflightning.io.atomic_target``).

    Attributes:
        written: ``(path, description)`` of the file written, ``None`` before.
    """

    def __init__(self) -> None:
        super().__init__(write_interval="epoch")
        self.written: tuple[Path, str] | None = None

    def write_on_epoch_end(
        self,
        trainer: Trainer,
        pl_module: LightningModule,
        predictions: Sequence[Any],
        batch_indices: Sequence[Any],
    ) -> None:
        """Concatenate each dataloader's batches along the batch dimension and save them."""
        loaders = [predictions] if len(trainer.num_predict_batches) == 1 else predictions
        outputs = [
            torch.cat(list(batches)) if all(isinstance(b, Tensor) for b in batches) else batches
            for batches in loaders
        ]
        if not outputs:
            return
        rank = "" if trainer.world_size == 1 else f"-rank{trainer.global_rank}"
        path = Path(trainer.log_dir or trainer.default_root_dir) / f"predictions{rank}.pt"
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_target(path) as tmp:
            torch.save(outputs[0] if len(outputs) == 1 else outputs, tmp)
        shapes = ", ".join(
            f"shape {tuple(o.shape)}" if isinstance(o, Tensor) else f"{len(o)} batches"
            for o in outputs
        )
        self.written = (path, shapes)


def _recipe_files(config: Any) -> list[Any]:
    """The recipe files given with ``--config``, as the YAML data they hold."""
    return [
        yaml.safe_load(path.read_text()) if hasattr(path, "read_text") else None
        for path in config.get("config") or []
    ]


def _given_init_args(recipes: list[Any], argv: list[str], key: str) -> set[str]:
    """The init args of ``model.<key>`` that a recipe file or a flag sets explicitly.

    Read from the recipes' ``model.<key>.init_args`` and from ``--model.<key>.init_args.X``,
    ``--model.<key>.X`` and ``--model.<key>={class_path: ..., init_args: {...}}`` flags.
    """
    given: set[str] = set()

    def from_value(value: Any) -> None:
        if isinstance(value, dict) and isinstance(value.get("init_args"), dict):
            given.update(value["init_args"])

    for recipe in recipes:
        model = recipe.get("model") if isinstance(recipe, dict) else None
        if isinstance(model, dict):
            from_value(model.get(key))
    prefix = f"--model.{key}"
    args = iter(argv)
    for arg in args:
        flag, has_value, value = arg.partition("=")
        if flag == prefix:
            with contextlib.suppress(yaml.YAMLError):
                from_value(yaml.safe_load(value if has_value else next(args, "")))
        elif flag.startswith(prefix + "."):
            name = flag.removeprefix(prefix + ".").removeprefix("init_args.")
            if name != "class_path":
                given.add(name.split(".")[0])
    return given


def _reset_carried_init_args(config: Any, key: str, recipes: list[Any], argv: list[str]) -> None:
    """Set the init args of ``model.<key>`` that nobody gave to its class's own defaults."""
    model = config.get("model") if config is not None else None
    entry = model.get(key) if isinstance(model, Namespace) else None
    if not isinstance(entry, Namespace) or not isinstance(entry.get("init_args"), Namespace):
        return
    module_name, _, name = str(entry.get("class_path", "")).rpartition(".")
    try:
        signature = inspect.signature(getattr(importlib.import_module(module_name), name))
    except (ImportError, AttributeError, TypeError, ValueError):
        return
    given = _given_init_args(recipes, argv, key)
    for arg, value in list(vars(entry.init_args).items()):
        parameter = signature.parameters.get(arg)
        if arg in given or parameter is None or parameter.default is parameter.empty:
            continue
        if value != parameter.default:
            entry.init_args[arg] = parameter.default


class MeanFieldCLI(LightningCLI):
    """LightningCLI for mean-field recipes.

    Refuses optimizer entries bypassing the mean-field param groups and a malformed ``sweep:``
    section, CRC-checks ``--ckpt_path`` before Lightning reads its hyperparameters, and lets
    ``test``/``predict`` fall back on the validation split of a data module without one.
    """

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        """Add the recipe's ``sweep:`` section."""
        parser.add_class_arguments(SweepSettings, "sweep")

    def parse_arguments(self, parser: LightningArgumentParser, args: ArgsType) -> None:
        """Parse, then refuse a damaged ``ckpt_path`` before anything loads it."""
        given = sys.argv[1:] if args is None else args if isinstance(args, list) else []
        self._args_given = [str(arg) for arg in given]
        super().parse_arguments(parser, args)
        subcommand = self.config.get("subcommand")
        ckpt_path = self.config[subcommand].get("ckpt_path") if subcommand else None
        if ckpt_path:
            verify_checkpoint(ckpt_path)

    def instantiate_trainer(self, **kwargs: Any) -> Trainer:
        """Lightning's trainer, with a trainer setting it refuses turned into one line.

        Raises:
            ValueError: the ``trainer:`` section cannot build a Trainer (``devices: -1`` on a
                CPU, an accelerator this machine lacks...), naming Lightning's reason.
        """
        try:
            return super().instantiate_trainer(**kwargs)
        except (TypeError, ValueError, RuntimeError, MisconfigurationException) as error:
            raise ValueError(
                f"the recipe's trainer: section cannot build a Trainer: {error} Fix "
                "trainer.accelerator / trainer.devices / trainer.strategy (e.g. "
                "--trainer.accelerator=cpu --trainer.devices=1)."
            ) from None

    def before_instantiate_classes(self) -> None:
        """Refuse a non-mapping ``sweep:`` section; drop init args carried over from a class.

        jsonargparse keeps the init args a recipe or flag did not set when a ``class_path``
        changes (the default ``torch.optim.SGD``'s ``lr=0.001, weight_decay=0.0`` into an
        ``AdamW``, whose own default decay is 0.01): ``_reset_carried_init_args``.
        """
        config = self.config[self.subcommand] if self.subcommand else self.config
        recipes = _recipe_files(config)
        for key in ("optimizer", "scheduler"):
            _reset_carried_init_args(config, key, recipes, self._args_given)
        sections = [config.get("sweep")]
        sections += [r["sweep"] for r in recipes if isinstance(r, dict) and "sweep" in r]
        for section in sections:
            if not isinstance(section, (Namespace, dict)):
                fields = ", ".join(f.name for f in dataclasses.fields(SweepSettings))
                self.parser.error(
                    f"the recipe's `sweep:` section must be a mapping of sweep settings "
                    f"({fields}), got {section!r}; write e.g. "
                    "`sweep: {widths: [32, 64], seeds: 4}`."
                )

    def _add_configure_optimizers_method_to_model(self, subcommand: str | None) -> None:
        for key in ("optimizer", "lr_scheduler"):
            if self._get(self.config_init, key) is not None:
                self._parser(subcommand).error(TOP_LEVEL_OPTIMIZER_MESSAGE.format(key=key))

    def _validation_split_for(self, method: str) -> None:
        """Give the data module ``<method>`` = ``val_dataloader`` when it defines none."""
        datamodule = self.datamodule
        if datamodule is not None and not is_overridden(method, datamodule, LightningDataModule):
            setattr(datamodule, method, datamodule.val_dataloader)

    def before_test(self) -> None:
        """Test on the validation split when the data module has no test split."""
        self._validation_split_for("test_dataloader")

    def before_predict(self) -> None:
        """Predict on the validation inputs when the data module has no predict split.

        Adds a ``PredictionFile`` writer, so the outputs are saved under the log directory.
        """
        self._validation_split_for("predict_dataloader")
        self._prediction_file = PredictionFile()
        self.trainer.callbacks.append(self._prediction_file)  # type: ignore[attr-defined]

    def after_predict(self) -> None:
        """Say where the predictions were written."""
        written = self._prediction_file.written
        if written is not None and self.trainer.is_global_zero:
            print(f"predictions: {written[0]} ({written[1]}; read with torch.load)")


@contextlib.contextmanager
def _command_line(prog: str, argv: list[str]) -> Iterator[None]:
    """Show ``argv`` to LightningCLI as the command line, with ``prog`` as the program name.

    LightningCLI reads ``sys.argv`` when given no ``args`` (and warns when given both); ``mfl``
    rewrites its arguments (sweep flags, ``--debug``) before parsing, so it presents them there.
    """
    saved = sys.argv
    sys.argv = [prog, *argv]
    try:
        yield
    finally:
        sys.argv = saved


def _cli(prog: str, argv: list[str], **kwargs: Any) -> MeanFieldCLI:
    """A ``MeanFieldCLI`` for ``MeanFieldModule`` and any data module, parsing ``argv``."""
    with _command_line(prog, argv):
        return MeanFieldCLI(
            MeanFieldModule,
            LightningDataModule,
            subclass_mode_data=True,
            parser_class=MeanFieldArgumentParser,
            **kwargs,
        )


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
    cli = _cli("mfl sweep", _sweep_arguments(argv), run=False, save_config_callback=None)
    trainer_config = cli.config.trainer
    steps = trainer_config.max_steps
    if steps is None or steps < 1:
        cli.parser.error(
            "a sweep needs `trainer.max_steps` >= 1 in the recipe or on the command line."
        )
    trainer_kwargs = sweep_trainer_kwargs(trainer_config)
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


def _attribute_docs(cls: type) -> dict[str, str]:
    """``{name: description}`` from the ``Attributes:`` section of a Google-style docstring."""
    docs: dict[str, str] = {}
    name = None
    section = inspect.getdoc(cls) or ""
    section = section.split("Attributes:", 1)[1] if "Attributes:" in section else ""
    for line in section.splitlines():
        entry = re.match(r"^ {4}(\w+): (.*)$", line)
        if entry:
            name = entry.group(1)
            docs[name] = entry.group(2)
        elif name and line.startswith(" " * 8):
            docs[name] += " " + line.strip()
        elif line.strip():
            break
    return docs


def _main_help() -> str:
    """``mfl --help``: every subcommand, one line each, ``sweep`` first."""
    width = max(len(name) for name in SUBCOMMANDS) + 2
    lines = [
        "usage: mfl {" + ",".join(SUBCOMMANDS) + "} [--config RECIPE] [options] [--debug]",
        "",
        "Mean-field networks in Lightning, and their distance to the infinite-width limit.",
        "",
        "subcommands:",
        *(f"  {name:<{width}}{about}" for name, about in SUBCOMMANDS.items()),
        "",
        "Run `mfl <subcommand> --help` for its options. Errors are one line; --debug (or "
        f"{DEBUG_ENV}=1) shows the traceback.",
    ]
    return "\n".join(lines)


def _sweep_help() -> str:
    """``mfl sweep --help``: the sweep flags first, then how to override the recipe."""
    docs = _attribute_docs(SweepSettings)
    rows = []
    for field in dataclasses.fields(SweepSettings):
        flag = f"--{field.name}" if field.name in SWEEP_FLAGS else f"--sweep.{field.name}"
        default = field.default_factory() if callable(field.default_factory) else field.default
        about = docs.get(field.name, "").replace("``", "`")
        rows.append((flag, about if "default" in about else f"{about} (default: {default})"))
    width = max(len(flag) for flag, _ in rows) + 2
    return "\n".join(
        [
            "usage: mfl sweep --config RECIPE [--widths 32,64,128] [--seeds S] [--out DIR] "
            "[--particles M] [--every_n_steps K] [--probe_size P] [--wandb MODE] "
            "[--<recipe key>=VALUE ...] [--debug]",
            "",
            SUBCOMMANDS["sweep"] + ".",
            "The flags override the recipe's `sweep:` section.",
            "",
            "sweep flags:",
            *(f"  {flag:<{width}}{about}" for flag, about in rows),
            "",
            "recipe overrides: every key of the recipe, as in `mfl fit` (`mfl fit --help` lists "
            "them), e.g. --model.lr=0.05 --trainer.max_steps=200 --data.init_args.n_train=512",
        ]
    )


def _one_line(error: BaseException) -> str:
    """The most specific line of an error and of its causes, for ``error: ...``.

    jsonargparse wraps a refusal (say ``Normal``'s "`std` must be >= 0") in several layers of
    union and subclass messages; the innermost line naming an argument in backquotes, as
    mflightning's messages do, is the one that says what is wrong.
    """
    chain: list[BaseException] = []
    current: BaseException | None = error
    while current is not None and current not in chain:
        chain.append(current)
        current = current.__cause__
    key = next((m.group(1) for e in chain if (m := KEY_PATTERN.search(str(e)))), None)
    unimportable = next((m for e in chain if (m := CLASS_PATH_PATTERN.search(str(e)))), None)
    if unimportable is not None:
        return _unimportable_class_path(key, *unimportable.groups())
    for candidate in reversed(chain):
        for line in str(candidate).splitlines():
            text = line.strip().removeprefix("- ").strip()
            if "`" in text:
                return f"{key}: {text}" if key and key not in text else text
    text = CLASS_PATTERN.sub(r"\1", KEY_PATTERN.sub(r"\1: ", str(error)))
    lines = [line.strip() for line in text.splitlines()]
    lines = [line for line in lines if line]
    if not lines:
        return type(error).__name__
    return f"{lines[0]} {lines[1]}" if lines[0].endswith(":") and len(lines) > 1 else lines[0]


def _unimportable_class_path(key: str | None, class_path: str, reason: str) -> str:
    """One line for a ``class_path`` that cannot be imported: the key, the path, the cause, a fix.

    ``reason`` is the import's own error (``No module named 'x'``, ``module 'm' has no attribute
    'C'``, or whatever the module raised while being imported). The closest class of an already
    imported module is suggested; nothing new is imported here.
    """
    module_name, _, name = class_path.rpartition(".")
    module = sys.modules.get(module_name)
    classes = [attr for attr, value in vars(module or object).items() if isinstance(value, type)]
    close = difflib.get_close_matches(name, classes, n=1, cutoff=0.75) if module else []
    hint = f" Did you mean '{module_name}.{close[0]}'?" if close else ""
    where = f"{key}: " if key else ""
    return (
        f"{where}`class_path` {class_path!r} cannot be imported: {reason.strip()}.{hint} Fix "
        "the dotted path (module.Class), or the import error of its module."
    )


_interrupted: int | None = None  # the signal that interrupted the command, if any
EXIT_CODES = {signal.SIGINT: 130, signal.SIGTERM: 143}  # 128 + the signal's number


def _on_interrupt(signum: int, frame: FrameType | None) -> None:
    """SIGINT/SIGTERM handler: remember the signal, raise ``KeyboardInterrupt``.

    Lightning turns the exception into ``sys.exit(1)``; ``main`` reads the remembered signal.
    SIGTERM (what schedulers such as SLURM send) is handled like Ctrl-C, so ``finally`` blocks
    run: no temporary file is left behind and finished runs are kept.
    """
    global _interrupted
    _interrupted = signum
    raise KeyboardInterrupt


def _resume_hint(argv: list[str]) -> str:
    """How to resume after Ctrl-C."""
    if argv and argv[0] == "sweep":
        return "interrupted: rerun the same command to resume: finished runs are kept."
    return (
        "interrupted: rerun the same command with --ckpt_path=last to resume from the last "
        "checkpoint."
    )


def _check_class_path_overrides(argv: list[str]) -> None:
    """Refuse a command-line ``class_path`` override whose class cannot be imported.

    Both forms: ``--<key>.class_path=<path>`` and ``--<key>={class_path: <path>, ...}``.
    jsonargparse crashes with an ``AttributeError`` traceback when such an override replaces a
    recipe's class by one it cannot import (``--model.network.class_path=...MLPP``).

    Raises:
        ValueError: one line naming the key, the path and the import's error.
    """
    args = iter(argv)
    for arg in args:
        flag, has_value, value = arg.partition("=")
        if not flag.startswith("--"):
            continue
        key = flag.removeprefix("--")
        path: object
        if key.endswith(".class_path"):
            key, path = key.removesuffix(".class_path"), value if has_value else next(args, "")
        elif has_value and value.lstrip().startswith("{"):
            try:
                parsed = yaml.safe_load(value)
            except yaml.YAMLError:
                continue
            path = parsed.get("class_path") if isinstance(parsed, dict) else None
            if not isinstance(path, str):
                continue
        else:
            continue
        module_name, _, name = path.rpartition(".")
        try:
            getattr(importlib.import_module(module_name), name)
        except Exception as error:  # any import error is the user's to see
            reason = str(error) or type(error).__name__
            raise ValueError(_unimportable_class_path(key, path, reason)) from None


OUT_OF_MEMORY = (
    "can't allocate memory",
    "cannot allocate memory",
    "out of memory",
    "failed to map segment",
    "defaultcpuallocator",
)


def _resource_error(error: BaseException, argv: list[str]) -> str | None:
    """One line for a full disk or for memory that ran out, from anywhere; ``None`` otherwise.

    The sweep's checks refuse what they can count before training (``WidthSweep``); this is the
    net under them, for what they cannot (allocator overheads, a library's own files).
    """
    chain: list[BaseException] = []
    current: BaseException | None = error
    while current is not None and current not in chain:
        chain.append(current)
        current = current.__cause__ or current.__context__
    resume = (
        "rerun the same command to resume: finished runs are kept"
        if argv and argv[0] == "sweep"
        else "resume from the last checkpoint with --ckpt_path=last"
    )
    for item in chain:
        if isinstance(item, OSError) and item.errno in (errno.ENOSPC, errno.EDQUOT):
            where = f" while writing {item.filename}" if item.filename else ""
            return f"the disk is full ({item.strerror}){where}: free some space, then {resume}."
    for item in chain:
        text = str(item).lower()
        if isinstance(item, MemoryError) or any(sign in text for sign in OUT_OF_MEMORY):
            limit = tightest_limit(torch.device("cpu"))
            lines = str(item).strip().splitlines()
            cause = lines[0][:160] if lines else type(item).__name__
            return (
                f"the process ran out of memory (limited by {limit}): {cause}; use a smaller "
                "--particles, fewer --seeds or narrower --widths (or raise the limit), then "
                f"{resume}."
            )
    return None


def _run(argv: list[str]) -> None:
    """Dispatch ``argv`` (without ``--debug``) to the help, ``sweep`` or LightningCLI."""
    if not argv or argv[0] in ("-h", "--help"):
        print(_main_help())
        return
    _check_class_path_overrides(argv[1:])
    if argv[0] == "sweep":
        if {"-h", "--help"} & set(argv[1:]):
            print(_sweep_help())
            return
        sweep(argv[1:])
        return
    _cli("mfl", argv, save_config_kwargs={"overwrite": True})


def main(args: list[str] | None = None) -> None:
    """Entry point of the ``mfl`` console script.

    Args:
        args: the arguments (default: ``sys.argv[1:]``).

    Raises:
        SystemExit: code 2 after a user error (one line on stderr), 130 after Ctrl-C, 143 after
            SIGTERM (one line saying how to resume).
    """
    global _interrupted
    argv = list(sys.argv[1:] if args is None else args)
    debug = "--debug" in argv or os.environ.get(DEBUG_ENV, "") not in ("", "0")
    argv = [arg for arg in argv if arg != "--debug"]
    _interrupted = None
    main_thread = threading.current_thread() is threading.main_thread()
    previous = {sig: signal.getsignal(sig) for sig in EXIT_CODES}
    if main_thread:  # only the main thread receives signals
        for sig in EXIT_CODES:
            signal.signal(sig, _on_interrupt)
    try:
        _run(argv)
    except (KeyboardInterrupt, SystemExit) as stop:
        if not (isinstance(stop, KeyboardInterrupt) or _interrupted):
            raise
        if debug:
            traceback.print_exc()
        print(_resume_hint(argv), file=sys.stderr)
        raise SystemExit(EXIT_CODES.get(_interrupted or signal.SIGINT, 130)) from None
    except USER_ERRORS as error:
        if debug:
            raise
        print(f"error: {_one_line(error)}", file=sys.stderr)
        raise SystemExit(2) from None
    except (MemoryError, RuntimeError, ImportError, OSError) as error:
        line = _resource_error(error, argv)
        if debug or line is None:
            raise
        print(f"error: {line}", file=sys.stderr)
        raise SystemExit(2) from None
    finally:
        if main_thread:
            for sig, handler in previous.items():
                signal.signal(sig, handler)


if __name__ == "__main__":
    main()
