"""Label masks token by token, padding sides, over-length records and bad samples."""

import pytest
import torch

from idefics2_ft.data.collator import IGNORE_INDEX, Idefics2Collator
from idefics2_ft.data.records import BadSample, BadSampleError


def text(t):
    return {"type": "text", "text": t}


IMG = {"type": "image"}


def learned_tokens(batch, tok, row=0):
    ids, labels = batch["input_ids"][row].tolist(), batch["labels"][row].tolist()
    return [tok.convert_ids_to_tokens(i) for i, lab in zip(ids, labels, strict=True) if lab != IGNORE_INDEX]


def test_single_turn_learns_only_the_answer_and_its_end_of_utterance(processor, red):
    record = {
        "images": [red],
        "messages": [
            {"role": "user", "content": [IMG, text("What color?")]},
            {"role": "assistant", "content": [text("red")]},
        ],
    }
    batch = Idefics2Collator(processor)([record])
    tok = processor.tokenizer
    assert learned_tokens(batch, tok) == ["▁red", "<end_of_utterance>"]
    ids, labels = batch["input_ids"][0], batch["labels"][0]
    # every supervised label equals its input id (the model shifts internally)
    assert torch.equal(labels[labels != IGNORE_INDEX], ids[labels != IGNORE_INDEX])
    for special in (processor.image_token_id, tok.convert_tokens_to_ids("<fake_token_around_image>")):
        assert (labels[ids == special] == IGNORE_INDEX).all()


def test_multi_turn_multi_image_with_system_prompt(processor, red, blue):
    record = {
        "images": [red, blue],
        "messages": [
            {"role": "system", "content": [text("Answer in one word.")]},
            {"role": "user", "content": [IMG, text("Color?")]},
            {"role": "assistant", "content": [text("red")]},
            {"role": "user", "content": [text("And this one?"), IMG]},
            {"role": "assistant", "content": [text("blue, clearly")]},
        ],
    }
    batch = Idefics2Collator(processor)([record])
    tok = processor.tokenizer
    assert learned_tokens(batch, tok) == [
        "▁red",
        "<end_of_utterance>",
        "▁blue",
        ",",
        "▁clearly",
        "<end_of_utterance>",
    ]
    tokens = tok.convert_ids_to_tokens(batch["input_ids"][0].tolist())
    labels = batch["labels"][0].tolist()
    # the system turn, user turns and the "Assistant:" prefixes are all -100
    for i, t in enumerate(tokens):
        if t in ("▁System", "User", "Ass", "istant", ":", "▁Answer", "▁Color", "▁And"):
            assert labels[i] == IGNORE_INDEX, (i, t)
    assert batch["pixel_values"].shape == (1, 2, 3, 64, 64)
    assert (batch["input_ids"][0] == processor.image_token_id).sum() == 2 * processor.image_seq_len


def test_collator_tokenizes_exactly_as_the_processor(processor, red, blue):
    messages = [
        {"role": "system", "content": [text("Be brief.")]},
        {"role": "user", "content": [IMG, IMG, text("Same color?")]},
        {"role": "assistant", "content": [text("no")]},
    ]
    batch = Idefics2Collator(processor)([{"images": [red, blue], "messages": messages}])
    reference = processor(text=[processor.apply_chat_template(messages)], images=[[red, blue]], return_tensors="pt")
    assert torch.equal(batch["input_ids"], reference["input_ids"])
    assert torch.equal(batch["pixel_values"], reference["pixel_values"])
    assert torch.equal(batch["pixel_attention_mask"], reference["pixel_attention_mask"])


def _records(red):
    short = {
        "images": [red],
        "messages": [{"role": "user", "content": [IMG, text("Hi?")]}, {"role": "assistant", "content": [text("yes")]}],
    }
    long = {
        "images": [red],
        "messages": [
            {"role": "user", "content": [IMG, text("What is the color of the big shape here?")]},
            {"role": "assistant", "content": [text("red")]},
        ],
    }
    return short, long


def test_right_padding_for_training(processor, red):
    batch = Idefics2Collator(processor)(list(_records(red)))
    mask, ids, labels = batch["attention_mask"], batch["input_ids"], batch["labels"]
    short_len = int(mask[0].sum())
    assert mask[0, :short_len].all() and not mask[0, short_len:].any()
    assert (ids[0, short_len:] == processor.tokenizer.pad_token_id).all()
    assert (labels[0, short_len:] == IGNORE_INDEX).all()
    assert mask[1].all()


def test_left_padding_and_generation_prompt(processor, red):
    collator = Idefics2Collator(processor, padding_side="left", add_generation_prompt=True)
    batch = collator(list(_records(red)))
    mask = batch["attention_mask"]
    short_len = int(mask[0].sum())
    assert not mask[0, :-short_len].any() and mask[0, -short_len:].all()
    tok = processor.tokenizer
    for row in range(2):  # both prompts end with "Assistant:" right at the edge, no answer
        assert tok.convert_ids_to_tokens(batch["input_ids"][row, -3:].tolist()) == ["Ass", "istant", ":"]
    assert batch["targets"] == ["yes", "red"]


def test_over_length_record_is_never_cut_inside_an_image_block(processor, red, blue):
    messages = [
        {"role": "user", "content": [text("Look"), IMG, text("then"), IMG]},
        {"role": "assistant", "content": [text("two shapes")]},
        {"role": "user", "content": [text("and?")]},
        {"role": "assistant", "content": [text("done")]},
    ]
    record = {"images": [red, blue], "messages": messages}
    full = Idefics2Collator(processor)([record])
    ids = full["input_ids"][0].tolist()
    image_positions = [i for i, t in enumerate(ids) if t == processor.image_token_id]
    second_start = image_positions[processor.image_seq_len]
    for max_length in range(second_start - 1, second_start + processor.image_seq_len + 2):
        batch = Idefics2Collator(processor, max_length=max_length)([record])
        if "input_ids" not in batch:  # nothing learnable left: skipped and counted
            assert batch["bad_samples"][0].kind == "too_long"
            continue
        out = batch["input_ids"][0].tolist()
        n_image_tokens = sum(t == processor.image_token_id for t in out)
        assert n_image_tokens % processor.image_seq_len == 0, max_length
        assert len(out) <= max_length
        assert batch["pixel_values"].shape[1] == n_image_tokens // processor.image_seq_len
        if n_image_tokens:  # the kept image block is closed by its fake token
            last_image = max(i for i, t in enumerate(out) if t == processor.image_token_id)
            assert out[last_image + 1] == processor.tokenizer.convert_tokens_to_ids("<fake_token_around_image>")


def test_over_length_with_nothing_learnable_left_is_a_bad_sample(processor, red):
    short, record = _records(red)
    fits = Idefics2Collator(processor)([short])["input_ids"].shape[1]
    batch = Idefics2Collator(processor, max_length=fits)([record, short])
    assert [b.kind for b in batch["bad_samples"]] == ["too_long"]
    assert batch["input_ids"].shape[0] == 1
    with pytest.raises(BadSampleError, match="record -1: data.max_length=8 leaves no room for an answer"):
        Idefics2Collator(processor, max_length=8, on_bad_sample="raise")([record])


def test_bad_samples_are_skipped_and_counted_or_raise(processor, red):
    good = _records(red)[0]
    too_many = {"images": [], "messages": good["messages"]}
    batch = Idefics2Collator(processor)([good, BadSample(7, "image not found: x.png", "missing_image"), too_many])
    assert sorted(b.kind for b in batch["bad_samples"]) == ["missing_image", "too_many_placeholders"]
    assert batch["input_ids"].shape[0] == 1
    with pytest.raises(BadSampleError, match="record 7: image not found"):
        Idefics2Collator(processor, on_bad_sample="raise")([BadSample(7, "image not found: x.png", "missing_image")])


def test_text_only_rows_in_a_batch_get_zero_images(processor, red):
    text_only = {
        "images": [],
        "messages": [{"role": "user", "content": [text("Hello?")]}, {"role": "assistant", "content": [text("hi")]}],
    }
    batch = Idefics2Collator(processor)([text_only, _records(red)[0]])
    assert batch["pixel_values"].shape[:2] == (2, 1)
    assert (batch["pixel_values"][0] == 0).all() and batch["pixel_values"][1].abs().sum() > 0


# Conversations the hand-rendered template must render exactly as the processor's own
# `apply_chat_template` does: image first or later, text-only turns, a system turn, several turns,
# several images, string content, and a generation prompt.
CONVERSATIONS = {
    "image first": [
        {"role": "user", "content": [IMG, text("What color?")]},
        {"role": "assistant", "content": [text("red")]},
    ],
    "text then image": [
        {"role": "user", "content": [text("Look: "), IMG, text(" which shape?")]},
        {"role": "assistant", "content": [text("a circle")]},
    ],
    "system and two turns": [
        {"role": "system", "content": [text("Answer in one word.")]},
        {"role": "user", "content": [IMG, text("Color?")]},
        {"role": "assistant", "content": [text("blue")]},
        {"role": "user", "content": [text("And the shape?")]},
        {"role": "assistant", "content": [text("triangle")]},
    ],
    "two images": [
        {"role": "user", "content": [IMG, IMG, text("Same color?")]},
        {"role": "assistant", "content": [text("no")]},
    ],
    "text only": [
        {"role": "user", "content": [text("Say hi.")]},
        {"role": "assistant", "content": [text("hi")]},
    ],
}


@pytest.mark.parametrize("generation", [False, True], ids=["training", "generation"])
@pytest.mark.parametrize("name", sorted(CONVERSATIONS))
def test_rendering_equals_the_processors_chat_template(processor, red, blue, name, generation):
    messages = CONVERSATIONS[name]
    if generation:
        messages = messages[:-1]
    collator = Idefics2Collator(processor)
    template = processor.apply_chat_template(messages, add_generation_prompt=generation)
    rendered, spans = collator.render(messages, add_generation_prompt=generation)
    n_images = sum(1 for m in messages for c in m["content"] if c.get("type") == "image")
    if n_images == 0:
        assert rendered == template  # no image to expand: the very same text
    images = [[red, blue][:n_images]] if n_images else None
    reference = processor(text=[template], images=images, return_tensors="pt")
    ours = processor.tokenizer(rendered, add_special_tokens=True)["input_ids"]
    assert ours == reference["input_ids"][0].tolist()
    # the learned spans are exactly the assistant answers, each with its closing <end_of_utterance>
    answers = [m for m in messages if m["role"] == "assistant"]
    assert [rendered[s:e] for s, e in spans] == [" " + a["content"][0]["text"] + "<end_of_utterance>" for a in answers]


def test_string_content_renders_as_a_text_part(processor):
    as_parts = [{"role": "user", "content": [text("Hi?")]}, {"role": "assistant", "content": [text("yes")]}]
    as_strings = [{"role": "user", "content": "Hi?"}, {"role": "assistant", "content": "yes"}]
    collator = Idefics2Collator(processor)
    assert collator.render(as_strings) == collator.render(as_parts)
    assert collator.render(as_strings)[0] == processor.apply_chat_template(as_parts)
