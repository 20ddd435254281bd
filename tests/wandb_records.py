"""Read the records of an offline W&B run file (``run-<id>.wandb``) back, without wandb's services.

The file is a LevelDB-style log: a 7-byte header (``:W&B``, magic 0xBEE1, version), then 32 KiB
blocks of chunks ``crc32 (4) | length (2, little endian) | type (1) | data``, where type 1 is a
whole record and 2/3/4 are its first/middle/last pieces. Each record is a ``wandb.proto`` Record.
"""

from __future__ import annotations

import struct
import time
from pathlib import Path

from wandb.proto import wandb_internal_pb2

BLOCK = 32 * 1024
HEADER = 7
CHUNK_HEADER = 7
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def read_records(path: Path) -> list[wandb_internal_pb2.Record]:
    """Every record of an offline run file, in order."""
    data = path.read_bytes()
    assert data[:4] == b":W&B", f"{path} is not a W&B run file"
    records, pending, offset = [], b"", HEADER
    while offset + CHUNK_HEADER <= len(data):
        room = BLOCK - offset % BLOCK
        if room < CHUNK_HEADER:  # block trailer padding
            offset += room
            continue
        _, length, kind = struct.unpack("<IHB", data[offset : offset + CHUNK_HEADER])
        if kind == 0 and length == 0:  # zero padding at the end of a block
            offset += room
            continue
        chunk = data[offset + CHUNK_HEADER : offset + CHUNK_HEADER + length]
        offset += CHUNK_HEADER + length
        pending = chunk if kind in (FULL, FIRST) else pending + chunk
        if kind in (FULL, LAST):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            records.append(record)
    return records


def finished_records(path: Path, timeout: float = 30.0) -> list[wandb_internal_pb2.Record]:
    """The records of a finished run, once its ``exit`` record is on disk.

    ``run.finish()`` can return before W&B's service has flushed the file (it may still hold
    only its header), so wait for the log to be complete, up to ``timeout`` seconds.
    """
    deadline = time.monotonic() + timeout
    while True:
        records = read_records(path)
        if any(r.WhichOneof("record_type") == "exit" for r in records):
            return records
        assert time.monotonic() < deadline, f"{path} has no exit record after {timeout} s"
        time.sleep(0.1)


def summarize(path: Path) -> dict:
    """Group, name, config keys, history keys and metric definitions of one finished offline run."""
    run, config, history, metrics = None, {}, set(), {}
    for record in finished_records(path):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            run = record.run
            config.update({item.key: item.value_json for item in record.run.config.update})
        elif kind == "config":
            config.update({item.key: item.value_json for item in record.config.update})
        elif kind == "history":
            history.update(item.key or "/".join(item.nested_key) for item in record.history.item)
        elif kind == "metric":
            name = record.metric.name or record.metric.glob_name
            metrics[name] = record.metric.step_metric
    assert run is not None, f"no run record in {path}"
    return {
        "group": run.run_group,
        "name": run.display_name,
        "job_type": run.job_type,
        "config": config,
        "history": history,
        "metrics": metrics,
    }
