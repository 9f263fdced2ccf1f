"""The CPU demo: a tiny random-init Idefics2 of the real architecture, the real Idefics2 processor
built offline, and stage 1 (a stand-in for pretraining). It uses the library; the library never
imports it. ``register()`` (the ``idefics2-ft`` command calls it) makes ``model.name_or_path=tiny``
mean this base, through ``idefics2_ft.models.register_stand_in``."""

from idefics2_ft.demo.base import STAGE1_VERSION, ensure_tiny_base, tiny_base_key, tiny_config_of, wait_for_base
from idefics2_ft.demo.model import build_tiny_model, tiny_config
from idefics2_ft.demo.stage1 import pretrain_tiny_base
from idefics2_ft.models.bases import StandIn, register_stand_in

NAME = "tiny"  # model.name_or_path=tiny


def register() -> None:
    """Make ``model.name_or_path=tiny`` the demo's tiny base (built once from its seed, then cached)."""
    register_stand_in(
        NAME,
        StandIn(
            build=ensure_tiny_base,
            config=tiny_config_of,
            description="a tiny random-init Idefics2 (idefics2-ft's CPU demo)",
        ),
    )


__all__ = [
    "NAME",
    "register",
    "STAGE1_VERSION",
    "build_tiny_model",
    "ensure_tiny_base",
    "pretrain_tiny_base",
    "tiny_base_key",
    "tiny_config",
    "tiny_config_of",
    "wait_for_base",
]
