"""Every strategy option composes, validates and builds; DeepSpeed accepts our configs; the rules
for sharded 4-bit weights and for a fixed global batch hold."""

import importlib
from pathlib import Path

import pytest
import torch

from idefics2_ft.config import ConfigError, accumulation, validate
from idefics2_ft.training.optim import make_optimizer_factory
from idefics2_ft.training.strategies import deepspeed_config, make_strategy, quant_storage_for
from tests.helpers import ROOT, compose_config

# the module, not the `validate` function the package exports under the same name
validate_module = importlib.import_module("idefics2_ft.config.validate")
STRATEGIES = sorted(p.stem for p in (ROOT / "conf" / "strategy").glob("*.yaml"))


def test_the_strategy_group_has_every_option():
    assert set(STRATEGIES) == {
        "auto",
        "ddp",
        "fsdp",
        "deepspeed_zero2",
        "deepspeed_zero2_offload",
        "deepspeed_zero3",
        "deepspeed_zero3_offload",
    }


@pytest.fixture
def on_cuda(monkeypatch):
    """Validate as on a CUDA machine (DeepSpeed refuses the CPU)."""
    monkeypatch.setattr(validate_module, "cuda_available", lambda: True)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_every_strategy_composes_validates_and_builds(strategy, tmp_path, on_cuda):
    peft = "peft=lora" if strategy.startswith("deepspeed_zero3") else "peft=qlora"  # ZeRO-3: no 4-bit
    cfg = compose_config(["recipe=docvqa_qlora", f"strategy={strategy}", peft, "logger=csv", f"run_dir={tmp_path}"])
    validate(cfg)
    built = make_strategy(cfg)
    expected = {
        "auto": "str",
        "ddp": "DDPStrategy",
        "fsdp": "FSDP2Strategy",
    }.get(strategy, "DeepSpeedStrategy")
    assert type(built).__name__ == expected
    if expected == "DeepSpeedStrategy":
        assert built.config["zero_optimization"]["stage"] == cfg.strategy.zero_stage


@pytest.mark.parametrize("strategy", [s for s in STRATEGIES if s.startswith("deepspeed")])
def test_deepspeed_configs_pass_deepspeeds_own_validation(strategy, tmp_path):
    from deepspeed.runtime.config import DeepSpeedConfig

    cfg = compose_config([f"strategy={strategy}", f"run_dir={tmp_path}"])
    config = deepspeed_config(cfg)
    # what Lightning's DeepSpeedStrategy adds from the trainer before DeepSpeed sees it
    config.update(
        train_micro_batch_size_per_gpu=2, gradient_accumulation_steps=8, gradient_clipping=1.0, bf16={"enabled": True}
    )
    parsed = DeepSpeedConfig(config)  # pydantic models: unknown or mistyped keys raise
    assert parsed.zero_optimization_stage == cfg.strategy.zero_stage
    assert parsed.train_batch_size == 16
    assert (parsed.zero_config.offload_optimizer is not None) == cfg.strategy.offload_optimizer
    assert (parsed.zero_config.offload_param is not None) == cfg.strategy.offload_params
    config["zero_optimization"]["stage3_prefetch_bucket_sizes"] = 1  # a typo is caught, so the check is real
    with pytest.raises(Exception, match="stage3_prefetch_bucket_sizes"):
        DeepSpeedConfig(config)


@pytest.mark.parametrize("strategy", ["deepspeed_zero3", "deepspeed_zero3_offload"])
def test_zero3_with_a_4bit_base_is_refused_naming_fsdp(strategy, tmp_path, on_cuda):
    cfg = compose_config(["recipe=docvqa_qlora", f"strategy={strategy}", "logger=csv", f"run_dir={tmp_path}"])
    with pytest.raises(ConfigError) as info:
        validate(cfg)
    (problem,) = info.value.problems
    assert f"strategy={strategy}" in problem and "strategy=fsdp" in problem and "peft.quantize=nf4" in problem


def test_deepspeed_on_the_cpu_is_refused_with_what_runs_here(tmp_path, monkeypatch):
    monkeypatch.setattr(validate_module, "cuda_available", lambda: False)
    cfg = compose_config(["strategy=deepspeed_zero2", f"run_dir={tmp_path}"])
    with pytest.raises(ConfigError) as info:
        validate(cfg)
    assert any("needs CUDA GPUs" in p and "strategy=fsdp" in p for p in info.value.problems)


def test_sharded_4bit_weights_are_stored_in_the_compute_dtype(tmp_path):
    base = ["recipe=docvqa_qlora", "logger=csv", f"run_dir={tmp_path}"]
    assert quant_storage_for(compose_config([*base, "strategy=fsdp", "model.dtype=bfloat16"])) == "bfloat16"
    assert quant_storage_for(compose_config([*base, "strategy=ddp"])) is None  # uint8, as published
    assert quant_storage_for(compose_config([*base, "strategy=fsdp", "peft=lora"])) is None  # nothing is 4-bit
    explicit = compose_config([*base, "strategy=fsdp", "peft.quant_storage=float16"])
    assert quant_storage_for(explicit) == "float16"


def test_sharded_strategies_use_plain_adamw(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    param = [torch.nn.Parameter(torch.zeros(2))]
    for strategy in ("fsdp", "deepspeed_zero2"):
        cfg = compose_config([f"strategy={strategy}", f"run_dir={tmp_path}"])
        assert type(make_optimizer_factory(cfg)(param)) is torch.optim.AdamW
    cfg = compose_config([f"run_dir={tmp_path}", "strategy=fsdp", "optim.optimizer=paged_adamw_8bit"])
    with pytest.raises(ConfigError, match="optim.optimizer=adamw"):
        validate(cfg)


def test_a_fixed_global_batch_sets_the_accumulation(tmp_path):
    base = [f"run_dir={tmp_path}", "data.batch_size=4", "trainer.accelerator=cpu", "trainer.global_batch_size=32"]
    one = compose_config([*base, "trainer.devices=1"])
    two = compose_config([*base, "trainer.devices=2"])
    four = compose_config([*base, "trainer.devices=2", "trainer.num_nodes=2"])
    assert [accumulation(c) for c in (one, two, four)] == [8, 4, 2]  # 32 = 4 x devices x nodes x accumulation
    assert accumulation(compose_config([f"run_dir={tmp_path}", "trainer.accumulate_grad_batches=3"])) == 3
    bad = compose_config([*base, "trainer.devices=3"])
    with pytest.raises(ConfigError) as info:
        validate(bad)
    (problem,) = info.value.problems
    assert "trainer.global_batch_size=32" in problem and "multiple of 12" in problem


def test_the_fsdp_units_are_the_repeated_layers_of_the_real_8b():
    """The wrapped classes exist in idefics2-8b, once per layer (meta device, no download)."""
    from collections import Counter

    from idefics2_ft.models import WRAP_CLASSES
    from idefics2_ft.models.reference import idefics2_8b_on_meta

    counts = Counter(type(m).__name__ for m in idefics2_8b_on_meta().modules())
    assert {c: counts[c] for c in WRAP_CLASSES} == {
        "MistralDecoderLayer": 32,
        "Idefics2EncoderLayer": 27,
        "Idefics2PerceiverLayer": 3,
    }


def test_strategy_yaml_comments_match_what_validation_does():
    """The ZeRO-3 files say 4-bit is refused and name the way out, as the validation does."""
    text = Path(ROOT / "conf" / "strategy" / "deepspeed_zero3.yaml").read_text()
    assert "strategy=fsdp" in text and "refused" in text
