"""A stream reads the records a table does, shuffled within a buffer unless told not to, and a resumed
stream goes on with exactly the batches the uninterrupted one would have."""

from __future__ import annotations

import json
import logging
from itertools import islice

import pytest
from omegaconf import OmegaConf
from PIL import Image

from idefics2_ft.config.schema import DataConfig
from idefics2_ft.data.mixture import Source
from idefics2_ft.data.sources import build_rows
from idefics2_ft.data.streaming import StreamBatches, log_shuffle, stream_rows

N = 20


def data_cfg(**values):
    return OmegaConf.merge(OmegaConf.structured(DataConfig), values)


def trl_record(i: int, colour: str) -> dict:
    """A record of the project's own JSONL (data=jsonl): TRL messages with content parts, and answers."""
    return {
        "id": f"img-{i // 2}",  # two questions per image, LLaVA-style
        "images": [f"{colour}.png"],
        "messages": [
            {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": f"Question {i}?"}]},
            {"role": "assistant", "content": [{"type": "text", "text": colour}]},
        ],
        "answers": [colour, colour.upper()],
    }


@pytest.fixture
def sorted_by_class(tmp_path):
    """``N`` records sorted by their answer: every red one, then every blue one."""
    for colour in ("red", "blue"):
        Image.new("RGB", (16, 16), colour).save(tmp_path / f"{colour}.png")
    records = [trl_record(i, "red" if i < N // 2 else "blue") for i in range(N)]
    path = tmp_path / "train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def comparable(row) -> tuple:
    return (row.messages, row.images, row.answers, row.id, row.problem)


def test_a_streamed_trl_jsonl_reads_the_records_the_file_does(sorted_by_class, tmp_path):
    single = data_cfg(source="hub", path=str(sorted_by_class))
    streamed = list(stream_rows(OmegaConf.merge(single, {"streaming": True}), "train"))
    rows = build_rows(single, "train")
    assert [comparable(r) for r in streamed] == [comparable(rows[i]) for i in range(len(rows))]
    assert streamed[0].problem is None and streamed[0].messages[0]["content"][0] == {"type": "image"}
    # a folder of JSONL files is read through datasets, streamed or not: the same records again
    folder = tmp_path / "folder"
    folder.mkdir()
    for name in ("train", "validation"):
        (folder / f"{name}.jsonl").write_text(sorted_by_class.read_text())
    for colour in ("red", "blue"):
        (folder / f"{colour}.png").write_bytes((tmp_path / f"{colour}.png").read_bytes())
    in_folder = data_cfg(source="hub", path=str(folder))
    table = build_rows(in_folder, "train")
    folder_streamed = list(stream_rows(OmegaConf.merge(in_folder, {"streaming": True}), "train"))
    expected = [(r.messages, r.answers, r.id) for r in streamed]
    assert [(table[i].messages, table[i].answers, table[i].id) for i in range(len(table))] == expected
    assert [(r.messages, r.answers, r.id) for r in folder_streamed] == expected


def _order(cfg, seed: int) -> list[str]:
    return [row.messages[0]["content"][1]["text"] for row in islice(stream_rows(cfg, "train", seed=seed), N)]


def test_a_stream_is_shuffled_by_default_and_the_seed_sets_the_order(sorted_by_class, caplog):
    cfg = data_cfg(source="hub", path=str(sorted_by_class), streaming=True)
    stored = [f"Question {i}?" for i in range(N)]
    assert cfg.buffer_size == 1000  # the documented default: datasets' shuffle buffer
    first, again, other = _order(cfg, 0), _order(cfg, 0), _order(cfg, 1)
    assert sorted(first) == sorted(stored) and first != stored  # every record once, not class after class
    assert first == again and first != other
    with caplog.at_level(logging.INFO, logger="idefics2_ft"):
        log_shuffle(cfg)
    assert "shuffled within a buffer of 1,000 records" in caplog.text and "data.buffer_size sets it" in caplog.text


def test_a_stream_without_a_buffer_trains_in_its_stored_order_and_says_so(sorted_by_class, caplog):
    cfg = data_cfg(source="hub", path=str(sorted_by_class), streaming=True, buffer_size=None)
    assert _order(cfg, 0) == [f"Question {i}?" for i in range(N)]
    with caplog.at_level(logging.WARNING, logger="idefics2_ft"):
        log_shuffle(cfg)
    assert "unshuffled" in caplog.text and "data.buffer_size=1000" in caplog.text


@pytest.mark.parametrize("sorted_within", [False, True], ids=["shuffled", "group_by"])
def test_a_resumed_stream_goes_on_with_the_batches_of_the_uninterrupted_one(sorted_by_class, sorted_within):
    cfg = data_cfg(source="hub", path=str(sorted_by_class), streaming=True)
    sort_key = (lambda row: (len(row.messages[0]["content"][1]["text"]),)) if sorted_within else None

    def batches(start: int) -> list[list[str]]:
        sources = [Source(None, cfg)]
        stream = StreamBatches(sources, [1.0], 2, 15, seed=3, start=start, sort_key=sort_key, buffer_size=1000)
        return [[record["messages"][0]["content"][1]["text"] for record in batch] for batch in stream]

    straight = batches(0)  # 30 draws of 20 records: into the second epoch, reshuffled
    assert len(straight) == 15
    if not sorted_within:  # (group_by sorts a buffer of 1,000 draws: 50 epochs)
        assert sorted(q for b in straight[:10] for q in b) == sorted(f"Question {i}?" for i in range(N))
        assert straight[10:] != straight[:5]  # the second epoch is another order
    assert batches(6) == straight[6:]
