"""Read what wandb wrote offline: the records of a `run-*.wandb` file (LevelDB-log framing of protobufs).

wandb 0.2x+ writes through its Go core and ships no Python reader, so tests parse the file themselves.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

BLOCK = 32 * 1024
FILE_HEADER = 7  # b":W&B", magic 0xBEE1, version 1
RECORD_HEADER = 7  # crc32 (4), length (2), type (1)
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def records(path: Path) -> list[Any]:
    from wandb.proto import wandb_internal_pb2 as pb

    data = path.read_bytes()
    assert data[:4] == b":W&B", f"{path} is not a wandb run file"
    out, pending, pos = [], b"", FILE_HEADER
    while pos + RECORD_HEADER <= len(data):
        room = BLOCK - pos % BLOCK
        if room < RECORD_HEADER:  # block trailer: padding
            pos += room
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + RECORD_HEADER])
        pos += RECORD_HEADER
        chunk, pos = data[pos : pos + length], pos + length
        if kind == 0 and length == 0:
            continue
        pending = chunk if kind in (FULL, FIRST) else pending + chunk
        if kind in (FULL, LAST):
            record = pb.Record()
            record.ParseFromString(pending)
            out.append(record)
    return out


def summarize(run_dir: Path) -> dict[str, Any]:
    """The run's name, group, job type, config keys and the history keys it logged."""
    files = sorted(run_dir.glob("run-*.wandb"))
    assert files, f"no wandb run file under {run_dir}"
    info: dict[str, Any] = {"history_keys": set(), "history_rows": 0, "config": {}}
    for record in records(files[0]):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            info.update(name=record.run.display_name, group=record.run.run_group, job_type=record.run.job_type)
            info["config"].update({i.key: json.loads(i.value_json) for i in record.run.config.update})
        elif kind == "config":
            info["config"].update({i.key: json.loads(i.value_json) for i in record.config.update if i.key})
        elif kind == "history":
            info["history_rows"] += 1
            info["history_keys"] |= {i.key or "/".join(i.nested_key) for i in record.history.item}
    return info
