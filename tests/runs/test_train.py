"""End to end on the tiny model: the run folder, checkpoints without base weights, resume, bad input."""

import json

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from idefics2_ft.data.records import BadSampleError
from idefics2_ft.tasks.train import train
from tests.helpers import assert_same_adapters

RUN_FILES = {"config.yaml", "metrics.json", "predictions.jsonl", "checkpoints", "adapter", "logs", "train.log"}


def test_train_writes_the_run_folder(tiny_run_cfg, tmp_path):
    cfg = tiny_run_cfg()
    metrics = train(cfg)
    run = tmp_path / "run"
    assert RUN_FILES - {"train.log"} <= {p.name for p in run.iterdir()}
    assert (run / "checkpoints" / "last.ckpt").is_file()
    adapter = {p.name for p in (run / "adapter").iterdir()}
    assert {
        "adapter_config.json",
        "adapter_model.safetensors",
        "processor_config.json",
        "tokenizer.json",
        "chat_template.jinja",
    } <= adapter
    written = json.loads((run / "metrics.json").read_text())
    assert written == pytest.approx(metrics)
    for key in ("val/accuracy", "val/loss", "val/n_questions", "train/steps", "data/skipped"):
        assert key in written, key
    assert written["train/steps"] == 4 and written["val/n_questions"] == 12
    assert {f"val/accuracy/{t}" for t in ("yes/no", "shape", "color")} & set(written)
    assert len((run / "predictions.jsonl").read_text().splitlines()) == 12
    # the adapter holds LoRA weights only
    assert all("lora_" in k for k in load_file(run / "adapter" / "adapter_model.safetensors"))
    # the plan and the phases, with the measured peak beside the plan
    plan = json.loads((run / "plan.json").read_text())
    assert plan["verdict"] and plan["measured_gb"] > 0 and written["memory/measured_gb"] == plan["measured_gb"]
    phases = json.loads((run / "phases.json").read_text())["phases"]
    assert {"data", "load", "fit", "validate", "save"} <= phases.keys() and phases["fit"]["steps"] == 4
    assert written["train/frozen_base_unchanged"] == 1


def test_step_checkpoints_are_kept_when_asked(tiny_run_cfg, tmp_path):
    train(tiny_run_cfg("trainer.keep_step_checkpoints=true", "trainer.checkpoint_every_n_steps=2"))
    names = {p.name for p in (tmp_path / "run" / "checkpoints").iterdir()}
    assert names == {"last.ckpt", "epoch=0-step=2.ckpt", "epoch=0-step=4.ckpt"}


def test_checkpoint_holds_trainable_weights_only(tiny_run_cfg, tmp_path):
    metrics = train(tiny_run_cfg())
    ckpt = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    state = ckpt["state_dict"]
    assert state and all("lora_" in k for k in state)
    assert sum(v.numel() for v in state.values()) == metrics["params/trainable/total"]
    assert ckpt["optimizer_states"] and ckpt["lr_schedulers"] and ckpt["global_step"] == 4


def test_resume_ends_where_the_uninterrupted_run_ends(tiny_run_cfg, tmp_path, monkeypatch):
    common = ("trainer.max_steps=6", "trainer.checkpoint_every_n_steps=3", "peft.dropout=0.1", "eval.at_end=false")
    straight = tiny_run_cfg(*common, run_dir=tmp_path / "straight")
    train(straight)

    from idefics2_ft.training.lightning_module import Idefics2Module

    original = Idefics2Module.training_step

    def crash_at_step_4(self, batch, batch_idx):
        if self.global_step == 4:
            raise RuntimeError("simulated crash")
        return original(self, batch, batch_idx)

    monkeypatch.setattr(Idefics2Module, "training_step", crash_at_step_4)
    interrupted = tiny_run_cfg(*common, run_dir=tmp_path / "resumed")
    with pytest.raises(RuntimeError, match="simulated crash"):
        train(interrupted)
    assert torch.load(tmp_path / "resumed/checkpoints/last.ckpt", weights_only=False)["global_step"] == 4
    monkeypatch.setattr(Idefics2Module, "training_step", original)
    metrics = train(tiny_run_cfg(*common, "resume=true", run_dir=tmp_path / "resumed"))
    assert metrics["train/steps"] == 6
    assert_same_adapters(tmp_path / "straight", tmp_path / "resumed")


def test_show_labels_prints_the_first_batch_and_loads_no_weights(tiny_run_cfg, tmp_path):
    out = train(tiny_run_cfg("debug.show_labels=true"))
    text = out["debug/show_labels"]
    assert "learned tokens" in text and "[<end_of_utterance>]" in text
    assert "[Ass]" not in text and "[<image>]" not in text
    assert not (tmp_path / "run" / "adapter").exists()


def _write_jsonl(folder, records):
    path = folder / "data.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in records) + "\n")
    return path


def _qa(image, answer="red", question="What color?", n_images=1):
    content = [{"type": "image"}] * n_images + [{"type": "text", "text": question}]
    return {
        "images": image if isinstance(image, list) else [image],
        "messages": [
            {"role": "user", "content": content},
            {"role": "assistant", "content": [{"type": "text", "text": answer}]},
        ],
    }


@pytest.fixture
def bad_jsonl(tmp_path):
    folder = tmp_path / "data"
    (folder / "img").mkdir(parents=True)
    Image.new("RGB", (64, 64), "red").save(folder / "img" / "red.png")
    (folder / "img" / "broken.png").write_bytes(b"not a png at all")
    records = [
        _qa("img/red.png"),
        _qa("img/red.png", answer="yes", question="Is it red?"),
        _qa("img/missing.png"),  # missing image file
        _qa("img/broken.png"),  # unreadable image
        {"images": ["img/red.png"], "messages": [{"role": "user", "content": [{"type": "image"}]}]},  # no assistant
        _qa("img/red.png", answer="  "),  # empty answer
        _qa(["img/red.png"], n_images=2),  # more placeholders than images
        _qa("img/red.png", question="And the shape?", answer="circle"),
    ]
    return _write_jsonl(folder, records)


def test_bad_records_are_skipped_and_counted(tiny_run_cfg, bad_jsonl, tmp_path):
    cfg = tiny_run_cfg(
        "data=jsonl",
        f"data.train_file={bad_jsonl}",
        f"data.val_file={bad_jsonl}",
        "data.batch_size=8",
        "data.eval_batch_size=8",
        "trainer.max_steps=1",
        "optim.warmup_steps=0",
    )
    metrics = train(cfg)
    expected = {
        "missing_image": 1,
        "unreadable_image": 1,
        "no_assistant_turn": 1,
        "empty_answer": 1,
        "too_many_placeholders": 1,
    }
    for stage in ("train", "val"):
        for kind, n in expected.items():
            assert metrics[f"data/skipped/{stage}/{kind}"] == n, (stage, kind)
    assert metrics["data/skipped"] == 10
    assert metrics["val/n_questions"] == 3
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["data/skipped"] == 10


def test_bad_record_stops_the_run_naming_its_file_and_line_when_asked(tiny_run_cfg, bad_jsonl):
    cfg = tiny_run_cfg(
        "data=jsonl",
        f"data.train_file={bad_jsonl}",
        f"data.val_file={bad_jsonl}",
        "data.batch_size=8",
        "data.on_bad_sample=raise",
    )
    # record 2 is line 3 of the file; found by the check of every source, before any weight loads
    with pytest.raises(BadSampleError, match=r"data\.jsonl:3: image not found: .*missing\.png"):
        train(cfg)


def test_batch_size_auto_takes_the_largest_batch_the_plan_fits_and_records_it(tiny_run_cfg, tmp_path, caplog):
    import logging

    from omegaconf import OmegaConf

    from idefics2_ft.models import base_config
    from idefics2_ft.planning.batch import largest_batch

    cfg = tiny_run_cfg("data.batch_size=auto", "plan.gpu_gb=0.3", "trainer.max_steps=2")
    expected, plan = largest_batch(cfg, base_config(cfg), "cpu", 0.3)
    assert 1 <= expected < 64 and plan.total_gb <= 0.3  # the budget binds: not simply the largest candidate
    with caplog.at_level(logging.INFO, logger="idefics2_ft"):
        metrics = train(cfg)
    assert OmegaConf.load(tmp_path / "run" / "config.yaml").data.batch_size == expected  # the number, not auto
    assert metrics["train/effective_batch"] == expected
    assert f"data.batch_size=auto: {expected} per device" in caplog.text


def test_an_out_of_memory_step_says_what_the_plan_predicted_and_the_batch_to_use(tiny_run_cfg, tmp_path, monkeypatch):
    import lightning as L

    from idefics2_ft.tasks.train import OutOfMemory

    def oom(*args, **kwargs):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(L.Trainer, "fit", oom)
    with pytest.raises(OutOfMemory, match=r"data.batch_size=4: the plan predicted .* Use data.batch_size=2"):
        train(tiny_run_cfg())
    assert (tmp_path / "run" / "config.yaml").is_file()  # the run folder is kept
