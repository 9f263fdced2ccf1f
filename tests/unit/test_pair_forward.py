"""A pair's forward sees each picture once and gives the log-probabilities plain forwards give."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from idefics2_ft.data.collator import IGNORE_INDEX, Idefics2Collator
from idefics2_ft.demo import ensure_tiny_base
from idefics2_ft.models import apply_peft, load_idefics2, load_processor
from idefics2_ft.training.pair_forward import pair_features, pair_logps, part_of, see_pair
from tests.helpers import TINY_RUN, compose_config


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    cache = tmp_path_factory.mktemp("tiny")
    cfg = compose_config(
        [*TINY_RUN, f"model.tiny.cache_dir={cache}", f"run_dir={cache}/run", "peft.target=text+connector"]
    )
    path = str(ensure_tiny_base(cfg))
    processor = load_processor(path, cfg.data)
    torch.manual_seed(0)
    model = apply_peft(load_idefics2(path, cfg.model, cfg.peft), cfg.peft, gradient_checkpointing=False)
    with torch.no_grad():  # lora_B starts at zero: give the adapters a say
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.02)
    model.eval()
    return model, processor


def record(colour: str, answer: str, pictures: int = 1) -> dict:
    return {
        "images": [Image.new("RGB", (64, 48), colour)] * pictures,
        "messages": [
            {"role": "user", "content": [*[{"type": "image"}] * pictures, {"type": "text", "text": "What colour?"}]},
            {"role": "assistant", "content": [{"type": "text", "text": answer}]},
        ],
    }


def pair_batch(processor, pairs: list[tuple[dict, dict]]) -> tuple[dict, dict, dict]:
    """A batch of pairs as the pair collator lays it out, and the two sides as plain SFT batches."""
    collate = Idefics2Collator(processor)
    chosen, rejected = collate([c for c, _ in pairs]), collate([r for _, r in pairs])
    length = max(chosen["input_ids"].shape[1], rejected["input_ids"].shape[1])
    batch = {"pixel_values": chosen["pixel_values"], "pixel_attention_mask": chosen["pixel_attention_mask"]}
    for side, b in (("chosen", chosen), ("rejected", rejected)):
        pad = length - b["input_ids"].shape[1]
        batch[f"{side}_input_ids"] = torch.nn.functional.pad(b["input_ids"], (0, pad), value=collate.pad_id)
        batch[f"{side}_attention_mask"] = torch.nn.functional.pad(b["attention_mask"], (0, pad), value=0)
        batch[f"{side}_labels"] = torch.nn.functional.pad(b["labels"], (0, pad), value=IGNORE_INDEX)
    return batch, chosen, rejected


def plain_logps(model, batch: dict) -> torch.Tensor:
    """Each row's summed log-probability of its labelled tokens, from an ordinary forward with pixels."""
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "pixel_values", "pixel_attention_mask")}
    logits = model(**inputs).logits[:, :-1].float()
    targets = batch["labels"][:, 1:]
    logps = torch.log_softmax(logits, -1).gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return (logps * (targets != IGNORE_INDEX)).sum(1)


def test_a_pairs_log_probabilities_are_those_of_plain_forwards(tiny):
    model, processor = tiny
    pairs = [
        (record("red", "it is red"), record("red", "blue, I think")),
        (record("blue", "blue", pictures=2), record("blue", "green", pictures=2)),
    ]
    batch, chosen, rejected = pair_batch(processor, pairs)
    with torch.no_grad():
        pictures, other = see_pair(model, batch)
        got = pair_logps(model, batch, pair_features(model, batch, pictures, other))
        want_chosen, want_rejected = plain_logps(model, chosen), plain_logps(model, rejected)
    # fp32 on the same weights and tokens: only the order of a few additions differs
    torch.testing.assert_close(got.chosen, want_chosen, atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(got.rejected, want_rejected, atol=1e-4, rtol=1e-5)
    assert got.chosen_tokens.tolist() == (chosen["labels"][:, 1:] != IGNORE_INDEX).sum(1).tolist()
    assert (got.chosen < 0).all() and not torch.equal(got.chosen, got.rejected)


def test_the_vision_tower_sees_each_picture_once_per_pair(tiny):
    model, processor = tiny
    tower = part_of(model, "Idefics2Model").vision_model
    seen: list[int] = []
    hook = tower.register_forward_hook(
        lambda m, args, kwargs, out: seen.append(kwargs["pixel_values"].shape[0]), with_kwargs=True
    )
    try:
        pairs = [(record(c, "yes"), record(c, "no")) for c in ("red", "blue", "green")]
        batch, chosen, rejected = pair_batch(processor, pairs)
        with torch.no_grad():
            pictures, other = see_pair(model, batch)
            pair_logps(model, batch, pair_features(model, batch, pictures, other))
        assert seen == [3]  # one call, three pictures: one per pair, for both answers
        seen.clear()
        with torch.no_grad():
            plain_logps(model, chosen), plain_logps(model, rejected)
        assert sum(seen) == 6  # what two ordinary batches cost (and twice that again for a reference)
    finally:
        hook.remove()
