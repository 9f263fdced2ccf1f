"""A tiny random-init Idefics2 of the real architecture (transformers' own modelling code)."""

from __future__ import annotations

import torch
from transformers import Idefics2Config, Idefics2ForConditionalGeneration


def tiny_config(
    *,
    image_size: int = 64,
    patch_size: int = 8,
    vision_hidden: int = 128,
    vision_layers: int = 2,
    text_hidden: int = 128,
    text_layers: int = 2,
    n_latents: int = 8,
    resampler_depth: int = 1,
    initializer_range: float = 0.02,
) -> Idefics2Config:
    """An Idefics2 config of the real architecture, small enough for the CPU.

    Every linear dimension is a multiple of 64: bitsandbytes' CPU 4-bit kernel requires
    ``in_features % 64 == 0`` and ``out_features % 32 == 0``.
    """
    for name, value in (("vision_hidden", vision_hidden), ("text_hidden", text_hidden)):
        if value % 64:
            raise ValueError(f"{name}={value}: must be a multiple of 64 for the 4-bit CPU kernels.")
    head_dim = 32
    return Idefics2Config(
        vision_config={
            "hidden_size": vision_hidden,
            "intermediate_size": 2 * vision_hidden,
            "num_hidden_layers": vision_layers,
            "num_attention_heads": vision_hidden // head_dim,
            "image_size": image_size,
            "patch_size": patch_size,
            "initializer_range": initializer_range,
        },
        perceiver_config={
            "resampler_n_latents": n_latents,
            "resampler_depth": resampler_depth,
            "resampler_n_heads": text_hidden // head_dim,
            "resampler_head_dim": head_dim,
            "num_key_value_heads": max(1, text_hidden // head_dim // 2),
            "hidden_size": text_hidden,
            "rms_norm_eps": 1e-5,
            "initializer_range": initializer_range,
        },
        text_config={
            "model_type": "mistral",
            "hidden_size": text_hidden,
            "intermediate_size": 2 * text_hidden,
            "num_hidden_layers": text_layers,
            "num_attention_heads": text_hidden // head_dim,
            "num_key_value_heads": max(1, text_hidden // head_dim // 2),
            "vocab_size": 32003,
            "max_position_embeddings": 1024,
            "pad_token_id": 0,
            "rms_norm_eps": 1e-5,
            "initializer_range": initializer_range,
        },
        image_token_id=32001,
        tie_word_embeddings=False,
        initializer_range=initializer_range,
    )


@torch.no_grad()
def build_tiny_model(
    config: Idefics2Config, seed: int = 0, latent_std: float = 1.0
) -> Idefics2ForConditionalGeneration:
    """A deterministic random-init tiny Idefics2.

    The perceiver latents start as all-ones upstream: every latent then asks the image the same
    question and the image reaches the text as one repeated vector. Drawing them from N(0, latent_std)
    gives each latent its own query, as a pretrained checkpoint's latents are.
    """
    with torch.random.fork_rng(devices=[]):  # leave the caller's random stream untouched
        torch.manual_seed(seed)
        model = Idefics2ForConditionalGeneration(config)
    if latent_std > 0:  # drawn from a generator of its own, as above
        latents = model.model.connector.perceiver_resampler.latents
        latents.copy_(torch.randn(latents.shape, generator=torch.Generator().manual_seed(seed)) * latent_std)
    return model
