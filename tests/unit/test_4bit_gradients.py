"""Gradients through a 4-bit base layer with LoRA, against the same layer dequantized to float32.

On a CPU with AVX512-BF16, bitsandbytes repacks a 4-bit weight for its inference kernel the first
time the layer runs in eval mode without gradients (a validation), and every later forward goes
through ``gemv_4bit``, which has no backward. The Trainer keeps the trainable layout
(``TrainableFourBitLayout`` in idefics2_ft/training/trainer.py); these tests show why and that it
holds: on the shapes the path takes (one token row, as in generation, and a batch).
"""

from __future__ import annotations

import warnings

import pytest
import torch

bnb = pytest.importorskip("bitsandbytes")

from idefics2_ft.training.strategies import keep_cpu_4bit_layout  # noqa: E402

SHAPES = {"one token row": (1, 1, 64), "a batch": (3, 5, 64)}


class LoraOn(torch.nn.Module):
    """``base(x) + B(A(x))``, as PEFT's LoRA wraps a layer (B starts non-zero here, to see its effect)."""

    def __init__(self, base: torch.nn.Module, rank: int = 4):
        super().__init__()
        g = torch.Generator().manual_seed(1)
        self.base = base
        self.lora_A = torch.nn.Parameter(torch.randn(rank, 64, generator=g) / 8)
        self.lora_B = torch.nn.Parameter(torch.randn(32, rank, generator=g) / 8)

    def forward(self, x):
        return self.base(x) + x @ self.lora_A.T @ self.lora_B.T


def layers() -> tuple[LoraOn, LoraOn]:
    """The same LoRA layer on a 4-bit NF4 base and on that base dequantized to float32."""
    torch.manual_seed(0)
    weight = torch.randn(32, 64) / 8
    q = bnb.nn.Linear4bit(64, 32, bias=False, compute_dtype=torch.float32, quant_type="nf4")
    q.weight = bnb.nn.Params4bit(weight, requires_grad=False, quant_type="nf4")
    q = q.to("cpu")  # quantizes
    dense = torch.nn.Linear(64, 32, bias=False)
    dense.weight = torch.nn.Parameter(
        bnb.functional.dequantize_4bit(q.weight.data, q.weight.quant_state).clone(), requires_grad=False
    )
    return LoraOn(q), LoraOn(dense)


def gradients(layer: LoraOn, shape) -> tuple[dict[str, torch.Tensor], list[str]]:
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(2)).requires_grad_(True)
    layer.train()
    layer.zero_grad()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        layer(x).pow(2).sum().backward()
    grads = {"input": x.grad, "lora_A": layer.lora_A.grad.clone(), "lora_B": layer.lora_B.grad.clone()}
    return grads, [str(w.message) for w in caught]


def validate(layer: LoraOn, shape) -> None:
    """What a validation does to the layer: eval mode, no gradients."""
    layer.eval()
    with torch.no_grad():
        layer(torch.randn(*shape))


@pytest.mark.parametrize("shape", list(SHAPES.values()), ids=list(SHAPES))
def test_gradients_through_the_4bit_layer_equal_the_dequantized_layers_after_a_validation(shape):
    quantized, dense = layers()
    keep_cpu_4bit_layout(quantized)  # what the Trainer does (TrainableFourBitLayout)
    validate(quantized, shape)
    assert not getattr(quantized.base.weight.quant_state, "packing_format_for_cpu", False)
    got, caught = gradients(quantized, shape)
    want, _ = gradients(dense, shape)
    assert not [m for m in caught if "gemv_4bit" in m]
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("shape", list(SHAPES.values()), ids=list(SHAPES))
def test_without_it_a_validation_sends_training_through_gemv_4bit_which_drops_the_input_gradient(shape):
    """Why the Trainer keeps the layout: where bitsandbytes repacks (AVX512-BF16), the input's
    gradient loses the base weight's part after the first validation."""
    quantized, dense = layers()
    if not quantized.base.support_avx512bf16_for_cpu:
        pytest.skip("this CPU has no AVX512-BF16: bitsandbytes never repacks, the path is not taken here")
    validate(quantized, shape)
    assert quantized.base.weight.quant_state.packing_format_for_cpu
    got, caught = gradients(quantized, shape)
    want, _ = gradients(dense, shape)
    if torch.allclose(got["input"], want["input"], rtol=1e-4, atol=1e-6):
        pytest.skip("this bitsandbytes differentiates gemv_4bit: TrainableFourBitLayout is no longer needed")
    assert any("gemv_4bit" in m and "silently incorrect" in m for m in caught), caught
    error = float((got["input"] - want["input"]).norm() / want["input"].norm())
    assert error > 0.5, error  # not rounding: the base weight's part of the gradient is gone
