"""Stage 1: make a random tiny base behave like a (very small) pretrained one."""

from __future__ import annotations

import random
from collections import defaultdict

import torch
from tqdm.auto import tqdm

from idefics2_ft.data.collator import BadSampleError, DataError, Idefics2Collator
from idefics2_ft.data.sources import RecordDataset, load_image
from idefics2_ft.trainer.progress import LineTicker, on_a_terminal


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


def pretrain_tiny_base(
    model, processor, rows, tiny, progress: bool = True, on_bad_sample: str = "skip"
) -> dict[str, float]:
    """Stage 1: make a random tiny base behave like a (very small) pretrained one.

    (a) ``tiny.vision_pretrain_steps``: the vision tower and the connector learn, through a
    throw-away linear probe on the image features the text model receives, which open answers (not
    yes/no) each training image has: a multi-label classifier. This stands in for SigLIP's own
    pretraining and for aligning the connector, as real Idefics2 had both before fine-tuning. (b) ``tiny.pretrain_steps``: the whole
    model trains on the training conversations with the language-model loss.

    Returns the last losses of each part.
    """
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
        bar, lines = _progress("stage 1a: vision tower + connector", tiny.vision_pretrain_steps, progress)
        for step in bar:
            batch = rng.sample(images, min(32, len(images)))
            for path in batch:
                if path not in cache:
                    cache[path] = _load_or_skip(path, on_bad_sample)
            batch = [p for p in batch if cache[p] is not None]
            if not batch:
                continue
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
            if progress and bar.disable:
                lines.tick(step + 1, loss.item())
        if not any(v is not None for v in cache.values()):
            raise DataError("stage 1: no training image could be read: check the image paths of data.train_file.")
        report["stage1/vision_loss"] = loss.item()
        report["stage1/skipped_images"] = sum(1 for v in cache.values() if v is None)
    if tiny.pretrain_steps:
        dataset = RecordDataset(rows)
        collator = Idefics2Collator(processor, on_bad_sample=on_bad_sample)
        optimizer = torch.optim.AdamW(model.parameters(), lr=tiny.pretrain_lr, weight_decay=0.0)
        scheduler = torch.optim.lr_scheduler.OneCycleLR(
            optimizer, max_lr=tiny.pretrain_lr, total_steps=tiny.pretrain_steps, pct_start=0.1
        )
        order = list(range(len(dataset)))
        rng.shuffle(order)
        bar, lines = _progress("stage 1b: full training", tiny.pretrain_steps, progress)
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
            if progress and bar.disable:
                lines.tick(step + 1, loss.item())
        report["stage1/lm_loss"] = loss.item()
    model.eval()
    return report
