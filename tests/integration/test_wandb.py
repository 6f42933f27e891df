"""W&B in offline mode: a real run's `.wandb` file holds one history row per logged step with the
losses of metrics.jsonl and the resolved config; a resume continues the same W&B run.

wandb 0.31 ships no Python reader for `.wandb` files (its sync runs in the Go `wandb-core`), so
:func:`read_records` decodes the file's LevelDB-style log: a 7-byte header (":W&B", magic 0xBEE1,
version 0), then 32 KiB blocks of chunks, each ``crc32 (uint32 LE) | length (uint16 LE) | type``
followed by the payload; types 1 full, 2 first, 3 middle, 4 last. Payloads are `Record` protos.
"""

from __future__ import annotations

import json
import struct
import zlib
from pathlib import Path

from wandb.proto.wandb_internal_pb2 import Record

from tests.helpers import FAST, read_metrics, run_recipe

HEADER = b":W&B" + struct.pack("<HB", 0xBEE1, 0)
BLOCK, CHUNK_HEADER = 32 * 1024, 7
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def read_records(path: Path) -> list[Record]:
    """Every record of a `.wandb` transaction log, in order; checks the framing and checksums."""
    data = path.read_bytes()
    assert data.startswith(HEADER), data[:len(HEADER)]
    records, parts, pos = [], [], len(HEADER)
    while pos + CHUNK_HEADER <= len(data):
        if BLOCK - pos % BLOCK < CHUNK_HEADER:  # block trailer too short for a chunk: zero padding
            pos += BLOCK - pos % BLOCK
            continue
        crc, length, kind = struct.unpack("<IHB", data[pos:pos + CHUNK_HEADER])
        payload = data[pos + CHUNK_HEADER:pos + CHUNK_HEADER + length]
        pos += CHUNK_HEADER + length
        if kind == 0 and length == 0:  # preallocated zeros at the end of the file
            break
        assert zlib.crc32(payload, zlib.crc32(bytes([kind]))) == crc, f"bad checksum at byte {pos}"
        parts.append(payload)
        if kind in (FULL, LAST):
            records.append(Record.FromString(b"".join(parts)))
            parts = []
    assert not parts, "the log ends inside a record"
    return records


def history(records: list[Record]) -> list[dict]:
    """History rows as {key: value}, keys joined with dots."""
    return [{".".join(item.nested_key) or item.key: json.loads(item.value_json) for item in r.history.item}
            for r in records if r.WhichOneof("record_type") == "history"]


def runs(records: list[Record]) -> list:
    return [r.run for r in records if r.WhichOneof("record_type") == "run"]


def wandb_env(tmp_path: Path) -> dict[str, str]:
    """Offline, silent, and nothing written outside tmp_path."""
    home = str(tmp_path / "wandb-home")
    return {"WANDB_MODE": "offline", "WANDB_SILENT": "true", "WANDB_DISABLE_GIT": "true", "WANDB_DISABLE_CODE": "true",
            "WANDB_CONFIG_DIR": home, "WANDB_CACHE_DIR": home, "WANDB_DATA_DIR": home, "WANDB_API_KEY": ""}


def test_offline_run_history_config_and_resume(tmp_path):
    run_dir = tmp_path / "run"
    args = [*FAST, "logging.log_interval=3", "eval.interval=0", "logging.wandb.enabled=true",
            "logging.wandb.mode=offline", f"run.dir={run_dir}"]
    proc = run_recipe("recipes.pretrain", [*args, "training.steps=12"], timeout=180, env=wandb_env(tmp_path))
    assert proc.returncode == 0, proc.stderr
    metrics = read_metrics(run_dir)
    assert [r["step"] for r in metrics] == [3, 6, 9, 12]

    (log,) = run_dir.glob("wandb/*run-*/run-*.wandb")
    records = read_records(log)
    (run,) = runs(records)
    run_id = (run_dir / "wandb_run_id").read_text().strip()
    assert run.run_id == run_id and log.name == f"run-{run_id}.wandb"
    rows = history(records)
    assert [row["_step"] for row in rows] == [3, 6, 9, 12]
    assert [row["loss"] for row in rows] == [r["loss"] for r in metrics]
    assert [row["tokens"] for row in rows] == [r["tokens"] for r in metrics]
    config = {item.key: json.loads(item.value_json) for item in run.config.update}
    assert config["model"]["dim"] == 64 and config["model"]["name"] == "debug"
    assert config["training"]["steps"] == 12 and config["logging"]["log_interval"] == 3
    assert config["run"]["dir"] == str(run_dir)

    proc = run_recipe("recipes.pretrain", [*args, "training.steps=15"], timeout=180, env=wandb_env(tmp_path))
    assert proc.returncode == 0, proc.stderr
    assert "resumed from" in proc.stdout
    metrics = read_metrics(run_dir)
    assert [r["step"] for r in metrics] == [3, 6, 9, 12, 15]
    assert (run_dir / "wandb_run_id").read_text().strip() == run_id
    logs = sorted(run_dir.glob("wandb/*run-*/run-*.wandb"), key=lambda p: p.parent.name)
    assert len(logs) == 2 and logs[0] == log and all(p.name == f"run-{run_id}.wandb" for p in logs)
    records = read_records(logs[1])
    assert [r.run_id for r in runs(records)] == [run_id]
    rows = history(records)
    assert [row["_step"] for row in rows] == [15]
    assert rows[0]["loss"] == metrics[-1]["loss"]


def test_moe_metrics_and_per_layer_load_histograms(tmp_path):
    run_dir = tmp_path / "run"
    args = [*FAST, "model=moe_debug", "training.steps=2", "logging.log_interval=1", "eval.interval=0",
            "checkpoint.enabled=false", "logging.wandb.enabled=true", "logging.wandb.mode=offline", f"run.dir={run_dir}"]
    proc = run_recipe("recipes.pretrain", args, timeout=180, env=wandb_env(tmp_path))
    assert proc.returncode == 0, proc.stderr
    metrics = read_metrics(run_dir)
    (log,) = run_dir.glob("wandb/*run-*/run-*.wandb")
    rows = history(read_records(log))
    assert [row["moe/load_max_mean"] for row in rows] == [r["moe/load_max_mean"] for r in metrics]
    assert [row["moe/tokens_dropped"] for row in rows] == [0, 0]
    for row, record in zip(rows, metrics):
        for layer, loads in record["moe/expert_load"].items():  # layer -> load per expert, as a bar histogram
            key = f"moe/expert_load/layer_{layer}"  # nested keys come back joined with dots
            assert row[f"{key}._type"] == "histogram" and row[f"{key}.values"] == loads
            assert row[f"{key}.bins"] == list(range(len(loads) + 1))
