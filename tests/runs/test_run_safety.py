"""A run never looks like a success while it is wrong: divergence stops it, a used run folder is not
reused silently, an extended run follows its new schedule, a stale crash flag says so, and a NaN
adapter is never exported."""

import csv
import math

import pytest
import torch
from safetensors.torch import load_file, save_file

from idefics2_ft.config import ConfigError
from idefics2_ft.tasks.export import NonFiniteWeights, export_run
from idefics2_ft.tasks.train import train
from idefics2_ft.training import Diverged, RehearsedCrash
from idefics2_ft.training.optim import warmup_cosine
from tests.helpers import run_train


def snapshot(folder):
    """Every file under ``folder`` with its bytes."""
    return {p.relative_to(folder): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_divergence_stops_at_once_and_keeps_the_last_good_checkpoint(tiny_run_cfg, tmp_path):
    cfg = tiny_run_cfg(
        "optim.lr=1e20",  # transformers 5.24 saturates at lr 1e6 (the loss stays ln(vocab)); 1e20 overflows
        "optim.warmup_steps=0",
        "trainer.gradient_clip_val=null",
        "trainer.max_steps=20",
        "trainer.checkpoint_every_n_steps=1",
    )
    with pytest.raises(Diverged, match=r"non-finite .* at step \d+ \(lr .*\)") as info:
        train(cfg)
    run = tmp_path / "run"
    step = int(str(info.value).split(" at step ")[1].split(" ")[0])
    assert step < 20  # stopped at once, not after the remaining steps
    assert not (run / "adapter").exists() and not (run / "metrics.json").exists()
    last = run / "checkpoints" / "last.ckpt"
    if last.is_file():  # an earlier step was checkpointed: it holds finite weights only
        assert "the last good checkpoint is" in str(info.value)
        state = torch.load(last, map_location="cpu", weights_only=False)
        assert state["global_step"] <= step
        assert all(torch.isfinite(v).all() for v in state["state_dict"].values())
    assert not list((run / "checkpoints").glob("*-v1.ckpt"))


def test_a_folder_holding_a_run_is_refused_untouched_unless_told(tiny_run_cfg, tmp_path):
    run = tmp_path / "run"
    train(tiny_run_cfg())
    before = snapshot(run)
    with pytest.raises(ConfigError, match="already holds a run .*resume=true.*overwrite=true"):
        train(tiny_run_cfg("seed=1"))
    assert snapshot(run) == before  # not one byte changed

    metrics = train(tiny_run_cfg("seed=1", "overwrite=true"))
    assert metrics["train/steps"] == 4
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["last.ckpt"]  # never last-v1.ckpt
    assert (run / "config.yaml").read_bytes() != before[run.relative_to(run) / "config.yaml"]
    assert "seed: 1" in (run / "config.yaml").read_text()


def test_a_refused_command_leaves_no_folder_and_no_trace(tiny_run_cfg, tmp_path):
    fresh = tmp_path / "fresh"
    out = run_train(f"run_dir={fresh}", "peft=full", "peft.quantize=nf4", expect_ok=False)
    assert out.returncode == 2 and "in the config" in out.stdout + out.stderr
    assert not fresh.exists()

    run = tmp_path / "run"
    train(tiny_run_cfg())
    before = snapshot(run)
    out = run_train(f"run_dir={run}", "peft=full", "peft.quantize=nf4", expect_ok=False)
    assert out.returncode == 2
    assert snapshot(run) == before  # no .hydra/config.yaml rewritten, no log line appended


def _lr_by_step(run):
    with open(run / "logs" / "metrics.csv") as f:
        return {int(r["step"]): float(r["train/lr"]) for r in csv.DictReader(f) if r.get("train/lr")}


def test_extending_a_finished_run_follows_the_new_schedule(tiny_run_cfg, tmp_path):
    run = tmp_path / "run"
    train(tiny_run_cfg("optim.lr=1e-3"))
    lr = _lr_by_step(run)
    assert lr[3] == pytest.approx(1e-3 * warmup_cosine(1, 4)(3))
    train(tiny_run_cfg("optim.lr=1e-3", "trainer.max_steps=8", "resume=true"))
    lr = _lr_by_step(run)
    # the first resumed step runs on the 8-step schedule, not at the 0 the 4-step cosine ended on
    assert lr[4] == pytest.approx(1e-3 * warmup_cosine(1, 8)(4)) and lr[4] > 1e-4
    assert lr[7] == pytest.approx(1e-3 * warmup_cosine(1, 8)(7))
    assert math.isclose(warmup_cosine(1, 4)(4), 0.0, abs_tol=1e-12)  # what the old schedule would have given


def test_resuming_with_the_crash_flag_still_set_says_to_drop_it(tiny_run_cfg, tmp_path):
    with pytest.raises(RehearsedCrash, match="stopping on purpose"):
        train(tiny_run_cfg("debug.crash_at_step=2", "eval.at_end=false"))
    with pytest.raises(RehearsedCrash, match="Drop debug.crash_at_step"):
        train(tiny_run_cfg("debug.crash_at_step=2", "eval.at_end=false", "resume=true"))
    metrics = train(tiny_run_cfg("eval.at_end=false", "resume=true"))
    assert metrics["train/steps"] == 4


def test_export_refuses_a_nan_adapter(tiny_run_cfg, tmp_path):
    run = tmp_path / "run"
    cfg = tiny_run_cfg()
    train(cfg)
    weights = run / "adapter" / "adapter_model.safetensors"
    state = load_file(weights)
    first = sorted(state)[0]
    state[first][0, 0] = float("nan")
    save_file(state, weights)
    cfg.export.adapter_only = True
    with pytest.raises(NonFiniteWeights, match=first.replace(".", r"\.")):
        export_run(cfg)
    assert not (run / "export").exists()


KILL_MID_SAVE = """
import os, signal, sys, torch
from idefics2_ft.training import AtomicCheckpointIO

real_save = torch.save
def dying_save(obj, f, *a, **k):  # write half a checkpoint, then die as `kill -9` does
    real_save({"weights": torch.zeros(1000)}, f)
    f.flush()
    os.kill(os.getpid(), signal.SIGKILL)
torch.save = dying_save
AtomicCheckpointIO().save_checkpoint({"weights": torch.ones(1000), "step": 2}, sys.argv[1])
"""


def test_a_kill_during_a_save_leaves_the_previous_checkpoint_whole(tmp_path):
    import subprocess
    import sys

    from idefics2_ft.training import AtomicCheckpointIO, remove_stale_temp_files

    folder, elsewhere = tmp_path / "run" / "checkpoints", tmp_path / "other_tmp"
    elsewhere.mkdir()
    last = folder / "last.ckpt"
    AtomicCheckpointIO().save_checkpoint({"weights": torch.full((1000,), 7.0), "step": 1}, last)
    env = {"TMPDIR": str(elsewhere), "PATH": "/usr/bin:/bin"}  # $TMPDIR on another folder (cluster case)
    out = subprocess.run([sys.executable, "-c", KILL_MID_SAVE, str(last)], env=env, capture_output=True)
    assert out.returncode == -9
    kept = torch.load(last, weights_only=False)
    assert kept["step"] == 1 and torch.equal(kept["weights"], torch.full((1000,), 7.0))
    partial = [p for p in folder.iterdir() if p.name != "last.ckpt"]
    assert partial and all(".tmp-" in p.name for p in partial)  # the killed save's own file, beside it
    assert remove_stale_temp_files(folder) == partial and sorted(p.name for p in folder.iterdir()) == ["last.ckpt"]


def _saved_steps(monkeypatch):
    from idefics2_ft.training import AtomicCheckpointIO

    steps: list[int] = []
    real = AtomicCheckpointIO.save_checkpoint

    def record(self, checkpoint, path, storage_options=None):
        steps.append(checkpoint["global_step"])
        return real(self, checkpoint, path, storage_options)

    monkeypatch.setattr(AtomicCheckpointIO, "save_checkpoint", record)
    return steps


def test_checkpoints_also_come_by_the_clock(tiny_run_cfg, tmp_path, monkeypatch):
    steps = _saved_steps(monkeypatch)
    train(tiny_run_cfg("trainer.checkpoint_every_n_steps=1000", "trainer.checkpoint_every_n_minutes=null"))
    assert steps == [4]  # only at the end
    steps.clear()
    every_step = ("trainer.checkpoint_every_n_steps=1000", "trainer.checkpoint_every_n_minutes=0.000001")
    train(tiny_run_cfg(*every_step, run_dir=tmp_path / "clock"))
    assert steps[:4] == [1, 2, 3, 4]  # the interval elapses within every step


def test_metrics_csv_keeps_the_steps_before_a_resume(tiny_run_cfg, tmp_path):
    common = ("trainer.checkpoint_every_n_steps=2", "eval.at_end=false")
    with pytest.raises(RehearsedCrash):
        train(tiny_run_cfg(*common, "debug.crash_at_step=3"))
    train(tiny_run_cfg(*common, "resume=true"))
    with open(tmp_path / "run" / "logs" / "metrics.csv") as f:
        steps = [int(r["step"]) for r in csv.DictReader(f) if r.get("train/loss")]
    assert steps == [0, 1, 2, 3]  # each step once: the rows from before the crash, then the resumed one


def test_the_same_seed_gives_the_same_adapter_whether_the_base_was_just_built_or_cached(tiny_run_cfg, tmp_path):
    stage1 = (
        f"model.tiny.cache_dir={tmp_path / 'fresh_cache'}",  # empty: the first run builds the base
        "model.tiny.vision_pretrain_steps=2",
        "model.tiny.pretrain_steps=2",
        "data.max_train_samples=40",
        "peft.dropout=0.1",  # draws from the global stream, as the LoRA init does
        "eval.at_end=false",
    )
    built = train(tiny_run_cfg(*stage1, run_dir=tmp_path / "built"))
    cached = train(tiny_run_cfg(*stage1, run_dir=tmp_path / "cached"))
    assert built["base/wall_s"] > cached["base/wall_s"]  # the first run did build it, the second read it
    a = load_file(tmp_path / "built" / "adapter" / "adapter_model.safetensors")
    b = load_file(tmp_path / "cached" / "adapter" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
