"""DDP with 2 CPU processes (gloo): ranks stay in sync and equal one process over the global batch."""

import json

import pytest

from tests.helpers import TINY_RUN, assert_same_adapters, llava_every_other_answer_empty, run_train


@pytest.mark.parametrize("group_by, mixture", [("none", False), ("length", True)])
def test_ddp_two_processes_equal_one_process_over_the_global_batch(tmp_path, group_by, mixture):
    """Also with data.group_by (the global batch is grouped as one, and each rank takes its half) over
    a mixture of easy-VQA and a TRL dataset (each rank a disjoint half of each global batch: else the
    adapters part by about the learning rate; the same samples per source)."""
    common = [*TINY_RUN, f"model.tiny.cache_dir={tmp_path / 'tiny'}", "peft.dropout=0", "name=ddp"]
    common.append(f"data.group_by={group_by}")
    if mixture:
        from idefics2_ft.demo import formats

        trl = formats.write_trl(tmp_path / "trl", rows=32)
        common.append(f"+data.mixture=[{{name: easy, weight: 0.5}}, {{name: trl, path: '{trl}', weight: 0.5}}]")
    run_train(*common, "data.batch_size=4", f"run_dir={tmp_path / 'one'}")  # also builds the tiny base
    run_train(
        *common,
        "strategy=ddp",
        "trainer.devices=2",
        "trainer.accelerator=cpu",
        "data.batch_size=2",
        f"run_dir={tmp_path / 'two'}",
    )
    two = json.loads((tmp_path / "two" / "metrics.json").read_text())
    assert two["train/world_size"] == 2 and two["train/effective_batch"] == 4
    assert two["train/ranks_in_sync"] is True  # checked across ranks with all_gather after training
    one = json.loads((tmp_path / "one" / "metrics.json").read_text())
    if mixture:
        samples = {k: v for k, v in one.items() if k.startswith("data/samples/")}
        assert samples == {k: v for k, v in two.items() if k.startswith("data/samples/")}
        assert sum(samples.values()) == 16
        # each question once, gathered from both ranks (the TRL copy has 8 in its test split)
        assert (two["val/easy/n_questions"], two["val/trl/n_questions"]) == (12, 8)
    else:
        assert two["val/n_questions"] == 12  # each question counted once, gathered from both ranks
    # fp32 sums in another order (two half batches, then an all-reduce) against a bug that moves
    # the weights by about the learning rate: the tolerance is argued in tests/helpers.py
    assert_same_adapters(tmp_path / "one", tmp_path / "two")
    # one run folder for both ranks: nothing was written anywhere else
    assert sorted(p.name for p in tmp_path.iterdir()) == ["one", "tiny", *(["trl"] if mixture else []), "two"]


def test_a_rank_whose_records_are_all_bad_keeps_step_and_the_run_equals_one_process(tmp_path, tiny_cache):
    """One record per rank and every other record bad (an empty answer): in some steps one rank holds
    nothing to learn. It must still join every collective of the step (the token count, the logged
    loss, the gradient all-reduce) and of validation (generation): a rank that skipped one left the
    other waiting in it until the timeout. Its zero loss is its exact share of the global mean, so the
    run still equals one process over the global batch of 2."""
    path = llava_every_other_answer_empty(tmp_path / "llava", rows=24)
    common = [*TINY_RUN, f"model.tiny.cache_dir={tiny_cache}", "peft.dropout=0", "name=ddp-bad"]
    common += ["data=jsonl", f"data.train_file={path}", f"data.val_file={path}", "data.max_val_samples=7"]
    common += ["data.eval_batch_size=1", "trainer.max_steps=6"]
    run_train(*common, "data.batch_size=2", f"run_dir={tmp_path / 'one'}")
    run_train(
        *common,
        "strategy=ddp",
        "trainer.devices=2",
        "trainer.accelerator=cpu",
        "data.batch_size=1",
        f"run_dir={tmp_path / 'two'}",
    )
    one = json.loads((tmp_path / "one" / "metrics.json").read_text())
    two = json.loads((tmp_path / "two" / "metrics.json").read_text())
    assert two["train/world_size"] == 2 and two["train/ranks_in_sync"] is True
    assert one["data/skipped/train/empty_answer"] == two["data/skipped/train/empty_answer"] > 0
    assert one["val/n_questions"] == two["val/n_questions"] == 4  # 7 held out, 3 of them bad
    assert_same_adapters(tmp_path / "one", tmp_path / "two")


def test_dpo_under_ddp_equals_one_process_over_the_global_batch_and_keeps_each_pair_whole(
    tmp_path, trained_run, tiny_cache
):
    """objective=dpo from the session's SFT run (its adapter the frozen reference), losses sigmoid + sft.
    The sampler shards records and a record is a whole pair (both sides, its pictures), so a pair is
    never split across ranks. One pair has identical sides (a bad pair, dropped) and the chosen answers
    differ in length: the ranks then hold different numbers of pairs and of answer tokens in some step,
    and PreferenceModule scales each rank's loss to its share of the global batch, so that DDP's average
    of the gradients is still one process's mean over the global batch (without it the adapters part)."""
    import torch

    from idefics2_ft.demo import formats
    from tests.helpers import adapter_weights, training_tolerance

    sft_dir, _ = trained_run
    path = formats.write_swift_pairs(tmp_path / "pairs", rows=16)
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    for i, row in enumerate(rows):
        if i % 3 == 1 and "rejected_response" in row:  # chosen answers of several lengths
            row["messages"][-1]["content"] += " , it is quite clear from the picture"
    rows[5]["rejected_response"] = rows[5]["messages"][-1]["content"]  # identical sides: a bad pair
    rows[5].pop("rejected_messages", None)
    rows[5].pop("rejected_images", None)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    common = [*TINY_RUN, f"model.tiny.cache_dir={tiny_cache}", "name=ddp-dpo", "objective=dpo"]
    common += [f"model.adapter={sft_dir}", "objective.loss=[sigmoid,sft]", "objective.loss_weights=[1.0,0.5]"]
    common += ["data=jsonl", f"data.train_file={path}", f"data.val_file={path}", "data.max_val_samples=11"]
    run_train(*common, "data.batch_size=4", f"run_dir={tmp_path / 'one'}")
    run_train(
        *common,
        "strategy=ddp",
        "trainer.devices=2",
        "trainer.accelerator=cpu",
        "data.batch_size=2",
        f"run_dir={tmp_path / 'two'}",
    )
    one = json.loads((tmp_path / "one" / "metrics.json").read_text())
    two = json.loads((tmp_path / "two" / "metrics.json").read_text())
    assert two["train/world_size"] == 2 and two["train/effective_batch"] == 4 and two["train/ranks_in_sync"] is True
    # the bad pair counted once over both ranks, as by one process; every held-out pair scored once
    assert one["data/skipped/train/identical_sides"] == two["data/skipped/train/identical_sides"] == 1
    # 11 held out, one of them the bad pair: an odd number, which a padding sampler would score one twice
    assert one["val/pairs"] == two["val/pairs"] == 10
    assert_same_adapters(tmp_path / "one", tmp_path / "two")
    assert two["val/rewards/accuracies"] == pytest.approx(one["val/rewards/accuracies"])
    # and the DPO steps moved the policy away from the SFT adapter it copied: a bug could have shown
    start, end = adapter_weights(sft_dir), adapter_weights(tmp_path / "two")
    moved = max(float((end[k].float() - start[k].float()).abs().max()) for k in end)
    assert moved > 10 * training_tolerance(lr=1e-3, steps=4)
    assert all(torch.isfinite(v).all() for v in end.values())
