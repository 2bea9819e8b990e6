"""Read back what an offline W&B run wrote, for tests.

An offline run stores its records in ``run-<id>.wandb``: a 7-byte header (":W&B", a 2-byte key,
a version byte), then LevelDB-log framed protobuf ``Record`` messages in 32 KiB blocks (each
chunk: 4-byte checksum, 2-byte little-endian length, 1-byte type FULL/FIRST/MIDDLE/LAST).
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

BLOCK = 32 * 1024
HEADER = 7
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def iter_record_bytes(path: Path):
    data = Path(path).read_bytes()
    assert data[:4] == b":W&B", f"{path} is not a wandb run file"
    pos, pending = HEADER, b""
    while pos + 7 <= len(data):
        room = BLOCK - pos % BLOCK
        if room < 7:  # block trailer padding
            pos += room
            continue
        _checksum, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        chunk = data[pos + 7: pos + 7 + length]
        pos += 7 + length
        if kind == 0 and length == 0:
            pos += BLOCK - pos % BLOCK if pos % BLOCK else 0
            continue
        if kind == FULL:
            yield chunk
        elif kind == FIRST:
            pending = chunk
        elif kind == MIDDLE:
            pending += chunk
        elif kind == LAST:
            yield pending + chunk
            pending = b""


def read_offline_run(run_dir: Path) -> dict:
    """``{"job_type", "group", "history": [dict], "summary": dict, "config": dict, "artifacts": [dict],
    "used": [dict]}`` of one offline run folder; an artifact: ``{"name", "type", "files"}`` (its paths)."""
    from wandb.proto import wandb_internal_pb2 as pb

    (run_file,) = Path(run_dir).glob("run-*.wandb")
    out = {"job_type": None, "group": None, "history": [], "summary": {}, "config": {}, "artifacts": [], "used": []}
    for raw in iter_record_bytes(run_file):
        record = pb.Record()
        record.ParseFromString(raw)
        kind = record.WhichOneof("record_type")
        if kind == "run":
            out["job_type"], out["group"] = record.run.job_type, record.run.run_group
        elif kind == "history":
            out["history"].append({i.key or "/".join(i.nested_key): json.loads(i.value_json)
                                   for i in record.history.item})
        elif kind == "config":
            for item in record.config.update:
                out["config"][item.key or "/".join(item.nested_key)] = json.loads(item.value_json)
        elif kind == "artifact":
            out["artifacts"].append({"name": record.artifact.name, "type": record.artifact.type,
                                     "files": sorted(entry.path for entry in record.artifact.manifest.contents)})
        elif kind == "use_artifact":
            out["used"].append({"name": record.use_artifact.name, "type": record.use_artifact.type})
        elif kind == "summary":
            for item in record.summary.update:
                out["summary"][item.key or "/".join(item.nested_key)] = json.loads(item.value_json)
    return out


def offline_runs(project_root: Path) -> list[Path]:
    return sorted((Path(project_root) / "wandb" / "wandb").glob("offline-run-*"))
