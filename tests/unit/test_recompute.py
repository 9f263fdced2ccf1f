"""Recomputing the connector (``model.checkpoint_connector``) and computing logits only where the model
learns change the memory, not the numbers: the same loss and the same gradients as without."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from idefics2_ft.data.collator import Idefics2Collator
from idefics2_ft.demo import ensure_tiny_base
from idefics2_ft.models import apply_peft, load_idefics2, load_processor
from idefics2_ft.models.recompute import connector_of, connector_trains, recompute_connector
from tests.helpers import TINY_RUN, compose_config


@pytest.fixture(scope="module", params=[False, True], ids=["no splitting", "splitting"])
def base(request, tmp_path_factory):
    cache = tmp_path_factory.mktemp("tiny")
    overrides = [*TINY_RUN, f"model.tiny.cache_dir={cache}", f"run_dir={cache}/run", "peft.target=text+connector"]
    overrides.append(f"data.do_image_splitting={str(request.param).lower()}")
    cfg = compose_config(overrides)
    return cfg, str(ensure_tiny_base(cfg))


def batch_of(path, cfg):
    processor = load_processor(path, cfg.data)
    records = [
        {
            "images": [Image.new("RGB", (64, 48), colour)],
            "messages": [
                {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What colour is it?"}]},
                {"role": "assistant", "content": [{"type": "text", "text": answer}]},
            ],
        }
        for colour, answer in (("red", "it is red"), ("blue", "blue"))
    ]
    batch = Idefics2Collator(processor)(records)
    batch.pop("bad_samples", None)
    return {k: v for k, v in batch.items() if isinstance(v, torch.Tensor)}


def model_of(path, cfg, peft_overrides: dict, recompute: bool, dtype: str = "float32"):
    peft = compose_config([f"peft.{k}={v}" for k, v in peft_overrides.items()]).peft
    model_cfg = compose_config([f"model.dtype={dtype}"]).model
    torch.manual_seed(0)
    model = apply_peft(
        load_idefics2(path, model_cfg, peft), peft, gradient_checkpointing=False, checkpoint_connector=False
    )
    with torch.no_grad():  # lora_B starts at zero: give it values so that every adapter gets a gradient
        generator = torch.Generator().manual_seed(1)
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=generator) * 0.05)
    if recompute:
        recompute_connector(model, chunk_patches=16)  # the tiny pictures have 48 patches: three chunks
    return model.train()


def gradients(model, batch) -> tuple[float, dict[str, torch.Tensor]]:
    loss = model(**batch).loss
    loss.backward()
    return float(loss.detach()), {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize(
    "quantize, dtype", [("nf4", "float32"), ("null", "float32"), ("null", "bfloat16")], ids=["NF4", "fp32", "bf16"]
)
def test_recomputing_the_connector_gives_the_same_gradients(base, quantize, dtype):
    cfg, path = base
    batch = batch_of(path, cfg)
    # no dropout: a chunk draws its own dropout masks, the same in distribution, not in value
    settings = {"quantize": quantize, "dropout": 0.0, "target": "text+connector"}
    loss_a, a = gradients(model_of(path, cfg, settings, recompute=False, dtype=dtype), batch)
    loss_b, b = gradients(model_of(path, cfg, settings, recompute=True, dtype=dtype), batch)
    tol = {"rtol": 1e-4, "atol": 1e-7} if dtype == "float32" else {"rtol": 2e-2, "atol": 1e-3}  # bf16: 8 bits
    assert loss_a == pytest.approx(loss_b, rel=tol["rtol"])
    connector = [n for n in a if ".connector." in n]
    assert connector and all(a[n].abs().sum() > 0 for n in connector)  # the connector's adapters do learn
    for name in a:
        torch.testing.assert_close(b[name], a[name], **tol, msg=name)


def test_recompute_is_on_by_default_only_when_the_connector_trains(base):
    cfg, path = base
    for target, on in (("text+connector", True), ("text", False)):
        peft = compose_config([f"peft.target={target}"]).peft
        model = apply_peft(load_idefics2(path, cfg.model, peft), peft, gradient_checkpointing=False)
        assert connector_trains(model) is on
        assert getattr(connector_of(model), "_recomputed", False) is on


def test_logits_only_where_the_model_learns_give_the_same_loss_and_gradients(base):
    from idefics2_ft.training import Idefics2Module

    cfg, path = base
    batch = batch_of(path, cfg)
    settings = {"quantize": "nf4", "dropout": 0.0, "target": "text+connector"}
    model = model_of(path, cfg, settings, recompute=False)
    full_loss, full = gradients(model, batch)  # transformers' own loss on every position's logits
    model.zero_grad()
    module = Idefics2Module(model, load_processor(path, cfg.data).tokenizer, optimizer_factory=None)
    loss = module.learned_loss(batch)
    loss.backward()
    assert float(loss.detach()) == pytest.approx(full_loss, rel=1e-6)
    for name, p in model.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(p.grad, full[name], rtol=1e-4, atol=1e-7, msg=name)
    # and with the DDP normalisation (the global batch's supervised tokens), as transformers divides
    n = (batch["labels"][:, 1:] != -100).sum().float() * 2
    expected = model(**batch, num_items_in_batch=n).loss
    assert float(module.learned_loss(batch, n)) == pytest.approx(float(expected), rel=1e-6)
