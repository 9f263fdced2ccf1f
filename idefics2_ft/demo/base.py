"""The demo's tiny base: built once from a seed (and stage 1), cached under a key of what it is built from.

The cached folder is an ordinary ``save_pretrained`` folder (model + processor), so the tiny model
then goes through the same ``from_pretrained`` path as a Hub checkpoint.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from idefics2_ft.data.sources import build_rows
from idefics2_ft.demo.model import build_tiny_model, tiny_config
from idefics2_ft.demo.stage1 import pretrain_tiny_base
from idefics2_ft.models.processor import build_processor
from idefics2_ft.ranks import is_rank_zero

log = logging.getLogger(__name__)

# Bump when the tiny base's construction or stage 1 changes: cached bases are keyed by it.
STAGE1_VERSION = 6


def tiny_base_key(cfg: DictConfig) -> str:
    """A folder name that changes whenever anything the tiny base is built from changes."""
    d = cfg.data
    payload = {
        "stage1_version": STAGE1_VERSION,
        "tiny": OmegaConf.to_container(cfg.model.tiny, resolve=True),
        "image": [d.longest_edge, d.do_image_splitting],
        "data": [d.source, d.path, d.train_split, d.train_file, d.max_train_samples, d.system_prompt],
    }
    payload["tiny"].pop("cache_dir")
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:12]


def tiny_config_of(cfg: DictConfig):
    """The tiny base's ``Idefics2Config`` as ``model.tiny.*`` sets it."""
    t = cfg.model.tiny
    return tiny_config(
        image_size=t.image_size,
        patch_size=t.patch_size,
        vision_hidden=t.vision_hidden,
        vision_layers=t.vision_layers,
        text_hidden=t.text_hidden,
        text_layers=t.text_layers,
        n_latents=t.n_latents,
        resampler_depth=t.resampler_depth,
        initializer_range=t.initializer_range,
    )


def ensure_tiny_base(cfg: DictConfig) -> Path:
    """Build (once) and cache the tiny base: random init from the seed, then stage 1 if configured.

    Other ranks wait for rank 0 to build it. Returns the folder.
    """
    t = cfg.model.tiny
    folder = (Path(t.cache_dir) / tiny_base_key(cfg)).resolve()
    if (folder / "config.json").is_file():
        log.info("Tiny base: using the cached %s", folder)
        return folder
    if not is_rank_zero():
        return wait_for_base(folder)
    start = time.perf_counter()
    config = tiny_config_of(cfg)
    processor = build_processor(t.n_latents, cfg.data.longest_edge, cfg.data.do_image_splitting)
    model = build_tiny_model(config, seed=t.seed, latent_std=t.latent_std)
    report: dict[str, float] = {}
    if t.vision_pretrain_steps or t.pretrain_steps:
        log.info(
            "Tiny base, stage 1 (a stand-in for a pretrained checkpoint): %d vision-tower steps, "
            "then %d steps of describing the training images of %s (no questions)",
            t.vision_pretrain_steps,
            t.pretrain_steps,
            cfg.data.source,
        )
        rows = build_rows(cfg.data, "train")
        if cfg.data.max_train_samples is not None:
            rows = rows[: cfg.data.max_train_samples]
        with torch.random.fork_rng(devices=[]):  # stage 1 draws from its own seed, and leaves the caller's stream alone
            torch.manual_seed(t.seed)
            report = pretrain_tiny_base(
                model, processor, rows, t, cfg.trainer.enable_progress_bar, cfg.data.on_bad_sample
            )
    report["stage1/wall_s"] = time.perf_counter() - start
    tmp = folder.with_name(folder.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)  # this pid's own partial folder, if a killed build left one
    model.save_pretrained(tmp)
    processor.save_pretrained(tmp)
    (tmp / "stage1.json").write_text(json.dumps(report, indent=2))
    tmp.rename(folder)  # a half-written base never looks complete
    log.info("Tiny base saved to %s (%.0f s)", folder, report["stage1/wall_s"])
    return folder


def wait_for_base(folder: Path, timeout_s: float = 3600.0) -> Path:
    """Other ranks wait for rank 0 to build the tiny base (no process group exists yet).

    Raises:
        TimeoutError: rank 0 did not finish within ``timeout_s``.
    """
    start = time.perf_counter()
    while not (folder / "config.json").is_file():
        waited = time.perf_counter() - start
        if waited > timeout_s:
            raise TimeoutError(f"Rank 0 did not build the tiny base {folder} within {timeout_s:.0f} s.")
        if int(waited) % 60 == 0:
            log.info("Waiting for rank 0 to build the tiny base %s (%.0f s)", folder, waited)
        time.sleep(1.0)
    return folder
