"""Evaluate a finished run: batched greedy generation on a split, metrics and predictions.jsonl.

    idefics2-ft evaluate run_dir=RUN [data.split=test] [model_dir=RUN/export] [out_dir=...] [key=value ...]

Loads the run's adapter on its base as trained (or a merged model folder with model_dir=), answers
every question of the split, prints a summary table and writes predictions.jsonl,
eval_metrics.json and report.html (metrics, curves, a gallery of answers) to out_dir (default
RUN/eval/<split>), all at once when the evaluation is complete. A read-only run folder needs
out_dir=; a folder that holds anything but an earlier evaluation of this run is refused.

eval.preset= asks and scores the questions as a harness does (lmms-eval, VLMEvalKit:
docs/evaluate-and-export.md#presets-a-score-beside-a-published-row); every score is written with its
score card (score_card.json), and the answers to a split without public answers into submission.json.

A preference run (objective=dpo) is scored on the split's pairs instead: its policy against its
reference (the adapter it started from, model.adapter, or the base), the rewards, the reward accuracy
and the log-probs, into eval_metrics.json and report.html. With objective.name=sft and a
question/answer split's data.* keys, its policy answers that split's questions as above.
"""

import logging
import sys

from idefics2_ft.cli import same_command
from idefics2_ft.cli.arguments import parse_overrides, rehearsed_stop, setup_logging
from idefics2_ft.config import ConfigError
from idefics2_ft.data import DataError
from idefics2_ft.presets import preset_of
from idefics2_ft.run_folder import FolderLock, OutputRefused, RunFolder, RunFolderError
from idefics2_ft.stops import Interrupted, StopPolicy, active, exiting
from idefics2_ft.tasks.evaluate import (
    config_for_split,
    evaluate,
    evaluate_pairs,
    evaluation_output,
    format_table,
    load_pair_run,
    load_run,
    scored_weights,
)

log = logging.getLogger("idefics2_ft")


def main(argv: list[str]) -> int:
    setup_logging()
    policy = active() or StopPolicy("evaluate").install()
    policy.completed("nothing was written yet", same_command("evaluate", argv))
    try:
        cfg, own = parse_overrides(argv, {"data.split": None, "model_dir": None, "out_dir": None})
        policy.rehearse(rehearsed_stop(argv))
        split = own["data.split"] or cfg.data.val_split
        with policy.phase_of("checks"):
            try:  # an unknown preset, before anything loads
                preset = preset_of(cfg.eval.preset)
            except ValueError as err:
                raise ConfigError([str(err)]) from None
            if preset is not None and cfg.objective.name == "dpo":
                raise ConfigError(
                    [
                        f"eval.preset={preset.name} asks questions, and {cfg.run_dir} is a preference run whose "
                        "split holds pairs (scored by their rewards): drop eval.preset, or score a question/answer "
                        "split with objective.name=sft and its data.* keys."
                    ]
                )
            cfg = config_for_split(cfg, split)  # a split the source does not have is refused here
            # where the results go, refused before a weight loads if it may not be written
            target = evaluation_output(cfg, own["out_dir"] or RunFolder(cfg.run_dir).eval(split))
            weights = scored_weights(cfg, own["model_dir"])
            holder = FolderLock(cfg.run_dir).holder()
            if holder:
                log.warning(
                    "run_dir=%s is in use by a training (pid %s on %s since %s): evaluating %s as it is now "
                    "(saved after step %s, sha256 %s); eval_metrics.json records which.",
                    *(cfg.run_dir, holder.get("pid"), holder.get("host"), holder.get("started")),
                    *(weights["eval/weights"], weights["eval/trained_steps"], weights["eval/weights_sha256"]),
                )
        if cfg.objective.name == "dpo":  # pairs: the run's own reward metrics, its policy against its reference
            if own["model_dir"]:
                raise ConfigError(
                    [
                        f"model_dir={own['model_dir']}: a preference run's pairs are scored against its reference, "
                        "which a merged model has lost; drop model_dir= (the run's adapter is used), or score a "
                        "question/answer split with objective.name=sft and its data.* keys."
                    ]
                )
            with policy.phase_of("model loading", "load"):
                model, processor, reference = load_pair_run(cfg)
            label = f"the run's policy against its reference ({reference})"
            with policy.phase_of("the evaluation", "evaluate"):
                metrics = evaluate_pairs(cfg, model, processor, reference, split, target, label, weights)
        else:
            with policy.phase_of("model loading", "load"):
                model, processor = load_run(cfg, model_dir=own["model_dir"])
            label = (
                f"merged model {own['model_dir']}" if own["model_dir"] else "the run's adapter on its base, as trained"
            )
            with policy.phase_of("the evaluation", "evaluate"):
                metrics = evaluate(cfg, model, processor, split, target, label, weights)
    except (ConfigError, DataError, FileNotFoundError, OutputRefused, RunFolderError) as err:
        sys.stderr.write(f"evaluate failed: {err}\n")
        return 2
    except Interrupted as stop:
        exiting()  # deaf to further signals until the process is gone
        sys.stderr.write(f"{stop}\n")
        return stop.exit_code
    finally:
        policy.uninstall()
    written = "eval_metrics.json" if "eval/pairs" in metrics else "predictions.jsonl, eval_metrics.json"
    sys.stdout.write(format_table(metrics) + f"\n\nwrote {target.path}/{written} and report.html\n")
    return 0
