"""The full demo (slow tier): QLoRA on the stage-1 base meets the floor on 1,000 held-out questions."""

import subprocess
import sys

import pytest

from idefics2_ft.tasks.train import train
from tests.helpers import ROOT, compose_config


@pytest.mark.slow
def test_default_recipe_meets_the_floor_and_qlora_does_the_learning(tmp_path):
    cfg = compose_config([f"run_dir={tmp_path / 'run'}", "trainer.enable_progress_bar=false"])
    metrics = train(cfg)
    assert metrics["val/n_questions"] >= 1000
    assert metrics["val/accuracy"] >= 0.80
    assert metrics["val/accuracy"] - metrics["before/val/accuracy"] >= 0.15  # the adapter, not stage 1, learned
    assert (tmp_path / "run" / "report.html").is_file()
    report = subprocess.run(
        [
            sys.executable,
            str(ROOT / "scripts" / "demo_report.py"),
            str(tmp_path / "run"),
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
