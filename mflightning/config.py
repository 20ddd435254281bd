"""Rebuild networks from plain data (``{"class_path", "init_args"}``), e.g. from checkpoint hparams.

Only classes inside the ``mflightning`` package are built: a checkpoint never makes us import or run
arbitrary code.
"""

from __future__ import annotations

import importlib
from typing import Any

from torch import nn

from mflightning.laws import InitLaw

ALLOWED_PREFIX = "mflightning."
BUILDABLE = (nn.Module, InitLaw)


def build(spec: Any) -> Any:
    """Recursively instantiate ``{"class_path": "mflightning.X", "init_args": {...}}`` dictionaries.

    Raises:
        ValueError: a ``class_path`` points outside the ``mflightning`` package, or to anything
            but a module or init-law class (a function, say).
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
            "layer or init law (functions are never called from saved configs); pass the network "
            "yourself, e.g. MeanFieldModule.load_from_checkpoint(path, network=my_net)."
        )
    return cls(**{key: build(value) for key, value in spec.get("init_args", {}).items()})
