"""What tests share: the checkout's paths, the tiny-run overrides, config composition, ``train.py``
in a subprocess. Importable (``from tests.helpers import run_train``); ``conftest.py`` holds the fixtures."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra

from idefics2_ft import demo
from idefics2_ft.config import CONF_DIR, register_configs

ROOT = Path(__file__).resolve().parents[1]
demo.register()  # model.name_or_path=tiny, as the idefics2-ft command has it
IDEFICS2_FT = str(Path(sys.executable).parent / "idefics2-ft")  # the console script of this venv
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
