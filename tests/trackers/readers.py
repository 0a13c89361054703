"""Reading a tracker's run back with the library's own reader, as one shape for the tests:
`Readback(run_ids, config, metrics={key: {step: [values in logged order]}}, tables={(split, step): rows})`.

- TensorBoard: `EventAccumulator` (what `tensorboard --logdir` serves).
- wandb: the offline run's `.wandb` transaction logs, decoded with wandb's own protobuf `Record` (wandb
  0.31 ships no Python reader; the framing is the LevelDB log format its files use, checksums verified),
  and its table files.
- MLflow: `MlflowClient` on the tracking store (`load_table` for the tables).
- Trackio: its `SQLiteStorage` and `Api`, in a subprocess (Trackio fixes its store directory at import).
"""

from __future__ import annotations

import json
import struct
import subprocess
import sys
import time
import zlib
from collections import defaultdict
from pathlib import Path
from typing import Any

import attrs
import yaml


@attrs.define
class Readback:
    run_ids: set[str]
    config: dict[str, Any]
    metrics: dict[str, dict[int, list[float]]]
    tables: dict[tuple[str, int], list[dict[str, Any]]]


def _metrics() -> dict[str, dict[int, list[float]]]:
    return defaultdict(lambda: defaultdict(list))


def tensorboard(run_dir: Path) -> Readback:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"scalars": 0, "tensors": 0})
    events.Reload()
    metrics = _metrics()
    for tag in events.Tags()["scalars"]:
        for event in events.Scalars(tag):
            metrics[tag][event.step].append(event.value)
    tables = {}
    for tag in events.Tags()["tensors"]:
        if tag.startswith("generations/"):
            split = tag.split("/")[1]
            for event in events.Tensors(tag):
                tables[(split, event.step)] = _markdown_rows(event.tensor_proto.string_val[0].decode())
    text = events.Tensors("config/text_summary")[-1].tensor_proto.string_val[0].decode()  # as last resumed
    config = yaml.safe_load(text.removeprefix("```yaml\n").removesuffix("```"))
    return Readback({str(run_dir / "tensorboard")}, config, metrics, tables)


def _markdown_rows(text: str) -> list[dict[str, Any]]:
    header, _, *rows = text.splitlines()
    columns = [c.strip() for c in header.strip("|").split("|")]
    return [dict(zip(columns, (c.strip() for c in row.strip("|").split(" | ")))) for row in rows]


# ---- wandb ---------------------------------------------------------------------------------------

BLOCK = 32 * 1024
HEADER = struct.Struct("<4sHB")  # ":W&B", magic 0xBEE1, version 0
RECORD = struct.Struct("<IHB")  # crc32, length, type (1 full, 2 first, 3 middle, 4 last)


def wandb_records(path: Path) -> list[Any]:
    """Every record of a `.wandb` file, as wandb's protobuf `Record`s."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    ident, magic, version = HEADER.unpack_from(data)
    assert (ident, magic, version) == (b":W&B", 0xBEE1, 0), (ident, magic, version)
    records, pending, pos = [], b"", HEADER.size
    while pos + RECORD.size <= len(data):
        left = BLOCK - pos % BLOCK
        if left < RECORD.size:
            pos += left
            continue
        crc, length, kind = RECORD.unpack_from(data, pos)
        if length == 0 and kind == 0:
            pos += left  # zero padding up to the block's end
            continue
        chunk = data[pos + RECORD.size:pos + RECORD.size + length]
        assert zlib.crc32(chunk, zlib.crc32(bytes([kind]))) & 0xFFFFFFFF == crc, f"bad checksum at {pos}"
        pos += RECORD.size + length
        pending = chunk if kind in (1, 2) else pending + chunk
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            records.append(record)
    return records


def finished_records(path: Path, timeout: float = 30.0) -> list[Any]:
    """The records of a run file once its `exit` record is written (wandb's service may still be writing
    when `finish()` returns)."""
    deadline = time.monotonic() + timeout
    while True:
        records = wandb_records(path)
        if any(r.WhichOneof("record_type") == "exit" for r in records) or time.monotonic() > deadline:
            return records
        time.sleep(0.1)


def wandb(run_dir: Path, step_key: str = "trainer/step") -> Readback:
    run_ids, config, metrics, tables = set(), {}, _metrics(), {}
    for run_path in sorted((run_dir / "wandb").glob("offline-run-*")):
        for record in finished_records(next(run_path.glob("run-*.wandb"))):
            kind = record.WhichOneof("record_type")
            if kind == "run":
                run_ids.add(record.run.run_id)
                config.update({item.key: json.loads(item.value_json) for item in record.run.config.update
                               if not item.key.startswith("_")})
            elif kind == "history":
                row: dict[str, Any] = {}
                for item in record.history.item:  # a table is logged as nested keys: (name, field)
                    *outer, leaf = list(item.nested_key) or [item.key]
                    (row.setdefault(outer[0], {}) if outer else row)[leaf] = json.loads(item.value_json)
                step = int(row[step_key])
                for key, value in row.items():
                    if isinstance(value, dict) and value.get("_type") == "table-file":
                        table = json.loads((run_path / "files" / value["path"]).read_text())
                        tables[(key.split("/")[1], step)] = [dict(zip(table["columns"], r)) for r in table["data"]]
                    elif not key.startswith("_") and key != step_key and isinstance(value, (int, float)):
                        metrics[key][step].append(float(value))
    return Readback(run_ids, config, metrics, tables)


# ---- mlflow --------------------------------------------------------------------------------------

def mlflow(run_dir: Path) -> Readback:
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{run_dir.resolve() / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri)
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    metrics, tables, config = _metrics(), {}, {}
    for run in runs:
        for key in run.data.metrics:
            for m in sorted(client.get_metric_history(run.info.run_id, key), key=lambda m: m.timestamp):
                metrics[key][m.step].append(m.value)
        config = yaml.safe_load(Path(client.download_artifacts(run.info.run_id, "config.yaml",
                                                               str(run_dir / "mlflow-read"))).read_text())
        for artifact in client.list_artifacts(run.info.run_id, "generations"):
            split, _, step = Path(artifact.path).stem.rpartition("_step_")
            frame = client.load_table(run.info.experiment_id, artifact.path, run_ids=[run.info.run_id])
            tables[(split, int(step))] = frame.drop(columns=["run_id"], errors="ignore").to_dict("records")
    return Readback({r.info.run_id for r in runs}, config, metrics, tables)


# ---- trackio -------------------------------------------------------------------------------------

TRACKIO_READER = """
import json, sys
from trackio import Api
from trackio.sqlite_storage import SQLiteStorage
project = sys.argv[1]
runs = list(Api().runs(project))
out = {"runs": [r.name for r in runs], "config": runs[-1].config, "logs": SQLiteStorage.get_logs(project, runs[-1].name)}
print(json.dumps(out, default=str))
"""


def trackio(trackio_dir: Path, project: str = "rlcore") -> Readback:
    import os

    proc = subprocess.run([sys.executable, "-c", TRACKIO_READER, project], capture_output=True, text=True,
                          env={**os.environ, "TRACKIO_DIR": str(trackio_dir)}, check=True)
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    metrics, tables = _metrics(), {}
    for row in out["logs"]:
        step = int(row["step"])
        for key, value in row.items():
            if isinstance(value, dict) and value.get("_type") == "trackio.table":
                tables[(key.split("/")[1], step)] = value["_value"]
            elif key not in ("step", "timestamp") and isinstance(value, (int, float)):
                metrics[key][step].append(float(value))
    config = {k: v for k, v in out["config"].items() if not k.startswith("_")}
    return Readback(set(out["runs"]), config, metrics, tables)
