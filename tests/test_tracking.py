"""--wandb_project: the real wandb client in offline mode, its run file read back; a tracking failure does not
stop training. Skipped where wandb, an optional dependency, is not installed."""
import dataclasses
import json
import struct
import subprocess

import pytest

import train_gpt
from conftest import config_args, cpu_env, tiny_config, trainer_command
from tools.logs import parse_log, printed_log_path

wandb = pytest.importorskip("wandb")


def records(path):
    """The protobuf records of a .wandb run file: after a 7-byte header, LevelDB's log format (32 KiB blocks
    of chunks, each with a 7-byte header: CRC, length, and whether it is a whole record or a part)."""
    from wandb.proto import wandb_internal_pb2
    data, block, pos, parts = path.read_bytes(), 1 << 15, 7, []
    assert data[:4] == b":W&B"
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # the block's tail is padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        parts.append(data[pos + 7:pos + 7 + length])
        pos += 7 + length
        if kind in (1, 4):  # a whole record, or its last part
            record = wandb_internal_pb2.Record()
            record.ParseFromString(b"".join(parts))
            parts = []
            yield record


def run(cfg, tmp_path, **env):
    result = subprocess.run([*trainer_command(1), *config_args(cfg)], capture_output=True, text=True, timeout=600,
                            env={**cpu_env(), "WANDB_SILENT": "true", "WANDB_DIR": str(tmp_path), **env})
    assert result.returncode == 0, result.stderr[-3000:]
    return parse_log(printed_log_path(result.stdout)), result


def test_offline_run_holds_the_config_and_every_step_line(char_shards, tmp_path):
    cfg = tiny_config(char_shards, tmp_path, wandb_project="speedrun-test")
    log, _ = run(cfg, tmp_path, WANDB_MODE="offline")
    run_dir = log.path.parent
    (run_file,) = run_dir.glob("wandb/offline-run-*/run-*.wandb")
    history, config, name = {}, {}, None
    for record in records(run_file):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            name, project = record.run.display_name, record.run.project
            config.update({i.key: i.value_json for i in record.run.config.update})
        elif kind == "config":
            config.update({i.key: i.value_json for i in record.config.update})
        elif kind == "history":
            items = {i.key or "/".join(i.nested_key): i.value_json for i in record.history.item}
            history.setdefault(int(items["_step"]), {}).update(items)
    assert name == run_dir.name and project == "speedrun-test"
    assert {k: v for k, v in config.items() if not k.startswith("_")} == {
        k: json.dumps(v) for k, v in dataclasses.asdict(cfg).items()}
    for step in log.steps:  # every step line of the log, with its values
        logged = history[step.step]
        assert float(logged[step.kind]) == pytest.approx(step.loss, abs=5e-5)
        if step.kind == "train_loss":
            assert float(logged["train_time_ms"]) == pytest.approx(step.train_time_ms, abs=0.5)
    assert sorted(history) == sorted({s.step for s in log.steps})


def test_a_tracking_failure_does_not_stop_training(char_shards, tmp_path):
    """Online mode with no API key and no network: wandb.init fails, the run says so once and trains on."""
    cfg = tiny_config(char_shards, tmp_path, wandb_project="speedrun-test")
    log, result = run(cfg, tmp_path, WANDB_MODE="online", WANDB_API_KEY="", WANDB_BASE_URL="http://127.0.0.1:9",
                      WANDB_INIT_TIMEOUT="20")
    notes = [line for line in result.stdout.splitlines() if line.startswith("wandb: could not start")]
    assert len(notes) == 1 and notes[0].endswith("tracking stops, training goes on"), result.stdout[-2000:]
    assert notes[0] in log.path.read_text()
    assert log.val[-1].step == cfg.steps


def test_tracking_needs_the_package(char_shards, tmp_path, monkeypatch):
    import importlib.util
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    cfg = tiny_config(char_shards, tmp_path, wandb_project="x")
    with pytest.raises(train_gpt.UserError, match=r"wandb_project: the wandb package is not installed \(pip install"):
        train_gpt.validate(cfg, 1)


def test_a_failure_while_logging_ends_the_tracking_only():
    class Broken:
        def log(self, metrics, step):
            raise OSError(28, "No space left on device")

    said = []
    tracker = train_gpt.Tracker(train_gpt.PRESETS["cpu-shakespeare"], 0, None, said.append)
    tracker.run = Broken()
    assert tracker(7, train_loss=2.0) >= 0 and tracker.run is None
    assert tracker(8, train_loss=1.9) == 0.0  # and nothing more is tried
    assert said == ["wandb: could not log step 7 (OSError: [Errno 28] No space left on device); tracking stops, "
                    "training goes on"]
