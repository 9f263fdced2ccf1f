"""Where stdout is a file (SLURM, CI), progress is a line every few seconds, not a bar's redraws."""

import re

from tests.helpers import TINY_RUN, run_train


def test_a_piped_run_logs_lines_not_a_bar(tmp_path):
    out = run_train(
        *TINY_RUN,
        f"model.tiny.cache_dir={tmp_path / 'cache'}",
        f"run_dir={tmp_path / 'run'}",
        "model.tiny.vision_pretrain_steps=2",
        "model.tiny.pretrain_steps=2",
        "data.max_train_samples=40",
        "trainer.enable_progress_bar=true",
        "trainer.progress_every_s=0",
    )
    text = out.stdout + out.stderr
    assert "\r" not in text  # no bar redraws in a file
    steps = re.findall(r"step (\d+)/4  loss [\d.]+  lr [\d.e+-]+  [\d.]+ samples/s  ETA \d+:\d\d", text)
    assert steps == ["1", "2", "3", "4"]  # every step, as progress_every_s=0 asks
    assert re.search(r"stage 1a: vision tower \+ connector: step 2/2  loss [\d.]+", text)
    assert re.search(r"stage 1b: describing the images, whole model: step 2/2  loss [\d.]+", text)


def test_the_default_interval_logs_the_first_and_last_step(tmp_path):
    out = run_train(
        *TINY_RUN,
        f"model.tiny.cache_dir={tmp_path / 'cache'}",
        f"run_dir={tmp_path / 'run'}",
        "trainer.enable_progress_bar=true",
    )
    assert re.findall(r"step (\d+)/4  loss", out.stdout + out.stderr) == ["1", "4"]
