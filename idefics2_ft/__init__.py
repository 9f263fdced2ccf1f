"""idefics2-ft: fine-tune Idefics2 with (Q)LoRA inside PyTorch Lightning.

The public names below are importable from the top level (``from idefics2_ft import train`` gives
the function ``train(cfg) -> metrics``) and from their own room (``from idefics2_ft.data import
Idefics2Collator``). They load on first use, so ``import idefics2_ft`` stays cheap and pulls in no
torch. ``docs/architecture.md`` maps the rooms.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# name -> the room that defines it (foundations first, then components, then tasks)
_EXPORTS = {
    "ConfigError": "idefics2_ft.config",
    "TrainConfig": "idefics2_ft.config",
    "register_configs": "idefics2_ft.config",
    "validate": "idefics2_ft.config",
    "anls": "idefics2_ft.metrics",
    "exact_match": "idefics2_ft.metrics",
    "IGNORE_INDEX": "idefics2_ft.data",
    "Idefics2Collator": "idefics2_ft.data",
    "Idefics2DataModule": "idefics2_ft.data",
    "RecordDataset": "idefics2_ft.data",
    "build_rows": "idefics2_ft.data",
    "IDEFICS2_CHAT_TEMPLATE": "idefics2_ft.models",
    "apply_peft": "idefics2_ft.models",
    "load_idefics2": "idefics2_ft.models",
    "load_processor": "idefics2_ft.models",
    "trainable_parameters": "idefics2_ft.models",
    "Idefics2Module": "idefics2_ft.training",
    "make_optimizer_factory": "idefics2_ft.training",
    "warmup_cosine": "idefics2_ft.training",
    "make_trainer": "idefics2_ft.training",
    "train": "idefics2_ft.tasks.train",
    "resolve_base": "idefics2_ft.models",
    "register_stand_in": "idefics2_ft.models",
    "export_run": "idefics2_ft.tasks.export",
    "evaluate": "idefics2_ft.tasks.evaluate",
    "load_run": "idefics2_ft.tasks.evaluate",
}

__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'idefics2_ft' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value
    return value
