"""The real idefics2-8b architecture, for checks and estimates on the meta device (no download)."""

from __future__ import annotations

import torch
from transformers import Idefics2Config, Idefics2ForConditionalGeneration

# From the published config.json of HuggingFaceM4/idefics2-8b. ``Idefics2Config()`` alone gives a
# 768-wide, 12-layer vision tower; the checkpoint uses SigLIP-so400m (1152 wide, 27 layers).
IDEFICS2_8B_VISION = {
    "hidden_size": 1152,
    "intermediate_size": 4304,
    "num_hidden_layers": 27,
    "num_attention_heads": 16,
    "image_size": 980,
    "patch_size": 14,
}


def idefics2_8b_config() -> Idefics2Config:
    """Idefics2Config of idefics2-8b: SigLIP-so400m, 64-latent perceiver, Mistral-7B with 32,003 tokens."""
    return Idefics2Config(
        vision_config=IDEFICS2_8B_VISION,
        perceiver_config={
            "resampler_n_latents": 64,
            "resampler_depth": 3,
            "resampler_n_heads": 16,
            "resampler_head_dim": 96,
            "num_key_value_heads": 4,
            "hidden_size": 4096,
            "rms_norm_eps": 1e-5,
        },
        text_config={"model_type": "mistral", "vocab_size": 32003, "rms_norm_eps": 1e-5, "pad_token_id": 0},
        image_token_id=32001,
        tie_word_embeddings=False,
    )


def idefics2_8b_on_meta() -> Idefics2ForConditionalGeneration:
    """The 8B model with no storage: shapes and module names only."""
    with torch.device("meta"):
        return Idefics2ForConditionalGeneration(idefics2_8b_config())
