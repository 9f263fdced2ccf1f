"""The CPU demo: a tiny random-init Idefics2 of the real architecture, the real Idefics2 processor
built offline, and stage 1 (a stand-in for pretraining). It uses the library; the library never
imports it. ``model.name_or_path=tiny`` asks ``idefics2_ft.train`` for it."""

from idefics2_ft.demo.base import STAGE1_VERSION, ensure_tiny_base, tiny_base_key, wait_for_base
from idefics2_ft.demo.model import build_tiny_model, tiny_config
from idefics2_ft.demo.processor import SPECIAL_TOKENS, build_processor, build_tokenizer, mistral_tokenizer_model
from idefics2_ft.demo.stage1 import pretrain_tiny_base

__all__ = [
    "SPECIAL_TOKENS",
    "STAGE1_VERSION",
    "build_processor",
    "build_tiny_model",
    "build_tokenizer",
    "ensure_tiny_base",
    "mistral_tokenizer_model",
    "pretrain_tiny_base",
    "tiny_base_key",
    "tiny_config",
    "wait_for_base",
]
