"""The LightningModule: it receives a built Idefics2 (with adapters) and an optimizer factory.

It does not load models, processors or datasets, nor read the config: ``idefics2_ft.tasks.train`` builds
those and injects them (the optimizer factory and schedule come from ``idefics2_ft.training.optim``).
"""

from __future__ import annotations

import logging
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable
from typing import Any

import lightning as L
import torch
import torch.distributed as dist
import torch.nn.functional as F

from idefics2_ft.data.collator import IGNORE_INDEX
from idefics2_ft.data.records import DataError
from idefics2_ft.metrics import row_scores
from idefics2_ft.models.generation import stop_token_ids
from idefics2_ft.ranks import world_size

log = logging.getLogger(__name__)

MODEL_INPUTS = ("input_ids", "attention_mask", "pixel_values", "pixel_attention_mask", "labels")


class Idefics2Module(L.LightningModule):
    """Train, validate (loss + greedy generation metrics) and checkpoint trainable weights only.

    Args:
        model: Idefics2ForConditionalGeneration, possibly wrapped by PEFT.
        tokenizer: decodes generated answers.
        optimizer_factory: ``params -> torch.optim.Optimizer``.
        lr_lambda: ``step -> multiplier`` for a per-step ``LambdaLR``.
        metric: the validation score (``data.metric``: accuracy, anls, vqa_accuracy, ...).
        source_metrics: a mixture's metric per source name; each source is scored with its own and
            reported as ``val/<source>/<metric>``.
        max_new_tokens: generation budget for validation answers.
        shard: ``(model, device_mesh) -> units``, applied in ``configure_model`` when the strategy
            gives a device mesh (FSDP2); None for every other strategy.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        tokenizer: Any,
        optimizer_factory: Callable[[list], torch.optim.Optimizer],
        lr_lambda: Callable[[int], float] | None = None,
        metric: str = "accuracy",
        max_new_tokens: int = 16,
        shard: Callable[[torch.nn.Module, Any], int] | None = None,
        source_metrics: dict[str, str] | None = None,
    ) -> None:
        super().__init__()
        self.model = model
        self.tokenizer = tokenizer
        self.optimizer_factory = optimizer_factory
        self.lr_lambda = lr_lambda
        self.metric = metric
        self.source_metrics = dict(source_metrics or {})
        self.max_new_tokens = max_new_tokens
        self.shard = shard
        self.strict_loading = False  # checkpoints hold trainable weights only: checked in on_load_checkpoint
        self.stop_ids = stop_token_ids(tokenizer)
        self.skipped: Counter[str] = Counter()  # bad records per "<stage>/<kind>", each record once
        self._bad_seen: set[tuple[str, int]] = set()
        self.val_metrics: dict[str, float] = {}
        # the last validation's rows, one per question (predictions.jsonl); None until a validation ends
        self.val_predictions: list[dict] | None = None
        self._val_rows: list[tuple[int, dict]] = []  # (the record's index in the validation set, its row)
        self._val_loss: list[tuple[float, int]] = []
        self._pending_rng: torch.Tensor | None = None
        self._step_rng: tuple[int, torch.Tensor | None] = (-1, None)
        self.first_step = 0  # the optimizer step this fit started at (after a resume, the restored one)

    def configure_model(self) -> None:
        # Called for every fit/validate, before the first forward (4-bit weights shard only then).
        if self.shard is not None:
            self.shard(self.model, self.device_mesh["data_parallel"])

    # ------------------------------------------------------------------ training
    def on_train_start(self) -> None:
        # from_pretrained returns the model in eval mode, and Lightning keeps each submodule's
        # mode: without this, LoRA dropout would silently be off.
        self.model.train()
        self.first_step = self.global_step
        self._follow_the_schedule()

    def _follow_the_schedule(self) -> None:
        """After a resume, set the lr to what this run's schedule gives at the restored step.

        The optimizer's state holds the lr the *old* schedule left; if the run is extended
        (a larger ``trainer.max_steps``) or ``optim.*`` changed, that is not this schedule's lr (for
        a finished cosine schedule it is 0, and the extension would train nothing). A plain resume
        gives the same value, and nothing changes.
        """
        if self.lr_lambda is None:
            return
        configured = getattr(self, "_configured_groups", None)
        for config in self.trainer.lr_scheduler_configs:
            scheduler = config.scheduler
            if configured is not None:  # optim.lr, weight_decay, betas as this run sets them
                for group, mine in zip(scheduler.optimizer.param_groups, configured, strict=True):
                    for key in ("weight_decay", "betas", "eps"):
                        if key in mine:
                            group[key] = mine[key]
                    group["initial_lr"] = mine["lr"]
                scheduler.base_lrs = [mine["lr"] for mine in configured]
            wanted = [base * self.lr_lambda(scheduler.last_epoch) for base in scheduler.base_lrs]
            current = [group["lr"] for group in scheduler.optimizer.param_groups]
            if wanted != current:
                log.warning(
                    "Resumed at step %d with a different schedule (trainer.max_steps or optim.* changed): "
                    "lr %.3g -> %.3g, and on this run's schedule from here on.",
                    self.global_step,
                    current[0],
                    wanted[0],
                )
                for group, lr in zip(scheduler.optimizer.param_groups, wanted, strict=True):
                    group["lr"] = lr
                scheduler._last_lr = wanted

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        # Restored here, not in on_load_checkpoint: creating the dataloader iterator draws from
        # the global RNG after the checkpoint is loaded.
        if self._pending_rng is not None:
            torch.set_rng_state(self._pending_rng)
            self._pending_rng = None
        if self._step_rng[0] != self.global_step:  # the first micro-batch of an optimizer step
            self._step_rng = (self.global_step, torch.get_rng_state())

    def forward(self, **inputs):
        return self.model(**inputs)

    def _count_bad(self, batch: dict, stage: str) -> None:
        # per record, not per read: a record read again in a later epoch is still one record
        for bad in batch.get("bad_samples", ()):
            key = f"{stage}/{bad.source}/{bad.kind}" if bad.source else f"{stage}/{bad.kind}"
            if (key, bad.index) not in self._bad_seen:
                self._bad_seen.add((key, bad.index))
                self.skipped[key] += 1

    def skipped_metrics(self) -> dict[str, int]:
        """``data/skipped`` and ``data/skipped/<stage>/<kind>`` over all ranks, each record once (a
        record can fall to another rank in another epoch); logs a warning naming them."""
        seen = set(self._bad_seen)
        if world_size() > 1:
            gathered: list = [None] * world_size()
            dist.all_gather_object(gathered, seen)
            seen = set().union(*gathered)
        skipped = dict(Counter(key for key, _ in seen))
        metrics = {"data/skipped": sum(skipped.values())}
        metrics.update({f"data/skipped/{k}": v for k, v in sorted(skipped.items())})
        if skipped:
            log.warning("Skipped %d bad records: %s", metrics["data/skipped"], skipped)
        return metrics

    @property
    def weights_sharded(self) -> bool:
        """True when the ranks hold shards of the weights (FSDP2, DeepSpeed ZeRO-3): every forward is
        then a collective that all ranks must join. False on one process and under DDP or ZeRO-2."""
        from lightning.pytorch.strategies import DDPStrategy, DeepSpeedStrategy

        if world_size() == 1:
            return False
        strategy = self.trainer.strategy
        if isinstance(strategy, DeepSpeedStrategy):
            return strategy.zero_stage_3
        return not isinstance(strategy, DDPStrategy)

    def zero_loss(self) -> torch.Tensor:
        """0 over the trainable weights: a step that learns nothing from this batch and still runs the
        backward (and, across ranks, the gradient all-reduce) with everyone else."""
        from torch.distributed.tensor import DTensor

        # a shard's own sum under FSDP2: a plain tensor, which the log's all-reduce takes; the gradient
        # still reaches the sharded weight (zeros), so every rank's optimizer step sees the same weights
        parts = [
            (p.to_local() if isinstance(p, DTensor) else p).sum() for p in self.model.parameters() if p.requires_grad
        ]
        return torch.stack(parts).sum() * 0.0

    def batch_stats(self, has_batch: bool, tokens: torch.Tensor | float = 0.0) -> tuple[float, int]:
        """``(tokens, ranks without a batch)`` over all ranks: one all-reduce that every rank joins, also
        one whose records were all bad (a rank that skipped a collective would leave the others waiting
        in it for ever). ``tokens`` is this rank's count of the tokens the loss divides by."""
        stats = torch.tensor([float(tokens), 0.0 if has_batch else 1.0], dtype=torch.float64, device=self.device)
        dist.all_reduce(stats)
        return float(stats[0]), int(stats[1])

    def training_step(self, batch: dict, batch_idx: int):
        self._count_bad(batch, "train")
        has_batch = "input_ids" in batch
        world = world_size()
        if world == 1:
            if not has_batch:  # every record of this batch was bad: keep the step, learn nothing
                return self.zero_loss()
            loss, n = self.learned_loss(batch), batch["input_ids"].shape[0]
        else:
            # Normalise by the supervised tokens of the global batch, not of this rank's share: DDP
            # averages the ranks' gradients, so each rank divides its summed loss by total/world, and
            # the step equals one process over the whole batch. A rank whose records were all bad adds
            # a zero loss: under DDP that is its exact share of the global mean. Under sharded weights
            # its forward would be a collective the others miss, so then every rank skips the batch.
            tokens = (batch["labels"][:, 1:] != IGNORE_INDEX).sum() if has_batch else 0.0
            total, without = self.batch_stats(has_batch, tokens)
            if has_batch and not (without and self.weights_sharded):
                loss = self.learned_loss(batch, torch.tensor(max(total, 1.0) / world, device=self.device))
                n = batch["input_ids"].shape[0]
            else:
                if without < world and self.weights_sharded:  # some rank's good records are skipped
                    log.warning(
                        "Step %d: %d of %d ranks had only bad records; with sharded weights every rank skips "
                        "this micro-batch.",
                        self.global_step,
                        without,
                        world,
                    )
                loss, n = self.zero_loss(), 1
        self.log("train/loss", loss, prog_bar=True, batch_size=n, sync_dist=world > 1)
        if self.trainer._logger_connector.should_update_logs:  # written only then: skip the call (~0.7 ms) otherwise
            self.log("train/lr", self.trainer.optimizers[0].param_groups[0]["lr"], batch_size=n)
        return loss

    def learned_loss(self, batch: dict, num_items: torch.Tensor | None = None) -> torch.Tensor:
        """The causal-LM loss with the head run only where some sample learns the next token.

        The logits (``tokens x vocab``, fp32 in the loss) of every other position would be computed
        and kept for the backward for nothing. transformers' ``logits_to_keep`` selects the positions
        before the head; the loss is transformers' own (summed cross-entropy over the supervised
        tokens, divided by ``num_items`` or by their count), on the same positions, so the value and
        the gradients are today's (``tests/unit/test_recompute.py``).
        """
        targets = batch["labels"][:, 1:]  # position t predicts token t + 1: [B, T - 1]
        keep = (targets != IGNORE_INDEX).any(dim=0).nonzero().squeeze(-1)  # [K] positions, any sample
        inputs = {k: batch[k] for k in MODEL_INPUTS if k in batch and k != "labels"}
        logits = self.model(**inputs, logits_to_keep=keep).logits  # [B, K, vocab]
        picked = targets[:, keep]  # [B, K]
        summed = F.cross_entropy(
            logits.float().flatten(0, 1), picked.flatten(), ignore_index=IGNORE_INDEX, reduction="sum"
        )
        count = num_items if num_items is not None else (picked != IGNORE_INDEX).sum().clamp(min=1)
        return summed / count

    # ------------------------------------------------------------------ validation
    def on_validation_epoch_start(self) -> None:
        self._val_rows, self._val_loss = [], []
        for key in [k for k in self.skipped if k.startswith("val/")]:
            del self.skipped[key]  # each validation pass counts its own
        self._bad_seen = {seen for seen in self._bad_seen if not seen[0].startswith("val/")}

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        self._count_bad(batch, "val")
        if self.weights_sharded:  # a forward is a collective there: no rank may skip one alone
            _, without = self.batch_stats("loss_inputs" in batch)
            if without:
                raise DataError(
                    f"Validation batch {batch_idx}: every record of it was bad on {without} rank(s), and with "
                    "sharded weights (FSDP, DeepSpeed ZeRO-3) each forward needs every rank. Remove the bad "
                    "records from the validation data (the data check at the start names them) or raise "
                    "data.eval_batch_size; `resume=true` then goes on from the last checkpoint (resume_changes= naming "
                    "what changed)."
                )
        if "loss_inputs" not in batch:
            return
        inputs = batch["loss_inputs"]
        out = self.model(**{k: inputs[k] for k in MODEL_INPUTS if k in inputs})
        supervised = int((inputs["labels"][:, 1:] != IGNORE_INDEX).sum())
        self._val_loss.append((float(out.loss) * supervised, supervised))
        predictions = self.generate(batch["gen_inputs"])
        n = len(predictions)
        sources = batch.get("sources") or [None] * n
        questions = batch.get("questions") or [""] * n
        for key, pred, refs, qtype, rid, source, question in zip(
            batch["keys"],
            predictions,
            batch["answers"],
            batch["question_types"],
            batch["ids"],
            sources,
            questions,
            strict=True,
        ):
            metric = self.source_metrics.get(source, self.metric) if source else self.metric
            row = {"id": rid if source is None else f"{source}/{rid}", "prediction": pred, "answers": refs}
            row.update(question_type=qtype, source=source, metric=metric)
            if refs:
                row.update(row_scores(metric, pred, refs, question))  # score, the diagnostic columns, <metric>
            else:  # a test split's question without a public answer: answered for a submission, not scored
                row["unanswered"] = True
            self._val_rows.append((key, row))

    @torch.no_grad()
    def generate(self, inputs: dict) -> list[str]:
        """Greedy answers for a left-padded batch of prompts ending with ``Assistant:``."""
        gen_inputs = {k: inputs[k] for k in MODEL_INPUTS if k in inputs and k != "labels"}
        output = self.model.generate(
            **gen_inputs,
            max_new_tokens=self.max_new_tokens,
            do_sample=False,
            eos_token_id=self.stop_ids,
            pad_token_id=self.tokenizer.pad_token_id,
            use_cache=True,
            # sharded ranks must keep stepping together until all are done; replicated ones (DDP) need not,
            # and a rank without a batch (all its records bad) then never waits on the others
            synced_gpus=self.weights_sharded,
        )
        new_tokens = output[:, gen_inputs["input_ids"].shape[1] :]
        return [t.strip() for t in self.tokenizer.batch_decode(new_tokens, skip_special_tokens=True)]

    def on_validation_epoch_end(self) -> None:
        keyed, losses = self._val_rows, self._val_loss
        if world_size() > 1:
            gathered: list = [None] * world_size()
            dist.all_gather_object(gathered, (keyed, losses))
            keyed = [r for part, _ in gathered for r in part]
            losses = [x for _, part in gathered for x in part]
        rows = unique_questions(keyed)
        metrics: dict[str, float] = {}
        total = sum(n for _, n in losses)
        if total:
            metrics["val/loss"] = sum(x for x, _ in losses) / total
        scored = [r for r in rows if not r.get("unanswered")]
        if scored:
            metrics.update(score_metrics(scored, self.metric))
        if rows:
            metrics["val/n_questions"] = float(len(rows))
        if len(scored) < len(rows):
            metrics["val/unanswered"] = float(len(rows) - len(scored))
            metrics.pop("val/loss", None)  # partly the loss of a stand-in answer (presets.NO_REFERENCE)
        self.val_metrics = metrics
        self.val_predictions = rows
        for key, value in metrics.items():
            self.log(key, value, rank_zero_only=True, sync_dist=False)

    # ------------------------------------------------------------------ optimizers
    def configure_optimizers(self):
        params = [p for p in self.model.parameters() if p.requires_grad]
        optimizer = self.optimizer_factory(params)
        # this run's settings: a resume restores the old run's over them, and _follow_the_schedule puts them back
        self._configured_groups = [
            {k: v for k, v in group.items() if k != "params"} for group in optimizer.param_groups
        ]
        if self.lr_lambda is None:
            return optimizer
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, self.lr_lambda)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # ------------------------------------------------------------------ checkpoints
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        # The strategy collected the state (under FSDP: the gathered trainable weights already).
        names = {n for n, p in self.named_parameters() if p.requires_grad}
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in names}
        checkpoint["trainable_names"] = sorted(checkpoint["state_dict"])
        # A checkpoint written mid-step (on an exception) holds the weights from before that step:
        # pair them with the random state from before it too, so a resumed run replays it exactly.
        step, state = self._step_rng
        mid_step = state is not None and checkpoint.get("global_step", self.global_step) == step
        checkpoint["rng_torch"] = state if mid_step else torch.get_rng_state()
        checkpoint["skipped_samples"] = dict(self.skipped)
        checkpoint["skipped_seen"] = sorted(self._bad_seen)

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        expected = {n for n, p in self.named_parameters() if p.requires_grad}
        # Under FSDP the strategy has taken the weights out of the checkpoint already: the names stay.
        stored = set(checkpoint["trainable_names"] if "trainable_names" in checkpoint else checkpoint["state_dict"])
        missing, unexpected = sorted(expected - stored), sorted(stored - expected)
        if missing or unexpected:
            raise RuntimeError(
                "The checkpoint does not match this model's trainable weights "
                f"(missing {missing[:3]}{'...' if len(missing) > 3 else ''}, "
                f"unexpected {unexpected[:3]}{'...' if len(unexpected) > 3 else ''}): resume with the same "
                "model and peft settings as the run that wrote it."
            )
        self._pending_rng = checkpoint.get("rng_torch")
        self.skipped = Counter(checkpoint.get("skipped_samples", {}))
        self._bad_seen = {tuple(seen) for seen in checkpoint.get("skipped_seen", [])}


def unique_questions(keyed: Iterable[tuple[int, dict]]) -> list[dict]:
    """The scored rows of every rank, each question once, in the validation set's order.

    A ``DistributedSampler`` pads the last ranks' share with repeats of the first records; they are
    told apart by the record's index in the validation set (the key), never by the data's ``id``,
    which several questions share (LLaVA-style data: one id per image, several questions each).

    Args:
        keyed: ``(index in the validation set, scored row)`` pairs, gathered from the ranks.
    """
    unique: dict[int, dict] = {}
    for key, row in keyed:
        unique.setdefault(key, row)
    return [unique[key] for key in sorted(unique)]


def score_metrics(rows: list[dict], metric: str) -> dict[str, float]:
    """Validation scores of scored rows: ``val/<metric>`` (and per question type) for one source; for
    a mixture, ``val/<source>/<metric>`` and ``val/<source>/n_questions`` for each source, and
    ``val/score``, the mean of the sources' scores, each source weighing the same whatever its size."""
    metrics: dict[str, float] = {}
    by_source: dict[str | None, list[dict]] = defaultdict(list)
    for r in rows:
        by_source[r.get("source")].append(r)
    if list(by_source) == [None]:
        metrics[f"val/{metric}"] = sum(r["score"] for r in rows) / len(rows)
        by_type: dict[str, list[float]] = defaultdict(list)
        for r in rows:
            if r["question_type"]:
                by_type[str(r["question_type"])].append(r["score"])
        for qtype, scores in sorted(by_type.items()):
            metrics[f"val/{metric}/{qtype}"] = sum(scores) / len(scores)
        return metrics | unparsed_count(rows)
    means = []
    for source, part in sorted(by_source.items(), key=lambda kv: str(kv[0])):
        mean = sum(r["score"] for r in part) / len(part)
        metrics[f"val/{source}/{part[0]['metric']}"] = mean
        metrics[f"val/{source}/n_questions"] = float(len(part))
        means.append(mean)
    metrics["val/score"] = sum(means) / len(means)
    return metrics | unparsed_count(rows)


def unparsed_count(rows: list[dict]) -> dict[str, float]:
    """``val/unparsed``: the multiple-choice answers that named no option (scored 0, never guessed);
    absent when no row's metric parses options."""
    parsed = [r for r in rows if "unparsed" in r]
    return {"val/unparsed": float(sum(bool(r["unparsed"]) for r in parsed))} if parsed else {}
