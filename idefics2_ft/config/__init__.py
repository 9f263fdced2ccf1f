"""Typed config schema (Hydra structured configs) and the validation pass."""

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
from idefics2_ft.config.validate import ConfigError, accumulation, num_devices, strategy_variant, validate

__all__ = [
    "ConfigError",
    "accumulation",
    "num_devices",
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
