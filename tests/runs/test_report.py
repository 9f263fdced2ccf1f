"""report.html: written by training and by evaluate.py, and checked in a real headless Chromium."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest
from omegaconf import OmegaConf

from idefics2_ft.reporting import metric_table
from idefics2_ft.reporting.gallery import pick_gallery
from tests.helpers import IDEFICS2_FT, ROOT

sys.path.insert(0, str(ROOT / "scripts"))
from screenshot_report import browser_paths  # noqa: E402

# CI installs Chromium and sets this: there a missing browser fails the test instead of skipping it.
REQUIRE_BROWSER = os.environ.get("IDEFICS2_FT_REQUIRE_BROWSER") == "1"


def test_the_gallery_shows_half_failures_and_fills_up_when_one_kind_runs_short():
    predictions = [{"id": i, "accuracy": float(i % 4 == 0)} for i in range(100)]  # 25 right, 75 wrong
    chosen = pick_gallery(predictions, size=16)
    assert len(chosen) == 16 and sum(p["accuracy"] < 1 for p in chosen) == 8
    assert [p["id"] for p in chosen] == sorted(p["id"] for p in chosen)  # in the data's order
    mostly_right = [{"id": i, "accuracy": float(i != 3)} for i in range(30)]
    assert sum(p["accuracy"] < 1 for p in pick_gallery(mostly_right, size=16)) == 1  # the only failure
    few = [{"id": i, "accuracy": 0.0} for i in range(5)]
    assert len(pick_gallery(few, size=16)) == 5


def test_the_metric_table_reads_every_prefix_and_question_type():
    table = metric_table(
        [
            ("before", {"val/accuracy": 0.25, "val/accuracy/color": 0.5, "val/loss": 3.0}),
            (
                "eval",
                {"eval/accuracy": 0.75, "eval/accuracy/color": 1.0, "eval/accuracy/yes/no": 0.5, "eval/anls": 0.9},
            ),
        ],
        "accuracy",
    )
    cells = re.findall(r"<tr><th>([^<]*)</th>(.*?)</tr>", table)
    rows = {label: re.findall(r'<td class="n">([^<]*)</td>', rest) for label, rest in cells}
    assert rows["accuracy, overall"] == ["25.0%", "75.0%"]
    assert rows["accuracy, color"] == ["50.0%", "100.0%"]
    assert rows["accuracy, yes/no"] == ["-", "50.0%"]
    assert rows["loss"] == ["3.0000", "-"]
    assert "anls" not in table


@pytest.fixture
def trained(trained_run):
    return trained_run


def test_training_writes_a_self_contained_report_with_curves_table_gallery_and_config(trained):
    run_dir, metrics = trained
    history = [json.loads(line) for line in (run_dir / "history.jsonl").read_text().splitlines()]
    assert [row["step"] for row in history if "train/loss" in row] == [1, 2, 3, 4, 5, 6]  # log_every_n_steps=1
    assert [row["step"] for row in history if "val/loss" in row] == [0, 6]  # before and after training
    page = (run_dir / "report.html").read_text()
    assert 'alt="loss and learning rate curves"' in page
    n_questions = int(metrics["val/n_questions"])
    wrong = n_questions - round(metrics["val/accuracy"] * n_questions)
    assert page.count('class="card ') == min(16, n_questions)
    assert page.count('class="card wrong"') == min(wrong, 8) or page.count('class="card right"') == n_questions - wrong
    assert f"{metrics['val/accuracy']:.1%}" in page and f"{metrics['before/val/accuracy']:.1%}" in page
    assert "before training" in page and "after training" in page
    assert "<pre>" in page and "max_steps: 6" in page  # the config
    assert re.search(r"(src|href)=\"(?!data:)", page) is None  # nothing is fetched: every image is inline


def test_evaluate_writes_its_own_report(trained):
    run_dir, _ = trained
    out = run_dir / "eval" / "test"
    done = subprocess.run(
        [IDEFICS2_FT, "evaluate", f"run_dir={run_dir}", "data.split=test", f"out_dir={out}"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "report.html" in done.stdout
    page = (out / "report.html").read_text()
    assert "this evaluation (test)" in page and "run: after training" in page  # the run validated on test too
    assert page.count('class="card ') == min(16, sum(1 for _ in open(out / "predictions.jsonl")))


@pytest.mark.skipif(
    browser_paths() is None and not REQUIRE_BROWSER, reason="no Chromium (apt-get install chromium chromium-driver)"
)
def test_the_report_renders_in_headless_chromium_with_its_images_and_no_console_error(trained, tmp_path):
    run_dir, _ = trained
    shot = tmp_path / "report.png"
    done = subprocess.run(
        [sys.executable, "scripts/screenshot_report.py", str(run_dir / "report.html"), "--out", str(shot)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
    )
    assert done.stdout, done.stderr[-2000:]
    result = json.loads(done.stdout.splitlines()[-1])
    name = OmegaConf.load(run_dir / "config.yaml").name
    assert result["ready"] == "complete" and result["title"].startswith(f"{name}: ")
    assert result["images"] >= 13  # the curves and one picture per gallery card
    assert result["broken_images"] == [] and result["console_errors"] == []
    assert done.returncode == 0
    from PIL import Image

    with Image.open(shot) as image:
        assert image.size[0] >= 1000 and len(set(image.convert("L").getdata())) > 50  # a rendered page, not a blank
