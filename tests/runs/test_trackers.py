"""W&B (offline, no account) and TensorBoard get the config, the plan, the metrics and a gallery of
answers with images; W&B the adapter as an artifact when asked. Both read back from their files."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from tests.helpers import ROOT, TINY_RUN


def train_in_subprocess(tmp_path, *overrides: str, **env: str) -> subprocess.CompletedProcess:
    run_env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    run_env.update(env)
    args = [
        *TINY_RUN,
        f"model.tiny.cache_dir={tmp_path / 'tiny'}",
        f"run_dir={tmp_path / 'run'}",
        "name=trackers",
        *overrides,
    ]
    out = subprocess.run(
        [sys.executable, str(ROOT / "train.py"), *args],
        cwd=tmp_path,
        env=run_env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.returncode == 0, (out.stdout + out.stderr)[-3000:]
    return out


def wandb_records(path) -> list:
    """The records of an offline run's ``.wandb`` file, parsed with W&B's own protobuf schema.

    The file is a 7-byte header (``:W&B``, magic, version) and then LevelDB's log format: 32 KiB
    blocks of chunks (crc 4, length 2, type 1: full, first, middle, last).
    """
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B"
    block, pos, pending, chunks = 32768, 7, b"", []
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a chunk header is padding
            pos += block - pos % block
            continue
        length, kind = int.from_bytes(data[pos + 4 : pos + 6], "little"), data[pos + 6]
        chunk, pos = data[pos + 7 : pos + 7 + length], pos + 7 + length
        if kind == 1:
            chunks.append(chunk)
        elif kind in (2, 3):
            pending += chunk
        elif kind == 4:
            chunks.append(pending + chunk)
            pending = b""
    records = []
    for chunk in chunks:
        record = wandb_internal_pb2.Record()
        record.ParseFromString(chunk)
        records.append(record)
    return records


def test_wandb_offline_run_holds_config_plan_metrics_gallery_and_adapter(tmp_path):
    out = train_in_subprocess(
        tmp_path,
        "logger=wandb",
        "logger.log_model=true",
        WANDB_MODE="offline",
        WANDB_SILENT="true",
        HOME=str(tmp_path),  # no ~/.netrc, no API key: no account at all
    )
    run_dir = tmp_path / "run"
    [offline] = list((run_dir / "wandb").glob("offline-run-*"))
    assert f"wandb sync {offline}" in out.stdout  # how to upload it later

    records = wandb_records(next(offline.glob("run-*.wandb")))
    [config] = [r.config for r in records if r.HasField("config")]
    values = {u.key: json.loads(u.value_json) for u in config.update}
    assert values["config"]["peft"]["method"] == "lora" and values["plan"]["total_gb"] > 0  # the config and the plan

    history_keys = {
        item.key or "/".join(item.nested_key) for r in records if r.HasField("history") for item in r.history.item
    }
    assert {"train/loss", "val/accuracy"} <= history_keys  # the metrics

    artifacts = {r.artifact.type: r.artifact for r in records if r.HasField("artifact")}
    gallery = {e.path for e in artifacts["run_table"].manifest.contents}  # W&B keeps a table with media as an artifact
    assert "val/gallery.table.json" in gallery
    images = [p for p in gallery if p.startswith("media/images/") and p.endswith(".png")]
    [table_file] = list((offline / "files" / "media" / "table" / "val").glob("gallery_*.table.json"))
    table = json.loads(table_file.read_text())
    assert table["columns"] == ["step", "image", "question", "prediction", "reference", "right", "type"]
    # one card per answer; W&B stores each distinct image once (easy-VQA asks several questions per image)
    assert 1 <= len(images) <= len(table["data"]) <= 16
    assert all(row[2] and row[4] for row in table["data"])  # a question and its reference

    adapter = artifacts["model"]  # logger.log_model=true
    assert adapter.name == "trackers-adapter"
    assert {"adapter_model.safetensors", "adapter_config.json"} <= {e.path for e in adapter.manifest.contents}


def test_tensorboard_gets_the_scalars_the_gallery_and_the_plan(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    train_in_subprocess(tmp_path, "logger=tensorboard")
    events = EventAccumulator(str(tmp_path / "run" / "logs"), size_guidance={"images": 0, "tensors": 0})
    events.Reload()
    tags = events.Tags()
    assert {"train/loss", "val/accuracy"} <= set(tags["scalars"])
    gallery = [t for t in tags["images"] if t.startswith("val/gallery/")]
    assert 1 <= len(gallery) <= 16
    image = events.Images(gallery[0])[-1]
    assert image.width > 0 and image.encoded_image_string[:4] == b"\x89PNG"
    assert "val/gallery/text_summary" in tags["tensors"] and "plan/text_summary" in tags["tensors"]
    text = events.Tensors("val/gallery/text_summary")[-1].tensor_proto.string_val[0].decode()
    assert "| question | prediction | reference | right |" in text
