"""`train.py --wandb`: Weights & Biases as an optional logger, in its offline mode (no network, no account). What the
run wrote to TensorBoard and metrics.jsonl is in the W&B run file too (read back here with a reader of the file's
record format written for this test: LevelDB's log blocks, W&B's protobuf records), the periodic grid as an image
equal to eval/stepS.png; a resumed run continues the same W&B run; without the package, one line."""

import glob
import json
import os
import struct
import sys

import numpy as np
import pytest
from PIL import Image

from helpers import TINY, only_run_dir, read_metrics, run_train

wandb = pytest.importorskip("wandb")

ENV = {"WANDB_SILENT": "true", "WANDB_DISABLE_GIT": "true"}
ARGS = [*TINY, "--batch_size", "16", "--log_every", "2", "--ckpt_every", "4", "--eval_every", "4",
        "--eval_samples", "20", "--wandb", "--wandb_mode", "offline"]


def wandb_records(path: str) -> list:
    """The records of a .wandb file: a 7-byte header (':W&B', magic, version), then 32 KiB blocks of chunks (crc32
    uint32, length uint16, type uint8: 1 whole, 2 first, 3 middle, 4 last), each record a protobuf Record."""
    from wandb.proto import wandb_internal_pb2

    data = open(path, "rb").read()
    assert data[:4] == b":W&B"
    records, pos, pending = [], 7, b""
    while pos + 7 <= len(data):
        if 32768 - pos % 32768 < 7:  # a block's tail too short for a chunk header is padding
            pos += 32768 - pos % 32768
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if kind == 0:
            break
        pending += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            records.append(record)
            pending = b""
    return records


def history(records) -> dict:
    """step -> {key: value} of the logged rows."""
    rows = {}
    for r in records:
        if r.WhichOneof("record_type") == "history":
            row = {(i.key or "/".join(i.nested_key)): json.loads(i.value_json) for i in r.history.item}
            rows[row["_step"]] = row
    return rows


def test_wandb_offline_holds_the_runs_scalars_grid_and_config(tmp_path):
    r = run_train(*ARGS, "--max_steps", "4", "--outputs", str(tmp_path), env_extra=ENV)
    assert r.returncode == 0, r.stderr[-3000:]
    run_dir = only_run_dir(tmp_path)
    files = glob.glob(os.path.join(run_dir, "wandb", "offline-run-*", "run-*.wandb"))
    assert len(files) == 1
    records = wandb_records(files[0])
    (run,) = [r.run for r in records if r.WhichOneof("record_type") == "run"]
    assert run.display_name == os.path.basename(run_dir) and run.project == "opendit"
    assert run.run_id == open(os.path.join(run_dir, "wandb-run-id")).read()
    config = {u.key: json.loads(u.value_json) for u in run.config.update}
    assert config["model"] == "DiT-N/2" and config["global_batch"] == 16 and config["class_names"][3] == "3"
    rows, metrics = history(records), read_metrics(run_dir)
    for step in (2, 4):
        assert rows[step]["train/loss"] == metrics[step]["loss"]
        assert rows[step]["train/lr"] == metrics[step]["lr"]
    assert rows[4]["train/fid"] == metrics[4]["fid"]
    image = rows[4]["eval/samples/path"]
    logged = np.asarray(Image.open(os.path.join(os.path.dirname(files[0]), "files", image)).convert("RGB"))
    grid = Image.open(os.path.join(run_dir, "eval", "step0000004.png")).convert("RGB")
    assert np.array_equal(logged, np.asarray(grid))


def test_a_resumed_run_continues_its_wandb_run(tmp_path):
    assert run_train(*ARGS, "--max_steps", "2", "--ckpt_every", "2", "--outputs", str(tmp_path),
                     env_extra=ENV).returncode == 0
    run_dir = only_run_dir(tmp_path)
    r = run_train(*ARGS, "--max_steps", "4", "--load", run_dir, env_extra=ENV)
    assert r.returncode == 0, r.stderr[-3000:]
    files = glob.glob(os.path.join(run_dir, "wandb", "offline-run-*", "run-*.wandb"))  # a run file per session
    ids = {[r.run for r in wandb_records(f) if r.WhichOneof("record_type") == "run"][0].run_id for f in files}
    assert len(files) == 2 and ids == {open(os.path.join(run_dir, "wandb-run-id")).read()}
    assert sorted(max(history(wandb_records(f))) for f in files) == [2, 4]  # the first session's steps, the second's


def test_wandb_without_the_package_is_one_line(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb raises ImportError
    r = run_train(*ARGS, "--max_steps", "1", "--outputs", str(tmp_path / "out"))
    assert r.returncode == 2 and r.stderr == ("error: --wandb needs the wandb package (pip install wandb, or pip "
                                              "install -e '.[wandb]')\n"), r.stderr
    assert not (tmp_path / "out").exists()


def test_a_wandb_setting_without_wandb_is_one_line(tmp_path):
    r = run_train(*TINY, "--max_steps", "1", "--wandb_mode", "offline", "--outputs", str(tmp_path / "out"))
    assert r.returncode == 2 and r.stderr == "error: --wandb_mode is a setting of the W&B logger; add --wandb\n"
    assert not (tmp_path / "out").exists()
