"""Model builders: load (quantization, dtype, attention), attach adapters, the chat template, the 8B's shapes."""

from idefics2_ft.models.chat_template import IDEFICS2_CHAT_TEMPLATE
from idefics2_ft.models.loading import (
    COMPONENTS,
    LORA_PRESETS,
    apply_peft,
    build_quantization_config,
    dequantized_weights,
    load_full_precision,
    load_idefics2,
    load_processor,
    lora_target_regex,
    non_finite_parameters,
    resolve_dtype,
    trainable_parameters,
)
from idefics2_ft.models.reference import idefics2_8b_config, idefics2_8b_on_meta

__all__ = [
    "COMPONENTS",
    "IDEFICS2_CHAT_TEMPLATE",
    "LORA_PRESETS",
    "apply_peft",
    "build_quantization_config",
    "dequantized_weights",
    "idefics2_8b_config",
    "idefics2_8b_on_meta",
    "load_full_precision",
    "load_idefics2",
    "load_processor",
    "lora_target_regex",
    "non_finite_parameters",
    "resolve_dtype",
    "trainable_parameters",
]
