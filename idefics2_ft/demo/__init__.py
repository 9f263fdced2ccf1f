"""The CPU demo: a tiny random-init Idefics2 of the real architecture, the real Idefics2 processor
built offline, and stage 1 (a stand-in for pretraining). It uses the library; the library never
imports it. ``model.name_or_path=tiny`` asks ``idefics2_ft.train`` for it."""

from idefics2_ft.demo.base import STAGE1_VERSION, ensure_tiny_base, tiny_base_key, tiny_config_of, wait_for_base
from idefics2_ft.demo.model import build_tiny_model, tiny_config
from idefics2_ft.demo.stage1 import pretrain_tiny_base

__all__ = [
    "STAGE1_VERSION",
    "build_tiny_model",
    "ensure_tiny_base",
    "pretrain_tiny_base",
    "tiny_base_key",
    "tiny_config",
    "tiny_config_of",
    "wait_for_base",
]
