"""Safe files: atomic writes, checksummed JSON, CRC-checked checkpoints.

* Writes are atomic: a crash mid-write leaves the previous version of the file intact. A full
  disk (or quota) is one ``DiskFullError`` line naming the file; the files already written are
  kept and no temporary file is left, so rerunning the command once space is freed resumes.
* The JSON files mflightning writes carry a sha256 of their canonical payload (key ``"sha256"``);
  ``read_json`` verifies it, so a truncated, damaged or edited file is refused, named, with how
  to recover, instead of being used or failing with a bare ``JSONDecodeError``.
* A checkpoint (a torch zip archive) is CRC-checked before ``torch.load`` reads it
  (``verify_checkpoint``; ``VerifiedCheckpointIO`` for Lightning): torch itself loads an archive
  with flipped bytes without a word.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import tempfile
import zipfile
import zlib
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from lightning.fabric.plugins import CheckpointIO
from lightning.fabric.utilities.types import _PATH

CHECKSUM_KEY = "sha256"
"""The key of a written JSON file that holds the sha256 of the rest of it."""
RECOVER_JSON = (
    "delete it to have it recomputed (in a sweep folder: or rerun with --sweep.overwrite true)"
)
RECOVER_CHECKPOINT = "delete it and resume from an earlier checkpoint, or fit again without it"


FULL_DISK_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})
"""The ``errno`` values of a write that failed for lack of space: a full disk, a full quota."""


class CorruptFileError(ValueError):
    """A file is truncated, damaged or edited: the message names it and how to recover."""


class DiskFullError(OSError, ValueError):
    """A write failed for lack of space (``ENOSPC``) or quota (``EDQUOT``).

    The message names the file, says that the files already written are kept and that rerunning
    the same command resumes once space is freed. A ``ValueError``, so ``mfl`` prints it as one
    line, and still an ``OSError`` with the original ``errno`` (like ``io.UnsupportedOperation``),
    so code that handles ``OSError`` keeps working; the original error is its ``__cause__``.

    Args:
        message: the one-line message.
        cause: the ``OSError`` of the failed write.
    """

    def __init__(self, message: str, cause: OSError) -> None:
        super().__init__(message)
        self.errno = cause.errno  # str() stays the message: strerror and filename are unset


def full_disk_error(error: BaseException) -> OSError | None:
    """The ``OSError`` with ``errno`` ``ENOSPC``/``EDQUOT`` in ``error`` or its causes, if any."""
    seen: list[BaseException] = []
    current: BaseException | None = error
    while current is not None and not any(current is s for s in seen):
        if isinstance(current, OSError) and current.errno in FULL_DISK_ERRNOS:
            return current
        seen.append(current)
        current = current.__cause__ or current.__context__
    return None


def disk_full_message(what: str, error: OSError, kept: str, resume: str) -> str:
    """The one-line message of a write stopped by a full disk or quota.

    ``could not write <what>: the disk is full (<strerror>); <kept>: free some space, then
    <resume>.``
    """
    cause = "the disk quota is exceeded" if error.errno == errno.EDQUOT else "the disk is full"
    reason = error.strerror or str(error)
    return f"could not write {what}: {cause} ({reason}); {kept}: free some space, then {resume}."


WRITE_KEPT = (
    "nothing half-written was left, and the files already written (a sweep's finished runs) "
    "are kept"
)
WRITE_RESUME = "rerun the same command to resume"
CHECKPOINT_KEPT = "the checkpoints already written are kept"
CHECKPOINT_RESUME = "resume from the last one (mfl fit ... --ckpt_path=last)"


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_target(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success rename it over ``path``, else delete it.

    Whatever the block writes to the yielded path appears at ``path`` all at once, or not at all.

    Raises:
        DiskFullError: the disk or the quota is full (``ENOSPC``/``EDQUOT`` while creating,
            writing or renaming the temporary file); the temporary file is removed first.
    """
    path = Path(path)
    tmp: Path | None = None
    try:
        fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        os.close(fd)
        tmp = Path(name)
        yield tmp
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp creates 0600; give the usual permissions
        os.replace(tmp, path)
    except BaseException as error:
        if tmp is not None:
            with contextlib.suppress(OSError):  # keep the error that stopped the write
                tmp.unlink(missing_ok=True)
        full = full_disk_error(error) if isinstance(error, Exception) else None
        if full is not None and not isinstance(error, DiskFullError):
            message = disk_full_message(str(path), full, WRITE_KEPT, WRITE_RESUME)
            raise DiskFullError(message, full) from error
        raise


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write ``text`` to a temporary file beside ``path``, then rename it over ``path``.

    Raises:
        DiskFullError: no space or quota left (see ``atomic_target``).
    """
    with atomic_target(path) as tmp:
        tmp.write_text(text)


def _digest(payload: Mapping[str, Any]) -> str:
    """sha256 of the canonical JSON of ``payload`` (sorted keys, no whitespace)."""
    canonical = json.dumps(payload, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


def atomic_write_json(path: str | Path, data: Mapping[str, Any]) -> None:
    """``atomic_write_text`` of ``data`` as indented JSON, with its checksum under ``"sha256"``.

    The checksum is taken over the payload as ``read_json`` will parse it back (tuples become
    lists, keys strings), so a file read back unchanged always verifies.
    """
    if CHECKSUM_KEY in data:
        raise ValueError(f"`data` must not use the key {CHECKSUM_KEY!r}: it holds the checksum.")
    payload = json.loads(json.dumps(dict(data)))
    text = json.dumps({**payload, CHECKSUM_KEY: _digest(payload)}, indent=2, sort_keys=False)
    atomic_write_text(path, text + "\n")


def read_json(path: str | Path, required: Sequence[str] = ()) -> dict[str, Any]:
    """Parse a JSON file written by ``atomic_write_json``; verify its checksum and keys.

    Parsing JSON never runs code.

    Args:
        path: the file.
        required: top-level keys the payload must have.

    Returns:
        The payload, without its checksum.

    Raises:
        CorruptFileError: the file is not JSON (truncated, damaged), has no or a wrong checksum
            (written by something else, edited, damaged) or lacks a required key; the message
            names the file and how to recover.
    """
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except ValueError as error:  # JSONDecodeError, or bytes that are not text
        raise CorruptFileError(
            f"{path} is not valid JSON ({error}): it is truncated or damaged; {RECOVER_JSON}."
        ) from error
    if not isinstance(data, dict) or not isinstance(data.get(CHECKSUM_KEY), str):
        raise CorruptFileError(
            f"{path} has no {CHECKSUM_KEY} checksum: it was not written by this version of "
            f"mflightning; {RECOVER_JSON}."
        )
    digest = data.pop(CHECKSUM_KEY)
    if digest != _digest(data):
        raise CorruptFileError(
            f"{path} does not match its {CHECKSUM_KEY} checksum: it was edited or damaged after "
            f"it was written; {RECOVER_JSON}."
        )
    missing = [key for key in required if key not in data]
    if missing:
        raise CorruptFileError(f"{path} lacks the keys {missing}; {RECOVER_JSON}.")
    return data


def verify_checkpoint(path: _PATH) -> None:
    """Refuse a truncated or damaged checkpoint archive before ``torch.load`` reads it.

    Checks that a local checkpoint file is a complete zip archive (the format of ``torch.save``)
    whose every entry matches its CRC-32 (``zipfile.ZipFile.testzip``). Paths that are not local
    files (directories of sharded checkpoints, remote URLs) are left to their loader.

    Raises:
        CorruptFileError: naming the file and how to recover.
    """
    local = Path(path)
    if not local.is_file():
        return
    try:
        with zipfile.ZipFile(local) as archive:
            damaged = archive.testzip()
    except (zipfile.BadZipFile, zlib.error, EOFError, NotImplementedError) as error:
        raise CorruptFileError(
            f"checkpoint {local} is not a complete zip archive ({error}): it is truncated or "
            f"damaged; {RECOVER_CHECKPOINT}."
        ) from error
    if damaged is not None:
        raise CorruptFileError(
            f"checkpoint {local} is damaged: its entry {damaged!r} does not match its CRC-32; "
            f"{RECOVER_CHECKPOINT}."
        )


class VerifiedCheckpointIO(CheckpointIO):
    """A Lightning ``CheckpointIO`` that runs ``verify_checkpoint`` before every load.

    Saving, loading and removing are delegated to ``base`` (Lightning's ``TorchCheckpointIO``
    unless the trainer was given another one).

    Args:
        base: the checkpoint IO plugin doing the work.
    """

    def __init__(self, base: CheckpointIO) -> None:
        self.base = base

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: _PATH, storage_options: Any | None = None
    ) -> None:
        """Save through ``base``.

        Raises:
            DiskFullError: the disk or the quota is full (``ENOSPC``/``EDQUOT``), naming the
                checkpoint and how to resume, instead of a bare ``OSError``.
        """
        try:
            self.base.save_checkpoint(checkpoint, path, storage_options)
        except Exception as error:
            full = full_disk_error(error)
            if full is None or isinstance(error, DiskFullError):
                raise
            message = disk_full_message(
                f"checkpoint {path}", full, CHECKPOINT_KEPT, CHECKPOINT_RESUME
            )
            raise DiskFullError(message, full) from error

    def load_checkpoint(
        self, path: _PATH, map_location: Any | None = None, weights_only: bool | None = None
    ) -> dict[str, Any]:
        """``verify_checkpoint(path)``, then load through ``base``."""
        verify_checkpoint(path)
        return self.base.load_checkpoint(path, map_location, weights_only)

    def remove_checkpoint(self, path: _PATH) -> None:
        """Remove through ``base``."""
        self.base.remove_checkpoint(path)

    def teardown(self) -> None:
        """Tear ``base`` down."""
        self.base.teardown()
