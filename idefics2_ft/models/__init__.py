"""Model builders: load (quantization, dtype, attention), attach adapters, the chat template, the
processor, the 8B's shapes and a random-init checkpoint of them."""

from idefics2_ft.models.architecture import COMPONENTS, LORA_PRESETS, WRAP_CLASSES, lora_target_regex
from idefics2_ft.models.bases import StandIn, base_config, register_stand_in, resolve_base, stand_in
from idefics2_ft.models.chat_template import IDEFICS2_CHAT_TEMPLATE
from idefics2_ft.models.loading import (
    apply_peft,
    build_quantization_config,
    dequantized_weights,
    frozen_fingerprint,
    load_full_precision,
    load_idefics2,
    load_processor,
    non_finite_parameters,
    resolve_dtype,
    start_from_adapter,
    trainable_parameters,
)
from idefics2_ft.models.processor import SPECIAL_TOKENS, build_processor, build_tokenizer, mistral_tokenizer_model
from idefics2_ft.models.random_checkpoint import default_cache_dir, write_random_checkpoint
from idefics2_ft.models.reference import idefics2_8b_config, idefics2_8b_on_meta

__all__ = [
    "COMPONENTS",
    "StandIn",
    "WRAP_CLASSES",
    "base_config",
    "register_stand_in",
    "resolve_base",
    "stand_in",
    "SPECIAL_TOKENS",
    "IDEFICS2_CHAT_TEMPLATE",
    "LORA_PRESETS",
    "apply_peft",
    "start_from_adapter",
    "build_processor",
    "build_quantization_config",
    "build_tokenizer",
    "default_cache_dir",
    "dequantized_weights",
    "frozen_fingerprint",
    "idefics2_8b_config",
    "idefics2_8b_on_meta",
    "load_full_precision",
    "load_idefics2",
    "load_processor",
    "lora_target_regex",
    "mistral_tokenizer_model",
    "non_finite_parameters",
    "resolve_dtype",
    "trainable_parameters",
    "write_random_checkpoint",
]
