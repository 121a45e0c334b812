"""The optional metrics sinks write what metrics.jsonl has: the TensorBoard event file and
the W&B offline run are read back and their scalars compared."""

from __future__ import annotations

import json
import struct
import time

import pytest

from asyncrl.metrics import MetricsLogger

ROWS = {1: {"train/reward_mean": 0.25, "eval/accuracy": 0.5}, 2: {"train/reward_mean": 0.75, "loss/total": -0.125}}


def log_rows(run_dir, **sinks) -> None:
    m = MetricsLogger(run_dir, total_steps=2, console=False, **sinks)
    for step, metrics in ROWS.items():
        m.log(step, metrics)
    m.close()
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [{k: v for k, v in r.items() if k not in ("step", "time_s")} for r in rows] == list(ROWS.values())


def test_tensorboard_event_file_has_the_scalars(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    log_rows(tmp_path, tensorboard=True)
    ea = EventAccumulator(str(tmp_path / "tensorboard"))
    ea.Reload()
    assert sorted(ea.Tags()["scalars"]) == ["eval/accuracy", "loss/total", "train/reward_mean"]
    assert [(e.step, e.value) for e in ea.Scalars("train/reward_mean")] == [(1, 0.25), (2, 0.75)]
    assert [(e.step, e.value) for e in ea.Scalars("eval/accuracy")] == [(1, 0.5)]
    assert [(e.step, e.value) for e in ea.Scalars("loss/total")] == [(2, -0.125)]


def wandb_records(path) -> list[bytes]:
    """The protobuf records of a W&B ``.wandb`` file: a 7-byte ``:W&B`` header, then
    LevelDB's log format (32 KiB blocks, each record ``crc32, length, type`` and a
    payload split FIRST / MIDDLE / LAST across blocks, or FULL)."""
    data, block, out, pending = path.read_bytes(), 32768, [], b""
    assert data[:4] == b":W&B", data[:8]
    pos = 7
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        payload, pos = data[pos + 7 : pos + 7 + length], pos + 7 + length
        if kind == 1:
            out.append(payload)
        elif kind in (2, 3):
            pending = (pending if kind == 3 else b"") + payload
        elif kind == 4:
            out.append(pending + payload)
    return out


def test_wandb_offline_run_has_the_history(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    from wandb.proto import wandb_internal_pb2

    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_DISABLE_GIT", "true")
    log_rows(tmp_path, wandb=True, config={"learner": {"lr": 1e-4}})
    (run_file,) = tmp_path.glob("wandb/offline-run-*/run-*.wandb")
    # wandb-core (its own process) may still be writing the transaction log when finish()
    # returns: on a loaded machine the history records landed after it (seen once)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and b"_step" not in run_file.read_bytes():
        time.sleep(0.2)
    history, config = {}, {}
    for payload in wandb_records(run_file):
        rec = wandb_internal_pb2.Record()
        rec.ParseFromString(payload)
        kind = rec.WhichOneof("record_type")
        if kind == "history":
            items = {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in rec.history.item}
            history[items.pop("_step")] = {k: v for k, v in items.items() if not k.startswith("_")}
        elif kind == "run":
            config = {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in rec.run.config.update}
    assert history == ROWS
    assert config["learner"] == {"lr": 1e-4}, config
