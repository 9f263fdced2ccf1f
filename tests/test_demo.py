"""The full demo (slow tier): the default recipe reaches its bar on 1,000 held-out questions."""

import subprocess
import sys

import pytest

from idefics2_ft.train import train
from tests.conftest import ROOT, compose_config


@pytest.mark.slow
def test_default_recipe_reaches_the_bar(tmp_path):
    cfg = compose_config([f"run_dir={tmp_path / 'run'}", "trainer.enable_progress_bar=false"])
    metrics = train(cfg)
    assert metrics["val/n_questions"] >= 1000
    assert metrics["val/accuracy"] >= 0.77
    assert metrics["val/accuracy/color"] >= 0.60
    report = subprocess.run(
        [
            sys.executable,
            str(ROOT / "scripts" / "demo_report.py"),
            str(tmp_path / "run"),
            "--min-overall",
            "0.77",
            "--min-color",
            "0.60",
        ],
        capture_output=True,
        text=True,
    )
    assert report.returncode == 0, report.stdout + report.stderr
    assert "blind baseline" in report.stdout
