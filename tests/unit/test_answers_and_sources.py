"""Numbers are answers too, a missing answer is a named bad record, and a source whose records are all bad
is refused with its first record's reason and the fix."""

from __future__ import annotations

import io
import json

import numpy as np
import pandas as pd
import pytest
from omegaconf import OmegaConf
from PIL import Image

from idefics2_ft.config.schema import DataConfig
from idefics2_ft.data import BadSample, BadSampleError, DataError, RecordDataset
from idefics2_ft.data.formats import as_text
from idefics2_ft.data.sources import build_rows, check_sources
from tests.helpers import compose_config


def data_cfg(**values):
    return OmegaConf.merge(OmegaConf.structured(DataConfig), values)


def _png() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (16, 16), "red").save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.mark.parametrize(
    "value, text",
    [("twelve", "twelve"), (3, "3"), (2.5, "2.5"), (3.0, "3"), (np.int64(4), "4"), (np.float64(3.0), "3"),
     (np.float32(0.1), "0.1"), (-0.5, "-0.5"), (None, None), (float("nan"), None), (np.float64("nan"), None)],
)  # fmt: skip
def test_numbers_read_as_text_and_nan_as_no_answer(value, text):
    assert as_text(value) == text


def test_a_dict_is_not_read_as_text():
    with pytest.raises(TypeError, match=r"dict \{'a': 1\}, not text or a number"):
        as_text({"a": 1})


@pytest.fixture
def numeric_qa(tmp_path):
    """A question/answer table as pandas writes it: a column of numbers with a gap is float64 (3 -> 3.0)."""
    frame = pd.DataFrame(
        {
            "question": ["How many?", "How much?", "How many more?", "Which?"],
            "answers": [3, 2.5, 12, None],
            "image": [{"bytes": _png(), "path": None}] * 4,
        }
    )
    assert frame["answers"].dtype == np.float64
    path = tmp_path / "qa.parquet"
    frame.to_parquet(path)
    return path


def test_numeric_answers_in_a_parquet_table_train_as_text(numeric_qa):
    rows = build_rows(data_cfg(source="hub", path=str(numeric_qa)), "train")
    assert [rows[i].answers for i in range(3)] == [["3"], ["2.5"], ["12"]]
    assert rows[0].messages[-1]["content"] == [{"type": "text", "text": "3"}]
    record = RecordDataset(rows)[1]
    assert not isinstance(record, BadSample) and record["answers"] == ["2.5"]


@pytest.mark.parametrize("mode", ["skip", "raise"])
def test_a_missing_answer_is_a_bad_record_named_with_its_file_column_and_row(numeric_qa, mode):
    cfg = data_cfg(source="hub", path=str(numeric_qa), val_split="train", on_bad_sample=mode)
    said = r"qa\.parquet\[train\] row 3: column 'answers' holds no answer \(None\): fill it in, or leave the row out"
    if mode == "raise":
        with pytest.raises(BadSampleError, match=said):
            check_sources(cfg)
        return
    assert check_sources(cfg) == {"train/missing_answer": 1, "val/missing_answer": 1}
    bad = RecordDataset(build_rows(cfg, "train"))[3]
    assert isinstance(bad, BadSample) and bad.kind == "missing_answer"
    assert "qa.parquet[train] row 3" in bad.where() and "column 'answers'" in bad.reason


@pytest.mark.parametrize("mode", ["skip", "raise"])
def test_nan_and_number_answers_in_a_jsonl_file(tmp_path, mode):
    Image.new("RGB", (16, 16), "red").save(tmp_path / "r.png")
    lines = [
        '{"question": "How many?", "answers": [7, 7.0], "image": "r.png"}',
        '{"question": 2024, "answers": "yes", "image": "r.png"}',
        '{"question": "How much?", "answers": NaN, "image": "r.png"}',  # json.loads reads NaN
    ]
    path = tmp_path / "qa.jsonl"
    path.write_text("\n".join(lines) + "\n")
    cfg = data_cfg(source="jsonl", train_file=str(path), val_file=str(path), on_bad_sample=mode)
    if mode == "raise":
        with pytest.raises(BadSampleError, match=r"qa\.jsonl:3: column 'answers' holds no answer \(nan\)"):
            check_sources(cfg)
        return
    rows = build_rows(cfg, "train")
    assert rows[0].answers == ["7", "7"] and rows[1].messages[-2]["content"][-1]["text"] == "2024"
    assert check_sources(cfg) == {"train/missing_answer": 1, "val/missing_answer": 1}


# ---------------------------------------------------------------- a source of nothing but bad records
def _llava_lines(path, speakers):
    rows = [
        {"image": "r.png", "conversations": [{"from": "human", "value": "<image>Q?"}, {"from": s, "value": "A"}]}
        for s in speakers
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture
def mixture_files(tmp_path):
    Image.new("RGB", (8, 8), "red").save(tmp_path / "r.png")
    good = _llava_lines(tmp_path / "good.jsonl", ["gpt", "gpt"])
    bad = _llava_lines(tmp_path / "bad.jsonl", ["bot", "bot", "bot"])
    mixed = _llava_lines(tmp_path / "mixed.jsonl", ["gpt", "bot"])
    return good, bad, mixed


def _mixture(b_train, b_val, good):
    entries = (
        f"[{{name: a, source: jsonl, train_file: '{good}', val_file: '{good}'}},"
        f" {{name: b, source: jsonl, train_file: '{b_train}', val_file: '{b_val}'}}]"
    )
    return compose_config(["data=jsonl", f"data.mixture={entries}"]).data


def test_a_mixture_source_whose_training_records_are_all_bad_is_refused(mixture_files):
    good, bad, mixed = mixture_files
    with pytest.raises(
        DataError,
        match=rf"data.mixture source 'b': all 3 train records are bad, so its draws would all be skipped "
        rf"\(the first, source b: {bad}:1: speaker from='bot' .*\)\. Fix its records as that says, point its "
        r"train_file at other records, or remove it from data.mixture\.",
    ):
        check_sources(_mixture(bad, good, good))
    # some bad records among good ones train, the bad ones counted
    assert check_sources(_mixture(mixed, good, good)) == {"train/b/unknown_role": 1}


def test_a_mixture_source_whose_validation_records_are_all_bad_is_refused(mixture_files):
    good, bad, _ = mixture_files
    with pytest.raises(DataError, match=r"source 'b': all 3 val records are bad, so val/score would leave it out"):
        check_sources(_mixture(good, bad, good))


def test_one_source_of_nothing_but_bad_records_is_refused(mixture_files):
    good, bad, _ = mixture_files
    cfg = data_cfg(source="jsonl", train_file=str(bad), val_file=str(good))
    with pytest.raises(
        DataError, match=r"data: all 3 train records are bad, so nothing would train .*data\.train_file"
    ):
        check_sources(cfg)
