"""A mixture of sources and a stream, end to end through ``train.py``: the ``cauldron_qlora`` recipe on a
local Cauldron copy (each subset in its real column layout), a score per source, and exact resumes
after kill -9 (those in the fault tier)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from idefics2_ft.demo import formats
from tests.helpers import IDEFICS2_FT, ROOT, TINY_RUN, run_train

# recipe=cauldron_qlora on the tiny model and the CPU, with the recipe's own mixture and metrics
CAULDRON_TINY = [
    "recipe=cauldron_qlora",
    "model=tiny",
    *TINY_RUN,
    "data.max_val_samples=4",
    "data.longest_edge=64",
    "data.shortest_edge=64",
    "data.train_split='train[4:]'",
    "data.val_split='train[:4]'",
    "data.num_workers=0",
    "trainer.accelerator=cpu",
    "trainer.accumulate_grad_batches=1",
    "trainer.val_check_interval=null",
    "logger=csv",
]

# kill -9 right after the checkpoint of step KILL_AFTER_STEP is on disk
KILL_AFTER_SAVE = """
import os, runpy, signal, sys, torch
from idefics2_ft.training import checkpoints

step = int(os.environ["KILL_AFTER_STEP"])
real_save = torch.save
def save(obj, f, *a, **k):
    real_save(obj, f, *a, **k)
    if isinstance(obj, dict) and obj.get("global_step") == step:
        f.flush()
        os.kill(os.getpid(), signal.SIGKILL)
checkpoints.torch.save = save
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


@pytest.fixture(scope="module")
def cauldron(tmp_path_factory):
    """A local copy of the Cauldron's repository layout: four subsets of 24 rows."""
    return formats.write_cauldron(tmp_path_factory.mktemp("cauldron"), rows=24)


def adapter(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(run_dir / "adapter" / "adapter_model.safetensors")


def killed_then_resumed(tmp_path: Path, overrides: list[str], kill_after: int) -> Path:
    wrapper = tmp_path / "kill_after_save.py"
    wrapper.write_text(KILL_AFTER_SAVE)
    run_dir = tmp_path / "killed"
    env = {**os.environ, "KILL_AFTER_STEP": str(kill_after)}
    command = [sys.executable, str(wrapper), str(ROOT / "train.py"), *overrides, f"run_dir={run_dir}"]
    killed = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert killed.returncode == -9, killed.stderr[-2000:]
    assert not (run_dir / "adapter").exists()
    run_train(*overrides, f"run_dir={run_dir}", "resume=true")
    return run_dir


RESUMABLE = ("trainer.max_steps=6", "trainer.checkpoint_every_n_steps=1", "peft.dropout=0.1", "eval.at_end=false")


def assert_resume_is_exact(tmp_path: Path, overrides: list[str]) -> Path:
    """6 steps straight, and killed after step 3's checkpoint then resumed: the same adapter, bit for bit."""
    overrides = [*overrides, *RESUMABLE]
    run_train(*overrides, f"run_dir={tmp_path / 'straight'}")
    resumed = killed_then_resumed(tmp_path, overrides, kill_after=3)
    a, b = adapter(tmp_path / "straight"), adapter(resumed)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    return resumed


def test_the_recipe_plans_and_lists_what_an_offline_node_needs():
    plan = subprocess.run([IDEFICS2_FT, "plan", "recipe=cauldron_qlora"], capture_output=True, text=True, timeout=300)
    assert plan.returncode == 0, plan.stderr[-2000:]
    assert "Verdict: fits" in plan.stdout
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    train = subprocess.run(
        [IDEFICS2_FT, "train", "recipe=cauldron_qlora", "logger=csv", "run_dir=/tmp/never-made"],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    said = train.stdout + train.stderr
    assert train.returncode != 0
    for subset in ("docvqa", "chartqa", "ai2d", "textvqa"):
        assert f"dataset HuggingFaceM4/the_cauldron [{subset}] (train): split train" in said
    assert "idefics2-ft prefetch recipe=cauldron_qlora" in said
    assert not Path("/tmp/never-made").exists()


def test_the_recipe_trains_and_scores_each_source(cauldron, tmp_path):
    run_dir = tmp_path / "run"
    out = run_train(
        *CAULDRON_TINY, f"data.path={cauldron}", f"model.tiny.cache_dir={tmp_path / 'tiny'}", f"run_dir={run_dir}"
    )
    metrics = json.loads((run_dir / "metrics.json").read_text())
    expected = {"docvqa": "anls", "chartqa": "relaxed_accuracy", "ai2d": "multiple_choice", "textvqa": "vqa_accuracy"}
    for source, metric in expected.items():
        assert f"val/{source}/{metric}" in metrics and metrics[f"val/{source}/n_questions"] == 4
    scores = [metrics[f"val/{s}/{m}"] for s, m in expected.items()]
    assert metrics["val/score"] == pytest.approx(sum(scores) / 4)  # the stated weighting: each source the same
    # the samples each source gave add up to what trained: 4 steps of 4
    given = {s: metrics[f"data/samples/{s}"] for s in expected}
    said = out.stdout + out.stderr
    assert sum(given.values()) == 16 and "Samples drawn per source: docvqa" in said
    assert "reads as format=cauldron" in said and "Mixture: docvqa 20 records, p=0.400" in said
    report = (run_dir / "report.html").read_text()
    for source, metric in expected.items():
        assert f"{source}: {metric}" in report
    assert "the mean of the sources" in report
    predictions = [json.loads(line) for line in (run_dir / "predictions.jsonl").read_text().splitlines()]
    assert {p["source"] for p in predictions} == set(expected)


@pytest.mark.faults  # kill -9 and resume: the fault tier (make test-faults)
def test_a_mixture_resumes_after_kill_9_to_the_same_adapter(cauldron, tmp_path):
    overrides = [
        *CAULDRON_TINY,
        f"data.path={cauldron}",
        f"model.tiny.cache_dir={tmp_path / 'tiny'}",
    ]
    resumed = assert_resume_is_exact(tmp_path, overrides)
    straight = json.loads((tmp_path / "straight" / "metrics.json").read_text())
    again = json.loads((resumed / "metrics.json").read_text())
    assert {k: v for k, v in straight.items() if k.startswith("data/samples/")} == {
        k: v for k, v in again.items() if k.startswith("data/samples/")
    }


@pytest.mark.faults
@pytest.mark.parametrize("group_by", ["none", "length"])
def test_a_stream_resumes_after_kill_9_to_the_same_adapter(tmp_path, group_by):
    trl = formats.write_trl(tmp_path / "trl", rows=40, kind="parquet")
    overrides = [
        *TINY_RUN,
        f"model.tiny.cache_dir={tmp_path / 'tiny'}",
        "data=hub",
        f"data.path={trl}",
        "data.val_split=test",
        "data.streaming=true",
        "data.buffer_size=16",
        f"data.group_by={group_by}",
        "data.longest_edge=64",
        "data.shortest_edge=64",
    ]
    assert_resume_is_exact(tmp_path, overrides)
