"""The per-GPU memory estimates: counted from the real 8B shapes, and ordered as sharding implies."""

import pytest

from idefics2_ft.models.reference import idefics2_8b_on_meta
from idefics2_ft.planning.weights import NF4_PACKED, inventory, per_gpu_gb

SKIP = ["model.vision_model", "model.connector", "lm_head"]


@pytest.fixture(scope="module")
def inv():
    return inventory(idefics2_8b_on_meta(), SKIP, "text+connector", 8)


def test_the_inventory_adds_up_to_the_8b_model(inv):
    model = idefics2_8b_on_meta()
    assert inv.quantizable + inv.frozen_other == sum(p.numel() for p in model.parameters())
    # the text model's linear layers, 32 x (4 attention + 3 MLP projections)
    text_linear = sum(p.numel() for n, p in model.named_parameters() if n.startswith("model.text_model.layers."))
    text_norms = 32 * 2 * 4096
    assert inv.quantizable == text_linear - text_norms
    assert 6.9e9 < inv.quantizable < 7.0e9 and inv.largest_layer == 218_112_000  # one Mistral decoder layer
    # LoRA r=8: text q,k,v,o,gate,up,down per layer, plus the connector's projections
    per_layer = 8 * ((4096 + 4096) * 2 + (4096 + 1024) * 2 + (4096 + 14336) * 2 + (14336 + 4096))
    assert inv.lora > 32 * per_layer


def test_sharding_divides_what_it_shards(inv):
    ddp = [per_gpu_gb(inv, "ddp", n, True) for n in (2, 4, 8)]
    fsdp = [per_gpu_gb(inv, "fsdp", n, True) for n in (2, 4, 8)]
    assert all(f < d for f, d in zip(fsdp, ddp, strict=True))  # FSDP shards the 4-bit base too
    assert fsdp[0] > fsdp[1] > fsdp[2]
    assert ddp[0] == pytest.approx(ddp[2])  # DDP replicates everything
    # The 4-bit base alone: 0.5 byte per quantizable weight, bf16 for the rest
    assert per_gpu_gb(inv, "ddp", 1, True) > (inv.quantizable * NF4_PACKED + inv.frozen_other * 2) / 1e9
    assert per_gpu_gb(inv, "ddp", 1, True) < per_gpu_gb(inv, "ddp", 1, False) / 2
    assert per_gpu_gb(inv, "deepspeed_zero3", 4, True) is None  # refused, as validation refuses it
    assert per_gpu_gb(inv, "deepspeed_zero3", 4, False) < per_gpu_gb(inv, "deepspeed_zero2", 4, False)
