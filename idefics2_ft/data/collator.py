"""Conversation records -> model batches. All chat rendering, image processing and -100 masking lives here.

Why and how: ``docs/data.md#how-the-collator-builds-the-labels``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from idefics2_ft.data.images import pictures_per_image
from idefics2_ft.data.records import BadSample, BadSampleError, count_images, message_text

# What transformers' cross-entropy ignores. Not image_token_id: early Idefics2 code ignored that id
# in the loss, and old notebooks padded labels with it; transformers uses -100.
IGNORE_INDEX = -100


def _expand_images(text: str, image_str: str, fake: str, image: str) -> str:
    """Replace each ``<image>`` placeholder as ``Idefics2Processor`` does before tokenizing."""
    text = text.replace(image, image_str)
    text = text.replace(fake + fake, fake)
    # The processor puts a space between a closing fake token and a word glued to it.
    out, i = [], 0
    while True:
        j = text.find(fake, i)
        if j < 0:
            out.append(text[i:])
            return "".join(out)
        end = j + len(fake)
        out.append(text[i:end])
        if end < len(text) and not text[end].isspace() and text[end] != "<":
            out.append(" ")
        i = end


def encode_records(records: list, encode: Callable[[dict], Any], on_bad_sample: str) -> tuple[list, list[BadSample]]:
    """Each record encoded, apart from the bad ones (read bad, or found bad by ``encode``): ``(encoded, bad)``.

    Raises:
        BadSampleError: the first bad one, with ``on_bad_sample=raise``, naming where it is.
    """
    encoded, bad = [], []
    for record in records:
        item = record if isinstance(record, BadSample) else encode(record)
        if isinstance(item, BadSample):
            if on_bad_sample == "raise":
                raise BadSampleError(
                    f"{item.where()}: {item.reason} (set data.on_bad_sample=skip to skip such records)"
                )
            bad.append(item)
        else:
            encoded.append(item)
    return encoded, bad


class Idefics2Collator:
    """Build ``input_ids, attention_mask, pixel_values, pixel_attention_mask, labels`` from records.

    Args:
        processor: an ``Idefics2Processor`` (its tokenizer and image processor are used).
        max_length: cut longer samples (after image expansion) at an image-block boundary.
        padding_side: "right" for training, "left" for generation.
        add_generation_prompt: drop the last assistant turn and end with ``Assistant:`` (for
            generation); its text is returned as ``targets``.
        on_bad_sample: "skip" (count it) or "raise".
        train_on_truncated: keep a training sample whose answer ``max_length`` cuts short (it then
            has no closing ``<end_of_utterance>`` to learn, which teaches the model not to stop);
            by default such a sample is skipped and counted as ``answer_truncated``.
        generation_prefix: with ``add_generation_prompt``, text the answer starts after ``Assistant:``
            (an evaluation preset's prefill, `` Answer:``); the generated text is what follows it.
    """

    def __init__(
        self,
        processor: Any,
        max_length: int | None = None,
        padding_side: str = "right",
        add_generation_prompt: bool = False,
        on_bad_sample: str = "skip",
        train_on_truncated: bool = False,
        generation_prefix: str = "",
    ) -> None:
        if padding_side not in ("left", "right"):
            raise ValueError(f"padding_side={padding_side!r}: use 'left' or 'right'.")
        if on_bad_sample not in ("skip", "raise"):
            raise ValueError(f"data.on_bad_sample={on_bad_sample!r}: use 'skip' or 'raise'.")
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.max_length = max_length
        self.padding_side = padding_side
        self.add_generation_prompt = add_generation_prompt
        self.on_bad_sample = on_bad_sample
        self.train_on_truncated = train_on_truncated
        self.generation_prefix = generation_prefix
        self.fake_token = processor.fake_image_token
        self.image_token = processor.image_token
        self.fake_id = self.tokenizer.convert_tokens_to_ids(self.fake_token)
        self.image_id = self.tokenizer.convert_tokens_to_ids(self.image_token)
        self.eou = str(processor.end_of_utterance_token)
        self.eou_id = self.tokenizer.convert_tokens_to_ids(self.eou)
        splits = pictures_per_image(getattr(processor.image_processor, "do_image_splitting", False))
        self.crops = splits  # pictures per image given to the vision tower
        self.tokens_per_image = processor.image_seq_len * splits
        self.image_str = (self.fake_token + self.image_token * processor.image_seq_len + self.fake_token) * splits
        pad = self.tokenizer.pad_token_id
        self.pad_id = pad if pad is not None else self.tokenizer.unk_token_id

    # ---------------------------------------------------------------- rendering
    def render(self, messages: list[dict], add_generation_prompt: bool = False) -> tuple[str, list[tuple[int, int]]]:
        """Render messages as the Idefics2 chat template does, with images expanded.

        Returns the text and the character spans the model learns (assistant words + closing
        ``<end_of_utterance>``). Equal to ``processor.apply_chat_template`` followed by the
        processor's image expansion (tested).
        """
        pieces: list[str] = []
        spans: list[tuple[int, int]] = []
        pos = 0
        for message in messages:
            content = message["content"]
            if isinstance(content, str):
                content = [{"type": "text", "text": content}]
            starts_with_image = bool(content) and content[0].get("type") == "image"
            prefix = message["role"].capitalize() + (":" if starts_with_image else ": ")
            body = "".join(
                part["text"] if part.get("type") == "text" else self.image_token
                for part in content
                if part.get("type") in ("text", "image")
            )
            body = _expand_images(body + self.eou, self.image_str, self.fake_token, self.image_token)
            learned = message["role"] == "assistant"
            if learned:
                # The space of ": " belongs to the first answer token ("▁blue"), so the span
                # starts right after the colon.
                colon = len(prefix.rstrip(" "))
                pieces.append(prefix[:colon])
                start = pos + colon
                pieces.append(prefix[colon:] + body)
                spans.append((start, start + len(prefix) - colon + len(body)))
            else:
                pieces.append(prefix + body)
            pieces.append("\n")
            pos = sum(len(p) for p in pieces)
        if add_generation_prompt:
            pieces.append("Assistant:" + self.generation_prefix)
        return "".join(pieces), spans

    # ---------------------------------------------------------------- one sample
    def encode(self, record: dict) -> dict | BadSample:
        """Tokenize one record; returns a dict of lists, or ``BadSample`` if nothing learnable fits."""
        index = record.get("index", -1)
        origin, source = record.get("origin"), record.get("source")
        messages = record["messages"]
        images = list(record.get("images") or [])
        target = None
        if self.add_generation_prompt:
            if not messages or messages[-1]["role"] != "assistant":
                return BadSample(index, "no assistant turn to generate", "no_assistant_turn", origin, source)
            target = message_text(messages[-1])
            messages = messages[:-1]
        text, spans = self.render(messages, add_generation_prompt=self.add_generation_prompt)
        n_placeholders = count_images(messages)
        if n_placeholders > len(images):
            return BadSample(
                index,
                f"{n_placeholders} image placeholders but {len(images)} images",
                "too_many_placeholders",
                origin,
                source,
            )
        images = images[:n_placeholders]
        enc = self.tokenizer(text, return_offsets_mapping=True, add_special_tokens=True)
        ids: list[int] = enc["input_ids"]
        labels = [IGNORE_INDEX] * len(ids)
        for i, (start, end) in enumerate(enc["offset_mapping"]):
            if end > start and any(end > s and start < e for s, e in spans):
                labels[i] = ids[i]
        for i, tok in enumerate(ids):  # image tokens are never learned, whatever the spans say
            if tok in (self.image_id, self.fake_id):
                labels[i] = IGNORE_INDEX
        if self.max_length is not None and len(ids) > self.max_length:
            cut = self._safe_cut(ids, self.max_length)
            kept_images = sum(1 for t in ids[:cut] if t == self.image_id) // self.tokens_per_image
            ids, labels, images = ids[:cut], labels[:cut], images[:kept_images]
            if not self.add_generation_prompt and all(x == IGNORE_INDEX for x in labels):
                image_tokens = sum(1 for t in enc["input_ids"] if t == self.image_id)
                reason = (
                    f"data.max_length={self.max_length} leaves no room for an answer: the sample needs "
                    f"{len(enc['input_ids'])} tokens, {image_tokens} of them its images': raise data.max_length"
                )
                return BadSample(index, reason, "too_long", origin, source)
            cut_answer = labels[-1] != IGNORE_INDEX and ids[-1] != self.eou_id  # stopped inside an answer
            if not self.add_generation_prompt and cut_answer and not self.train_on_truncated:
                reason = (
                    f"an answer is cut by max_length={self.max_length} before its <end_of_utterance> "
                    "(raise data.max_length, or set data.train_on_truncated=true to train on it anyway)"
                )
                return BadSample(index, reason, "answer_truncated", origin, source)
        out = {"input_ids": ids, "labels": labels, "images": images, "source": source}
        if target is not None:
            out["target"] = target
        return out

    def _safe_cut(self, ids: list[int], max_length: int) -> int:
        """The largest cut <= max_length that does not split an image block."""
        positions = [i for i, t in enumerate(ids) if t == self.image_id]
        cut = max_length
        for k in range(0, len(positions), self.tokens_per_image):
            first, last = positions[k], positions[min(k + self.tokens_per_image, len(positions)) - 1]
            open_fake, close_fake = first - 1, last + 1
            if open_fake < cut <= close_fake:
                # keep an opening fake token only when it also closes the previous image
                shared = open_fake > 0 and ids[open_fake - 1] == self.image_id
                return open_fake + 1 if shared else open_fake
        return cut

    # ---------------------------------------------------------------- batch
    def __call__(self, records: list[dict | BadSample]) -> dict[str, Any]:
        encoded, bad = encode_records(records, self.encode, self.on_bad_sample)
        batch: dict[str, Any] = {"bad_samples": bad}
        if not encoded:
            return batch
        length = max(len(e["input_ids"]) for e in encoded)
        input_ids = torch.full((len(encoded), length), self.pad_id, dtype=torch.long)
        attention_mask = torch.zeros((len(encoded), length), dtype=torch.long)
        labels = torch.full((len(encoded), length), IGNORE_INDEX, dtype=torch.long)
        for row, e in enumerate(encoded):
            n = len(e["input_ids"])
            sl = slice(length - n, length) if self.padding_side == "left" else slice(0, n)
            input_ids[row, sl] = torch.tensor(e["input_ids"])
            labels[row, sl] = torch.tensor(e["labels"])
            attention_mask[row, sl] = 1
        batch.update(input_ids=input_ids, attention_mask=attention_mask, labels=labels)
        batch["sources"] = [e["source"] for e in encoded]
        batch.update(self._pixels([e["images"] for e in encoded]))
        pictures = sum(len(e["images"]) for e in encoded) * self.crops
        batch["stats"] = padding_stats(attention_mask, batch.get("pixel_attention_mask"), pictures)
        if self.add_generation_prompt:
            batch["targets"] = [e["target"] for e in encoded]
        return batch

    def _pixels(self, images: list[list]) -> dict[str, torch.Tensor]:
        """``pixel_values`` [B, max_images, 3, H, W] and ``pixel_attention_mask`` [B, max_images, H, W]."""
        if not any(images):
            return {}
        rows = [[im.convert("RGB") for im in row] for row in images]
        nonempty = [row for row in rows if row]
        out = self.processor.image_processor(nonempty, return_tensors="pt")
        pv, pm = out["pixel_values"], out["pixel_attention_mask"]
        if len(nonempty) == len(rows):
            return {"pixel_values": pv, "pixel_attention_mask": pm}
        # Rows with no image get all-zero images, which Idefics2 recognises as padding.
        full_v = pv.new_zeros((len(rows), *pv.shape[1:]))
        full_m = pm.new_zeros((len(rows), *pm.shape[1:]))
        j = 0
        for i, row in enumerate(rows):
            if row:
                full_v[i], full_m[i] = pv[j], pm[j]
                j += 1
        return {"pixel_values": full_v, "pixel_attention_mask": full_m}


def padding_stats(attention_mask: torch.Tensor, pixel_mask: torch.Tensor | None, pictures: int) -> dict[str, int]:
    """Token and pixel counts of a batch, real and padded, as plain ints (the step reads them
    without a device sync): ``data/pad_frac`` and ``data/pixel_pad_frac`` come from them.

    Pixels count over the pictures the vision tower sees (images, or crops with splitting), each
    padded to the tallest and widest of the batch; the all-zero slots of rows with fewer images are
    dropped by the model before the vision tower and are not counted.
    """
    stats = {
        "tokens": int(attention_mask.count_nonzero()),
        "token_slots": attention_mask.numel(),
        "samples": len(attention_mask),
    }
    if pixel_mask is not None:
        stats["pixels"] = int(pixel_mask.count_nonzero())  # 8x faster than sum() on a bool mask
        stats["pixel_slots"] = pictures * pixel_mask.shape[-2] * pixel_mask.shape[-1]
    return stats


def format_labels(batch: dict, tokenizer: Any, limit: int = 2) -> str:
    """The first samples of a collated batch, one token per item, learned tokens in [brackets]
    (``debug.show_labels=true``)."""
    lines = []
    for row in range(min(limit, batch["input_ids"].shape[0])):
        ids = batch["input_ids"][row].tolist()
        labels = batch["labels"][row].tolist()
        mask = batch["attention_mask"][row].tolist()
        pieces = []
        for tok, lab, m in zip(ids, labels, mask, strict=True):
            if not m:
                continue
            text = tokenizer.convert_ids_to_tokens(tok)
            pieces.append(f"[{text}]" if lab != IGNORE_INDEX else text)
        learned = sum(1 for x in labels if x != IGNORE_INDEX)
        lines.append(f"sample {row}: {learned} learned tokens of {sum(mask)}\n  " + " ".join(pieces))
    return "\n".join(lines)
