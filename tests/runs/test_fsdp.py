"""FSDP2 with 2 CPU processes (gloo): sharded QLoRA trains as one process over the global batch,
gathers one ordinary adapter that reproduces the sharded model, and resumes from its checkpoint."""

import json

import pytest
import torch
from safetensors.torch import load_file

from tests.helpers import TINY_RUN, assert_same_adapters, llava_every_other_answer_empty, run_train

TWO_RANKS = ["strategy=fsdp", "trainer.devices=2", "trainer.accelerator=cpu", "data.batch_size=2"]


def adapter(run_dir):
    return load_file(run_dir / "adapter" / "adapter_model.safetensors")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """One process over batches of 4, and FSDP over 2 ranks x 2, from the same tiny base."""
    tmp = tmp_path_factory.mktemp("fsdp")
    common = [
        *TINY_RUN,
        f"model.tiny.cache_dir={tmp / 'tiny'}",
        "peft.dropout=0",
        "model.gradient_checkpointing=true",  # recomputed inside the FSDP units
        "name=fsdp",
    ]
    run_train(*common, "data.batch_size=4", f"run_dir={tmp / 'one'}")  # also builds the tiny base
    run_train(*common, *TWO_RANKS, f"run_dir={tmp / 'two'}")
    return tmp, common


def test_fsdp_two_ranks_equal_one_process_over_the_global_batch(runs):
    tmp, _ = runs
    one = json.loads((tmp / "one" / "metrics.json").read_text())
    two = json.loads((tmp / "two" / "metrics.json").read_text())
    assert two["train/world_size"] == 2 and two["train/effective_batch"] == 4
    # only the adapters train under sharding: the same counts as one process, nothing in the vision tower
    trainable = {k: v for k, v in two.items() if k.startswith("params/trainable/")}
    assert trainable == {k: v for k, v in one.items() if k.startswith("params/trainable/")}
    assert trainable["params/trainable/vision"] == 0 and trainable["params/trainable/total"] > 0
    assert two["train/ranks_in_sync"] is True  # the gathered weights, compared across ranks
    assert two["val/n_questions"] == 12
    config = (tmp / "two" / "config.yaml").read_text()
    assert "quant_storage: float32" in config  # the 4-bit weights were stored in the compute dtype
    assert any("lora_B" in k for k in adapter(tmp / "one"))
    assert_same_adapters(tmp / "one", tmp / "two")  # and it trained: LoRA B (zero at first) moved


def test_fsdp_with_group_by_equals_one_process_over_the_global_batch(runs):
    """data.group_by under FSDP: the global batch is grouped as one and each rank trains on its half."""
    tmp, common = runs
    grouped = [*common, "data.group_by=length"]
    run_train(*grouped, "data.batch_size=4", f"run_dir={tmp / 'one-grouped'}")
    run_train(*grouped, *TWO_RANKS, f"run_dir={tmp / 'two-grouped'}")
    assert_same_adapters(tmp / "one-grouped", tmp / "two-grouped")
    with pytest.raises(AssertionError, match="more than float summation order explains"):
        assert_same_adapters(tmp / "one", tmp / "one-grouped")  # grouping changed the batches, and that shows


def test_the_gathered_adapter_reproduces_the_sharded_model(runs, tmp_path):
    """The FSDP run's validation (sharded over 2 ranks) and a fresh single-process model with the
    gathered adapter give the same loss over every supervised token and the same greedy answers."""
    from omegaconf import OmegaConf

    from idefics2_ft.tasks.evaluate import evaluate, load_run
    from idefics2_ft.training.strategies import keep_cpu_4bit_layout

    tmp, _ = runs
    run = tmp / "two"
    cfg = OmegaConf.load(run / "config.yaml")
    model, processor = load_run(cfg)  # the recorded base + the adapter folder, as evaluate.py loads them
    # Same 4-bit kernel as under FSDP: unsharded, bitsandbytes would switch to a repacked bf16 CPU
    # inference kernel, which rounds differently (enough to flip a greedy token now and then).
    keep_cpu_4bit_layout(model)
    fresh = evaluate(cfg, model, processor, cfg.data.val_split, tmp_path)
    sharded = json.loads((run / "metrics.json").read_text())
    assert fresh["eval/loss"] == pytest.approx(sharded["val/loss"], rel=1e-5)
    during = {r["id"]: r["prediction"] for r in map(json.loads, (run / "predictions.jsonl").open())}
    after = {r["id"]: r["prediction"] for r in map(json.loads, (tmp_path / "predictions.jsonl").open())}
    assert during == after and len(during) == 12


def test_fsdp_resumes_from_its_checkpoint_where_the_uninterrupted_run_ends(runs):
    tmp, common = runs
    resumed = tmp / "resumed"
    crashed = run_train(*common, *TWO_RANKS, f"run_dir={resumed}", "debug.crash_at_step=2", expect_ok=False)
    assert crashed.returncode != 0 and "debug.crash_at_step=2" in crashed.stderr
    state = torch.load(resumed / "checkpoints" / "last.ckpt", weights_only=False)
    assert state["global_step"] == 2
    # rank 0 wrote one file with the gathered trainable weights only: no base weight, no shard
    names = set(state["state_dict"])
    assert names and all("lora_" in n for n in names)
    run_train(*common, *TWO_RANKS, f"run_dir={resumed}", "resume=true")
    assert_same_adapters(tmp / "two", resumed)


@pytest.fixture(scope="module")
def one_process_with_connector(runs):
    tmp, common = runs
    connector = [*common, "peft.target=text+connector"]
    run_train(*connector, "data.batch_size=4", f"run_dir={tmp / 'one-connector'}")
    return tmp / "one-connector", connector


@pytest.mark.slow  # two 2-rank runs: make test-slow
@pytest.mark.parametrize("strategy", ["fsdp", "ddp"])
def test_the_recomputed_connector_trains_under_fsdp_and_ddp_as_one_process(strategy, runs, one_process_with_connector):
    """LoRA in the connector, recomputed in the backward (the default when it trains): the perceiver
    layers are FSDP units, and 2 ranks still train as one process over the global batch."""
    tmp, _ = runs
    one, connector = one_process_with_connector
    two = tmp / f"two-connector-{strategy}"
    run_train(*connector, f"strategy={strategy}", *TWO_RANKS[1:], f"run_dir={two}")
    metrics = json.loads((two / "metrics.json").read_text())
    assert metrics["params/trainable/connector"] > 0 and metrics["train/ranks_in_sync"] is True
    assert any(".connector." in k for k in adapter(one))
    assert_same_adapters(one, two)


def test_dpo_under_fsdp_equals_one_process_over_the_global_batch(runs):
    """objective=dpo (the base the reference, LoRA on the text model and the connector) sharded over 2
    ranks. The pair's forward runs the vision tower and the connector directly, past the root unit's
    hook: it is registered as a forward method of the root (strategies.FORWARD_METHODS), so their
    weights outside the layers are gathered. Without that the sharded run fails on its first step."""
    from idefics2_ft.demo import formats

    tmp, common = runs
    pairs = formats.write_trl_pairs(tmp / "pairs", rows=16)
    dpo = [
        *common,
        "objective=dpo",
        "data=hub",
        f"data.path={pairs}",
        "data.val_split=test",
        "peft.target=text+connector",
    ]
    run_train(*dpo, "data.batch_size=4", f"run_dir={tmp / 'one-dpo'}")
    run_train(*dpo, *TWO_RANKS, f"run_dir={tmp / 'two-dpo'}")
    one = json.loads((tmp / "one-dpo" / "metrics.json").read_text())
    two = json.loads((tmp / "two-dpo" / "metrics.json").read_text())
    assert two["train/world_size"] == 2 and two["train/ranks_in_sync"] is True
    assert one["val/pairs"] == two["val/pairs"] > 0
    assert two["val/rewards/accuracies"] == pytest.approx(one["val/rewards/accuracies"])
    assert_same_adapters(tmp / "one-dpo", tmp / "two-dpo")


def test_under_fsdp_a_rank_without_a_good_record_skips_with_the_others_and_validation_says_so(runs):
    """Sharded weights make every forward a collective. One record per rank, every other record bad (an
    empty answer): a training micro-batch that one rank lacks is skipped by every rank (a warning names
    the step), and a validation batch all bad on one rank stops the run with exit 2 and one line naming
    the fix, where it used to hang or crash on a DTensor; the fit's checkpoint is kept for the resume."""
    tmp, common = runs
    path = llava_every_other_answer_empty(tmp / "llava-bad", rows=16)
    run_dir = tmp / "fsdp-bad"
    out = run_train(
        *common,
        *TWO_RANKS[:3],
        "data.batch_size=1",
        "data.eval_batch_size=1",
        "data=jsonl",
        f"data.train_file={path}",
        f"data.val_file={path}",
        "trainer.max_steps=6",
        f"run_dir={run_dir}",
        expect_ok=False,
    )
    said = out.stdout + out.stderr
    assert out.returncode == 2, said[-3000:]
    assert "every record of it was bad on 1 rank(s)" in said and "Traceback" not in said
    log = (run_dir / "train.log").read_text()
    assert "1 of 2 ranks had only bad records; with sharded weights every rank skips" in log
    assert (run_dir / "checkpoints" / "last.ckpt").is_file()
