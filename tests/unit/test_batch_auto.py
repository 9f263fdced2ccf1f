"""``data.batch_size=auto`` where not even a batch of 1 fits: refused with what it needs, what the device
offers and the plan's cheapest change, never logged as fitting."""

from __future__ import annotations

import logging

import pytest

from idefics2_ft.config import ConfigError
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
