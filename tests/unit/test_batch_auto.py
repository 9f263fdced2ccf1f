"""``data.batch_size=auto`` where not even a batch of 1 fits: refused with what it needs, what the device
offers and the plan's cheapest change, never logged as fitting."""

from __future__ import annotations

import logging

import pytest

from idefics2_ft.config import ConfigError
from idefics2_ft.models import base_config
from idefics2_ft.models.reference import idefics2_8b_config
from idefics2_ft.planning import plan_run, setup_from_cfg, workload_from_cfg
from idefics2_ft.planning.batch import largest_batch
from idefics2_ft.tasks.train import resolve_batch_size
from tests.helpers import compose_config


def test_the_8b_recipe_on_a_6_gb_gpu_names_the_plans_cheapest_change():
    cfg = compose_config(["recipe=docvqa_qlora", "data.batch_size=auto"])
    config = idefics2_8b_config()
    one = compose_config(["recipe=docvqa_qlora", "data.batch_size=1"])
    plan = plan_run(config, workload_from_cfg(one, config), setup_from_cfg(one, "cuda"), gpu_gb=6.0)
    assert plan.total_gb > 6.0 and plan.fix and plan.fix != "no single change makes it fit"
    with pytest.raises(ConfigError) as raised:
        largest_batch(cfg, config, "cuda", 6.0)
    said = str(raised.value)
    assert f"data.batch_size=auto: not even a batch of 1 fits: its plan needs {plan.total_gb:.1f} GB" in said
    assert "the device offers 6.0 GB (plan.gpu_gb, or what the device reports)" in said
    assert f"The cheapest change that fits, by the plan: {plan.fix}." in said


def test_batch_1_too_large_for_the_memory_is_refused_before_anything_runs(tiny_run_cfg, caplog):
    cfg = tiny_run_cfg("data.batch_size=auto", "plan.gpu_gb=0.001", "trainer.accelerator=cpu")
    with caplog.at_level(logging.INFO, logger="idefics2_ft"), pytest.raises(ConfigError) as raised:
        resolve_batch_size(cfg)
    assert "not even a batch of 1 fits" in str(raised.value) and "offers 0.001 GB" in str(raised.value)
    assert "per device, the largest whose plan fits" not in caplog.text
    assert cfg.data.batch_size == "auto"  # nothing recorded


def test_batch_auto_with_dpo_picks_the_largest_pair_batch_the_plan_fits():
    """A pair is two text rows, its pictures once and the reference's pass: the batch counts pairs."""
    config = idefics2_8b_config()
    overrides = ["recipe=rlaifv_dpo", "data.do_image_splitting=true"]

    def plan_of(pairs: int):
        cfg = compose_config([*overrides, f"data.batch_size={pairs}"])
        return plan_run(config, workload_from_cfg(cfg, config), setup_from_cfg(cfg, "cuda"))

    one, two, four = plan_of(1), plan_of(2), plan_of(4)
    assert one.workload.batch == 2 and one.setup.reference == "base"
    assert "temporaries: the reference's connector (no grad)" in {**one.rows, **one.off_peak}
    auto = compose_config([*overrides, "data.batch_size=auto"])
    for memory, pairs in (((one.total_gb + two.total_gb) / 2, 1), ((two.total_gb + four.total_gb) / 2, 2)):
        batch, plan = largest_batch(auto, config, "cuda", memory)
        assert batch == pairs and plan.workload.batch == 2 * pairs and plan.total_gb <= memory
    # the same memory holds more SFT samples than pairs
    sft = compose_config(["recipe=docvqa_qlora", "data.do_image_splitting=true", "data.batch_size=auto"])
    assert largest_batch(sft, config, "cuda", 24.0)[0] > largest_batch(auto, config, "cuda", 24.0)[0]


def test_batch_auto_with_dpo_is_resolved_before_the_run_as_pairs_per_device(tiny_run_cfg, caplog):
    probe = tiny_run_cfg("objective=dpo", "data.batch_size=2", "trainer.accelerator=cpu")
    config = base_config(probe)
    totals = {}
    for pairs in (2, 4):
        cfg = tiny_run_cfg("objective=dpo", f"data.batch_size={pairs}", "trainer.accelerator=cpu")
        totals[pairs] = plan_run(config, workload_from_cfg(cfg, config), setup_from_cfg(cfg, "cpu")).total_gb
    memory = (totals[2] + totals[4]) / 2
    cfg = tiny_run_cfg("objective=dpo", "data.batch_size=auto", f"plan.gpu_gb={memory}", "trainer.accelerator=cpu")
    with caplog.at_level(logging.INFO, logger="idefics2_ft"):
        resolve_batch_size(cfg)
    assert cfg.data.batch_size == 2
    assert "data.batch_size=auto: 2 per device, the largest whose plan fits" in caplog.text


@pytest.mark.parametrize(
    "overrides",
    [
        [],
        ["objective.loss=[simpo]"],
        ["objective.loss=[orpo,sft]"],
        ["objective.loss=[sigmoid,sft]"],
        ["objective.loss=[sft]"],
        ["objective.reference=none", "objective.loss=[simpo]"],
        ["model.adapter=/some/run"],
    ],
)
def test_the_plan_resolves_the_reference_as_the_preference_module_does(overrides):
    """planning does not import training: its copy of which losses need a reference is pinned here."""
    from idefics2_ft.planning.shapes import REFERENCE_FREE_LOSSES, REFERENCE_OPTIONAL_LOSSES, reference_pass
    from idefics2_ft.training.preference import LOSSES
    from idefics2_ft.training.preference_module import reference_of

    assert REFERENCE_FREE_LOSSES == {k for k, v in LOSSES.items() if v.reference_free}
    assert REFERENCE_OPTIONAL_LOSSES == {k for k, v in LOSSES.items() if not v.reference_free and not v.needs_reference}
    cfg = compose_config(["recipe=rlaifv_dpo", *overrides])
    expected = reference_of(cfg.objective, cfg.model.adapter)
    assert reference_pass(cfg) == (None if expected == "none" else expected)
    assert reference_pass(compose_config(["recipe=docvqa_qlora"])) is None
