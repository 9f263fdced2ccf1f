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

from idefics2_ft.data.records import DataError
from idefics2_ft.ranks import world_size
from idefics2_ft.training.lightning_module import Idefics2Module
from idefics2_ft.training.pair_forward import IGNORE_INDEX, attach_pair_passes
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
        self._metric_names: list[str] | None = None
        attach_pair_passes(self.model)  # the pair's forward, as one method of the model (FSDP2 registers it)
        self._global_pairs = 0.0

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
        reference_pass = None if self.reference == "none" else self.as_reference
        policy, reference = self.model.pair_passes(batch, reference_pass)  # pair_forward.pair_passes
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

    def global_shares(self, batch: dict) -> tuple[torch.Tensor, int]:
        """``[pairs, chosen answer tokens]`` of the global batch over the world size, and how many ranks
        hold no pair (an all-reduce: every rank calls it, also one whose pairs were all bad)."""
        counts = torch.zeros(3, dtype=torch.float64, device=self.device)
        if "chosen_input_ids" in batch:
            counts[0] = batch["chosen_input_ids"].shape[0]
            counts[1] = (batch["chosen_labels"][:, 1:] != IGNORE_INDEX).sum()
        else:
            counts[2] = 1
        torch.distributed.all_reduce(counts)
        return counts[:2] / world_size(), int(counts[2])

    def metric_names(self) -> list[str]:
        """The names ``pair_loss`` returns its metrics under, in its order (from the losses alone): a rank
        without a pair joins the metrics' all-reduce with zeros under the same names."""
        if self._metric_names is None:
            one = torch.zeros(1, device=self.device)
            reference = None if self.reference == "none" else one
            logps = PairLogps(one, one, one + 1, one + 1, reference, reference)
            _, metrics = preference_loss(logps, self.losses, self.weights, self.beta, **self.options)
            self._metric_names = [*metrics, "length/chosen", "length/rejected"]
        return self._metric_names

    def global_metrics(
        self, loss: torch.Tensor, metrics: dict[str, torch.Tensor], pairs: int
    ) -> dict[str, torch.Tensor]:
        """The loss and the metrics of the global batch: the loss is the ranks' sum over the world size
        (each rank's loss is its share of the global mean, ``pair_loss``), each metric the mean over all
        the ranks' pairs. One all-reduce, in an order every rank knows (``metric_names``)."""
        names = self.metric_names()
        values = [loss.detach().double()] + [metrics[k].detach().double() * pairs if pairs else 0.0 for k in names]
        stacked = torch.stack([torch.as_tensor(v, dtype=torch.float64, device=self.device) for v in values])
        torch.distributed.all_reduce(stacked)
        total_pairs = max(float(self._global_pairs), 1.0)
        out = {"loss": stacked[0] / world_size()}
        out.update({k: stacked[i + 1] / total_pairs for i, k in enumerate(names)})
        return out

    def training_step(self, batch: dict, batch_idx: int):
        self._count_bad(batch, "train")
        has_batch = "chosen_input_ids" in batch
        if world_size() == 1:
            if not has_batch:  # every pair of this batch was bad: keep the step, learn nothing
                return self.zero_loss()
            loss, metrics = self.pair_loss(batch)
            logged = {"loss": loss, **metrics}
        else:
            # Under DDP each rank's loss is scaled to its share of the global batch (pair_loss): with as
            # many pairs on every rank (the sampler gives each rank data.batch_size records, a pair each)
            # the scale is 1, but a bad pair dropped on one rank would otherwise weigh the others' pairs
            # differently from one process over the global batch. A rank whose pairs were all bad adds a
            # zero loss, its exact share. Every rank joins each all-reduce, in the same order; with
            # sharded weights a forward is one too, so there every rank skips a batch that one rank lacks.
            shares, without = self.global_shares(batch)
            self._global_pairs = float(shares[0]) * world_size()
            if has_batch and not (without and self.weights_sharded):
                loss, metrics = self.pair_loss(batch, shares)
                pairs = batch["chosen_input_ids"].shape[0]
            else:
                loss, metrics, pairs = self.zero_loss(), {}, 0
                if without and self.weights_sharded:
                    self._global_pairs = 0.0
            logged = self.global_metrics(loss, metrics, pairs)
            if 0 < without < world_size() and self.weights_sharded:  # some rank's good pairs are skipped
                log.warning(
                    "Step %d: %d of %d ranks had only bad pairs; with sharded weights every rank skips this "
                    "micro-batch.",
                    self.global_step,
                    without,
                    world_size(),
                )
        for key, value in logged.items():  # already the global batch's: no sync
            self.log(f"train/{key}", value, prog_bar=key == "loss", batch_size=1, sync_dist=False)
        if (
            not self._said_start and "rewards/margins" in logged
        ):  # the fit's first batch (batch_idx is not 0 after a resume)
            self._said_start = True
            log.info(
                "Step %d: loss %.6f, rewards/margins %.6f (policy and reference %s)",
                self.global_step,
                float(logged["loss"].detach()),
                float(logged["rewards/margins"]),
                "agree: ln 2 = 0.693147 for sigmoid" if self.global_step == 0 else "as resumed",
            )
        if self.trainer._logger_connector.should_update_logs:
            self.log("train/lr", self.trainer.optimizers[0].param_groups[0]["lr"], batch_size=1)
        return loss

    # ------------------------------------------------------------------ validation
    def on_validation_epoch_start(self) -> None:
        for key in [k for k in self.skipped if k.startswith("val/")]:
            del self.skipped[key]
        self._bad_seen = {(k, i) for k, i in self._bad_seen if not k.startswith("val/")}
        self._val_sums, self._val_pairs = {}, 0

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        self._count_bad(batch, "val")
        if self.weights_sharded:  # a forward is a collective there: no rank may skip one alone
            _, without = self.global_shares(batch)
            if without:
                raise DataError(
                    f"Validation batch {batch_idx}: every pair of it was bad on {without} rank(s), and with "
                    "sharded weights (FSDP, DeepSpeed ZeRO-3) each forward needs every rank. Remove the bad "
                    "pairs from the validation data (the data check at the start names them) or raise "
                    "data.eval_batch_size; `resume=true` then goes on from the last checkpoint (resume_changes= naming "
                    "what changed)."
                )
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
            names = {k for part, _ in gathered for k in part}  # a rank without a pair has none
            sums = {k: sum(s.get(k, 0.0) for s, _ in gathered) for k in sorted(names)}
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
