"""The preference losses of ``idefics2_ft/training/preference.py`` equal TRL 1.16's own on the same
log-probabilities (TRL is a test-only oracle, in the ``dev`` extra; the package never imports it), combine
as their weighted sum, start at ln 2 with every reward 0 when the policy is the reference, and log the
metrics TRL logs.

TRL's losses live inside its trainers' methods, so each oracle is a trainer made with
``object.__new__`` and given only the attributes its method reads: ``DPOTrainer._compute_loss`` runs on
a stand-in model that returns per-token log-probabilities (and precomputed reference log-probs), and
``CPOTrainer``/``ORPOTrainer.get_batch_loss_metrics`` run on a stand-in ``concatenated_forward`` that
returns the per-token mean log-probabilities and the chosen NLL.
"""

from __future__ import annotations

import ast
import math
from collections import defaultdict
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from idefics2_ft.training import preference
from idefics2_ft.training.preference import (
    LOSSES,
    OPTION_DEFAULTS,
    PairLogps,
    preference_loss,
    reference_problem,
    unknown_loss_problem,
)

TOLERANCE = 1e-5
SEEDS = (0, 1, 2)
DTYPES = (torch.float32, torch.float64)
PAIRS = 8
LENGTH = 12  # tokens per sequence; answers take 1..LENGTH-3 of them, after a prompt token


# ---------------------------------------------------------------- a batch, as TRL's DPOTrainer sees it
def make_batch(seed: int, dtype: torch.dtype, pairs: int = PAIRS) -> SimpleNamespace:
    """Random per-token log-probs of B chosen and B rejected answers (TRL's [chosen; rejected] layout),
    their answer masks, and reference sums; ``logps`` is the same batch as ``PairLogps``."""
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(1, LENGTH - 2, (2 * pairs,), generator=g)
    completion_mask = torch.zeros(2 * pairs, LENGTH, dtype=torch.long)
    for row, n in enumerate(tokens.tolist()):
        completion_mask[row, 1 : n + 1] = 1  # position 0 is the prompt
    shifted = completion_mask[:, 1:]
    # per-token log-probs in (-2.01, -0.01): both branches of log(1 - exp(x)) are crossed in ORPO
    per_token = (-(torch.rand(2 * pairs, LENGTH - 1, generator=g, dtype=torch.float64) * 2.0 + 0.01)).to(dtype)
    per_token = per_token * shifted.to(dtype)  # the model gives 0 where the label is -100
    sums = per_token.sum(dim=1)
    reference = (sums.double() + torch.randn(2 * pairs, generator=g, dtype=torch.float64) * 3.0).to(dtype)
    chosen, rejected = sums.chunk(2)
    ref_chosen, ref_rejected = reference.chunk(2)
    chosen_tokens, rejected_tokens = tokens.chunk(2)
    return SimpleNamespace(
        per_token=per_token,
        completion_mask=completion_mask,
        ref_chosen=ref_chosen,
        ref_rejected=ref_rejected,
        logps=PairLogps(chosen, rejected, chosen_tokens, rejected_tokens, ref_chosen, ref_rejected),
        free=PairLogps(chosen, rejected, chosen_tokens, rejected_tokens),
    )


# ---------------------------------------------------------------- the oracles (TRL's own methods)
class Accelerator:
    """What the trainers' loss methods read of accelerate's Accelerator, on one process."""

    device = torch.device("cpu")

    def gather(self, tensor):
        return tensor

    gather_for_metrics = gather


class PerTokenModel:
    """Stands in for the model inside ``DPOTrainer._compute_loss``: returns the batch's per-token
    log-probs, and zeros for what TRL only logs (entropy, mean logits, top-1)."""

    training = True

    def __init__(self, per_token):
        self.per_token = per_token

    def __call__(self, **kwargs):
        zeros = torch.zeros_like(self.per_token)
        return SimpleNamespace(
            log_probs=self.per_token, entropy=zeros, mean_logits=zeros, is_top1=zeros.bool(), aux_loss=None
        )


def trl_dpo(batch, loss_types, beta, weights=None, label_smoothing=0.0):
    """TRL's ``DPOTrainer._compute_loss`` on the batch: ``(loss, {metric: value})``."""
    pytest.importorskip("trl")
    from trl.trainer.dpo_trainer import DPOTrainer

    trainer = object.__new__(DPOTrainer)
    trainer.beta = beta
    trainer.loss_types = list(loss_types)
    trainer.loss_weights = list(weights) if weights is not None else [1.0] * len(loss_types)
    trainer.label_smoothing = label_smoothing
    trainer.f_divergence_type = "reverse_kl"
    trainer.ld_alpha = None
    trainer.precompute_ref_logps = True
    trainer.aux_loss_enabled = False
    trainer.use_weighting = False
    trainer.accelerator = Accelerator()
    trainer._metrics = {"train": defaultdict(list), "eval": defaultdict(list)}
    trainer._total_train_tokens = 0
    trainer._tp_size = 1
    trainer.model = model = PerTokenModel(batch.per_token)
    inputs = {
        "input_ids": torch.zeros_like(batch.completion_mask),
        "attention_mask": torch.ones_like(batch.completion_mask),
        "completion_mask": batch.completion_mask,
        "ref_chosen_logps": batch.ref_chosen,
        "ref_rejected_logps": batch.ref_rejected,
    }
    loss = trainer._compute_loss(model, inputs, return_outputs=False)
    return loss, {key: values[-1] for key, values in trainer._metrics["train"].items()}


def _forward_of(logps: PairLogps, nll):
    """A stand-in ``concatenated_forward`` for CPO/ORPO: per-token mean log-probs (TRL's
    ``average_log_prob=True``), dummy logits, the chosen NLL."""
    chosen, rejected = logps.mean_logps()
    logits = torch.zeros(chosen.shape[0], 1, 1, dtype=chosen.dtype)
    return lambda model, batch: (chosen, rejected, logits, logits, nll)


def trl_cpo(logps: PairLogps, loss_type, beta, label_smoothing=0.0, simpo_gamma=0.5, cpo_alpha=0.0):
    """TRL's ``CPOTrainer.get_batch_loss_metrics`` (SimPO is its ``loss_type="simpo"``, ``cpo_alpha=0``)."""
    pytest.importorskip("trl")
    from trl.experimental.cpo import CPOTrainer

    trainer = object.__new__(CPOTrainer)
    trainer.beta = beta
    trainer.label_smoothing = label_smoothing
    trainer.loss_type = loss_type
    trainer.simpo_gamma = simpo_gamma
    trainer.cpo_alpha = cpo_alpha
    trainer.alpha = 0.0  # no AlphaPO reward shaping
    trainer.aux_loss_enabled = False
    trainer.accelerator = Accelerator()
    trainer.concatenated_forward = _forward_of(logps, logps.nll())
    return trainer.get_batch_loss_metrics(None, {})


def trl_cpo_loss(chosen, rejected, beta, label_smoothing):
    """TRL's ``CPOTrainer.cpo_loss`` (sigmoid, label-smoothed) on the given per-pair scores: the mean."""
    pytest.importorskip("trl")
    from trl.experimental.cpo import CPOTrainer

    trainer = object.__new__(CPOTrainer)
    trainer.beta, trainer.label_smoothing, trainer.loss_type, trainer.alpha = beta, label_smoothing, "sigmoid", 0.0
    trainer.accelerator = Accelerator()
    losses, _, _ = trainer.cpo_loss(chosen, rejected)
    return losses.mean()


def trl_orpo(logps: PairLogps, beta):
    """TRL's ``ORPOTrainer.get_batch_loss_metrics`` (its ``beta`` is the paper's lambda)."""
    pytest.importorskip("trl")
    from trl.experimental.orpo import ORPOTrainer

    trainer = object.__new__(ORPOTrainer)
    trainer.beta = beta
    trainer.aux_loss_enabled = False
    trainer.accelerator = Accelerator()
    trainer.concatenated_forward = _forward_of(logps, logps.nll())
    return trainer.get_batch_loss_metrics(None, {})


def _close(ours, theirs) -> float:
    """|ours - theirs| (as float64), asserted within TOLERANCE."""
    diff = abs(float(ours) - float(theirs))
    assert diff <= TOLERANCE, (float(ours), float(theirs), diff)
    return diff


DPO_METRICS = (
    "rewards/chosen",
    "rewards/rejected",
    "rewards/margins",
    "rewards/accuracies",
    "logps/chosen",
    "logps/rejected",
)

# (our losses, our weights, beta, options, TRL DPOTrainer's loss_type, its loss_weights)
DPO_CASES = [
    (["sigmoid"], None, 0.1, {}, ["sigmoid"], None),
    (["sigmoid"], None, 0.5, {}, ["sigmoid"], None),
    (["ipo"], None, 0.1, {}, ["ipo"], None),
    (["ipo"], None, 0.5, {}, ["ipo"], None),
    (["hinge"], None, 0.5, {}, ["hinge"], None),
    (["hinge"], None, 0.1, {}, ["hinge"], None),
    (["robust"], None, 0.1, {"label_smoothing": 0.1}, ["robust"], None),
    (["robust"], None, 0.5, {"label_smoothing": 0.3}, ["robust"], None),
    (["bco_pair"], None, 0.1, {}, ["bco_pair"], None),
    (["bco_pair"], None, 0.5, {}, ["bco_pair"], None),
    (["sft"], None, 0.1, {}, ["sft"], None),
    (["sigmoid", "sft"], None, 0.1, {}, ["sigmoid", "sft"], None),  # RPO
    (["sigmoid", "bco_pair", "sft"], [0.8, 0.2, 1.0], 0.1, {}, ["sigmoid", "bco_pair", "sft"], [0.8, 0.2, 1.0]),  # MPO
]


def _id(case) -> str:
    losses, weights, beta, options = case[:4]
    extra = "".join(f",{k}={v}" for k, v in options.items())
    return "+".join(losses) + (f"@{weights}" if weights else "") + f",beta={beta}{extra}"


# ---------------------------------------------------------------- against TRL
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("case", DPO_CASES, ids=_id)
def test_reference_losses_and_metrics_equal_trls_dpo_trainer(case, seed, dtype):
    losses, weights, beta, options, trl_types, trl_weights = case
    batch = make_batch(seed, dtype)
    ours, metrics = preference_loss(batch.logps, losses, weights, beta, **options)
    theirs, their_metrics = trl_dpo(batch, trl_types, beta, trl_weights, options.get("label_smoothing", 0.0))
    assert ours.dtype == dtype
    _close(ours, theirs)
    for key in DPO_METRICS:
        _close(metrics[key], their_metrics[key])


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("label_smoothing", [0.1, 0.25])
def test_cdpo_is_the_label_smoothed_logistic_loss_on_the_log_ratios(label_smoothing, seed, dtype):
    # TRL 1.16's DPOTrainer reads label_smoothing only for robust (and exo_pair); its CPOTrainer's sigmoid
    # is the cDPO form, so CPO's loss on the log-ratios is cDPO (and DPO's at eps = 0)
    batch = make_batch(seed, dtype)
    ours, _ = preference_loss(batch.logps, ["sigmoid"], beta=0.1, label_smoothing=label_smoothing)
    chosen, rejected = batch.logps.logratios()
    _close(ours, trl_cpo_loss(chosen, rejected, 0.1, label_smoothing))
    plain, _ = preference_loss(batch.logps, ["sigmoid"], beta=0.1)
    _close(plain, trl_cpo_loss(chosen, rejected, 0.1, 0.0))


SIMPO_CASES = [(2.0, 0.5, 0.0), (2.5, 1.0, 0.0), (2.0, 0.5, 0.1)]  # beta, gamma, label_smoothing


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("beta,gamma,eps", SIMPO_CASES)
def test_simpo_equals_trls_cpo_trainer(beta, gamma, eps, seed, dtype):
    logps = make_batch(seed, dtype).free
    ours, metrics = preference_loss(logps, ["simpo"], beta=beta, simpo_gamma=gamma, label_smoothing=eps)
    theirs, their_metrics = trl_cpo(logps, "simpo", beta, eps, gamma)
    _close(ours, theirs)
    for key in DPO_METRICS:
        _close(metrics[key], their_metrics[key])


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("seed", SEEDS)
def test_simpo_with_sft_is_cpo_simpo(seed, dtype):
    # CPOTrainer's BC term is the chosen answer tokens' mean NLL, weighted by cpo_alpha: simpo + alpha * sft
    logps = make_batch(seed, dtype).free
    ours, _ = preference_loss(logps, ["simpo", "sft"], [1.0, 0.7], beta=2.0)
    theirs, _ = trl_cpo(logps, "simpo", 2.0, cpo_alpha=0.7)
    _close(ours, theirs)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("beta", [0.1, 0.5])
def test_orpo_equals_trls_orpo_trainer(beta, seed, dtype):
    logps = make_batch(seed, dtype).free
    ours, metrics = preference_loss(logps, ["orpo"], beta=beta)
    theirs, their_metrics = trl_orpo(logps, beta)
    _close(ours, theirs)
    for key in DPO_METRICS:
        _close(metrics[key], their_metrics[key])
    _close(metrics["orpo/log_odds_ratio"], their_metrics["log_odds_ratio"])
    _close(metrics["orpo/log_odds_chosen"], their_metrics["log_odds_chosen"])
    _close(metrics["orpo/nll"], their_metrics["nll_loss"])
    # orpo_lambda weighs the odds-ratio term apart from beta: TRL with beta = lambda gives the loss
    lam, _ = preference_loss(logps, ["orpo"], beta=1.0, orpo_lambda=beta)
    _close(lam, theirs)


def test_every_loss_is_checked_against_trl():
    covered = {name for case in DPO_CASES for name in case[0]} | {"simpo", "orpo"}
    assert covered == set(LOSSES)


# ---------------------------------------------------------------- the combination and its metrics
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("seed", SEEDS)
def test_mpo_is_the_weighted_sum_of_its_losses(seed, dtype):
    logps = make_batch(seed, dtype).logps
    names, weights = ["sigmoid", "bco_pair", "sft"], [0.8, 0.2, 1.0]
    combined, metrics = preference_loss(logps, names, weights, beta=0.1)
    alone = [preference_loss(logps, [name], beta=0.1)[0] for name in names]
    expected = sum(w * value for w, value in zip(weights, alone, strict=True))
    torch.testing.assert_close(combined, expected)
    for name, value in zip(names, alone, strict=True):
        torch.testing.assert_close(metrics[f"loss/{name}"], value)  # each component before its weight
    assert preference_loss(logps, names, None, beta=0.1)[0] == pytest.approx(float(sum(alone)), abs=1e-6)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_the_policy_equal_to_the_reference_gives_ln2_and_zero_rewards(dtype):
    policy = -torch.rand(PAIRS, dtype=dtype) * 20
    rejected = -torch.rand(PAIRS, dtype=dtype) * 20
    tokens = torch.randint(1, 30, (PAIRS,))
    logps = PairLogps(policy, rejected, tokens, tokens, policy.clone(), rejected.clone())
    loss, metrics = preference_loss(logps, ["sigmoid"], beta=0.1)
    assert loss.item() == torch.tensor(math.log(2), dtype=dtype).item()  # exactly, in either precision
    for key in ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies"):
        assert metrics[key].item() == 0.0, key
    # the other reference losses start where their formulas put them
    assert preference_loss(logps, ["hinge"], beta=0.1)[0].item() == 1.0
    assert preference_loss(logps, ["bco_pair"], beta=0.1)[0].item() == pytest.approx(2 * math.log(2))
    assert preference_loss(logps, ["ipo"], beta=0.1)[0].item() == pytest.approx(25.0)  # (1 / (2 beta))**2


def test_the_metrics_of_two_pairs_by_hand():
    beta = 0.5
    logps = PairLogps(
        policy_chosen=torch.tensor([-1.0, -3.0], dtype=torch.float64),
        policy_rejected=torch.tensor([-2.0, -1.0], dtype=torch.float64),
        chosen_tokens=torch.tensor([2, 4]),
        rejected_tokens=torch.tensor([1, 2]),
        reference_chosen=torch.tensor([-2.0, -2.0], dtype=torch.float64),
        reference_rejected=torch.tensor([-2.0, -2.0], dtype=torch.float64),
    )
    # log-ratios: chosen [1, -1], rejected [0, 1]; rewards chosen [0.5, -0.5], rejected [0, 0.5]
    loss, m = preference_loss(logps, ["sigmoid", "sft"], [1.0, 0.5], beta=beta)
    dpo = (math.log1p(math.exp(-0.5)) + math.log1p(math.exp(1.0))) / 2  # -log s(0.5 * 1), -log s(0.5 * -2)
    nll = 4.0 / 6.0  # -(-1 - 3) over 2 + 4 chosen tokens
    assert m["loss/sigmoid"].item() == pytest.approx(dpo, abs=1e-12)
    assert m["loss/sft"].item() == pytest.approx(nll, abs=1e-12)
    assert loss.item() == pytest.approx(dpo + 0.5 * nll, abs=1e-12)
    assert m["rewards/chosen"].item() == pytest.approx(0.0, abs=1e-12)
    assert m["rewards/rejected"].item() == pytest.approx(0.25, abs=1e-12)
    assert m["rewards/margins"].item() == pytest.approx(-0.25, abs=1e-12)  # [0.5, -1]
    assert m["rewards/accuracies"].item() == 0.5  # the first pair only
    assert m["logps/chosen"].item() == pytest.approx(-2.0, abs=1e-12)
    assert m["logps/rejected"].item() == pytest.approx(-1.5, abs=1e-12)
    assert all(not value.requires_grad for value in m.values())

    # reference-free: rewards and logps per token, as TRL logs SimPO's and ORPO's
    free = PairLogps(logps.policy_chosen, logps.policy_rejected, logps.chosen_tokens, logps.rejected_tokens)
    loss, m = preference_loss(free, ["simpo"], beta=2.0, simpo_gamma=0.5)
    # per-token means: chosen [-0.5, -0.75], rejected [-2, -0.5]; beta * margin - gamma = [2.5, -1]
    assert loss.item() == pytest.approx((math.log1p(math.exp(-2.5)) + math.log1p(math.exp(1.0))) / 2, abs=1e-12)
    assert m["logps/chosen"].item() == pytest.approx(-0.625, abs=1e-12)
    assert m["logps/rejected"].item() == pytest.approx(-1.25, abs=1e-12)
    assert m["rewards/chosen"].item() == pytest.approx(-1.25, abs=1e-12)
    assert m["rewards/rejected"].item() == pytest.approx(-2.5, abs=1e-12)
    assert m["rewards/margins"].item() == pytest.approx(1.25, abs=1e-12)
    assert m["rewards/accuracies"].item() == 0.5


def test_gradients_reach_the_policy_and_never_the_reference():
    batch = make_batch(0, torch.float64)
    policy_c = batch.logps.policy_chosen.clone().requires_grad_()
    policy_r = batch.logps.policy_rejected.clone().requires_grad_()
    ref_c = batch.ref_chosen.clone().requires_grad_()
    ref_r = batch.ref_rejected.clone().requires_grad_()
    logps = PairLogps(policy_c, policy_r, batch.logps.chosen_tokens, batch.logps.rejected_tokens, ref_c, ref_r)
    loss, _ = preference_loss(logps, ["sigmoid", "ipo", "hinge", "robust", "bco_pair", "sft"], beta=0.1)
    loss.backward()
    assert policy_c.grad is not None and policy_c.grad.abs().sum() > 0
    assert policy_r.grad is not None and policy_r.grad.abs().sum() > 0
    assert ref_c.grad is None and ref_r.grad is None


def test_chosen_nll_given_as_a_scalar_or_per_pair():
    base = make_batch(1, torch.float64).free
    scalar = replace(base, chosen_nll=torch.tensor(1.25, dtype=torch.float64))
    per_pair = replace(base, chosen_nll=torch.tensor([1.0, 1.5], dtype=torch.float64).repeat(PAIRS // 2))
    assert preference_loss(scalar, ["sft"])[0].item() == 1.25
    assert preference_loss(per_pair, ["sft"])[0].item() == 1.25  # their mean
    # by default: every chosen answer token of the batch, each counted once
    expected = -base.policy_chosen.sum() / base.chosen_tokens.sum()
    torch.testing.assert_close(preference_loss(base, ["sft"])[0], expected)


# ---------------------------------------------------------------- the table and its checks
def test_the_table_says_which_losses_need_a_reference():
    assert {n for n, e in LOSSES.items() if e.needs_reference} == {"sigmoid", "ipo", "hinge", "robust", "bco_pair"}
    assert {n for n, e in LOSSES.items() if e.reference_free} == {"simpo", "orpo"}
    assert LOSSES["sft"].reference == "either"
    for name, entry in LOSSES.items():
        assert entry.name == name and entry.about
        assert set(entry.options) <= set(OPTION_DEFAULTS)


def test_reference_problems_name_the_key_and_the_fix():
    assert reference_problem(["sigmoid", "sft"], has_reference=True) is None
    assert reference_problem(["simpo", "sft"], has_reference=False) is None
    assert reference_problem(["sft"], has_reference=False) is None and reference_problem(["sft"], True) is None
    missing = reference_problem(["sigmoid"], has_reference=False)
    assert "objective.loss" in missing and "objective.reference" in missing and "simpo" in missing
    extra = reference_problem(["orpo"], has_reference=True, reference_key="objective.ref")
    assert "reference-free" in extra and "objective.ref to none" in extra
    assert "combine losses of one kind" in reference_problem(["sigmoid", "simpo"], has_reference=True)
    batch = make_batch(0, torch.float64)
    with pytest.raises(ValueError, match="none is set"):
        preference_loss(batch.free, ["sigmoid"])
    with pytest.raises(ValueError, match="reference-free"):
        preference_loss(batch.logps, ["simpo"])


def test_unknown_loss_names_the_nearest():
    message = unknown_loss_problem("sigmod")
    assert "objective.loss" in message and "'sigmod'" in message and "Did you mean 'sigmoid'?" in message
    assert "Did you mean 'bco_pair'?" in unknown_loss_problem("bco")
    assert "Did you mean 'simpo'?" in unknown_loss_problem("simpo_loss")
    assert "Did you mean" not in unknown_loss_problem("kto")
    batch = make_batch(0, torch.float64)
    with pytest.raises(ValueError, match="Did you mean 'hinge'"):
        preference_loss(batch.logps, ["hing"])


@pytest.mark.parametrize(
    "call,match",
    [
        (dict(losses=[]), "objective.loss is empty"),
        (dict(losses=["sigmoid", "sigmoid"]), "names a loss twice"),
        (dict(losses=["sigmoid", "sft"], weights=[1.0]), "objective.loss_weights"),
        (dict(losses=["sigmoid"], beta=0.0), "objective.beta=0.0"),
        (dict(losses=["robust"], label_smoothing=0.5), r"objective.label_smoothing=0.5.*\[0, 0.5\)"),
    ],
)
def test_bad_arguments_name_the_key(call, match):
    batch = make_batch(0, torch.float64)
    with pytest.raises(ValueError, match=match):
        preference_loss(batch.logps, **call)


def test_an_unknown_option_is_refused_with_the_nearest():
    with pytest.raises(TypeError, match="Did you mean 'label_smoothing'"):
        preference_loss(make_batch(0, torch.float64).logps, ["sigmoid"], label_smothing=0.1)


def test_bad_shapes_are_refused():
    v = torch.zeros(3)
    with pytest.raises(ValueError, match="both reference_chosen and reference_rejected"):
        PairLogps(v, v, v, v, reference_chosen=v)
    with pytest.raises(ValueError, match=r"PairLogps.rejected_tokens has shape \(4,\)"):
        PairLogps(v, v, v, torch.zeros(4))


def test_the_package_never_imports_trl():
    source = Path(preference.__file__).read_text()
    imported = {
        alias.name.split(".")[0]
        for node in ast.walk(ast.parse(source))
        if isinstance(node, ast.Import | ast.ImportFrom)
        for alias in (node.names if isinstance(node, ast.Import) else [SimpleNamespace(name=node.module or "")])
    }
    assert "trl" not in imported
    root = Path(preference.__file__).parents[1]
    offenders = [str(p) for p in root.rglob("*.py") if "import trl" in p.read_text() or "from trl" in p.read_text()]
    assert offenders == []


def log_sigmoid(x: float) -> float:
    return -math.log1p(math.exp(-x))


def test_losses_match_the_formulas_of_the_docstrings_at_one_point():
    # one pair by hand, each loss by its docstring's formula (guards the docstrings against the code)
    with_reference = PairLogps(
        policy_chosen=torch.tensor([-2.0], dtype=torch.float64),
        policy_rejected=torch.tensor([-6.0], dtype=torch.float64),
        chosen_tokens=torch.tensor([2]),
        rejected_tokens=torch.tensor([3]),
        reference_chosen=torch.tensor([-3.0], dtype=torch.float64),
        reference_rejected=torch.tensor([-4.0], dtype=torch.float64),
    )
    free = replace(with_reference, reference_chosen=None, reference_rejected=None)
    beta, lr_c, lr_r = 0.5, 1.0, -2.0  # log-ratios; delta = 3
    mean_c, mean_r = -1.0, -2.0  # per-token log-probs: -2 / 2, -6 / 3
    value = {
        name: preference_loss(free if entry.reference_free else with_reference, [name], beta=beta)[0].item()
        for name, entry in LOSSES.items()
    }
    assert value["sigmoid"] == pytest.approx(-log_sigmoid(beta * (lr_c - lr_r)))
    assert value["robust"] == pytest.approx(value["sigmoid"])  # at label_smoothing 0
    assert value["hinge"] == pytest.approx(0.0)  # 1 - 1.5 < 0
    assert value["ipo"] == pytest.approx((lr_c / 2 - lr_r / 3 - 1 / (2 * beta)) ** 2)
    assert value["bco_pair"] == pytest.approx(-log_sigmoid(beta * lr_c) - log_sigmoid(-beta * lr_r))
    assert value["sft"] == pytest.approx(1.0)  # 2 nats over 2 chosen tokens
    assert value["simpo"] == pytest.approx(-log_sigmoid(beta * (mean_c - mean_r) - 0.5))

    def log_odds(m):
        return m - math.log(1 - math.exp(m))

    assert value["orpo"] == pytest.approx(1.0 - beta * log_sigmoid(log_odds(mean_c) - log_odds(mean_r)))
