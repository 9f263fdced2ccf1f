"""The real Idefics2 processor, built offline (for the tiny demo model and the random-init 8B).

The tokenizer is Mistral-7B-v0.1's sentencepiece model (shipped by the ``mistral-common`` package)
plus Idefics2's three added special tokens, with the real ids 32000-32002. Nothing here touches
the network.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from transformers import Idefics2ImageProcessorPil, Idefics2Processor, LlamaTokenizer
from transformers.tokenization_utils_base import AddedToken

from idefics2_ft.models.chat_template import IDEFICS2_CHAT_TEMPLATE

SPECIAL_TOKENS = ("<fake_token_around_image>", "<image>", "<end_of_utterance>")


def mistral_tokenizer_model() -> Path:
    """Path of the Mistral-7B-v0.1 sentencepiece model that ``mistral-common`` ships.

    Raises:
        FileNotFoundError: if ``mistral-common`` is not installed or no longer ships the file.
    """
    try:
        import mistral_common
    except ImportError as err:  # pragma: no cover - a dependency of the package
        raise FileNotFoundError(
            "The tiny processor needs the `mistral-common` package: pip install mistral-common"
        ) from err
    path = Path(mistral_common.__file__).parent / "data" / "tokenizer.model.v1"
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: the installed mistral-common does not ship it.")
    return path


def build_tokenizer() -> LlamaTokenizer:
    """The Idefics2 tokenizer: Mistral's 32,000 pieces + 3 special tokens, BOS prepended, ``<unk>`` as pad."""
    with tempfile.TemporaryDirectory() as folder:
        # LlamaTokenizer(vocab_file=...) builds a degenerate vocabulary; from_pretrained on a
        # folder holding `tokenizer.model` builds the real one.
        shutil.copy(mistral_tokenizer_model(), Path(folder) / "tokenizer.model")
        tokenizer = LlamaTokenizer.from_pretrained(folder, add_bos_token=True, add_eos_token=False, legacy=False)
    tokenizer.add_special_tokens(
        {"additional_special_tokens": [AddedToken(t, normalized=False, special=True) for t in SPECIAL_TOKENS]}
    )
    tokenizer.pad_token = tokenizer.unk_token
    tokenizer.padding_side = "right"
    return tokenizer


def build_processor(
    image_seq_len: int = 8,
    longest_edge: int = 64,
    do_image_splitting: bool = False,
) -> Idefics2Processor:
    """A real ``Idefics2Processor`` for the tiny model, built without any download.

    ``image_seq_len`` must equal the model's ``perceiver_config.resampler_n_latents``.
    """
    # The PIL backend is what transformers falls back to without torchvision; naming it keeps the
    # processor identical with or without torchvision installed.
    image_processor = Idefics2ImageProcessorPil(
        do_image_splitting=do_image_splitting,
        size={"longest_edge": longest_edge, "shortest_edge": min(longest_edge, 378)},
    )
    return Idefics2Processor(
        image_processor=image_processor,
        tokenizer=build_tokenizer(),
        image_seq_len=image_seq_len,
        chat_template=IDEFICS2_CHAT_TEMPLATE,
    )
