"""Every recipe composes, validates and instantiates; bad configs fail before any weight loads."""

from pathlib import Path

import pytest
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf
from omegaconf.errors import ConfigKeyError, ValidationError

from idefics2_ft.config import ConfigError, validate
from idefics2_ft.demo import build_tiny_model, tiny_config
from idefics2_ft.models import apply_peft, trainable_parameters
from idefics2_ft.models.reference import idefics2_8b_on_meta
from tests.helpers import ROOT, compose_config

RECIPES = sorted(p.relative_to(ROOT / "recipes").with_suffix("").as_posix() for p in (ROOT / "recipes").rglob("*.yaml"))


def test_recipes_are_found():
    assert {"docvqa_qlora", "easyvqa_tiny"} <= set(RECIPES)
    # `recipe=` reads the recipes/ folder itself: no copy of any YAML exists
    assert (ROOT / "conf" / "recipe").resolve() == (ROOT / "recipes").resolve()


@pytest.mark.parametrize("recipe", RECIPES)
def test_every_recipe_composes_validates_and_instantiates(recipe, monkeypatch, tmp_path):
    monkeypatch.setenv("WANDB_MODE", "offline")  # the docvqa recipe logs to W&B
    cfg = compose_config([f"recipe={recipe}", f"run_dir={tmp_path}"])
    assert cfg.name == recipe  # run folders are outputs/<recipe>/...
    validate(cfg)
    if cfg.model.name_or_path == "tiny":
        t = cfg.model.tiny
        model = build_tiny_model(
            tiny_config(
                vision_hidden=t.vision_hidden, text_hidden=t.text_hidden, n_latents=t.n_latents, patch_size=t.patch_size
            )
        )
    else:  # the real 8B shapes on the meta device; 4-bit needs real storage, LoRA does not
        model = idefics2_8b_on_meta()
    peft = OmegaConf.merge(cfg.peft, {"quantize": None})
    counts = trainable_parameters(apply_peft(model, peft, gradient_checkpointing=False))
    assert counts["text"] > 0 and counts["total"] > 0


def test_docvqa_recipe_is_what_the_readme_says(tmp_path):
    cfg = compose_config(["recipe=docvqa_qlora", f"run_dir={tmp_path}"])
    assert cfg.model.name_or_path == "HuggingFaceM4/idefics2-8b"
    assert cfg.peft.method == "lora" and cfg.peft.quantize == "nf4" and cfg.peft.r == 8
    assert cfg.peft.target == "text+connector"
    assert cfg.model.attn_implementation == "sdpa" and cfg.data.do_image_splitting is False
    assert cfg.model.gradient_checkpointing is True and cfg.logger.type == "wandb"
    assert cfg.data.source == "hub" and cfg.data.path == "HuggingFaceM4/DocumentVQA" and cfg.data.metric == "anls"
    overridden = compose_config(
        ["recipe=docvqa_qlora", f"run_dir={tmp_path}", "peft.r=16", "data.longest_edge=490", "trainer.max_steps=2000"]
    )
    assert (overridden.peft.r, overridden.data.longest_edge, overridden.trainer.max_steps) == (16, 490, 2000)


def test_default_recipe_is_the_tiny_demo(tmp_path):
    cfg = compose_config([f"run_dir={tmp_path}"])
    assert cfg.name == "easyvqa_tiny"
    assert cfg.model.name_or_path == "tiny" and cfg.peft.quantize == "nf4" and cfg.data.source == "easyvqa"
    assert cfg.data.max_val_samples >= 1000


def test_unknown_key_fails_when_composed_naming_the_key(tmp_path):
    with pytest.raises((ConfigCompositionException, ConfigKeyError)) as info:
        compose_config([f"run_dir={tmp_path}", "peft.rank=4"])
    assert "rank" in str(info.value) + str(info.value.__cause__)


def test_wrong_type_fails_when_composed(tmp_path):
    with pytest.raises((ConfigCompositionException, ValidationError)) as info:
        compose_config([f"run_dir={tmp_path}", "peft.r=eight"])
    assert "peft.r" in str(info.value) + str(info.value.__cause__)


def test_validation_lists_every_problem_with_its_fix(tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc with W&B credentials
    cfg = compose_config(
        [
            f"run_dir={tmp_path}",
            "peft=full",
            "peft.quantize=nf4",  # 4-bit can't be trained in full
            "model.attn_implementation=flash_attention_2",
            "data=jsonl",  # needs files
            "logger=wandb",
            "resume=true",
        ]
    )
    with pytest.raises(ConfigError) as info:
        validate(cfg)
    text = str(info.value)
    problems = info.value.problems
    assert any("peft.method=full" in p and "peft=qlora" in p for p in problems)
    assert any("flash_attention_2" in p and "sdpa" in p for p in problems)
    assert any("data.train_file" in p for p in problems) and any("data.val_file" in p for p in problems)
    assert any("wandb login" in p for p in problems)
    assert any("resume=true" in p for p in problems)
    assert text.startswith(f"{len(problems)} problem(s)")


def test_train_refuses_a_bad_config_before_loading_any_weight(tmp_path, monkeypatch):
    from idefics2_ft.tasks import train as train_module

    def fail(*args, **kwargs):
        raise AssertionError("weights were loaded")

    monkeypatch.setattr(train_module, "load_idefics2", fail)
    monkeypatch.setattr(train_module, "resolve_base", fail)
    cfg = compose_config([f"run_dir={tmp_path}", "peft=full", "peft.quantize=nf4"])
    with pytest.raises(ConfigError):
        train_module.train(cfg)
    assert not Path(tmp_path, "adapter").exists()


def test_config_yaml_redacts_secret_keys_only():
    from omegaconf import OmegaConf

    from idefics2_ft.run_folder import redacted

    cfg = OmegaConf.create(
        {"eval": {"max_new_tokens": 16}, "hub": {"token": "hf_x", "repo_id": "me/m"}, "api_key": "k"}
    )
    assert redacted(cfg) == {
        "eval": {"max_new_tokens": 16},
        "hub": {"token": "<redacted>", "repo_id": "me/m"},
        "api_key": "<redacted>",
    }


def test_slurm_allocation_is_checked_against_the_config(tmp_path):
    from idefics2_ft.config.validate import slurm_problems

    cfg = compose_config([f"run_dir={tmp_path}", "trainer.devices=4", "trainer.num_nodes=2"])
    good = {"SLURM_JOB_ID": "1", "SLURM_NTASKS_PER_NODE": "4", "SLURM_NNODES": "2", "SLURM_JOB_NAME": "idefics2-ft"}
    assert slurm_problems(cfg, good) == []
    assert slurm_problems(cfg, {}) == []  # not under SLURM
    bad = {"SLURM_JOB_ID": "1", "SLURM_NTASKS_PER_NODE": "2", "SLURM_NNODES": "1", "SLURM_JOB_NAME": "bash"}
    problems = slurm_problems(cfg, bad)
    assert any("--ntasks-per-node=2 but trainer.devices=4" in p for p in problems)
    assert any("trainer.num_nodes=1" in p for p in problems)
    assert any("hides SLURM from Lightning" in p for p in problems)
    assert any("SLURM_NTASKS_PER_NODE is not set" in p for p in slurm_problems(cfg, {"SLURM_JOB_ID": "1"}))
