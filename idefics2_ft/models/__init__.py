"""Model and processor builders: load, quantize, attach adapters."""

from idefics2_ft.models.loading import (
    LORA_PRESETS,
    apply_peft,
    build_quantization_config,
    load_idefics2,
    load_processor,
    lora_target_regex,
    resolve_dtype,
    trainable_parameters,
)

__all__ = [
    "LORA_PRESETS",
    "apply_peft",
    "build_quantization_config",
    "load_idefics2",
    "load_processor",
    "lora_target_regex",
    "resolve_dtype",
    "trainable_parameters",
]
