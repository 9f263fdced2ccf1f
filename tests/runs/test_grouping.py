"""data.group_by: batches of alike records, deterministic, resumable, sharded, and the padding they save."""

import json
from collections import Counter

import pytest
import torch

from idefics2_ft.data import Idefics2Collator, record_shapes, sort_keys
from idefics2_ft.data.dataset import RecordDataset
from idefics2_ft.data.grouping import GroupedBatchSampler, RecordShape, resized_size
from idefics2_ft.data.records import Row
from idefics2_ft.data.sources import build_rows
from idefics2_ft.data.synthetic import write_docs
from idefics2_ft.models import build_processor
from tests.helpers import assert_same_adapters, compose_config


def shapes_of(n: int, seed: int = 0) -> list[RecordShape]:
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(20, 400, (n,), generator=g).tolist()
    portrait = torch.randint(0, 2, (n,), generator=g).tolist()
    return [RecordShape(t, 1, 980 if p else 700, 700 if p else 980) for t, p in zip(tokens, portrait, strict=True)]


def padding(batches, shapes) -> float:
    real = sum(shapes[i].tokens for b in batches for i in b)
    slots = sum(len(b) * max(shapes[i].tokens for i in b) for b in batches)
    return 1 - real / slots


def pixel_padding(batches, shapes) -> float:
    real = sum(shapes[i].height * shapes[i].width for b in batches for i in b)
    slots = sum(len(b) * max(shapes[i].height for i in b) * max(shapes[i].width for i in b) for b in batches)
    return 1 - real / slots


@pytest.mark.parametrize("group_by", ["length", "aspect"])
def test_grouped_batches_pad_less_and_use_every_record_once_per_epoch(group_by):
    shapes = shapes_of(1024)
    keys = sort_keys(shapes, group_by, 980)
    batches = list(GroupedBatchSampler(keys, batch_size=8, num_batches=128, seed=3))
    assert len(batches) == 128 and all(len(b) == 8 for b in batches)
    assert Counter(i for b in batches for i in b) == Counter(range(1024))  # one epoch: every record once
    plain = [list(range(k, k + 8)) for k in range(0, 1024, 8)]  # any fixed order is a random one here
    assert padding(batches, shapes) < 0.05 < padding(plain, shapes)
    if group_by == "aspect":
        assert pixel_padding(batches, shapes) < 0.05 < pixel_padding(plain, shapes)
    # shuffled across buckets: the run is not ordered by length
    means = [sum(shapes[i].tokens for i in b) / 8 for b in batches]
    assert means != sorted(means) and means != sorted(means, reverse=True)


def test_grouped_batches_are_deterministic_for_a_seed_and_resume_part_way():
    keys = sort_keys(shapes_of(300), "length", 980)
    run = list(GroupedBatchSampler(keys, 4, 100, seed=7))
    assert run == list(GroupedBatchSampler(keys, 4, 100, seed=7))
    assert run != list(GroupedBatchSampler(keys, 4, 100, seed=8))
    resumed = GroupedBatchSampler(keys, 4, 100, seed=7, start=37)
    assert list(resumed) == run[37:] and len(resumed) == 100  # the whole run's length, as Lightning expects


def test_ranks_get_disjoint_records_the_same_number_of_batches_and_one_process_s_global_batch():
    keys = sort_keys(shapes_of(500), "aspect", 980)
    world, steps = 3, 100  # 83 global batches of 6 make an epoch (2 records open the next one)
    ranks = [list(GroupedBatchSampler(keys, 2, steps, seed=1, rank=r, num_replicas=world)) for r in range(world)]
    assert all(len(r) == steps for r in ranks)
    one = list(GroupedBatchSampler(keys, 2 * world, steps, seed=1))
    for step in range(steps):
        parts = [set(r[step]) for r in ranks]
        assert sum(len(p) for p in parts) == len(set().union(*parts)) == 6  # disjoint within the step
        assert sorted(set().union(*parts)) == sorted(one[step])  # together: one process with the global batch
    first_epoch = [i for step in range(83) for r in ranks for i in r[step]]
    assert len(first_epoch) == len(set(first_epoch)) == 498  # no record twice within an epoch, across ranks


def test_record_shapes_match_what_the_collator_and_processor_build(tmp_path):
    docs = write_docs(tmp_path, n_train=6, n_val=0, seed=2, long_answers=True)
    processor = build_processor(image_seq_len=4, longest_edge=128, do_image_splitting=True)
    processor.image_processor.size = {"longest_edge": 128, "shortest_edge": 16}
    collator = Idefics2Collator(processor, max_length=None)
    rows = build_rows(compose_config(["data=jsonl", f"data.train_file={docs['train']}"]).data, "train")
    shapes = record_shapes(rows, collator, 128, 16)
    dataset = RecordDataset(rows)
    for i, shape in enumerate(shapes):
        batch = collator([dataset[i]])
        assert shape.tokens == batch["input_ids"].shape[1]
        assert (shape.height, shape.width) == tuple(batch["pixel_values"].shape[-2:])
    # a row that cannot be trained on sorts first instead of failing here
    assert record_shapes([Row(messages=[])], collator, 128, 16) == [RecordShape(0, 0, 0, 0)]


def test_resized_size_follows_the_image_processor():
    assert resized_size(980, 700, 490, 16) == (350, 490)
    assert resized_size(620, 880, 490, 16) == (490, 345)
    assert resized_size(100, 50, 490, 64) == (64, 100)  # small images are not enlarged, only to shortest_edge


def test_group_by_trains_resumes_exactly_and_logs_where_time_goes(tiny_run_cfg, tmp_path, monkeypatch):
    """A run with data.group_by=aspect on mixed pages, interrupted and resumed mid-epoch, ends with the
    uninterrupted run's adapter; the per-run perf metrics are in metrics.csv."""
    from idefics2_ft.tasks.train import train
    from idefics2_ft.training.lightning_module import Idefics2Module

    pages = ((760, 980), (980, 700))  # portrait and landscape: one batch at most holds both
    docs = write_docs(tmp_path / "docs", n_train=40, n_val=4, seed=5, sizes=pages, long_answers=True)
    common = (
        "data=jsonl",
        f"data.train_file={docs['train']}",
        f"data.val_file={docs['val']}",
        "data.group_by=aspect",
        "data.do_image_splitting=true",
        "data.longest_edge=64",
        "data.shortest_edge=16",
        "data.max_length=null",
        "data.metric=anls",
        "trainer.max_steps=6",
        "trainer.checkpoint_every_n_steps=3",
        "peft.dropout=0.1",
        "eval.at_end=false",
    )
    train(tiny_run_cfg(*common, run_dir=tmp_path / "straight"))
    original = Idefics2Module.training_step

    def crash_at_step_4(self, batch, batch_idx):
        if self.global_step == 4:
            raise RuntimeError("simulated crash")
        return original(self, batch, batch_idx)

    monkeypatch.setattr(Idefics2Module, "training_step", crash_at_step_4)
    with pytest.raises(RuntimeError, match="simulated crash"):
        train(tiny_run_cfg(*common, run_dir=tmp_path / "resumed"))
    monkeypatch.setattr(Idefics2Module, "training_step", original)
    train(tiny_run_cfg(*common, "resume=true", run_dir=tmp_path / "resumed"))
    assert_same_adapters(tmp_path / "straight", tmp_path / "resumed")

    import csv

    rows = list(csv.DictReader(open(tmp_path / "straight/logs/metrics.csv")))
    logged = {k for r in rows for k, v in r.items() if v}
    perf = {"perf/data_wait_frac", "perf/samples_per_s", "perf/tokens_per_s", "data/pad_frac", "data/pixel_pad_frac"}
    assert perf <= logged
    wait = [float(r["perf/data_wait_frac"]) for r in rows if r.get("perf/data_wait_frac")]
    assert all(0 <= w < 1 for w in wait)
    # grouped by size: only the batch where portrait meets landscape pads (a mixed batch pads ~30%
    # of pixels, and about half of random batches of these pages are mixed)
    pixel_pad = [float(r["data/pixel_pad_frac"]) for r in rows if r.get("data/pixel_pad_frac")]
    assert sum(pixel_pad) / len(pixel_pad) <= 0.3 / 6
    assert json.loads((tmp_path / "straight/metrics.json").read_text())["train/steps"] == 6


def test_perf_metrics_reach_tensorboard(tiny_run_cfg, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from idefics2_ft.tasks.train import train

    train(tiny_run_cfg("logger=tensorboard", "eval.at_end=false", "trainer.log_every_n_steps=2"))
    events = [p for p in (tmp_path / "run" / "logs").rglob("events.out.tfevents.*")]
    assert events
    tags = set()
    for path in events:
        accumulator = EventAccumulator(str(path))
        accumulator.Reload()
        tags |= set(accumulator.Tags()["scalars"])
    assert {"perf/data_wait_frac", "perf/samples_per_s", "perf/tokens_per_s", "data/pad_frac", "train/loss"} <= tags
