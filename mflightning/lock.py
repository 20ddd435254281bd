"""An exclusive lock on a report folder: one sweep at a time writes into it.

``folder_lock`` holds an OS file lock (``fcntl.flock``) on ``<folder>/.lock`` for the duration of
a block and writes the holder (pid, host, start time) into the file. A second process asking for
the same folder is refused with that holder's name. The operating system releases the lock when
its holder exits, however it exits (``kill -9`` and crashes included), so a lock left behind by a
killed sweep is simply taken over by the next one; the file itself stays (removing it while
another process opens it would let two processes lock two different files).

POSIX only: where ``fcntl`` does not exist (Windows) the folder is not locked.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

LOCK_NAME = ".lock"


class FolderLockedError(ValueError):
    """Another live process holds the folder's lock."""


def _holder(fd: int) -> str:
    """The recorded holder of a lock file, as words."""
    os.lseek(fd, 0, os.SEEK_SET)
    try:
        holder = json.loads(os.read(fd, 4096).decode())
        return (
            f"pid {holder['pid']} on host {holder['host']}, started "
            f"{time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(holder['started']))}"
        )
    except (ValueError, KeyError, TypeError):
        return "a process that has not recorded itself yet"


@contextmanager
def folder_lock(folder: Path) -> Iterator[None]:
    """Hold the lock of the report folder ``folder`` (which must exist) for the block.

    See the module docstring.

    Raises:
        FolderLockedError: another live process holds the lock (the message names it).
        ValueError: the lock file cannot be created (the folder is not writable).
    """
    path = folder / LOCK_NAME
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    except OSError as error:
        raise ValueError(
            f"the report folder `out` = {folder} is not writable ({error.strerror}); "
            "choose another with --out."
        ) from None
    try:
        if sys.platform != "win32":
            import fcntl

            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise FolderLockedError(
                    f"another sweep is writing into `out` = {folder} ({_holder(fd)}); wait "
                    "for it to finish, or choose another --out. (The lock is released when "
                    f"that process exits, however it exits: {path} then needs no cleaning.)"
                ) from None
        record = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.time()}
        os.ftruncate(fd, 0)
        os.lseek(fd, 0, os.SEEK_SET)
        os.write(fd, json.dumps(record).encode())
        yield
    finally:
        os.close(fd)  # releases the lock
