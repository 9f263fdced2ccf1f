"""The tolerance of cross-process and cross-run comparisons (tests/helpers.py, training_tolerance):
float32 summation order passes it, the bugs it is there for do not.

A LoRA-shaped layer trained with torch's AdamW for 4 steps on a global batch of 4, as one process
and as 2 ranks would (two half-batch means, then their mean), then with each bug."""

from __future__ import annotations

import pytest
import torch

from tests.helpers import assert_same_training, training_tolerance

LR, STEPS = 1e-3, 4


def train(gradient, steps: int = STEPS, lr_at=lambda step: LR, reset_optimizer_at: int | None = None) -> dict:
    """``steps`` AdamW steps of B (zero at first, as LoRA's) in ``y = B A x``; ``gradient(step, B)``
    gives B's gradient for the step."""
    b = torch.zeros(16, 4, requires_grad=True)
    optimizer = torch.optim.AdamW([b], lr=LR, weight_decay=0.0)
    for step in range(steps):
        if step == reset_optimizer_at:
            optimizer = torch.optim.AdamW([b], lr=LR, weight_decay=0.0)  # a resume that lost Adam's moments
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step)
        b.grad = gradient(step, b.detach())
        optimizer.step()
    return {"lora_B.weight": b.detach().clone()}


generator = torch.Generator().manual_seed(0)
A = torch.randn(4, 32, generator=generator) / 32**0.5
X = [torch.randn(4, 32, generator=generator) for _ in range(STEPS)]  # each step's global batch of 4
T = [torch.randn(4, 16, generator=generator) for _ in range(STEPS)]


def batch_gradient(b: torch.Tensor, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """d/dB of the mean over the batch of ||B A x - t||^2."""
    h = x @ A.to(x.dtype).T  # (n, 4)
    return 2 * (h @ b.T - t).T @ h / len(x)


def one_process(step, b):
    return batch_gradient(b, X[step], T[step])


def two_ranks(step, b):  # each rank's mean over its half, then the all-reduce's mean: another summation order
    halves = [batch_gradient(b, X[step][i : i + 2], T[step][i : i + 2]) for i in (0, 2)]
    return (halves[0] + halves[1]) / 2


def test_the_tolerance_is_a_fraction_of_how_far_the_training_moves():
    assert training_tolerance(LR, STEPS) == pytest.approx(4e-5)
    reference = train(one_process)["lora_B.weight"]
    assert 0.3 * LR * STEPS < float(reference.abs().max()) <= LR * STEPS  # Adam: at most ~lr per step


@pytest.mark.parametrize(
    "case",
    ["two ranks (another summation order)", "relative noise of 1e-6 on every gradient", "float64 sums"],
)
def test_float_summation_order_passes(case):
    noise = torch.Generator().manual_seed(1)
    gradient = {
        "two ranks (another summation order)": two_ranks,
        "relative noise of 1e-6 on every gradient": lambda s, b: (
            one_process(s, b) * (1 + 1e-6 * torch.randn(16, 4, generator=noise))
        ),
        "float64 sums": lambda s, b: batch_gradient(b.double(), X[s].double(), T[s].double()).float(),
    }[case]
    assert_same_training(train(one_process), train(gradient), lr=LR, steps=STEPS)


BUGS = {
    "both ranks train on the same half": lambda s, b: batch_gradient(b, X[s][:2], T[s][:2]),
    "a rank's gradient not averaged with the other's": lambda s, b: batch_gradient(b, X[s][2:], T[s][2:]),
    "one sample of each batch dropped": lambda s, b: batch_gradient(b, X[s][:3], T[s][:3]),
    "the batches in another order (a resume that restarts the sampler)": lambda s, b: one_process(STEPS - 1 - s, b),
}


@pytest.mark.parametrize("case", list(BUGS))
def test_a_sharding_or_averaging_bug_fails(case):
    with pytest.raises(AssertionError, match="more than float summation order explains"):
        assert_same_training(train(one_process), train(BUGS[case]), lr=LR, steps=STEPS)


@pytest.mark.parametrize("factor", [0.5, 2.0])
def test_one_update_halved_or_doubled_fails(factor):
    changed = train(one_process, lr_at=lambda step: LR * factor if step == STEPS - 1 else LR)
    with pytest.raises(AssertionError, match="more than float summation order explains"):
        assert_same_training(train(one_process), changed, lr=LR, steps=STEPS)


def test_a_resume_that_loses_the_optimizer_state_fails():
    with pytest.raises(AssertionError, match="more than float summation order explains"):
        assert_same_training(train(one_process), train(one_process, reset_optimizer_at=2), lr=LR, steps=STEPS)


def test_a_gradient_scaled_by_a_constant_changes_nothing_under_adam():
    """A sum instead of a mean doubles every gradient: Adam divides by their RMS, so the training
    is the same (this is why the bugs above are about direction, not scale)."""
    assert_same_training(train(one_process), train(lambda s, b: 2 * one_process(s, b)), lr=LR, steps=STEPS)


def test_runs_that_did_not_move_cannot_show_a_bug():
    untrained = {"lora_B.weight": torch.zeros(16, 4)}
    with pytest.raises(AssertionError, match="too little for this check"):
        assert_same_training(untrained, untrained, lr=LR, steps=STEPS)
