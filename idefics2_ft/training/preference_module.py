"""Preference tuning (``objective=dpo``): the SFT module's training and checkpointing, a pair's loss.

Everything but the step is the SFT module's (``Idefics2Module``): the optimizer and schedule,
trainable-only checkpoints, exact resume, bad-record counts, the strategies. A step reads a batch
of pairs (``data/pairs.py``), runs the policy and, without grad, the reference over it
(``pair_forward.py``: each picture through the vision tower once per pair), and combines the
losses ``objective.loss`` names (``preference.py``).

The reference (``objective.reference``):

- ``adapter``: the adapter the run started from (``model.adapter``, an SFT run), loaded a second time
  as a frozen PEFT adapter named ``reference`` on the same base: no second model in memory. The
  policy starts as a copy of it, so at step 0 policy and reference agree: the sigmoid loss is
  exactly ln 2 and every reward 0 (logged as ``train/start/...``).
- ``base``: the base with the adapters switched off.
- ``none``: no reference pass, for the reference-free losses (simpo, orpo).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch

from idefics2_ft.ranks import world_size
from idefics2_ft.training.lightning_module import Idefics2Module
from idefics2_ft.training.pair_forward import (
    IGNORE_INDEX,
    has_adapters,
    pair_features,
    pair_logps,
    part_of,
    see_pair,
)
from idefics2_ft.training.preference import LOSSES, PairLogps, preference_loss, reference_problem, unknown_loss_problem

log = logging.getLogger(__name__)

REFERENCE_ADAPTER = "reference"
POLICY_ADAPTER = "default"
REFERENCES = ("adapter", "base", "none")


class PreferenceModule(Idefics2Module):
    """Train on preference pairs; validate with the same metrics on held-out pairs.

    Args:
        model: the PEFT model: the policy's adapter active (``default``) and, for
            ``reference="adapter"``, the frozen ``reference`` adapter beside it.
        losses, weights, beta, options: ``objective.loss``, ``objective.loss_weights``,
            ``objective.beta`` and the losses' options (``preference.OPTION_DEFAULTS``).
        reference: ``adapter``, ``base`` or ``none`` (see the module's docstring).
        Others: as ``Idefics2Module``.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        tokenizer: Any,
        optimizer_factory: Callable[[list], torch.optim.Optimizer],
        lr_lambda: Callable[[int], float] | None = None,
        *,
        losses: Sequence[str] = ("sigmoid",),
        weights: Sequence[float] | None = None,
        beta: float = 0.1,
        reference: str = "base",
        options: dict[str, Any] | None = None,
        shard: Callable[[torch.nn.Module, Any], int] | None = None,
    ) -> None:
        super().__init__(model, tokenizer, optimizer_factory, lr_lambda, shard=shard)
        if reference not in REFERENCES:
            raise ValueError(f"objective.reference={reference!r} is not one of {', '.join(REFERENCES)}.")
        self.losses, self.weights, self.beta = list(losses), (list(weights) if weights else None), beta
        self.reference, self.options = reference, dict(options or {})
        self._val_sums: dict[str, float] = {}
        self._val_pairs = 0
        self._said_start = False

    @classmethod
    def from_objective(
        cls,
        model: torch.nn.Module,
        tokenizer: Any,
        objective: Any,
        reference: str,
        optimizer_factory: Callable[[list], torch.optim.Optimizer] | None = None,
        lr_lambda: Callable[[int], float] | None = None,
        shard: Callable[[torch.nn.Module, Any], int] | None = None,
    ) -> PreferenceModule:
        """The module for the ``objective`` group (its losses, weights, beta and the losses' options)."""
        o = objective
        return cls(
            model,
            tokenizer,
            optimizer_factory,
            lr_lambda,
            losses=list(o.loss),
            weights=list(o.loss_weights) if o.loss_weights is not None else None,
            beta=o.beta,
            reference=reference,
            options={"label_smoothing": o.label_smoothing, "simpo_gamma": o.simpo_gamma, "orpo_lambda": o.orpo_lambda},
            shard=shard,
        )

    # ------------------------------------------------------------------ the reference
    @contextmanager
    def as_reference(self) -> Iterator[None]:
        """The model as the reference while the block runs: the ``reference`` adapter, or none."""
        training = self.model.training
        self.model.eval()  # no dropout in the reference: it is a fixed function of the pair
        try:
            if self.reference == "adapter":
                self.model.base_model.set_adapter(REFERENCE_ADAPTER, inference_mode=True)
                try:
                    yield
                finally:  # the policy's adapter active and trainable again, the reference's frozen
                    self.model.base_model.set_adapter(POLICY_ADAPTER)
            else:
                with self.model.disable_adapter():
                    yield
        finally:
            self.model.train(training)

    def pair_loss(
        self, batch: dict, shares: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The batch's preference loss and metrics (means over its pairs).

        Args:
            shares: under DDP, this rank's share of the global batch (``global_shares``): ``[pairs, chosen
                answer tokens]`` of every rank summed, over the world size. The loss is then the sum over
                this rank's pairs over its share of the pairs, and the chosen side's NLL (``sft``, ``orpo``)
                the sum over this rank's tokens over its share of the tokens: DDP's average of the ranks'
                gradients is then the global batch's mean, also when the ranks hold different numbers of
                pairs (bad pairs dropped) or of answer tokens. None: the means over this batch.
        """
        pictures, rejected = see_pair(self.model, batch)
        features = pair_features(self.model, batch, pictures, rejected)
        policy = pair_logps(self.model, batch, features)
        reference = None
        if self.reference != "none":
            inner = part_of(self.model, "Idefics2Model")
            with torch.no_grad(), self.as_reference():
                if has_adapters(inner.vision_model):  # the reference's tower differs (no recipe does this)
                    pictures, rejected = see_pair(self.model, batch)
                if has_adapters(inner.vision_model) or has_adapters(inner.connector):
                    features = pair_features(self.model, batch, pictures, rejected)
                reference = pair_logps(self.model, batch, [f.detach() for f in features])
        scale, chosen_nll = 1.0, None
        if shares is not None:  # the global batch's means under DDP's average (see Args)
            pairs, tokens = shares.to(policy.chosen.dtype).unbind()
            scale = policy.chosen.shape[0] / pairs
            chosen_nll = -policy.chosen.sum() / tokens.clamp(min=1) / scale  # times scale below: sum / tokens share
        logps = PairLogps(
            policy.chosen,
            policy.rejected,
            policy.chosen_tokens,
            policy.rejected_tokens,
            reference.chosen if reference is not None else None,
            reference.rejected if reference is not None else None,
            chosen_nll,
        )
        loss, metrics = preference_loss(logps, self.losses, self.weights, self.beta, **self.options)
        loss = loss * scale
        metrics["length/chosen"] = policy.chosen_tokens.float().mean()
        metrics["length/rejected"] = policy.rejected_tokens.float().mean()
        return loss, metrics

    # ------------------------------------------------------------------ training
    def on_train_start(self) -> None:
        super().on_train_start()
        self._said_start = False

    def global_shares(self, batch: dict) -> torch.Tensor:
        """``[pairs, chosen answer tokens]`` of the global batch over the world size (an all-reduce:
        every rank calls it, also one whose pairs were all bad)."""
        counts = torch.zeros(2, dtype=torch.float64, device=self.device)
        if "chosen_input_ids" in batch:
            counts[0] = batch["chosen_input_ids"].shape[0]
            counts[1] = (batch["chosen_labels"][:, 1:] != IGNORE_INDEX).sum()
        torch.distributed.all_reduce(counts)
        return counts / world_size()

    def training_step(self, batch: dict, batch_idx: int):
        self._count_bad(batch, "train")
        synced = world_size() > 1
        # Under DDP each rank's loss is scaled to its share of the global batch (pair_loss): with as
        # many pairs on every rank (the sampler gives each rank data.batch_size records, a pair each)
        # the scale is 1, but a bad pair dropped on one rank would otherwise weigh the others' pairs
        # differently from one process over the global batch. The all-reduce comes first: every rank joins it.
        shares = self.global_shares(batch) if synced else None
        if "chosen_input_ids" not in batch:  # every pair of this batch was bad: keep the step in step
            return torch.stack([p.sum() for p in self.model.parameters() if p.requires_grad]).sum() * 0.0
        loss, metrics = self.pair_loss(batch, shares)
        n = batch["chosen_input_ids"].shape[0]
        self.log("train/loss", loss, prog_bar=True, batch_size=n, sync_dist=synced)
        for key, value in metrics.items():
            self.log(f"train/{key}", value, batch_size=n, sync_dist=synced)
        if not self._said_start:  # the fit's first batch (batch_idx is not 0 after a resume: Lightning restores it)
            self._said_start = True
            log.info(
                "Step %d: loss %.6f, rewards/margins %.6f (policy and reference %s)",
                self.global_step,
                float(loss.detach()),
                float(metrics["rewards/margins"]),
                "agree: ln 2 = 0.693147 for sigmoid" if self.global_step == 0 else "as resumed",
            )
        if self.trainer._logger_connector.should_update_logs:
            self.log("train/lr", self.trainer.optimizers[0].param_groups[0]["lr"], batch_size=n)
        return loss

    # ------------------------------------------------------------------ validation
    def on_validation_epoch_start(self) -> None:
        for key in [k for k in self.skipped if k.startswith("val/")]:
            del self.skipped[key]
        self._bad_seen = {(k, i) for k, i in self._bad_seen if not k.startswith("val/")}
        self._val_sums, self._val_pairs = {}, 0

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        self._count_bad(batch, "val")
        if "chosen_input_ids" not in batch:
            return
        loss, metrics = self.pair_loss(batch)
        n = batch["chosen_input_ids"].shape[0]
        for key, value in {"loss": loss, **metrics}.items():
            self._val_sums[key] = self._val_sums.get(key, 0.0) + float(value) * n
        self._val_pairs += n

    def on_validation_epoch_end(self) -> None:
        sums, pairs = dict(self._val_sums), self._val_pairs
        if world_size() > 1:
            gathered: list = [None] * world_size()
            torch.distributed.all_gather_object(gathered, (sums, pairs))
            sums = {k: sum(s.get(k, 0.0) for s, _ in gathered) for k in sums}
            pairs = sum(p for _, p in gathered)
        metrics = {f"val/{k}": v / pairs for k, v in sums.items()} if pairs else {}
        metrics["val/pairs"] = float(pairs)
        self.val_metrics = metrics
        for key, value in metrics.items():
            self.log(key, value, sync_dist=False, rank_zero_only=True)


def reference_of(objective: Any, adapter: str | None) -> str:
    """``objective.reference`` resolved: ``auto`` is ``none`` for reference-free losses, else ``adapter``
    when the run starts from one (``model.adapter``), else ``base``."""
    if objective.reference != "auto":
        return objective.reference
    entries = [LOSSES[name] for name in objective.loss if name in LOSSES]
    if entries and any(e.reference_free for e in entries) and not any(e.needs_reference for e in entries):
        return "none"
    return "adapter" if adapter else "base"


def objective_problems(cfg: Any) -> list[str]:
    """The ``objective`` group's problems (with ``objective=dpo``), each with its fix."""
    o = cfg.objective
    if o.name != "dpo":
        return []
    problems = [unknown_loss_problem(name) for name in o.loss if name not in LOSSES]
    if not o.loss:
        problems.append(f"objective.loss is empty: give one or more of {', '.join(LOSSES)} (e.g. [sigmoid]).")
    if len(set(o.loss)) != len(o.loss):
        problems.append(f"objective.loss={list(o.loss)} names a loss twice; name each once and weight it instead.")
    if o.loss_weights is not None and len(o.loss_weights) != len(o.loss):
        problems.append(
            f"objective.loss_weights={list(o.loss_weights)}: one weight per loss of objective.loss={list(o.loss)}, "
            "in the same order."
        )
    if not o.beta > 0:
        problems.append(f"objective.beta={o.beta}: must be above 0 (0.1 is DPO's usual value).")
    if not 0.0 <= o.label_smoothing < 0.5:
        problems.append(f"objective.label_smoothing={o.label_smoothing}: a probability in [0, 0.5) (0 turns it off).")
    reference = reference_of(o, cfg.model.adapter)
    if reference == "adapter" and not cfg.model.adapter:
        problems.append(
            "objective.reference=adapter needs the adapter the run starts from: model.adapter=RUN_DIR (an SFT "
            "run) or an adapter folder; or objective.reference=base."
        )
    if not problems:
        problem = reference_problem(list(o.loss), reference != "none")
        if problem:
            problems.append(problem)
    if cfg.peft.method == "full":
        problems.append(
            "objective=dpo with peft=full: the reference is an adapter, or the base with the adapters off, and a "
            "full fine-tune has neither; use peft=qlora (or lora, dora)."
        )
    return problems
