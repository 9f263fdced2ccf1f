"""Facts of the Idefics2 architecture that several rooms need: its components by module prefix,
the LoRA target presets, and the repeated layers (FSDP units, checkpointed blocks)."""

from __future__ import annotations

COMPONENTS = (
    ("vision", "model.vision_model."),
    ("connector", "model.connector."),
    ("text", "model.text_model."),
    ("head", "lm_head."),
)

# Module-name regexes (full match, relative to Idefics2ForConditionalGeneration) per component.
_TEXT = r"model\.text_model\.layers\.\d+\.(self_attn\.(q|k|v|o)_proj|mlp\.(gate|up|down)_proj)"
_CONNECTOR = r"model\.connector\.(modality_projection|perceiver_resampler\.layers\.\d+\.(self_attn|mlp))\.\w+_proj"
_VISION = r"model\.vision_model\.encoder\.layers\.\d+\.(self_attn\.(q|k|v|out)_proj|mlp\.fc[12])"
LORA_PRESETS = {
    "text": (_TEXT,),
    "text+connector": (_TEXT, _CONNECTOR),
    "all": (_TEXT, _CONNECTOR, _VISION),
}


def lora_target_regex(preset: str) -> str:
    """The PEFT ``target_modules`` regex for a preset (``text``, ``text+connector``, ``all``)."""
    return "|".join(f"(?:{r})" for r in LORA_PRESETS[preset])


# The repeated blocks of Idefics2: one FSDP unit each (gradient checkpointing, when on, also
# recomputes the decoder and encoder layers one at a time; the perceiver's are not checkpointable).
WRAP_CLASSES = ("MistralDecoderLayer", "Idefics2EncoderLayer", "Idefics2PerceiverLayer")
