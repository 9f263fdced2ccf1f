"""Where a fine-tuned Idefics2 stops: at ``<end_of_utterance>`` (each turn ends with it) or ``</s>``.

Training, evaluation and every export stop at the same ids, so a plain ``generate()`` on an export
answers as the project did.
"""

from __future__ import annotations

from typing import Any

END_OF_UTTERANCE = "<end_of_utterance>"


def stop_token_ids(tokenizer: Any) -> list[int]:
    """``[<end_of_utterance>, </s>]`` as this tokenizer numbers them (32002 and 2 for Idefics2)."""
    eou = tokenizer.convert_tokens_to_ids(END_OF_UTTERANCE)
    return [i for i in (eou, tokenizer.eos_token_id) if i is not None]


def generation_config(tokenizer: Any, base: Any = None):
    """A ``GenerationConfig`` (a copy of ``base``'s, if given) that stops at ``stop_token_ids`` and
    pads with the tokenizer's pad token: what an export's ``generation_config.json`` holds.

    Args:
        tokenizer: the run's tokenizer.
        base: the model's own generation config, whose other settings are kept.

    Returns:
        The generation config.
    """
    import copy

    from transformers import GenerationConfig

    config = copy.deepcopy(base) if base is not None else GenerationConfig()
    config.eos_token_id = stop_token_ids(tokenizer)
    config.pad_token_id = tokenizer.pad_token_id
    if tokenizer.bos_token_id is not None:
        config.bos_token_id = tokenizer.bos_token_id
    return config
