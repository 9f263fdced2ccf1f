"""The full demo (slow tier): QLoRA on the stage-1 base meets the floor on 1,000 held-out questions, and
the DPO stage on that run (scripts/demo_dpo.py, `make demo-dpo`) meets its own floor."""

import json
import subprocess
import sys

import pytest

from idefics2_ft.tasks.train import train
from tests.helpers import ROOT, compose_config


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    """The default recipe trained once (as `make demo` trains it): ``(run_dir, metrics)``."""
    run_dir = tmp_path_factory.mktemp("demo") / "run"
    return run_dir, train(compose_config([f"run_dir={run_dir}", "trainer.enable_progress_bar=false"]))


@pytest.mark.slow
def test_default_recipe_meets_the_floor_and_qlora_does_the_learning(demo_run):
    run_dir, metrics = demo_run
    assert metrics["val/n_questions"] >= 1000
    assert metrics["val/accuracy"] >= 0.80
    assert metrics["val/accuracy"] - metrics["before/val/accuracy"] >= 0.15  # the adapter, not stage 1, learned
    assert (run_dir / "report.html").is_file()
    report = subprocess.run(
        [
            sys.executable,
            str(ROOT / "scripts" / "demo_report.py"),
            str(run_dir),
            "--min-overall",
            "0.80",
            "--min-gain",
            "0.15",
        ],
        capture_output=True,
        text=True,
    )
    assert report.returncode == 0, report.stdout + report.stderr
    assert "blind prior" in report.stdout and "floor met" in report.stdout


@pytest.mark.slow
def test_dpo_on_the_demo_runs_own_wrong_answers_meets_the_floor(demo_run, tmp_path):
    run_dir, metrics = demo_run
    out = tmp_path / "dpo"
    stage = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "demo_dpo.py"), str(run_dir), "--out", str(out)],
        capture_output=True,
        text=True,
    )
    said = stage.stdout + stage.stderr
    assert stage.returncode == 0, said
    assert "SFT adapter" in said and "after DPO" in said and "floor met" in said
    summary = json.loads((out / "summary.json").read_text())
    # the pairs are the SFT adapter's own mistakes: every rejected side is what it answered, never the reference
    pairs = [json.loads(line) for f in ("train.jsonl", "val.jsonl") for line in (out / "pairs" / f).open()]
    assert len(pairs) == summary["pairs"]["train"] + summary["pairs"]["val"] > 100
    answered = {r["id"]: r for r in map(json.loads, (out / "answers" / "predictions.jsonl").open())}
    for pair in pairs:
        row = answered[pair["id"]]
        assert pair["rejected"][0]["content"][0]["text"] == row["prediction"].strip() != row["references"][0]
        assert pair["chosen"][0]["content"][0]["text"] == row["references"][0]
    held_out_pictures = {p["images"][0] for p in map(json.loads, (out / "pairs" / "val.jsonl").open())}
    assert held_out_pictures and not held_out_pictures & {p["images"][0] for p in pairs[: summary["pairs"]["train"]]}
    # the SFT adapter scored again is the demo's own final validation, question by question
    assert summary["before"]["overall"][1] == pytest.approx(metrics["val/accuracy"])
    # the floor, as the script checks it
    assert summary["reward_accuracy"] >= 0.9
    assert summary["gain"] >= -0.005
    dpo = json.loads((out / "run" / "metrics.json").read_text())
    assert dpo["val/rewards/accuracies"] == summary["reward_accuracy"] and dpo["val/pairs"] == summary["pairs"]["val"]
