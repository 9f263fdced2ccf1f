"""Stage 1: make a random tiny base behave like a (very small) pretrained one, without the task.

Why and how: ``docs/benchmarks.md#stage-1-the-demos-stand-in-for-pretraining``.
"""

from __future__ import annotations

import random
import string
from collections import defaultdict

import torch
from tqdm.auto import tqdm

from idefics2_ft.console import LineTicker, on_a_terminal
from idefics2_ft.data.collator import Idefics2Collator
from idefics2_ft.data.dataset import RecordDataset
from idefics2_ft.data.images import load_image
from idefics2_ft.data.records import BadSampleError, DataError, Row

# What stage 1b asks for (None: the image alone), and the phrasings of the description. Each
# image is described with the phrasings that use all it is known to show (its colour and shape,
# or the one of them its annotations give). No request is a question about the image, and no
# description is a one-word answer: the base learns to look and to describe, not the demo's task.
CAPTIONS = (
    (
        None,
        (
            "a {color} {shape}.",
            "a picture of a {color} {shape}.",
            "one {color} {shape}.",
            "a {color} shape.",
            "a {shape}.",
        ),
    ),
    (
        "Describe the image.",
        (
            "a {color} {shape} on a light background.",
            "a {color} {shape}; there is no {other_color} shape and no {other_shape}.",
            "this is a {shape}, and it is {color}.",
            "a {color} shape on a light background.",
            "a {shape} on a light background.",
        ),
    ),
    ("Write a caption.", ("a {color} {shape}.", "a picture of a {color} {shape}.", "a {color} shape.", "a {shape}.")),
    ("Describe the colour of the shape.", ("the shape is {color}.", "it is {color}, not {other_color}.")),
    ("Describe the shape.", ("it is a {shape}.", "it is a {shape}, not a {other_shape}.")),
)


def _names(phrasing: str) -> list[str]:
    """The fields of a phrasing: ``color``, ``shape``, ``other_color`` (another colour than the image's), ..."""
    return [name for _, name, _, _ in string.Formatter().parse(phrasing) if name]


def _kinds(phrasing: str) -> frozenset[str]:
    """The kinds of attribute a phrasing speaks of (``other_color`` counts as colour)."""
    return frozenset(name.removeprefix("other_") for name in _names(phrasing))


def image_attributes(rows) -> dict[str, dict[str, str]]:
    """What each single-image training row's annotations say its image shows.

    Returns ``{image path: {kind: value}}``, where the kind is the row's question type ("color",
    "shape"; "answer" where the data has no types) and the value its open (not yes/no) answer.
    """
    attributes: dict[str, dict[str, str]] = defaultdict(dict)
    for row in rows:
        if len(row.images) == 1 and isinstance(row.images[0], str) and row.answers:
            answer = row.answers[0].strip().lower()
            if answer not in ("yes", "no"):
                attributes[row.images[0]].setdefault(row.question_type or "answer", answer)
    return dict(attributes)


def caption(
    attributes: dict[str, str], rng: random.Random, vocab: dict[str, list[str]] | None = None
) -> tuple[str | None, str]:
    """A request (None: the image alone) and a description of the image, drawn from ``rng``.

    ``vocab`` (every value of each kind in the data) lets a description say what the image is not
    ("it is red, not blue."). For data without colour and shape attributes: the image alone and
    "a picture of: <values>.".
    """
    known = frozenset(attributes) & {"color", "shape"}
    values = {
        **attributes,
        **{f"other_{k}": [v for v in (vocab or {}).get(k, []) if v != attributes[k]] for k in known},
    }

    def usable(phrasing: str) -> bool:  # says all that is known, and has another value where it names one
        return _kinds(phrasing) == known and all(values.get(name) for name in _names(phrasing))

    choices = [(request, [p for p in phrasings if usable(p)]) for request, phrasings in CAPTIONS]
    choices = [(request, kept) for request, kept in choices if kept]
    if not known or not choices:
        return None, "a picture of: " + ", ".join(attributes[k] for k in sorted(attributes)) + "."
    request, phrasings = rng.choice(choices)
    phrasing = rng.choice(phrasings)
    fields = {n: rng.choice(values[n]) if n.startswith("other_") else values[n] for n in _names(phrasing)}
    return request, phrasing.format(**fields)


def caption_row(
    path: str, attributes: dict[str, str], rng: random.Random, vocab: dict[str, list[str]] | None = None
) -> Row:
    """A describing conversation: the image (and maybe a request) as the user turn, the description as the answer."""
    request, text = caption(attributes, rng, vocab)
    user = [{"type": "image"}] + ([{"type": "text", "text": request}] if request else [])
    messages = [
        {"role": "user", "content": user},
        {"role": "assistant", "content": [{"type": "text", "text": text}]},
    ]
    return Row(messages=messages, images=[path], answers=[text], origin=f"stage 1 caption of {path}")


def _image_features(model, pixel_values, pixel_attention_mask) -> torch.Tensor:
    """What the text model receives for single-image batches, mean-pooled over the latents: [B, D]."""
    features = model.model.get_image_features(pixel_values, pixel_attention_mask).pooler_output
    return torch.stack([f.mean(0) for f in features])  # each f: [n_latents, D]


def _progress(name: str, total: int, progress: bool) -> tuple[tqdm, LineTicker]:
    """A bar over ``range(total)`` on a terminal (disabled elsewhere), and the lines that replace it."""
    bar = tqdm(range(total), desc=name, disable=not (progress and on_a_terminal()), mininterval=2.0)
    return bar, LineTicker(name, total)


def _load_or_skip(path: str, on_bad_sample: str):
    """The image at ``path``, or None (skipped) when it cannot be read and ``on_bad_sample=skip``."""
    try:
        return load_image(path)
    except Exception as err:  # PIL raises many types for a corrupt file
        if on_bad_sample == "raise":
            raise BadSampleError(
                f"stage 1: image {path}: {type(err).__name__}: {err} (set data.on_bad_sample=skip to skip it)"
            ) from err
        return None


def _one_cycle(optimizer, lr: float, steps: int):
    """Warm up over the first 10% of the steps, then anneal (stage 1 learns shapes far more reliably so)."""
    return torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=max(steps, 2), pct_start=0.1)


def _pretrain_vision(model, processor, attributes, vocab, steps, rng, progress, on_bad_sample) -> dict[str, float]:
    """Part (a): the vision tower and the connector, through a linear probe per kind of attribute."""
    kinds = sorted(vocab)
    offsets, width = {}, 0
    for k in kinds:
        offsets[k], width = width, width + len(vocab[k])
    probe = torch.nn.Linear(model.config.text_config.hidden_size, width)
    params = [*model.model.vision_model.parameters(), *model.model.connector.parameters(), *probe.parameters()]
    optimizer = torch.optim.AdamW(params, lr=1e-3)
    scheduler = _one_cycle(optimizer, 1e-3, steps)
    images = sorted(attributes)
    cache: dict[str, object] = {}
    bar, lines = _progress("stage 1a: vision tower + connector", steps, progress)
    loss = torch.tensor(float("nan"))
    for step in bar:
        batch = rng.sample(images, min(32, len(images)))
        for path in batch:
            if path not in cache:
                cache[path] = _load_or_skip(path, on_bad_sample)
        batch = [p for p in batch if cache[p] is not None]
        if batch:
            px = processor.image_processor([[cache[p]] for p in batch], return_tensors="pt")
            logits = probe(_image_features(model, px["pixel_values"], px["pixel_attention_mask"]))
            loss = logits.new_zeros(())
            for k in kinds:
                target = torch.tensor([vocab[k].index(attributes[p][k]) if k in attributes[p] else -100 for p in batch])
                head = logits[:, offsets[k] : offsets[k] + len(vocab[k])]
                if (target >= 0).any():
                    loss = loss + torch.nn.functional.cross_entropy(head, target, ignore_index=-100)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        scheduler.step()
        bar.set_postfix(loss=f"{loss.item():.3f}")
        if progress and bar.disable:
            lines.tick(step + 1, loss.item())
    if not any(v is not None for v in cache.values()):
        raise DataError("stage 1: no training image could be read: check the image paths of data.train_file.")
    return {"stage1/vision_loss": loss.item(), "stage1/skipped_images": sum(1 for v in cache.values() if v is None)}


def _pretrain_captions(model, processor, attributes, vocab, tiny, rng, progress, on_bad_sample) -> dict[str, float]:
    """Part (b): the whole model learns to describe the training images (no question is asked)."""
    collator = Idefics2Collator(processor, on_bad_sample=on_bad_sample)
    optimizer = torch.optim.AdamW(model.parameters(), lr=tiny.pretrain_lr, weight_decay=0.0)
    scheduler = _one_cycle(optimizer, tiny.pretrain_lr, tiny.pretrain_steps)
    images = sorted(attributes)
    bar, lines = _progress("stage 1b: describing the images, whole model", tiny.pretrain_steps, progress)
    loss = torch.tensor(float("nan"))
    for step in bar:
        paths = rng.sample(images, min(tiny.pretrain_batch_size, len(images)))
        records = RecordDataset([caption_row(p, attributes[p], rng, vocab) for p in paths])
        batch = collator([records[i] for i in range(len(records))])
        batch.pop("bad_samples")
        batch.pop("stats", None)
        if "input_ids" in batch:  # else every record of this batch was bad
            loss = model(**batch).loss
            optimizer.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
        scheduler.step()
        bar.set_postfix(loss=f"{loss.item():.3f}")
        if progress and bar.disable:
            lines.tick(step + 1, loss.item())
    return {"stage1/lm_loss": loss.item()}


def pretrain_tiny_base(
    model, processor, rows, tiny, progress: bool = True, on_bad_sample: str = "skip"
) -> dict[str, float]:
    """Stage 1 on ``rows`` (the training split): (a) attribute probes, then (b) captioning.

    Returns the last loss of each part and the number of unreadable images skipped.

    Raises:
        ValueError: the data has no single-image rows with image files and open answers.
    """
    attributes = image_attributes(rows)
    if not attributes:
        raise ValueError(
            "Stage 1 of the tiny base needs single-image training rows with image files and open (not "
            "yes/no) answers, which say what each image shows; this data has none: set "
            "model.tiny.vision_pretrain_steps=0 model.tiny.pretrain_steps=0."
        )
    vocab = {
        k: sorted({a[k] for a in attributes.values() if k in a}) for k in {k for a in attributes.values() for k in a}
    }
    rng = random.Random(tiny.seed)
    report: dict[str, float] = {}
    model.train()
    if tiny.vision_pretrain_steps:
        report |= _pretrain_vision(
            model, processor, attributes, vocab, tiny.vision_pretrain_steps, rng, progress, on_bad_sample
        )
    if tiny.pretrain_steps:
        report |= _pretrain_captions(model, processor, attributes, vocab, tiny, rng, progress, on_bad_sample)
    model.eval()
    return report
