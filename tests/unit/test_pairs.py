"""Preference pairs: the four formats other projects write (TRL, RLAIF-V, LLaMA-Factory, ms-swift) detected
and read into pairs; ``PairCollator``'s masks token by token (each side learns its final answer only), the
prompt's images once per pair, one padded length for both sides; bad pairs counted by kind or raised; a pair
too long counted, never cut; and pair data refused by an SFT run (and SFT data by a DPO run)."""

from __future__ import annotations

import io
import json
import re
from pathlib import Path

import datasets
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image

from idefics2_ft.config.schema import DataConfig
from idefics2_ft.data import BadSample, BadSampleError, DataError, RecordDataset
from idefics2_ft.data.collator import IGNORE_INDEX
from idefics2_ft.data.dataset import row_to_record
from idefics2_ft.data.formats import FORMATS
from idefics2_ft.data.pairs import PairCollator
from idefics2_ft.data.records import Row
from idefics2_ft.data.sources import build_rows, check_sources
from idefics2_ft.demo import formats as demo

PAIR_FORMATS = [name for name, form in FORMATS.items() if form.pairs]


def data_cfg(pairs: bool = True, **values):
    """``data.*`` with ``data.pairs`` (set from ``objective`` by the run: true for objective=dpo)."""
    cfg = OmegaConf.merge(OmegaConf.structured(DataConfig), values)
    OmegaConf.set_struct(cfg, False)
    cfg.pairs = pairs
    return cfg


def jsonl(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def text(t: str) -> dict:
    return {"type": "text", "text": t}


IMG = {"type": "image"}
USER = {"role": "user", "content": [IMG, text("Colour?")]}


def answer(t: str) -> dict:
    return {"role": "assistant", "content": [text(t)]}


# ---------------------------------------------------------------- the four formats, as their projects write them
def _trl_save_to_disk(tmp_path: Path, red: Image.Image) -> tuple:
    # TRL's vision DPO data (HuggingFaceH4/rlaif-v_formatted): conversational, `images` as datasets images
    rows = {
        "prompt": [[{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Colour?"}]}]] * 2,
        "chosen": [[{"role": "assistant", "content": [{"type": "text", "text": "red"}]}]] * 2,
        "rejected": [[{"role": "assistant", "content": [{"type": "text", "text": "blue"}]}]] * 2,
        "images": [[{"bytes": png(red), "path": None}]] * 2,
    }
    table = datasets.Dataset.from_dict(rows).cast_column("images", datasets.List(datasets.Image()))
    datasets.DatasetDict({"train": table, "test": table}).save_to_disk(str(tmp_path / "trl"))
    return data_cfg(source="hub", path=str(tmp_path / "trl"), val_split="test"), [USER]


def _trl_strings(tmp_path: Path, red: Image.Image) -> tuple:
    # TRL's standard (plain string) preference form, one `image` a row: the prompt is the user turn
    path = jsonl(tmp_path / "p.jsonl", [{"prompt": "Colour?", "chosen": "red", "rejected": "blue", "image": "r.png"}])
    return data_cfg(source="jsonl", train_file=path, val_file=path), [USER]


def _rlaifv(tmp_path: Path, red: Image.Image) -> tuple:
    # openbmb/RLAIF-V-Dataset's parquet columns
    table = datasets.Dataset.from_dict(
        {
            "ds_name": ["vqa"] * 2,
            "image": [{"bytes": png(red), "path": None}] * 2,
            "question": ["Colour?"] * 2,
            "chosen": ["red"] * 2,
            "rejected": ["blue"] * 2,
            "origin_dataset": ["x"] * 2,
            "origin_split": ["train"] * 2,
            "idx": ["0", "1"],
            "image_path": ["r.png"] * 2,
        }
    ).cast_column("image", datasets.Image())
    table.to_parquet(str(tmp_path / "rlaifv.parquet"))
    return data_cfg(source="hub", path=str(tmp_path / "rlaifv.parquet")), [USER]


def _llamafactory_conversations(tmp_path: Path, red: Image.Image) -> tuple:
    # LLaMA-Factory's ranking form (dpo_en_demo.json, a JSON array), with images and markers
    rows = [
        {
            "conversations": [{"from": "human", "value": "<image>Colour?"}],
            "chosen": {"from": "gpt", "value": "red"},
            "rejected": {"from": "gpt", "value": "blue"},
            "images": ["r.png"],
        }
    ]
    (tmp_path / "dpo.json").write_text(json.dumps(rows, indent=2))
    path = str(tmp_path / "dpo.json")
    return data_cfg(source="jsonl", train_file=path, val_file=path), [USER]


def _llamafactory_messages(tmp_path: Path, red: Image.Image) -> tuple:
    # the same with role/content tags and a system column
    row = {
        "messages": [{"role": "user", "content": "<image>Colour?"}],
        "chosen": {"role": "assistant", "content": "red"},
        "rejected": {"role": "assistant", "content": "blue"},
        "system": "Be brief.",
        "images": ["r.png"],
    }
    path = jsonl(tmp_path / "lf.jsonl", [row])
    return data_cfg(source="jsonl", train_file=path, val_file=path), [
        {"role": "system", "content": [text("Be brief.")]},
        USER,
    ]


def _swift(tmp_path: Path, red: Image.Image) -> tuple:
    # ms-swift's RLHF form: messages ending in the chosen answer, rejected_response
    row = {
        "messages": [{"role": "user", "content": "<image>Colour?"}, {"role": "assistant", "content": "red"}],
        "rejected_response": "blue",
        "images": ["r.png"],
    }
    path = jsonl(tmp_path / "swift.jsonl", [row])
    return data_cfg(source="jsonl", train_file=path, val_file=path), [USER]


WRITTEN = {
    "trl_pairs (save_to_disk, datasets images)": ("trl_pairs", _trl_save_to_disk),
    "trl_pairs (JSONL, plain strings, one image)": ("trl_pairs", _trl_strings),
    "rlaifv (parquet)": ("rlaifv", _rlaifv),
    "llamafactory_pairs (JSON array, conversations)": ("llamafactory_pairs", _llamafactory_conversations),
    "llamafactory_pairs (JSONL, messages and system)": ("llamafactory_pairs", _llamafactory_messages),
    "swift_pairs (JSONL, rejected_response)": ("swift_pairs", _swift),
}


@pytest.mark.parametrize("case", list(WRITTEN))
def test_each_pair_format_is_detected_and_read_into_a_pair(case, tmp_path, red):
    red.save(tmp_path / "r.png")
    fmt, write = WRITTEN[case]
    cfg, prompt = write(tmp_path, red)
    rows = build_rows(cfg, "train")
    assert rows.format == fmt
    assert check_sources(cfg) == {}
    row = rows[0]
    assert row.messages == [*prompt, answer("red")]
    assert row.rejected == [*prompt, answer("blue")]
    assert row.rejected_images is None and len(row.images) == 1
    assert row.answers == ["red"]  # the chosen answer is the reference
    record = RecordDataset(rows)[0]
    assert record["rejected"] == row.rejected and record["rejected_images"] is None
    assert record["images"][0].getpixel((0, 0)) == (255, 0, 0)


def test_swift_rejected_messages_with_their_own_images(tmp_path, red, blue):
    red.save(tmp_path / "r.png")
    blue.save(tmp_path / "b.png")
    prompt = {"role": "user", "content": "<image>Is it red?"}
    rows = [
        {  # the rejected side shows another image: the same words, a different picture
            "messages": [prompt, {"role": "assistant", "content": "yes"}],
            "images": ["r.png"],
            "rejected_messages": [prompt, {"role": "assistant", "content": "yes"}],
            "rejected_images": ["b.png"],
        },
        {  # the rejected answer alone, and rejected_images the same as images: no images of its own
            "messages": [prompt, {"role": "assistant", "content": "yes"}],
            "images": ["r.png"],
            "rejected_messages": [{"role": "assistant", "content": "no"}],
            "rejected_images": ["r.png"],
        },
    ]
    path = jsonl(tmp_path / "swift.jsonl", rows)
    cfg = data_cfg(source="jsonl", train_file=path, val_file=path)
    read = build_rows(cfg, "train")
    assert read.format == "swift_pairs" and check_sources(cfg) == {}
    user = {"role": "user", "content": [IMG, text("Is it red?")]}
    assert read[0].rejected == [user, answer("yes")] and read[0].rejected_images == [str(tmp_path / "b.png")]
    assert read[1].rejected == [user, answer("no")] and read[1].rejected_images is None
    record = RecordDataset(read)[0]
    assert record["rejected_images"][0].getpixel((0, 0)) == (0, 0, 255)


@pytest.mark.parametrize("fmt", PAIR_FORMATS)
def test_the_demos_copy_of_each_pair_format_reads_as_it(fmt, tmp_path):
    (writer,) = demo.WRITERS[fmt]
    written = writer(tmp_path / fmt, 8)
    if Path(written).is_file():
        cfg = data_cfg(source="jsonl", train_file=str(written), val_file=str(written))
    else:
        cfg = data_cfg(source="hub", path=str(written), val_split="test")
    rows = build_rows(cfg, "train")
    assert rows.format == fmt and check_sources(cfg) == {}
    assert all(row.rejected is not None and (row.rejected != row.messages or row.rejected_images) for row in rows)


def test_an_sft_record_is_unchanged_and_a_pair_record_carries_its_rejected_side(red):
    sft = row_to_record(Row(messages=[USER, answer("red")], images=[red]), 0)
    assert "rejected" not in sft and "rejected_images" not in sft
    pair = row_to_record(Row(messages=[USER, answer("red")], images=[red], rejected=[USER, answer("blue")]), 0)
    assert pair["rejected"] == [USER, answer("blue")] and pair["rejected_images"] is None


# ---------------------------------------------------------------- the collator: masks, images, one length
def learned(batch: dict, tok, side: str, row: int = 0) -> list[str]:
    ids, labels = batch[f"{side}_input_ids"][row].tolist(), batch[f"{side}_labels"][row].tolist()
    return [tok.convert_ids_to_tokens(i) for i, lab in zip(ids, labels, strict=True) if lab != IGNORE_INDEX]


def pair(chosen: str, rejected: str, images: list, prompt: list[dict] | None = None, index: int = 0) -> dict:
    prompt = prompt or [USER]
    return {
        "index": index,
        "origin": f"pairs.jsonl:{index + 1}",
        "images": images,
        "messages": [*prompt, answer(chosen)],
        "rejected": [*prompt, answer(rejected)],
        "rejected_images": None,
    }


@pytest.mark.parametrize("case", list(WRITTEN))
def test_each_format_learns_each_sides_answer_and_nothing_else(case, processor, tmp_path, red):
    red.save(tmp_path / "r.png")
    fmt, write = WRITTEN[case]
    cfg, _ = write(tmp_path, red)
    batch = PairCollator(processor)([RecordDataset(build_rows(cfg, "train"))[0]])
    tok = processor.tokenizer
    assert learned(batch, tok, "chosen") == ["▁red", "<end_of_utterance>"]
    assert learned(batch, tok, "rejected") == ["▁blue", "<end_of_utterance>"]


def test_a_multi_turn_prompt_learns_only_the_final_answer_of_each_side(processor, red, blue):
    prompt = [
        {"role": "system", "content": [text("Answer in one word.")]},
        USER,
        answer("red"),  # an earlier answer belongs to the prompt both sides share
        {"role": "user", "content": [text("And this one?"), IMG]},
    ]
    batch = PairCollator(processor)([pair("blue, clearly", "green", [red, blue], prompt)])
    tok = processor.tokenizer
    assert learned(batch, tok, "chosen") == ["▁blue", ",", "▁clearly", "<end_of_utterance>"]
    assert learned(batch, tok, "rejected") == ["▁green", "<end_of_utterance>"]
    for side in ("chosen", "rejected"):
        ids, labels = batch[f"{side}_input_ids"][0], batch[f"{side}_labels"][0]
        assert torch.equal(labels[labels != IGNORE_INDEX], ids[labels != IGNORE_INDEX])
        for special in (processor.image_token_id, tok.convert_tokens_to_ids("<fake_token_around_image>")):
            assert (labels[ids == special] == IGNORE_INDEX).all()


def test_both_sides_share_the_prompts_image_tokens_and_one_pixel_tensor_per_pair(processor, red, blue):
    records = [pair("red", "blue", [red]), pair("no", "yes, they are", [red, blue], [USER, USER], index=1)]
    batch = PairCollator(processor)(records)
    chosen, rejected = batch["chosen_input_ids"], batch["rejected_input_ids"]
    assert chosen.shape == rejected.shape == batch["chosen_labels"].shape == batch["rejected_labels"].shape
    assert chosen.shape[1] == max(int(batch[f"{s}_attention_mask"].sum(1).max()) for s in ("chosen", "rejected"))
    for row in range(2):
        image = processor.image_token_id
        assert torch.equal((chosen[row] == image).nonzero(), (rejected[row] == image).nonzero())
        first = int((batch["chosen_labels"][row] != IGNORE_INDEX).nonzero()[0])  # the prompt: the same tokens
        assert torch.equal(chosen[row, :first], rejected[row, :first])
    assert (chosen[0] == processor.image_token_id).sum() == processor.image_seq_len
    assert batch["pixel_values"].shape == (2, 2, 3, 64, 64)  # the prompt's images, once per pair
    assert not batch["pixel_attention_mask"][0, 1].any()  # the first pair's second slot is padding
    assert "rejected_pixel_values" not in batch and "rejected_own_images" not in batch
    assert batch["n_pairs"] == 2 and batch["stats"]["samples"] == 2 and batch["bad_samples"] == []
    assert batch["stats"]["token_slots"] == 2 * chosen.numel()
    for side in ("chosen", "rejected"):  # right padding: -100 and no attention past each side's end
        mask = batch[f"{side}_attention_mask"]
        assert (batch[f"{side}_labels"][mask == 0] == IGNORE_INDEX).all()
        assert (batch[f"{side}_input_ids"][mask == 0] == processor.tokenizer.pad_token_id).all()


def test_a_rejected_side_with_its_own_images_gets_its_own_pixels(processor, red, blue):
    own = pair("yes", "yes", [red])
    own["rejected_images"] = [blue]  # the same words shown another picture
    batch = PairCollator(processor)([pair("red", "blue", [red], index=1), own])
    assert batch["rejected_own_images"].tolist() == [False, True]
    assert batch["rejected_pixel_values"].shape[:2] == (2, 1)
    assert not batch["rejected_pixel_attention_mask"][0].any()  # the first pair shows pixel_values
    assert torch.equal(
        batch["rejected_pixel_values"][1], PairCollator(processor)([pair("a", "b", [blue])])["pixel_values"][0]
    )
    assert learned(batch, processor.tokenizer, "rejected", row=1) == ["▁yes", "<end_of_utterance>"]


# ---------------------------------------------------------------- bad pairs
def _bad_rows(tmp_path: Path) -> list[dict]:
    good = {"prompt": "Colour?", "chosen": "red", "rejected": "blue", "image": "r.png"}
    return [
        good,
        {**good, "rejected": "red"},  # identical sides
        {**good, "rejected": "  "},  # an empty side
        {**good, "prompt": "<image><image>Colour?"},  # two markers, one image
        {**good, "rejected": None},  # no rejected side
    ]


BAD = [  # the kind, the line and how its reason starts
    ("identical_sides", 2, "the chosen and rejected sides are the same ('red')"),
    ("empty_side", 3, "the rejected side has an empty answer"),
    ("images_mismatch", 4, "2 <image> marker(s) but 1 image(s)"),
    ("empty_side", 5, "the rejected side has no answer"),
]


def test_bad_pairs_are_counted_by_kind(tmp_path, red, processor):
    red.save(tmp_path / "r.png")
    path = jsonl(tmp_path / "pairs.jsonl", _bad_rows(tmp_path))
    cfg = data_cfg(source="jsonl", train_file=path, val_file=path)
    assert check_sources(cfg) == {
        "train/identical_sides": 1,
        "train/empty_side": 2,
        "train/images_mismatch": 1,
        "val/identical_sides": 1,
        "val/empty_side": 2,
        "val/images_mismatch": 1,
    }
    records = RecordDataset(build_rows(cfg, "train"))
    for kind, line, reason in BAD:
        bad = records[line - 1]
        assert isinstance(bad, BadSample) and (bad.kind, bad.origin) == (kind, f"{path}:{line}")
        assert bad.reason.startswith(reason) and kind in FORMATS["trl_pairs"].problems
    batch = PairCollator(processor)([records[i] for i in range(len(records))])
    assert [b.kind for b in batch["bad_samples"]] == [kind for kind, _, _ in BAD]
    assert batch["n_pairs"] == 1


def test_bad_pairs_are_named_with_their_row_when_raised(tmp_path, red, processor):
    red.save(tmp_path / "r.png")
    path = jsonl(tmp_path / "pairs.jsonl", _bad_rows(tmp_path))
    cfg = data_cfg(source="jsonl", train_file=path, val_file=path, on_bad_sample="raise")
    with pytest.raises(BadSampleError, match=re.escape(f"{path}:2: the chosen and rejected sides are the same")):
        check_sources(cfg)
    records = RecordDataset(build_rows(cfg, "train"))
    for _, line, reason in BAD:
        with pytest.raises(BadSampleError, match=re.escape(f"{path}:{line}: {reason}")):
            PairCollator(processor, on_bad_sample="raise")([records[0], records[line - 1]])


def test_bad_pairs_built_in_memory_are_caught_by_the_collator(processor, red):
    same = pair("red", "red", [red])
    empty = pair("red", "", [red], index=1)
    sft = {"index": 2, "images": [red], "messages": [USER, answer("red")]}
    batch = PairCollator(processor)([same, empty, sft, pair("red", "blue", [red], index=3)])
    assert [b.kind for b in batch["bad_samples"]] == ["identical_sides", "empty_side", "empty_side"]
    assert batch["n_pairs"] == 1 and batch["chosen_input_ids"].shape[0] == 1


def test_a_pair_too_long_is_counted_not_cut(processor, red):
    short = pair("red", "blue", [red])
    long = pair("red", "a long and winding answer about the colour blue", [red], index=1)
    full = PairCollator(processor)([long])
    longest = int(full["rejected_attention_mask"].sum())
    fits = int(PairCollator(processor)([short])["rejected_attention_mask"].sum())
    assert fits < longest
    batch = PairCollator(processor, max_length=longest - 1)([short, long])
    (bad,) = batch["bad_samples"]
    assert bad.kind == "too_long" and f"needs {longest} tokens" in bad.reason and "never cut" in bad.reason
    assert batch["n_pairs"] == 1
    assert batch["chosen_input_ids"].shape[1] == fits  # the pair that fits, whole
    assert (batch["chosen_input_ids"][0] == processor.image_token_id).sum() == processor.image_seq_len
    with pytest.raises(BadSampleError, match="too_long|never cut"):
        PairCollator(processor, max_length=longest - 1, on_bad_sample="raise")([long])
    assert PairCollator(processor, max_length=longest)([long])["n_pairs"] == 1


# ---------------------------------------------------------------- each objective refuses the other's data
def test_an_sft_run_refuses_pair_data_naming_objective_dpo(tmp_path, red):
    red.save(tmp_path / "r.png")
    cfg, _ = _llamafactory_conversations(tmp_path, red)
    with pytest.raises(DataError) as err:
        build_rows(OmegaConf.merge(cfg, {"pairs": False}), "train")
    message = str(err.value)
    assert "['chosen', 'conversations', 'images', 'rejected'] are preference pairs" in message
    assert "format=llamafactory_pairs" in message and "objective=sft" in message
    assert "Train on pairs with objective=dpo." in message


def test_swift_pairs_given_to_sft_also_name_the_format_that_reads_their_chosen_side(tmp_path, red):
    red.save(tmp_path / "r.png")
    cfg, _ = _swift(tmp_path, red)
    sft = OmegaConf.merge(cfg, {"pairs": False})
    with pytest.raises(DataError, match=r"objective=dpo, or set data.format=llava to train on its chosen"):
        build_rows(sft, "train")
    assert build_rows(OmegaConf.merge(sft, {"format": "llava"}), "train")[0].rejected is None


def test_a_dpo_run_refuses_sft_data_naming_objective_sft(tmp_path, red):
    red.save(tmp_path / "r.png")
    row = {"messages": [{"role": "user", "content": "<image>Colour?"}, {"role": "assistant", "content": "red"}]}
    path = jsonl(tmp_path / "sft.jsonl", [{**row, "images": ["r.png"], "chosen": "red"}])
    with pytest.raises(DataError) as err:
        build_rows(data_cfg(source="jsonl", train_file=path, val_file=path), "train")
    message = str(err.value)
    assert "objective=dpo trains on preference pairs" in message and "['chosen', 'images', 'messages']" in message
    assert "It has a 'chosen' column and no 'rejected'" in message and "objective=sft" in message
    assert all(name in message for name in PAIR_FORMATS)


def test_a_pair_format_named_in_data_format_is_refused_by_sft_too(tmp_path, red):
    red.save(tmp_path / "r.png")
    cfg, _ = _trl_strings(tmp_path, red)
    with pytest.raises(DataError, match="objective=dpo"):
        build_rows(OmegaConf.merge(cfg, {"pairs": False, "format": "trl_pairs"}), "train")
