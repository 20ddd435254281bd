"""Configuration fingerprints: a saved result is reused only if nothing that determines it changed.

A configuration (nested mappings and sequences of numbers, strings, classes, functions, partials,
dtypes...) is first made *plain*: canonical JSON data (``plain``). Its fingerprint is the SHA-256
of that data's canonical JSON text (sorted keys, no whitespace), so two configurations have the
same fingerprint exactly when their plain forms are equal. ``differences`` names the dotted keys
whose values differ (``model.lr: 0.1 -> 5.0``), for an error message that says what changed.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import inspect
import json
import math
import re
from collections.abc import Mapping
from enum import Enum
from pathlib import PurePath
from typing import Any

import torch

MAX_SHOWN = 60  # characters of one value in a difference line
_ADDRESS = re.compile(r" at 0x[0-9a-fA-F]+")


def qualified_name(obj: Any) -> str:
    """``module.QualifiedName`` of a class or function."""
    return f"{getattr(obj, '__module__', '?')}.{getattr(obj, '__qualname__', repr(obj))}"


def plain(value: Any) -> Any:
    """``value`` as canonical JSON data (module docstring).

    Mappings get string keys; tuples and lists become lists, sets sorted lists; a non-finite
    float becomes its name (``"nan"``, ``"inf"``); classes and functions their qualified name;
    a ``functools.partial`` its function, arguments and keywords; a dtype, device, path or enum
    its string; an object with ``to_config()`` (a network) that config; a dataclass (an init law)
    its class and fields; anything else its ``repr`` without memory addresses.
    """
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else repr(value)
    if isinstance(value, Mapping):
        return {str(key): plain(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(item) for item in value]
    if isinstance(value, (set, frozenset)):
        return sorted((plain(item) for item in value), key=repr)
    if isinstance(value, functools.partial):
        return {
            "callable": plain(value.func),
            "args": plain(value.args),
            "kwargs": plain(value.keywords),
        }
    if inspect.isclass(value) or inspect.isroutine(value):
        return qualified_name(value)
    if isinstance(value, (torch.dtype, torch.device, PurePath, Enum)):
        return str(value)
    to_config = getattr(value, "to_config", None)
    if callable(to_config):
        return plain(to_config())
    if dataclasses.is_dataclass(value):
        fields = {f.name: getattr(value, f.name) for f in dataclasses.fields(value)}
        return {"class": qualified_name(type(value)), **plain(fields)}
    return _ADDRESS.sub("", repr(value))


def canonical_json(value: Any) -> str:
    """The canonical JSON text of ``plain(value)`` (sorted keys, no whitespace)."""
    return json.dumps(plain(value), sort_keys=True, separators=(",", ":"), allow_nan=False)


def fingerprint(value: Any) -> str:
    """SHA-256 (hex) of ``canonical_json(value)``."""
    return hashlib.sha256(canonical_json(value).encode()).hexdigest()


def _flatten(value: Any, prefix: str, out: dict[str, Any]) -> None:
    if isinstance(value, Mapping) and value:
        for key, item in value.items():
            _flatten(item, f"{prefix}.{key}" if prefix else str(key), out)
    elif isinstance(value, list) and value and any(isinstance(v, (Mapping, list)) for v in value):
        for index, item in enumerate(value):
            _flatten(item, f"{prefix}[{index}]", out)
    else:
        out[prefix] = value


def _shown(value: Any) -> str:
    text = json.dumps(value, sort_keys=True)
    return text if len(text) <= MAX_SHOWN else text[: MAX_SHOWN - 3] + "..."


def differences(old: Any, new: Any) -> list[str]:
    """``"key: old -> new"`` for every dotted key whose plain values differ, in key order.

    A key present on one side only shows ``(absent)`` on the other.
    """
    before: dict[str, Any] = {}
    after: dict[str, Any] = {}
    _flatten(plain(old), "", before)
    _flatten(plain(new), "", after)
    lines = []
    for key in sorted(before.keys() | after.keys()):
        if before.get(key, ...) != after.get(key, ...):
            was = _shown(before[key]) if key in before else "(absent)"
            now = _shown(after[key]) if key in after else "(absent)"
            lines.append(f"{key or '(whole)'}: {was} -> {now}")
    return lines
