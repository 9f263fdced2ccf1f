"""Preference-tuning losses on per-sequence log-probabilities, and ``LOSSES``, the one table of them.

Everything here is a pure torch function of a batch of B pairs (a prompt with a chosen and a rejected
answer): no model code. The caller runs the model and hands over, per pair, the summed log-probability
of each answer's tokens under the policy (and under the reference, for the losses that need one), the
number of answer tokens on each side, and optionally the chosen side's NLL (``PairLogps``).
``preference_loss`` combines any of the table's losses with weights (``objective.loss`` and
``objective.loss_weights``)::

    loss = sum_i weight_i * loss_i        # each loss_i a mean over the batch's pairs

and returns the metrics TRL logs for the same objective (``rewards/*``, ``logps/*``) beside each
component (``loss/<name>``).

Notation: ``beta`` is the temperature; per pair, ``logratio_chosen = policy_chosen - reference_chosen``
(summed over the chosen answer's tokens), the same for the rejected side, and
``delta = logratio_chosen - logratio_rejected``. The losses:

========== ========= ============================================================================
name       reference what it optimises
========== ========= ============================================================================
sigmoid    needed    DPO: ``-log sigmoid(beta * delta)``; with ``label_smoothing`` eps, cDPO (conservative DPO)
ipo        needed    IPO: ``(delta_per_token - 1 / (2 beta))**2``, log-ratios divided by each side's token count
hinge      needed    SLiC's hinge (as in DPO's paper): ``max(0, 1 - beta * delta)``
robust     needed    robust DPO: the sigmoid loss unbiased for labels flipped with probability eps
bco_pair   needed    BCO on pairs: each side's reward classified apart, ``-log s(beta lr_c) - log s(-beta lr_r)``
sft        either    the chosen answer's NLL (mean over its tokens); + sigmoid is RPO, + sigmoid + bco_pair is MPO
simpo      free      SimPO: ``-log sigmoid(beta * (mean_c - mean_r) - gamma)``, per-token mean log-probs
orpo       free      ORPO: chosen NLL ``- lambda * log sigmoid(log odds(chosen) - log odds(rejected))``
========== ========= ============================================================================

Every loss was checked against TRL 1.16's own code on the same log-probabilities
(``tests/unit/test_preference_losses.py``): the reference losses and ``sft`` against ``DPOTrainer``
(its ``loss_type``), ``simpo`` against ``CPOTrainer`` (``loss_type="simpo"``), ``orpo`` against
``ORPOTrainer``. TRL is a test-only oracle: this package never imports it.

Two differences from TRL, both on purpose:

- ``sigmoid`` honours ``label_smoothing`` (cDPO), as earlier releases of TRL's ``DPOTrainer`` did and its
  ``CPOTrainer`` still does; TRL 1.16's ``DPOTrainer`` reads ``label_smoothing`` only for
  ``robust`` and ``exo_pair``. At eps = 0 the two agree.
- ``orpo``'s NLL is the one ``PairLogps`` carries: by default the mean NLL over the chosen answer's
  tokens (the prompt is masked, as in SFT). TRL's ``ORPOTrainer`` averages its NLL over the prompt's
  tokens too; the odds-ratio term and its weight lambda (TRL's ``beta``) are the same.
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

Reference = Literal["needed", "free", "either"]

#: The options ``preference_loss`` accepts (``objective.<option>``), with their defaults.
OPTION_DEFAULTS: dict[str, float | None] = {
    "label_smoothing": 0.0,  # eps of cDPO, robust DPO and SimPO: the probability a pair's label is flipped
    "simpo_gamma": 0.5,  # SimPO's target margin gamma (TRL's CPOConfig.simpo_gamma default)
    "orpo_lambda": None,  # ORPO's lambda, the odds-ratio term's weight; None: beta (as TRL's ORPOConfig)
}


# ---------------------------------------------------------------- inputs
@dataclass(frozen=True)
class PairLogps:
    """The log-probabilities of a batch of B preference pairs, the inputs of every loss.

    Attributes:
        policy_chosen: [B] the policy's log-probability of each chosen answer, summed over its tokens.
        policy_rejected: [B] the same for each rejected answer.
        chosen_tokens: [B] the number of tokens each chosen answer has (the positions summed above);
            the length-normalised losses (ipo, simpo, orpo) divide by it (at least 1).
        rejected_tokens: [B] the same for the rejected answers.
        reference_chosen: [B] the reference model's summed log-probability of each chosen answer, or
            None (reference-free); it carries no gradient (it is detached here).
        reference_rejected: [B] the same for the rejected answers; given together with
            ``reference_chosen`` or not at all.
        chosen_nll: the chosen side's NLL that ``sft`` and ``orpo`` read: a scalar (used as it is), or
            [B] per-pair NLLs (their mean is used). None: ``-sum(policy_chosen) / sum(chosen_tokens)``,
            the mean NLL over every chosen answer token of the batch (what TRL's ``sft`` loss computes).
    """

    policy_chosen: Tensor
    policy_rejected: Tensor
    chosen_tokens: Tensor
    rejected_tokens: Tensor
    reference_chosen: Tensor | None = None
    reference_rejected: Tensor | None = None
    chosen_nll: Tensor | None = None

    def __post_init__(self) -> None:
        if (self.reference_chosen is None) != (self.reference_rejected is None):
            raise ValueError(
                "PairLogps: give both reference_chosen and reference_rejected (a reference loss) or neither "
                "(a reference-free loss)."
            )
        named = {
            "policy_chosen": self.policy_chosen,
            "policy_rejected": self.policy_rejected,
            "chosen_tokens": self.chosen_tokens,
            "rejected_tokens": self.rejected_tokens,
            "reference_chosen": self.reference_chosen,
            "reference_rejected": self.reference_rejected,
        }
        for key, value in named.items():
            if value is not None and (value.dim() != 1 or value.shape != self.policy_chosen.shape):
                raise ValueError(
                    f"PairLogps.{key} has shape {tuple(value.shape)}; every per-pair tensor is [B] with "
                    f"B = {self.policy_chosen.shape[0] if self.policy_chosen.dim() == 1 else '?'} (policy_chosen's), "
                    "one value per pair."
                )
        if self.chosen_nll is not None and self.chosen_nll.dim() > 1:
            raise ValueError(
                f"PairLogps.chosen_nll has shape {tuple(self.chosen_nll.shape)}; give a scalar or one NLL per pair [B]."
            )

    @property
    def has_reference(self) -> bool:
        """Whether the reference's log-probabilities are given."""
        return self.reference_chosen is not None

    def logratios(self) -> tuple[Tensor, Tensor]:
        """``(policy - reference)`` per pair for the chosen and the rejected side, the reference detached."""
        if self.reference_chosen is None or self.reference_rejected is None:
            raise ValueError("This loss needs the reference's log-probabilities; PairLogps has none.")
        return (
            self.policy_chosen - self.reference_chosen.detach(),
            self.policy_rejected - self.reference_rejected.detach(),
        )

    def mean_logps(self) -> tuple[Tensor, Tensor]:
        """The policy's log-probabilities per answer token (each sum over its token count, at least 1)."""
        return (
            self.policy_chosen / self.chosen_tokens.clamp(min=1).to(self.policy_chosen.dtype),
            self.policy_rejected / self.rejected_tokens.clamp(min=1).to(self.policy_rejected.dtype),
        )

    def nll(self) -> Tensor:
        """The chosen side's NLL as a scalar (see ``chosen_nll``)."""
        if self.chosen_nll is not None:
            return self.chosen_nll.mean() if self.chosen_nll.dim() == 1 else self.chosen_nll
        tokens = self.chosen_tokens.sum().clamp(min=1).to(self.policy_chosen.dtype)
        return -self.policy_chosen.sum() / tokens


# ---------------------------------------------------------------- the losses
def _smoothed_logistic(z: Tensor, eps: float) -> Tensor:
    """``-(1 - eps) log sigmoid(z) - eps log sigmoid(-z)``: a logistic loss whose label is wrong with
    probability ``eps`` (the conservative form of DPO and SimPO)."""
    if eps == 0.0:
        return -F.logsigmoid(z)
    return -(1.0 - eps) * F.logsigmoid(z) - eps * F.logsigmoid(-z)


def sigmoid_loss(logps: PairLogps, beta: float, label_smoothing: float = 0.0) -> Tensor:
    """DPO (Direct Preference Optimization): maximise the likelihood of the preferences under a
    Bradley-Terry model whose implicit reward is ``beta * log(policy / reference)``; the loss is
    ``-log sigmoid(beta * delta)``. With ``label_smoothing`` eps > 0 it is conservative DPO (cDPO),
    which trusts each label with probability 1 - eps: ``-(1-eps) log s(beta delta) - eps log s(-beta delta)``.

    Returns:
        The mean over the batch's pairs.
    """
    chosen, rejected = logps.logratios()
    return _smoothed_logistic(beta * (chosen - rejected), label_smoothing).mean()


def ipo_loss(logps: PairLogps, beta: float) -> Tensor:
    """IPO (Identity Preference Optimisation, "A General Theoretical Paradigm to Understand Learning
    from Human Preferences"): regress the log-ratio margin onto ``1 / (2 beta)`` (beta is the paper's
    tau) instead of pushing it without bound, so a deterministic preference cannot drive the policy
    away from the reference. As in TRL (confirmed there with the IPO authors), each side's log-ratio is
    divided by its answer's token count: ``((lr_c / n_c - lr_r / n_r) - 1 / (2 beta))**2``.

    Returns:
        The mean over the batch's pairs.
    """
    chosen, rejected = logps.logratios()
    chosen = chosen / logps.chosen_tokens.clamp(min=1).to(chosen.dtype)
    rejected = rejected / logps.rejected_tokens.clamp(min=1).to(rejected.dtype)
    return ((chosen - rejected - 1.0 / (2.0 * beta)) ** 2).mean()


def hinge_loss(logps: PairLogps, beta: float) -> Tensor:
    """The hinge loss of SLiC (Sequence Likelihood Calibration), in DPO's log-ratio form: a margin
    loss ``max(0, 1 - beta * delta)`` that stops pushing a pair once its reward margin passes ``1 / beta``.

    Returns:
        The mean over the batch's pairs.
    """
    chosen, rejected = logps.logratios()
    return torch.relu(1.0 - beta * (chosen - rejected)).mean()


def robust_loss(logps: PairLogps, beta: float, label_smoothing: float = 0.0) -> Tensor:
    """Robust DPO ("Provably Robust DPO: Aligning Language Models with Noisy Feedback"): an unbiased
    estimate of the DPO loss when each label is flipped with probability eps (``label_smoothing``, in
    [0, 0.5)): ``((1-eps) l(delta) - eps l(-delta)) / (1 - 2 eps)`` with ``l(x) = -log sigmoid(beta x)``.
    At eps = 0 it is DPO.

    Returns:
        The mean over the batch's pairs.
    """
    chosen, rejected = logps.logratios()
    z = beta * (chosen - rejected)
    eps = label_smoothing
    return ((-(1.0 - eps) * F.logsigmoid(z) + eps * F.logsigmoid(-z)) / (1.0 - 2.0 * eps)).mean()


def bco_pair_loss(logps: PairLogps, beta: float) -> Tensor:
    """BCO (Binary Classifier Optimization) on pairs: a binary classifier whose logit is the implicit
    reward ``beta * log(policy / reference)`` is trained to call the chosen answer good and the rejected
    one bad, each side on its own: ``-log sigmoid(beta lr_c) - log sigmoid(-beta lr_r)``. TRL 1.16
    uses no running reward shift here, and neither does this. MPO (Mixed Preference Optimization, of
    InternVL) is sigmoid + bco_pair + sft.

    Returns:
        The mean over the batch's pairs.
    """
    chosen, rejected = logps.logratios()
    return (-F.logsigmoid(beta * chosen) - F.logsigmoid(-beta * rejected)).mean()


def sft_loss(logps: PairLogps, beta: float) -> Tensor:
    """The chosen answer's negative log-likelihood (``PairLogps.nll``: by default the mean over the
    batch's chosen answer tokens), which keeps the chosen answers likely while the preference terms
    move the margin. With ``sigmoid`` it is RPO (Iterative Reasoning Preference Optimization's DPO +
    NLL); with ``sigmoid`` and ``bco_pair`` it is MPO. ``beta`` is not read.

    Returns:
        A scalar.
    """
    return logps.nll()


def simpo_loss(logps: PairLogps, beta: float, label_smoothing: float = 0.0, simpo_gamma: float = 0.5) -> Tensor:
    """SimPO (Simple Preference Optimization with a Reference-Free Reward): the reward is the policy's
    mean log-probability per answer token times beta, and the chosen reward must beat the rejected one
    by a target margin gamma: ``-log sigmoid(beta * (mean_c - mean_r) - gamma)``. No reference model.
    ``label_smoothing`` eps smooths it as in cDPO (as TRL's CPOTrainer does).

    Returns:
        The mean over the batch's pairs.
    """
    chosen, rejected = logps.mean_logps()
    return _smoothed_logistic(beta * (chosen - rejected) - simpo_gamma, label_smoothing).mean()


def _log1mexp(x: Tensor) -> Tensor:
    """``log(1 - exp(x))`` for x < 0, accurate at both ends (log1p near -inf, expm1 near 0)."""
    return torch.where(x < -math.log(2.0), torch.log1p(-torch.exp(x)), torch.log(-torch.expm1(x)))


def orpo_log_odds(logps: PairLogps) -> Tensor:
    """[B] ``log odds(chosen) - log odds(rejected)`` with ``odds(y) = P(y) / (1 - P(y))`` and ``P(y)``
    the policy's mean per-token probability of the answer (``exp`` of its mean log-probability)."""
    chosen, rejected = logps.mean_logps()
    return (chosen - rejected) - (_log1mexp(chosen) - _log1mexp(rejected))


def orpo_loss(logps: PairLogps, beta: float, orpo_lambda: float | None = None) -> Tensor:
    """ORPO (Monolithic Preference Optimization without Reference Model): supervised fine-tuning on the
    chosen answer plus an odds-ratio term that makes the chosen answer's odds beat the rejected one's,
    ``nll - lambda * mean(log sigmoid(log odds ratio))``, where the odds use each answer's mean
    per-token probability (``orpo_log_odds``). lambda is ``orpo_lambda``, by default ``beta``: TRL's
    ORPOConfig calls the paper's lambda ``beta`` (0.1 by default). No reference model. The NLL is
    ``PairLogps.nll`` (the chosen answer's tokens; TRL's ORPOTrainer also counts the prompt's).

    Returns:
        A scalar.
    """
    weight = beta if orpo_lambda is None else orpo_lambda
    return logps.nll() - weight * F.logsigmoid(orpo_log_odds(logps)).mean()


# ---------------------------------------------------------------- the table
@dataclass(frozen=True)
class PreferenceLoss:
    """One loss as ``objective.loss`` names it.

    Attributes:
        name: the value ``objective.loss`` gives, and the metric ``loss/<name>``.
        fn: ``fn(logps: PairLogps, beta, **options) -> Tensor``, a scalar (the mean over the pairs).
        reference: "needed" (refused without a reference), "free" (reference-free: refused with a
            reference set) or "either" (``sft``: reads no reference).
        about: one line on what it optimises, with its paper's name.
        options: the options of ``OPTION_DEFAULTS`` that ``fn`` reads.
    """

    name: str
    fn: Callable[..., Tensor]
    reference: Reference
    about: str
    options: tuple[str, ...] = field(default=())

    def __post_init__(self) -> None:
        unknown = set(self.options) - set(OPTION_DEFAULTS)
        if unknown:
            raise ValueError(f"PreferenceLoss {self.name!r}: options {sorted(unknown)} are not in OPTION_DEFAULTS.")

    @property
    def needs_reference(self) -> bool:
        """The loss reads the reference's log-probabilities (a run without a reference is refused)."""
        return self.reference == "needed"

    @property
    def reference_free(self) -> bool:
        """The loss is reference-free (a run with a reference set is refused: it would cost a pass for nothing)."""
        return self.reference == "free"


def _table(*entries: PreferenceLoss) -> dict[str, PreferenceLoss]:
    table: dict[str, PreferenceLoss] = {}
    for entry in entries:
        if entry.name in table:
            raise ValueError(f"Loss name {entry.name!r} is given twice in LOSSES: give each loss its own name.")
        table[entry.name] = entry
    return table


LOSSES: dict[str, PreferenceLoss] = _table(
    PreferenceLoss(
        "sigmoid",
        sigmoid_loss,
        "needed",
        "DPO: -log sigmoid(beta * margin of log-ratios); label_smoothing > 0 makes it cDPO",
        ("label_smoothing",),
    ),
    PreferenceLoss("ipo", ipo_loss, "needed", "IPO: per-token log-ratio margin regressed onto 1 / (2 beta)"),
    PreferenceLoss("hinge", hinge_loss, "needed", "SLiC's hinge: max(0, 1 - beta * margin of log-ratios)"),
    PreferenceLoss(
        "robust",
        robust_loss,
        "needed",
        "robust DPO: DPO unbiased for labels flipped with probability label_smoothing",
        ("label_smoothing",),
    ),
    PreferenceLoss(
        "bco_pair", bco_pair_loss, "needed", "BCO on pairs: chosen reward classified positive, rejected negative"
    ),
    PreferenceLoss("sft", sft_loss, "either", "the chosen answer's NLL; + sigmoid is RPO, + sigmoid + bco_pair is MPO"),
    PreferenceLoss(
        "simpo",
        simpo_loss,
        "free",
        "SimPO: beta * (mean log-prob margin) must exceed simpo_gamma; no reference",
        ("label_smoothing", "simpo_gamma"),
    ),
    PreferenceLoss(
        "orpo",
        orpo_loss,
        "free",
        "ORPO: chosen NLL - orpo_lambda * log sigmoid(log odds ratio); no reference",
        ("orpo_lambda",),
    ),
)


# ---------------------------------------------------------------- checks
def unknown_loss_problem(name: str) -> str:
    """The message for an ``objective.loss`` entry that is not in ``LOSSES``, naming the nearest one."""
    near = difflib.get_close_matches(str(name), list(LOSSES), n=1, cutoff=0.5)
    hint = f" Did you mean {near[0]!r}?" if near else ""
    return (
        f"objective.loss: {name!r} is not a preference loss.{hint} Give one or more of {', '.join(LOSSES)} "
        "(e.g. objective.loss=[sigmoid])."
    )


def reference_problem(
    losses: Sequence[str], has_reference: bool, reference_key: str = "objective.reference"
) -> str | None:
    """Why ``losses`` cannot run with (or without) a reference, or None when they can.

    A loss that needs a reference is refused without one; a reference-free loss (simpo, orpo) is
    refused with one set, since its pass would be paid for and never read; the two kinds cannot be
    mixed. ``reference_key`` is the config key that chooses the reference, named in the fix.
    """
    entries = [LOSSES[name] for name in losses if name in LOSSES]
    needing = [e.name for e in entries if e.needs_reference]
    free = [e.name for e in entries if e.reference_free]
    if needing and free:
        return (
            f"objective.loss={list(losses)}: {', '.join(needing)} need a reference model and {', '.join(free)} "
            "are reference-free; combine losses of one kind (sft goes with either)."
        )
    if needing and not has_reference:
        return (
            f"objective.loss={list(losses)}: {', '.join(needing)} compare the policy with a reference model, and "
            f"none is set; set {reference_key}, or use a reference-free loss (simpo, orpo)."
        )
    if free and has_reference:
        return (
            f"objective.loss={list(losses)}: {', '.join(free)} are reference-free, but a reference is set; set "
            f"{reference_key} to none, or use a loss that reads it (sigmoid, ipo, hinge, robust, bco_pair)."
        )
    return None


def _check(losses: Sequence[str], weights: Sequence[float] | None, beta: float, options: dict) -> list[float]:
    """The weights (1 each when None), once the losses, weights, beta and options pass."""
    if not losses:
        raise ValueError(f"objective.loss is empty; give one or more of {', '.join(LOSSES)} (e.g. [sigmoid]).")
    for name in losses:
        if name not in LOSSES:
            raise ValueError(unknown_loss_problem(name))
    if len(set(losses)) != len(losses):
        raise ValueError(f"objective.loss={list(losses)} names a loss twice; name each once and weight it instead.")
    if weights is None:
        weights = [1.0] * len(losses)
    if len(weights) != len(losses):
        raise ValueError(
            f"objective.loss_weights={list(weights)} has {len(weights)} weights for the {len(losses)} losses of "
            f"objective.loss={list(losses)}; give one weight per loss, in the same order."
        )
    if not beta > 0:
        raise ValueError(f"objective.beta={beta}: must be above 0 (0.1 is DPO's usual value).")
    for key in options:
        if key not in OPTION_DEFAULTS:
            near = difflib.get_close_matches(key, list(OPTION_DEFAULTS), n=1, cutoff=0.5)
            hint = f" Did you mean {near[0]!r}?" if near else ""
            raise TypeError(
                f"preference_loss: unknown option {key!r}.{hint} The options: {', '.join(OPTION_DEFAULTS)}."
            )
    eps = options.get("label_smoothing", 0.0)
    if not 0.0 <= eps < 0.5:
        raise ValueError(
            f"objective.label_smoothing={eps}: the probability that a label is flipped must lie in [0, 0.5) "
            "(0.1 is robust DPO's suggestion; 0 turns it off)."
        )
    lam = options.get("orpo_lambda")
    if lam is not None and lam < 0:
        raise ValueError(f"objective.orpo_lambda={lam}: must be at least 0 (0.1 is ORPO's usual value).")
    return [float(w) for w in weights]


# ---------------------------------------------------------------- the combination
def preference_loss(
    logps: PairLogps,
    losses: Sequence[str],
    weights: Sequence[float] | None = None,
    beta: float = 0.1,
    **options: float | None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """The weighted sum of the named losses on one batch of pairs, and its metrics.

    Args:
        logps: the batch's log-probabilities (``PairLogps``).
        losses: names from ``LOSSES`` (``objective.loss``), each once; one string is one loss.
        weights: one weight per loss (``objective.loss_weights``); None: 1 each.
        beta: the temperature (``objective.beta``, above 0); ORPO's lambda unless ``orpo_lambda`` is given.
        **options: ``label_smoothing``, ``simpo_gamma``, ``orpo_lambda`` (``OPTION_DEFAULTS``; None or
            absent: the default); each loss reads the ones its entry lists.

    Returns:
        ``(loss, metrics)``: the scalar ``sum_i weights[i] * loss_i``, and detached scalars (means over
        the batch's pairs):

        - ``rewards/chosen``, ``rewards/rejected``: with a reference, DPO's implicit rewards
          ``beta * (policy - reference)`` of the summed log-probs; without one, ``beta`` times the mean
          log-prob per answer token (what TRL's CPOTrainer logs for SimPO and its ORPOTrainer logs);
        - ``rewards/margins``: chosen minus rejected; ``rewards/accuracies``: the share of pairs whose
          chosen reward is strictly above the rejected one (at equal rewards, 0);
        - ``logps/chosen``, ``logps/rejected``: the policy's log-probs, summed with a reference, per
          token without one (as TRL logs them for DPO and for SimPO/ORPO);
        - ``loss/<name>``: each component before its weight;
        - with ``orpo``: ``orpo/log_odds_ratio`` (mean log sigmoid of the log odds ratio),
          ``orpo/log_odds_chosen`` (mean log odds ratio) and ``orpo/nll``, as TRL's ORPOTrainer logs them.

    Raises:
        ValueError: an unknown or repeated loss, weights that do not match, beta at or below 0,
            label_smoothing outside [0, 0.5), or losses that need a reference the batch lacks (or
            reference-free losses given one); the message names the ``objective.*`` key and the fix.
        TypeError: an option not in ``OPTION_DEFAULTS``.
    """
    if isinstance(losses, str):
        losses = [losses]
    options = {key: value for key, value in options.items() if value is not None}  # None: the default
    weights = _check(losses, weights, beta, options)
    problem = reference_problem(losses, logps.has_reference)
    if problem is not None:
        raise ValueError(problem)
    settings = {**OPTION_DEFAULTS, **options}

    total: Tensor | None = None
    metrics: dict[str, Tensor] = {}
    for name, weight in zip(losses, weights, strict=True):
        entry = LOSSES[name]
        value = entry.fn(logps, beta, **{key: settings[key] for key in entry.options})
        metrics[f"loss/{name}"] = value.detach()
        total = weight * value if total is None else total + weight * value

    with torch.no_grad():
        if logps.has_reference:
            chosen_logps, rejected_logps = logps.policy_chosen.detach(), logps.policy_rejected.detach()
            chosen_ratio, rejected_ratio = logps.logratios()
            chosen_rewards, rejected_rewards = beta * chosen_ratio.detach(), beta * rejected_ratio.detach()
        else:
            chosen_logps, rejected_logps = (t.detach() for t in logps.mean_logps())
            chosen_rewards, rejected_rewards = beta * chosen_logps, beta * rejected_logps
        metrics["rewards/chosen"] = chosen_rewards.mean()
        metrics["rewards/rejected"] = rejected_rewards.mean()
        metrics["rewards/margins"] = (chosen_rewards - rejected_rewards).mean()
        metrics["rewards/accuracies"] = (chosen_rewards > rejected_rewards).to(chosen_rewards.dtype).mean()
        metrics["logps/chosen"] = chosen_logps.mean()
        metrics["logps/rejected"] = rejected_logps.mean()
        if "orpo" in losses:
            log_odds = orpo_log_odds(logps).detach()
            metrics["orpo/log_odds_ratio"] = F.logsigmoid(log_odds).mean()
            metrics["orpo/log_odds_chosen"] = log_odds.mean()
            metrics["orpo/nll"] = logps.nll().detach()
    assert total is not None
    return total, metrics
