"""Shared fixtures: the offline Idefics2 processor, config composition, a tiny-run override set."""

from __future__ import annotations

import logging
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from PIL import Image

from idefics2_ft.config import CONF_DIR, register_configs
from idefics2_ft.models import build_processor

ROOT = Path(__file__).resolve().parents[1]
CONF = CONF_DIR

# A smaller tiny model than the demo's, no stage 1, a handful of steps: seconds per run.
TINY_RUN = [
    "model.tiny.vision_hidden=64",
    "model.tiny.text_hidden=64",
    "model.tiny.vision_layers=1",
    "model.tiny.text_layers=1",
    "model.tiny.vision_pretrain_steps=0",
    "model.tiny.pretrain_steps=0",
    "data.max_train_samples=64",
    "data.max_val_samples=12",
    "data.batch_size=4",
    "data.eval_batch_size=6",
    "trainer.max_steps=4",
    "trainer.log_every_n_steps=1",
    "trainer.enable_progress_bar=false",
    "optim.warmup_steps=1",
    "eval.before_training=false",
    "logger=csv",
]


def run_train(*overrides: str, cwd: Path = ROOT, expect_ok: bool = True) -> subprocess.CompletedProcess:
    """``python train.py OVERRIDES`` in a subprocess (how users launch several processes)."""
    out = subprocess.run(
        [sys.executable, str(ROOT / "train.py"), *overrides], cwd=cwd, capture_output=True, text=True, timeout=600
    )
    if expect_ok:
        assert out.returncode == 0, out.stderr[-3000:]
    return out


def compose_config(overrides: list[str] | None = None, config_name: str = "train"):
    """Compose ``conf/`` exactly as ``train.py`` does, with overrides."""
    register_configs()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(config_name=config_name, overrides=overrides or [], return_hydra_config=False)


@pytest.fixture
def tiny_run_cfg(tmp_path, tiny_cache):
    def make(*extra: str, run_dir: Path | None = None):
        overrides = [
            *TINY_RUN,
            f"model.tiny.cache_dir={tiny_cache}",
            f"run_dir={run_dir or tmp_path / 'run'}",
            "name=test",
        ]
        return compose_config(overrides + list(extra))

    return make


@pytest.fixture(scope="session")
def tiny_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("tiny_base")


@pytest.fixture(scope="session")
def processor():
    logging.getLogger("transformers").setLevel(logging.ERROR)
    return build_processor(image_seq_len=4, longest_edge=64)


@pytest.fixture
def red():
    return Image.new("RGB", (64, 64), (255, 0, 0))


@pytest.fixture
def blue():
    return Image.new("RGB", (48, 64), (0, 0, 255))


def pytest_collection_modifyitems(config, items):
    """`gpu` tests need CUDA: skip them (with the reason) where there is none."""
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
