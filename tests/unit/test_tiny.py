"""The offline processor is the real Idefics2 processor: tokenizer ids, BOS, pad, chat template."""

from idefics2_ft.demo import build_tiny_model, tiny_config
from idefics2_ft.models import IDEFICS2_CHAT_TEMPLATE


def test_tokenizer_is_mistral_with_idefics2_special_tokens(processor):
    tok = processor.tokenizer
    assert tok.convert_tokens_to_ids(["<fake_token_around_image>", "<image>", "<end_of_utterance>"]) == [
        32000,
        32001,
        32002,
    ]
    assert len(tok) == 32003
    ids = tok("Hello")["input_ids"]
    assert ids == [1, 22557]  # BOS prepended, as Idefics2 does; "Hello" -> 22557 as in Mistral
    assert tok.pad_token == "<unk>" and tok.pad_token_id == 0
    assert processor.image_token_id == 32001


def test_chat_template_renders_idefics2_turns(processor):
    messages = [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What color?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "red"}]},
    ]
    assert processor.chat_template == IDEFICS2_CHAT_TEMPLATE
    assert (
        processor.apply_chat_template(messages)
        == "User:<image>What color?<end_of_utterance>\nAssistant: red<end_of_utterance>\n"
    )
    prompt = processor.apply_chat_template(messages[:1], add_generation_prompt=True)
    assert prompt.endswith("<end_of_utterance>\nAssistant:")


def test_tiny_model_is_deterministic_and_has_distinct_latents():
    config = tiny_config(vision_hidden=64, text_hidden=64, vision_layers=1, text_layers=1)
    a, b = build_tiny_model(config, seed=3), build_tiny_model(config, seed=3)
    for (name, pa), (_, pb) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        assert (pa == pb).all(), name
    latents = a.model.connector.perceiver_resampler.latents
    assert latents.std() > 0.5  # drawn, not the all-ones upstream init
    assert config.perceiver_config.resampler_n_latents == 8 and config.image_token_id == 32001


def test_tiny_config_rejects_dimensions_the_4bit_cpu_kernel_cannot_take():
    import pytest

    with pytest.raises(ValueError, match="multiple of 64"):
        tiny_config(text_hidden=96)


def test_stage1_builds_once_and_trains_the_random_base(tmp_path):
    import json

    import torch
    from safetensors.torch import load_file

    from idefics2_ft.demo import ensure_tiny_base, tiny_base_key
    from tests.helpers import TINY_RUN, compose_config

    overrides = [
        *TINY_RUN,
        f"model.tiny.cache_dir={tmp_path}",
        f"run_dir={tmp_path / 'run'}",
        "model.tiny.vision_pretrain_steps=3",
        "model.tiny.pretrain_steps=3",
        "data.max_train_samples=40",
    ]
    cfg = compose_config(overrides)
    folder = ensure_tiny_base(cfg)
    report = json.loads((folder / "stage1.json").read_text())
    assert {"stage1/vision_loss", "stage1/lm_loss", "stage1/wall_s"} <= set(report)
    t = cfg.model.tiny
    random_init = build_tiny_model(
        tiny_config(
            vision_hidden=t.vision_hidden,
            text_hidden=t.text_hidden,
            vision_layers=t.vision_layers,
            text_layers=t.text_layers,
        ),
        seed=t.seed,
    ).state_dict()
    trained = load_file(folder / "model.safetensors")
    for prefix in ("model.vision_model.", "model.connector.", "model.text_model.", "lm_head."):
        keys = [k for k in trained if k.startswith(prefix)]
        assert any(not torch.equal(trained[k], random_init[k]) for k in keys), prefix
    stamp = (folder / "model.safetensors").stat().st_mtime_ns
    assert ensure_tiny_base(cfg) == folder and (folder / "model.safetensors").stat().st_mtime_ns == stamp
    other = compose_config([*overrides, "model.tiny.pretrain_steps=4"])
    assert tiny_base_key(other) != tiny_base_key(cfg)  # any change of stage 1 builds a new base


def test_stage1_describes_the_training_images_without_asking_the_tasks_questions():
    import random
    import re

    from idefics2_ft.data.records import message_text
    from idefics2_ft.data.sources import easyvqa_rows
    from idefics2_ft.demo.stage1 import caption_row, image_attributes

    rows = easyvqa_rows("train")
    questions = {message_text(r.messages[-2]) for r in rows}
    answers = {r.answers[0] for r in rows}
    attributes = image_attributes(rows)
    assert len(attributes) == 3816  # of 4000 images, those with a colour or shape answer
    assert all(set(a) <= {"color", "shape"} and a for a in attributes.values())
    vocab = {k: sorted({a[k] for a in attributes.values() if k in a}) for k in ("color", "shape")}
    rng, negated = random.Random(0), 0
    for path, known in attributes.items():
        row = caption_row(path, known, rng, vocab)
        request, description = message_text(row.messages[0]), message_text(row.messages[1])
        assert "?" not in request and request not in questions  # never one of the task's questions
        assert len(description.split()) >= 2 and description.rstrip(".") not in answers  # never its answers
        assert all(value in description for value in known.values())  # all that is known is said
        denied = re.findall(r"\bnot? (?:a )?(\w+)", description)  # "not blue", "no triangle"
        assert all(word in vocab["color"] + vocab["shape"] and word not in known.values() for word in denied)
        negated += bool(denied)
    assert 0.1 < negated / len(attributes) < 0.5  # what an image is not is said in some descriptions
