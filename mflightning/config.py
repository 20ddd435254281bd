"""Rebuild networks from plain data (``{"class_path", "init_args"}``), e.g. from checkpoint hparams.

Only classes inside the ``mflightning`` package are built: a checkpoint never makes us import or run
arbitrary code.
"""

from __future__ import annotations

import contextlib
import difflib
import importlib
import inspect
from typing import Any

from torch import nn

from mflightning.laws import InitLaw

ALLOWED_PREFIX = "mflightning."
BUILDABLE = (nn.Module, InitLaw)


def _closest(name: str, candidates: list[str]) -> str:
    """`` Did you mean 'x'?`` for the candidate closest to ``name`` (empty when none is close).

    Dotted paths are compared by their last component, the part a typo is usually in.
    """
    last = {candidate.rpartition(".")[2]: candidate for candidate in candidates}
    match = difflib.get_close_matches(name.rpartition(".")[2], list(last), n=1, cutoff=0.75)
    return f" Did you mean {last[match[0]]!r}?" if match else ""


def _buildable_names(module_name: str) -> list[str]:
    """Dotted paths of the buildable classes in ``module_name`` and in ``mflightning`` itself."""
    names = []
    for name in dict.fromkeys(["mflightning", module_name]):
        with contextlib.suppress(ImportError):
            module = importlib.import_module(name)
            names += [
                f"{name}.{attr}"
                for attr, value in vars(module).items()
                if isinstance(value, type)
                and issubclass(value, BUILDABLE)
                and value.__module__.startswith(ALLOWED_PREFIX)
            ]
    return names


def _check_init_args(cls: type, class_path: str, init_args: Any) -> None:
    """Refuse ``init_args`` that are not a mapping of ``cls``'s constructor arguments."""
    parameters = inspect.signature(cls).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values()):
        return
    if not isinstance(init_args, dict):
        raise ValueError(
            f"`init_args` of {class_path!r} must be a mapping of its arguments, got "
            f"{init_args!r}; write them as `key: value` lines."
        )
    valid = [name for name in parameters if name != "generator"]
    for key in init_args:
        if key not in parameters:
            raise ValueError(
                f"`{key}` is not an argument of {class_path}.{_closest(key, valid)} Valid "
                f"arguments: {', '.join(valid)}."
            )


def build(spec: Any) -> Any:
    """Recursively instantiate ``{"class_path": "mflightning.X", "init_args": {...}}`` dictionaries.

    Raises:
        ValueError: a ``class_path`` points outside the ``mflightning`` package, to anything
            but a module or init-law class (a function, say), or to no class at all (the closest
            name is suggested); or ``init_args`` has a key the class does not take (the closest
            argument and the valid ones are listed).
    """
    if isinstance(spec, list):
        return [build(item) for item in spec]
    if not isinstance(spec, dict):
        return spec
    if "class_path" not in spec:
        return {key: build(value) for key, value in spec.items()}
    class_path = spec["class_path"]
    if not isinstance(class_path, str) or not class_path.startswith(ALLOWED_PREFIX):
        raise ValueError(
            f"refusing to build `class_path` {class_path!r}: only mflightning classes are rebuilt "
            "from saved configs; pass the network yourself, e.g. "
            "MeanFieldModule.load_from_checkpoint(path, network=my_net)."
        )
    module_name, _, class_name = class_path.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module_name), class_name, None)
    except ImportError:
        cls = None
    if not (
        isinstance(cls, type)
        and issubclass(cls, BUILDABLE)
        and cls.__module__.startswith(ALLOWED_PREFIX)
    ):
        raise ValueError(
            f"refusing to build `class_path` {class_path!r}: it is not an mflightning network, "
            f"layer or init law.{_closest(class_path, _buildable_names(module_name))} Functions "
            "are never called from configs; for another network, pass the network yourself, "
            "e.g. MeanFieldModule.load_from_checkpoint(path, network=my_net)."
        )
    init_args = spec.get("init_args", {})
    _check_init_args(cls, class_path, init_args)
    return cls(**{key: build(value) for key, value in init_args.items()})
