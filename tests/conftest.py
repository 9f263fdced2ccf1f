"""Shared fixtures: the offline Idefics2 processor, a tiny-run config, test images (helpers: tests/helpers.py)."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
from PIL import Image

from idefics2_ft.models import build_processor
from tests.helpers import TINY_RUN, compose_config


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
def trained_run(tmp_path_factory, tiny_cache):
    """One tiny run trained once for the session, for the tests that only read it (they write
    their evaluations and exports into folders of their own or beside it): ``(run_dir, metrics)``."""
    from idefics2_ft.tasks.train import train

    run_dir = tmp_path_factory.mktemp("trained") / "run"
    overrides = [*TINY_RUN, f"model.tiny.cache_dir={tiny_cache}", f"run_dir={run_dir}", "name=t"]
    overrides += ["trainer.max_steps=6", "optim.lr=5e-3", "eval.before_training=true"]
    return run_dir, train(compose_config(overrides))


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
