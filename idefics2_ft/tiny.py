"""A tiny random-init Idefics2 of the real architecture, and the real Idefics2 processor built offline.

The tokenizer is Mistral-7B-v0.1's sentencepiece model (shipped by the ``mistral-common`` package)
plus Idefics2's three added special tokens, with the real ids 32000-32002. Nothing here touches
the network.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import torch
from transformers import (
    Idefics2Config,
    Idefics2ForConditionalGeneration,
    Idefics2ImageProcessorPil,
    Idefics2Processor,
    LlamaTokenizer,
)
from transformers.tokenization_utils_base import AddedToken

# The chat template published with HuggingFaceM4/idefics2-8b: "User:" / "Assistant:" turns, each
# closed by "<end_of_utterance>\n"; the generation prompt is "Assistant:".
IDEFICS2_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{message['role'].capitalize()}}"
    "{% if message['content'][0]['type'] == 'image' %}{{':'}}{% else %}{{': '}}{% endif %}"
    "{% for line in message['content'] %}"
    "{% if line['type'] == 'text' %}{{line['text']}}"
    "{% elif line['type'] == 'image' %}{{ '<image>' }}{% endif %}"
    "{% endfor %}<end_of_utterance>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)

# Bump when the tiny base's construction or stage 1 changes: cached bases are keyed by it.
STAGE1_VERSION = 2

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


def _image_features(model, pixel_values, pixel_attention_mask) -> torch.Tensor:
    """What the text model receives for single-image batches, mean-pooled over the latents: [B, D]."""
    features = model.model.get_image_features(pixel_values, pixel_attention_mask).pooler_output
    return torch.stack([f.mean(0) for f in features])  # each f: [n_latents, D]


def pretrain_tiny_base(model, processor, rows, tiny, progress: bool = True) -> dict[str, float]:
    """Stage 1: make a random tiny base behave like a (very small) pretrained one.

    (a) ``tiny.vision_pretrain_steps``: the vision tower and the connector learn, through a
    throw-away linear probe on the image features the text model receives, which open answers (not
    yes/no) each training image has: a multi-label classifier. This stands in for SigLIP's own
    pretraining and for aligning the connector, as real Idefics2 had both before fine-tuning. (b) ``tiny.pretrain_steps``: the whole
    model trains on the training conversations with the language-model loss.

    Returns the last losses of each part.
    """
    import random
    from collections import defaultdict

    from tqdm.auto import tqdm

    from idefics2_ft.data.collator import Idefics2Collator
    from idefics2_ft.data.sources import RecordDataset, load_image

    rng = random.Random(tiny.seed)
    report: dict[str, float] = {}
    model.train()
    if tiny.vision_pretrain_steps:
        answers_of: dict[str, set[str]] = defaultdict(set)
        for row in rows:
            if len(row.images) == 1 and isinstance(row.images[0], str) and row.answers:
                answer = row.answers[0].strip().lower()
                if answer not in ("yes", "no"):
                    answers_of[row.images[0]].add(answer)
        vocab = sorted({a for s in answers_of.values() for a in s})
        index = {a: i for i, a in enumerate(vocab)}
        images = sorted(answers_of)
        if not images:
            raise ValueError(
                "model.tiny.vision_pretrain_steps needs single-image training rows with image files and "
                "open (not yes/no) answers; this data has none: set model.tiny.vision_pretrain_steps=0."
            )
        probe = torch.nn.Linear(model.config.text_config.hidden_size, len(vocab))
        params = [*model.model.vision_model.parameters(), *model.model.connector.parameters(), *probe.parameters()]
        optimizer = torch.optim.AdamW(params, lr=1e-3)
        cache: dict[str, object] = {}
        bar = tqdm(
            range(tiny.vision_pretrain_steps),
            desc="stage 1a: vision tower + connector",
            disable=not progress,
            mininterval=2.0,
        )
        for _ in bar:
            batch = rng.sample(images, min(32, len(images)))
            for path in batch:
                if path not in cache:
                    cache[path] = load_image(path)
            pics = [[cache[p]] for p in batch]
            px = processor.image_processor(pics, return_tensors="pt")
            target = torch.zeros(len(batch), len(vocab))
            for row, path in enumerate(batch):
                for a in answers_of[path]:
                    target[row, index[a]] = 1.0
            feats = _image_features(model, px["pixel_values"], px["pixel_attention_mask"])
            loss = torch.nn.functional.binary_cross_entropy_with_logits(probe(feats), target)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            bar.set_postfix(loss=f"{loss.item():.3f}")
        report["stage1/vision_loss"] = loss.item()
    if tiny.pretrain_steps:
        dataset = RecordDataset(rows)
        collator = Idefics2Collator(processor, on_bad_sample="skip")
        optimizer = torch.optim.AdamW(model.parameters(), lr=tiny.pretrain_lr, weight_decay=0.0)
        scheduler = torch.optim.lr_scheduler.OneCycleLR(
            optimizer, max_lr=tiny.pretrain_lr, total_steps=tiny.pretrain_steps, pct_start=0.1
        )
        order = list(range(len(dataset)))
        rng.shuffle(order)
        bar = tqdm(range(tiny.pretrain_steps), desc="stage 1b: full training", disable=not progress, mininterval=2.0)
        for step in bar:
            start = (step * tiny.pretrain_batch_size) % len(order)
            batch = collator([dataset[i] for i in order[start : start + tiny.pretrain_batch_size]])
            batch.pop("bad_samples")
            if "input_ids" not in batch:  # every record of this batch was bad
                continue
            loss = model(**batch).loss
            optimizer.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            scheduler.step()
            bar.set_postfix(loss=f"{loss.item():.3f}")
        report["stage1/lm_loss"] = loss.item()
    model.eval()
    return report
