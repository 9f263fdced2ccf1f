"""Mixtures: each source's config, the draws' proportions, resuming into them, ranks, and the mistakes refused."""

from __future__ import annotations

from collections import Counter
from itertools import islice

import pytest
from omegaconf import OmegaConf

from idefics2_ft.config import ConfigError, validate
from idefics2_ft.data import DataError
from idefics2_ft.data.datamodule import ResumableSampler
from idefics2_ft.data.grouping import GroupedBatchSampler, index_stream
from idefics2_ft.data.mixture import RecordOrder, Source, probabilities, source_configs
from tests.helpers import compose_config

SIZES = [300, 120, 40]


def test_entries_take_what_they_leave_out_from_data():
    cfg = compose_config(
        [
            "data=cauldron",
            "data.max_val_samples=7",
            "+data.mixture=[{name: a, subset: ai2d, weight: 0.5, metric: multiple_choice},"
            " {name: b, path: /tmp/elsewhere, weight: 0.5}]",
        ]
    )
    a, b = source_configs(cfg.data)
    assert (a.name, a.cfg.subset, a.cfg.metric, a.cfg.path) == ("a", "ai2d", "multiple_choice", cfg.data.path)
    assert (b.cfg.source, b.cfg.path, b.cfg.metric, b.cfg.subset) == ("hub", "/tmp/elsewhere", "anls", "docvqa")
    assert a.cfg.max_val_samples == b.cfg.max_val_samples == 7 and a.cfg.mixture is None


@pytest.mark.parametrize("weights", [(0.5, 0.3, 0.2), (0.1, 0.1, 0.8)])
def test_draws_follow_the_weights(weights):
    """Over 30,000 draws each source's share is within 0.01 of its weight (the binomial's standard
    deviation is under 0.003 at this N)."""
    sources = [Source(f"s{i}", OmegaConf.create({}), w) for i, w in enumerate(weights)]
    order = RecordOrder(SIZES, probabilities(sources, SIZES), seed=3)
    offsets = [0, SIZES[0], SIZES[0] + SIZES[1]]
    drawn = list(islice(order.stream(), 30_000))
    counts = Counter(max(i for i, off in enumerate(offsets) if index >= off) for index in drawn)
    for i, w in enumerate(weights):
        assert abs(counts[i] / len(drawn) - w) < 0.01, (i, counts)


def test_a_source_runs_through_its_own_permutation_before_repeating():
    sources = [Source("a", OmegaConf.create({}), 0.5), Source("b", OmegaConf.create({}), 0.5)]
    order = RecordOrder([10, 1000], probabilities(sources, [10, 1000]), seed=0)
    small = [i for i in islice(order.stream(), 400) if i < 10]
    assert sorted(small[:10]) == list(range(10))  # each record once before any record twice


def test_sources_without_weights_share_by_size():
    sources = [
        Source("a", OmegaConf.create({})),
        Source("b", OmegaConf.create({})),
        Source("c", OmegaConf.create({}), 0.5),
    ]
    assert probabilities(sources, [300, 100, 50]) == pytest.approx([0.375, 0.125, 0.5])
    assert probabilities(sources[:2], [300, 100]) == pytest.approx([0.75, 0.25])


@pytest.mark.parametrize(
    "weights, says",
    [((0.5, 0.0), "weight=0.0 must be a positive probability"), ((0.7, 0.7), "weights sum to 1.4, not 1")],
)
def test_bad_weights_are_refused(weights, says):
    sources = [Source(f"s{i}", OmegaConf.create({}), w) for i, w in enumerate(weights)]
    with pytest.raises(DataError, match=says):
        probabilities(sources, [10, 10])


def test_one_source_draws_as_before_mixtures():
    assert list(islice(RecordOrder([50], seed=9).stream(), 500)) == list(islice(index_stream(50, 9), 500))


def test_a_resumed_mixture_sampler_goes_on_where_the_first_stopped():
    order = RecordOrder(SIZES, [0.5, 0.3, 0.2], seed=1)
    whole = list(ResumableSampler(sum(SIZES), 400, seed=1, order=order))
    assert list(ResumableSampler(sum(SIZES), 400, seed=1, start=150, order=order)) == whole[150:]
    keys = [(i % 7,) for i in range(sum(SIZES))]
    grouped = list(GroupedBatchSampler(keys, 4, 60, seed=1, order=order))
    assert list(GroupedBatchSampler(keys, 4, 60, seed=1, start=25, order=order)) == grouped[25:]


@pytest.mark.parametrize("grouped", [False, True])
def test_ranks_take_disjoint_parts_of_the_one_process_order(grouped):
    order = RecordOrder(SIZES, [0.5, 0.3, 0.2], seed=2)
    if grouped:
        keys = [(i % 5,) for i in range(sum(SIZES))]
        one = [b for b in GroupedBatchSampler(keys, 4, 40, seed=2, order=order)]
        ranks = [list(GroupedBatchSampler(keys, 2, 40, seed=2, rank=r, num_replicas=2, order=order)) for r in (0, 1)]
        for step, batch in enumerate(one):
            assert ranks[0][step] + ranks[1][step] == batch  # rank r takes its half of each global batch
        return
    one = list(ResumableSampler(sum(SIZES), 200, seed=2, order=order))
    ranks = [list(ResumableSampler(sum(SIZES), 100, seed=2, rank=r, num_replicas=2, order=order)) for r in (0, 1)]
    assert sorted(ranks[0] + ranks[1]) == sorted(one)
    assert [x for pair in zip(*ranks, strict=True) for x in pair] == one  # positions dealt round-robin


def _problems(*overrides):
    with pytest.raises(ConfigError) as err:
        validate(compose_config(["run_dir=/tmp/unused", *overrides]))
    return str(err.value)


def test_mixture_mistakes_are_refused_with_the_key_and_the_fix():
    said = _problems("data=cauldron", "+data.mixture=[{name: a, weight: 0.6}, {name: a, weight: 0.6}]")
    assert "the source name(s) ['a'] are used twice" in said
    assert "weights sum to 1.2, not 1" in said and "normalised: a: 0.500, a: 0.500" in said
    said = _problems("data=cauldron", "+data.mixture=[{name: a, weight: -1}, {name: b}]")
    assert "data.mixture[0] (a).weight=-1" in said
    said = _problems("data=cauldron", "+data.mixture=[{name: a, weight: 0.5, max_samples: 10}]")
    assert "give a weight" in said and "not both" in said
    said = _problems("data=cauldron", "+data.mixture=[{name: a, metric: bleu}]")
    assert "data.mixture[0] (a).metric='bleu' is not one of" in said
    said = _problems("data=cauldron", "+data.mixture=[{name: a, source: jsonl}]")
    assert "data.mixture[0] (a).train_file is required with source jsonl" in said


def test_streaming_with_group_by_needs_a_buffer():
    assert compose_config(["data=cauldron"]).data.buffer_size == 1000  # the default: a buffer
    said = _problems("data=cauldron", "data.streaming=true", "data.group_by=aspect", "data.buffer_size=null")
    assert "data.streaming=true with data.group_by=aspect needs data.buffer_size" in said


def test_a_mixtures_bad_records_are_counted_per_source_or_named_with_it(tmp_path):
    import json

    from PIL import Image

    from idefics2_ft.data import BadSampleError
    from idefics2_ft.data.sources import check_sources

    Image.new("RGB", (8, 8), "red").save(tmp_path / "r.png")

    def row(speaker):
        return {
            "image": "r.png",
            "conversations": [{"from": "human", "value": "<image>Q?"}, {"from": speaker, "value": "A"}],
        }

    good, bad = tmp_path / "good.jsonl", tmp_path / "bad.jsonl"
    good.write_text(json.dumps(row("gpt")) + "\n")
    bad.write_text(json.dumps(row("gpt")) + "\n" + json.dumps(row("bot")) + "\n")
    entries = (
        f"[{{name: a, source: jsonl, train_file: '{good}', val_file: '{good}'}},"
        f" {{name: b, source: jsonl, train_file: '{bad}', val_file: '{good}'}}]"
    )
    cfg = compose_config(["data=jsonl", f"data.mixture={entries}"])
    assert check_sources(cfg.data) == {"train/b/unknown_role": 1}
    cfg.data.on_bad_sample = "raise"
    with pytest.raises(BadSampleError, match=rf"source b: {bad}:2: speaker from='bot'"):
        check_sources(cfg.data)


def test_an_unnamed_source_is_refused():
    assert "data.mixture[0] has no name" in _problems("data=cauldron", "data.mixture=[{subset: ai2d, weight: 1.0}]")
