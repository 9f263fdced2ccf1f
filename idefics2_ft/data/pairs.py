"""Preference pairs -> model batches: both sides rendered, encoded and masked by ``Idefics2Collator``,
the prompt's images given once per pair.

A pair record (``row_to_record`` of a row with ``rejected``) holds ``messages`` (the chosen side's
conversation), ``rejected`` (the rejected side's), ``images`` and ``rejected_images`` (the rejected
side's own images, or None: it shows ``images``). Each side learns its final answer only: the
prompt, earlier assistant turns included, is what both sides share, and is -100 like the images,
the system and user turns and the padding. A pair is never cut: one whose longer side does not fit
``max_length`` is counted (``too_long``), as is a side with an empty answer (``empty_side``) and two
sides that are the same (``identical_sides``).

The batch (B pairs, L the longest side of any pair)::

    pixel_values [B, max_images, 3, H, W], pixel_attention_mask [B, max_images, H, W]
        the chosen side's (the prompt's) images, once per pair; absent when no pair has an image
    rejected_pixel_values, rejected_pixel_attention_mask, rejected_own_images [B] (bool)
        only when some pair's rejected side shows images of its own: those pairs' images, all-zero
        (padding) rows for the pairs whose rejected side shows ``pixel_values``
    chosen_input_ids, chosen_attention_mask, chosen_labels,
    rejected_input_ids, rejected_attention_mask, rejected_labels   [B, L], right-padded to one L
    bad_samples, sources, stats (``padding_stats`` over both sides; ``samples`` counts pairs), n_pairs
"""

from __future__ import annotations

from typing import Any

import torch

from idefics2_ft.data.collator import IGNORE_INDEX, Idefics2Collator, encode_records, padding_stats
from idefics2_ft.data.records import BadSample, final_answer, sides_problem

SIDES = ("chosen", "rejected")


class _FinalAnswer(Idefics2Collator):
    """``Idefics2Collator`` whose labels are the last assistant turn's alone (a side's answer)."""

    def render(self, messages: list[dict], add_generation_prompt: bool = False) -> tuple[str, list[tuple[int, int]]]:
        text, spans = super().render(messages, add_generation_prompt)
        return text, spans[-1:]


class PairCollator:
    """Build a preference batch from pair records (see the module's docstring for its keys).

    Args:
        processor: an ``Idefics2Processor``.
        max_length: the most tokens a side may have (after image expansion); a pair whose longer
            side has more is a bad sample (``too_long``), never cut.
        on_bad_sample: "skip" (count it) or "raise".
    """

    def __init__(self, processor: Any, max_length: int | None = None, on_bad_sample: str = "skip") -> None:
        self.sides = _FinalAnswer(processor, max_length=None, on_bad_sample=on_bad_sample)
        self.max_length = max_length
        self.on_bad_sample = on_bad_sample
        self.pad_id = self.sides.pad_id

    # ---------------------------------------------------------------- one pair
    def encode(self, record: dict) -> dict | BadSample:
        """Both sides of one pair tokenized (``{chosen, rejected}``: ``input_ids``, ``labels``,
        ``images``), with ``own`` (the rejected side shows images of its own); or the ``BadSample`` it is."""
        index, origin, source = record.get("index", -1), record.get("origin"), record.get("source")
        chosen, rejected = record["messages"], record.get("rejected")
        if rejected is None:
            reason = "not a preference pair: no rejected side (a pair dataset gives both, for objective=dpo)"
            return BadSample(index, reason, "empty_side", origin, source)
        images = list(record.get("images") or [])
        own = record.get("rejected_images")
        problem = sides_problem(chosen, rejected, images, own)
        if problem:
            return BadSample(index, problem[1], problem[0], origin, source)
        out: dict[str, Any] = {"source": source, "own": own is not None}
        for side, messages, side_images in (("chosen", chosen, images), ("rejected", rejected, own or images)):
            encoded = self.sides.encode({"messages": messages, "images": side_images, **_where(record)})
            if isinstance(encoded, BadSample):
                encoded.reason = f"the {side} side: {encoded.reason}"
                return encoded
            if all(label == IGNORE_INDEX for label in encoded["labels"]):  # its answer has no token
                reason = f"the {side} side's answer {final_answer(messages)!r} has no token to learn"
                return BadSample(index, reason, "empty_side", origin, source)
            out[side] = encoded
        longest = max(len(out[side]["input_ids"]) for side in SIDES)
        if self.max_length is not None and longest > self.max_length:
            image_tokens = sum(1 for t in out["chosen"]["input_ids"] if t == self.sides.image_id)
            reason = (
                f"data.max_length={self.max_length} is shorter than the pair: its longer side needs {longest} tokens, "
                f"{image_tokens} of them its images'. A pair is never cut (the prompt's images and both answers "
                "are what it compares): raise data.max_length"
            )
            return BadSample(index, reason, "too_long", origin, source)
        return out

    # ---------------------------------------------------------------- batch
    def __call__(self, records: list[dict | BadSample]) -> dict[str, Any]:
        encoded, bad = encode_records(records, self.encode, self.on_bad_sample)
        batch: dict[str, Any] = {"bad_samples": bad, "n_pairs": len(encoded)}
        if not encoded:
            return batch
        length = max(len(e[side]["input_ids"]) for e in encoded for side in SIDES)
        for side in SIDES:
            ids = torch.full((len(encoded), length), self.pad_id, dtype=torch.long)
            mask = torch.zeros((len(encoded), length), dtype=torch.long)
            labels = torch.full((len(encoded), length), IGNORE_INDEX, dtype=torch.long)
            for row, e in enumerate(encoded):
                n = len(e[side]["input_ids"])
                ids[row, :n] = torch.tensor(e[side]["input_ids"])
                labels[row, :n] = torch.tensor(e[side]["labels"])
                mask[row, :n] = 1
            batch.update({f"{side}_input_ids": ids, f"{side}_attention_mask": mask, f"{side}_labels": labels})
        batch["sources"] = [e["source"] for e in encoded]
        batch.update(self.sides._pixels([e["chosen"]["images"] for e in encoded]))
        pictures = sum(len(e["chosen"]["images"]) for e in encoded)
        own = [e["own"] for e in encoded]
        if any(own):
            pixels = self.sides._pixels(
                [e["rejected"]["images"] if o else [] for e, o in zip(encoded, own, strict=True)]
            )
            batch.update({f"rejected_{key}": value for key, value in pixels.items()})
            batch["rejected_own_images"] = torch.tensor(own, dtype=torch.bool)
        both = torch.cat([batch["chosen_attention_mask"], batch["rejected_attention_mask"]])
        stats = padding_stats(both, batch.get("pixel_attention_mask"), pictures * self.sides.crops)
        if "rejected_pixel_attention_mask" in batch:
            extra = sum(len(e["rejected"]["images"]) for e, o in zip(encoded, own, strict=True) if o) * self.sides.crops
            rejected = padding_stats(both, batch["rejected_pixel_attention_mask"], extra)
            for key in ("pixels", "pixel_slots"):
                stats[key] = stats.get(key, 0) + rejected[key]
        stats["samples"] = len(encoded)  # pairs
        batch["stats"] = stats
        return batch


def _where(record: dict) -> dict:
    return {key: record.get(key) for key in ("index", "origin", "source")}
