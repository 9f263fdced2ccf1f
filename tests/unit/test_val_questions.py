"""Validation under DDP counts each question once, told apart by its place in the validation set: never by
the data's own ``id``, which several questions share (LLaVA-style data, one id per image)."""

from __future__ import annotations

from PIL import Image
from torch.utils.data.distributed import DistributedSampler

from idefics2_ft.data.datamodule import ValCollator
from idefics2_ft.data.dataset import RecordDataset
from idefics2_ft.data.records import Row, qa_messages
from idefics2_ft.training.lightning_module import score_metrics, unique_questions

QUESTIONS = 25  # 4 per image: 7 ids
WORLD = 2


def scored(index: int) -> dict:
    return {"id": f"image-{index // 4}", "prediction": "a", "answers": ["a"], "question_type": None, "score": 1.0}


def test_every_question_counts_once_over_ranks_whatever_ids_they_share():
    # what each rank validates: a DistributedSampler pads the last rank's share with the first records
    shares = [list(DistributedSampler(range(QUESTIONS), WORLD, rank, shuffle=False)) for rank in range(WORLD)]
    assert sum(map(len, shares)) == QUESTIONS + 1  # one padded repeat
    gathered = [(index, scored(index)) for share in shares for index in share]
    rows = unique_questions(gathered)
    assert len(rows) == QUESTIONS
    assert [r["id"] for r in rows] == [f"image-{i // 4}" for i in range(QUESTIONS)]  # the user's ids, in order
    assert score_metrics(rows, "accuracy") == {"val/accuracy": 1.0}


def test_the_validation_batch_carries_each_records_place_in_the_set(processor):
    image = Image.new("RGB", (32, 32), "red")
    rows = [Row(qa_messages(f"Q{i}?", "red"), images=[image], answers=["red"], id="same") for i in range(3)]
    records = [RecordDataset(rows)[i] for i in (2, 0, 1)]
    batch = ValCollator(processor, max_length=None, on_bad_sample="skip")(records)
    assert batch["keys"] == [2, 0, 1] and batch["ids"] == ["same"] * 3
