"""The preference step: policy and reference agree at step 0 (ln 2, rewards 0), whichever the reference,
and one training step sends each picture through the vision tower once."""

from __future__ import annotations

import math

import pytest
import torch

from idefics2_ft.demo import ensure_tiny_base
from idefics2_ft.models import apply_peft, load_idefics2, load_processor, start_from_adapter
from idefics2_ft.training.pair_forward import part_of
from idefics2_ft.training.preference_module import PreferenceModule
from tests.helpers import TINY_RUN, compose_config
from tests.unit.test_pair_forward import pair_batch, record

LN2 = math.log(2)


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    cache = tmp_path_factory.mktemp("tiny")
    cfg = compose_config([*TINY_RUN, f"model.tiny.cache_dir={cache}", f"run_dir={cache}/run"])
    return cfg, str(ensure_tiny_base(cfg)), cache


@pytest.fixture(scope="module")
def sft_adapter(base):
    """An SFT run's adapter: LoRA on the text model and the connector, its B matrices non-zero."""
    cfg, path, cache = base
    peft = compose_config(["peft.target=text+connector"]).peft
    torch.manual_seed(1)
    model = apply_peft(load_idefics2(path, cfg.model, peft), peft, gradient_checkpointing=False)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    model.save_pretrained(str(cache / "sft"))
    return str(cache / "sft")


def module_for(model, reference: str, tokenizer, losses=("sigmoid",)) -> PreferenceModule:
    return PreferenceModule(model, tokenizer, torch.optim.AdamW, losses=losses, reference=reference)


def pairs_of(processor):
    return pair_batch(
        processor,
        [(record("red", "it is red"), record("red", "blue")), (record("blue", "blue"), record("blue", "a square"))],
    )[0]


@pytest.mark.parametrize("target", ["text", "text+connector"])
def test_a_fresh_adapter_against_the_base_starts_at_ln2_with_zero_rewards(base, target):
    cfg, path, _ = base
    peft = compose_config([f"peft.target={target}"]).peft
    model = apply_peft(load_idefics2(path, cfg.model, peft), peft, gradient_checkpointing=False)
    processor = load_processor(path, cfg.data)
    module = module_for(model, "base", processor.tokenizer)
    loss, metrics = module.pair_loss(pairs_of(processor))
    # LoRA's B starts at zero: the policy computes exactly what the base computes
    assert loss.item() == pytest.approx(LN2, abs=1e-7)
    for key in ("rewards/chosen", "rewards/rejected", "rewards/margins"):
        assert float(metrics[key]) == 0.0, key
    assert float(metrics["rewards/accuracies"]) == 0.0 and float(metrics["logps/chosen"]) < 0


def test_continuing_an_sft_adapter_makes_it_the_reference_not_the_base(base, sft_adapter):
    """LLaMA-Factory #8459: from an SFT LoRA the base became the reference, and the loss started far
    from ln 2. Here the policy starts as a copy of the adapter and the reference is the adapter."""
    cfg, path, _ = base
    processor = load_processor(path, cfg.data)
    batch = pairs_of(processor)
    model = start_from_adapter(load_idefics2(path, cfg.model, cfg.peft), sft_adapter, gradient_checkpointing=False)
    module = module_for(model, "adapter", processor.tokenizer)
    model.eval()  # no dropout in the policy either: the two must compute the same function
    loss, metrics = module.pair_loss(batch)
    assert loss.item() == pytest.approx(LN2, abs=1e-6) and abs(float(metrics["rewards/margins"])) < 1e-6
    against_base, _ = module_for(model, "base", processor.tokenizer).pair_loss(batch)
    assert abs(float(against_base) - LN2) > 1e-4  # the base is another model: the adapter moved it
    # the reference stays frozen and unsaved; the policy's adapter trains
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(".default." in n for n in trainable)
    assert not any(
        ".reference." in n
        for n in model.state_dict()
        if n in dict(model.named_parameters()) and dict(model.named_parameters())[n].requires_grad
    )


def test_a_step_sees_each_picture_once_and_runs_the_connector_again_only_with_adapters_in_it(base, sft_adapter):
    cfg, path, _ = base
    processor = load_processor(path, cfg.data)
    batch = pairs_of(processor)
    for target, connector_calls in (("text", 1), ("text+connector", 2)):
        peft = compose_config([f"peft.target={target}"]).peft
        model = apply_peft(load_idefics2(path, cfg.model, peft), peft, gradient_checkpointing=False)
        inner = part_of(model, "Idefics2Model")
        calls: list[str] = []
        hooks = [
            inner.vision_model.register_forward_hook(lambda *a, seen=calls: seen.append("vision")),
            inner.connector.register_forward_hook(lambda *a, seen=calls: seen.append("connector")),
        ]
        loss, _ = module_for(model, "base", processor.tokenizer).pair_loss(batch)
        loss.backward()
        for hook in hooks:
            hook.remove()
        # two pairs, two pictures: one call of the tower for policy and reference, chosen and rejected
        assert (calls.count("vision"), calls.count("connector")) == (1, connector_calls), target
        assert any(p.grad is not None for n, p in model.named_parameters() if "lora_" in n)
