"""Typed config schema (Hydra structured configs) and the validation pass."""

from pathlib import Path

from idefics2_ft.config.derived import accumulation, num_devices, optimizer_name, strategy_variant
from idefics2_ft.config.schema import (
    DataConfig,
    DebugConfig,
    EvalConfig,
    ExportConfig,
    HubConfig,
    LoggerConfig,
    ModelConfig,
    OptimConfig,
    PeftConfig,
    TinyConfig,
    TrainConfig,
    TrainerConfig,
    register_configs,
)
from idefics2_ft.config.validate import ConfigError, validate

# The Hydra config tree: conf/train.yaml, the groups, and the recipes in conf/recipe/. It ships in the
# wheel; the checkout's conf/ and recipes/ are links to it.
CONF_DIR = Path(__file__).resolve().parents[1] / "conf"

__all__ = [
    "CONF_DIR",
    "ConfigError",
    "accumulation",
    "num_devices",
    "optimizer_name",
    "strategy_variant",
    "DataConfig",
    "DebugConfig",
    "EvalConfig",
    "ExportConfig",
    "HubConfig",
    "LoggerConfig",
    "ModelConfig",
    "OptimConfig",
    "PeftConfig",
    "TinyConfig",
    "TrainConfig",
    "TrainerConfig",
    "register_configs",
    "validate",
]
