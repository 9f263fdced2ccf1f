"""The demo's DPO stage: pairs from the SFT run's own wrong answers, DPO from its adapter, the test scored again.

    python scripts/demo_dpo.py [DEMO_RUN] [--out DIR] [--questions 4000] [-- key=value ...]

DEMO_RUN is a finished `make demo` run (default: the newest outputs/easyvqa_tiny/demo-*). In DIR
(default outputs/easyvqa_tiny_dpo/dpo-<time>), each step is a command of the toolkit:

1. answers/   idefics2-ft evaluate run_dir=DEMO_RUN data.split=train data.max_val_samples=N: the SFT
              adapter answers the first N easy-VQA training questions (greedy, batched)
2. pairs/     train.jsonl, val.jsonl: one pair per wrong answer, in TRL's preference form (prompt,
              chosen, rejected, images as paths): chosen the reference answer, rejected what the
              model said; the pairs of every 8th picture are held out (val.jsonl)
3. run/       python train.py objective=dpo model.adapter=DEMO_RUN data=jsonl data.train_file=...
              data.val_file=... and the settings of DPO_SETTINGS, on the demo's recipe (easyvqa_tiny:
              its model, image size, adapter): the SFT adapter is the policy's start and the reference
4. test_sft/, test_dpo/   idefics2-ft evaluate ... data.split=test data.max_val_samples=1000: the SFT
              adapter and the DPO policy (objective.name=sft data.source=easyvqa) answer the demo's
              1,000 test questions as the demo scores them

Then it prints the accuracy per question type before and after DPO, and the held-out pairs' reward
accuracy. Exits 1 if a floor is missed (reward accuracy below --min-reward-accuracy, or the test
accuracy more than --max-drop below the SFT adapter's); the goal (--goal-gain) is reported.
Overrides after `--` go to train.py (objective.beta=0.2 trainer.max_steps=200 ...). --reuse PREV_DIR
takes steps 1, 2 and the SFT scores from an earlier run of this script on the same DEMO_RUN.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from collections import defaultdict
from datetime import datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TYPES = ("yes/no", "shape", "color", "overall")
HELD_OUT_EVERY = 8  # the pairs of every 8th training picture are held out
# The DPO run's keys over the demo's recipe (measured: docs/preference-tuning.md#the-demo). RPO (DPO plus
# the chosen answer's NLL); a small step: lr 1e-4 moves the yes/no prior (-24 points), 2e-5 costs 1.0, 1e-5 0.4.
DPO_SETTINGS = [
    "name=easyvqa_tiny_dpo",
    "objective=dpo",
    "objective.loss=[sigmoid,sft]",
    "objective.beta=0.1",
    "optim.lr=5e-6",
    "optim.warmup_steps=10",
    "trainer.max_steps=100",
    "trainer.log_every_n_steps=10",
    "eval.before_training=false",
]


def newest_demo_run() -> Path | None:
    runs = sorted(
        (p for p in (ROOT / "outputs" / "easyvqa_tiny").glob("demo-*") if (p / "adapter").is_dir()),
        key=lambda p: p.stat().st_mtime,
    )
    return runs[-1] if runs else None


def run(step: str, command: list[str], log_file: Path) -> float:
    """Run one command of the toolkit (its output into ``log_file``); its wall time in seconds."""
    print(f"[{step}] {' '.join(command)}", flush=True)
    start = time.monotonic()
    with open(log_file, "w") as log:
        done = subprocess.run(command, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env=os.environ)
    if done.returncode != 0:
        tail = log_file.read_text().splitlines()[-30:]
        sys.exit(f"[{step}] failed (exit {done.returncode}); the end of {log_file}:\n" + "\n".join(tail))
    return time.monotonic() - start


def idefics2_ft(*args: str) -> list[str]:
    return [sys.executable, "-c", "import sys; from idefics2_ft.cli import main; sys.exit(main())", *args]


def write_pairs(answers: Path, folder: Path) -> dict[str, int]:
    """One TRL preference pair per wrong answer in ``answers`` (predictions.jsonl of the train split):
    chosen the reference answer, rejected the model's own; the pairs of every 8th picture held out."""
    import easy_vqa

    questions, _, image_ids = easy_vqa.get_train_questions()
    paths = easy_vqa.get_train_image_paths()
    folder.mkdir(parents=True, exist_ok=True)
    counts = {"answered": 0, "wrong": 0, "train": 0, "val": 0, "empty": 0}
    with open(folder / "train.jsonl", "w") as train, open(folder / "val.jsonl", "w") as val:
        for line in answers.read_text().splitlines():
            row = json.loads(line)
            counts["answered"] += 1
            if row["accuracy"] >= 1:
                continue
            counts["wrong"] += 1
            said = row["prediction"].strip()
            if not said:  # an empty answer is no side to reject
                counts["empty"] += 1
                continue
            n = int(str(row["id"]).removeprefix("train-"))
            pair = {
                "prompt": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": questions[n]}]}],
                "chosen": [{"role": "assistant", "content": [{"type": "text", "text": row["references"][0]}]}],
                "rejected": [{"role": "assistant", "content": [{"type": "text", "text": said}]}],
                "images": [str(Path(paths[image_ids[n]]).resolve())],
                "id": row["id"],
            }
            held_out = image_ids[n] % HELD_OUT_EVERY == 0
            (val if held_out else train).write(json.dumps(pair) + "\n")
            counts["val" if held_out else "train"] += 1
    return counts


def scores(predictions: Path) -> dict[str, tuple[int, float]]:
    """(questions, accuracy) per question type and overall, from an evaluation's predictions.jsonl."""
    by_type: dict[str, list[float]] = defaultdict(list)
    for line in predictions.read_text().splitlines():
        row = json.loads(line)
        by_type[row["question_type"]].append(row["accuracy"])
        by_type["overall"].append(row["accuracy"])
    return {t: (len(v), sum(v) / len(v)) for t, v in by_type.items()}


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        usage="%(prog)s [DEMO_RUN] [options] [-- key=value ...]",
    )
    parser.add_argument("demo_run", type=Path, nargs="?", default=None, help="a finished `make demo` run folder")
    parser.add_argument("--out", type=Path, default=None, help="where the stage writes (a new folder)")
    parser.add_argument("--questions", type=int, default=4000, help="training questions the SFT adapter answers")
    parser.add_argument("--test-questions", type=int, default=1000, help="test questions scored (the demo's)")
    parser.add_argument(
        "--reuse", type=Path, default=None, help="an earlier output of this script: its answers, pairs and SFT scores"
    )
    parser.add_argument("--min-reward-accuracy", type=float, default=0.9, help="floor: held-out reward accuracy")
    parser.add_argument("--max-drop", type=float, default=0.005, help="floor: test accuracy at most this below SFT's")
    parser.add_argument("--goal-gain", type=float, default=0.02, help="goal: test accuracy this far above SFT's")
    argv = sys.argv[1:]
    cut = argv.index("--") if "--" in argv else len(argv)
    args = parser.parse_args(argv[:cut])
    args.overrides = argv[cut + 1 :]  # after --: train.py overrides for the DPO run

    demo = args.demo_run or newest_demo_run()
    if demo is None or not (demo / "adapter" / "adapter_config.json").is_file():
        sys.exit(f"no finished demo run ({demo or 'outputs/easyvqa_tiny/demo-*'}): run `make demo` first")
    demo = demo.resolve()
    out = (args.out or ROOT / "outputs" / "easyvqa_tiny_dpo" / f"dpo-{datetime.now():%Y%m%d-%H%M%S}").resolve()
    if out.exists() and any(out.iterdir()):
        sys.exit(f"--out {out} is not empty: give a new folder")
    out.mkdir(parents=True, exist_ok=True)
    (out / "logs").mkdir()
    print(f"DPO stage on the demo run {demo}, into {out}", flush=True)
    quiet = "trainer.enable_progress_bar=false"
    wall: dict[str, float] = {}
    start = time.monotonic()

    # 1-2: the SFT adapter's answers to training questions, and pairs from the wrong ones
    if args.reuse:
        for name in ("answers", "pairs", "test_sft"):
            shutil.copytree(args.reuse.resolve() / name, out / name)
        wall["answers"] = json.loads((out / "pairs" / "counts.json").read_text())["answers_s"]
    else:
        wall["answers"] = run(
            "1 answers",
            idefics2_ft(
                "evaluate",
                f"run_dir={demo}",
                "data.split=train",
                f"data.max_val_samples={args.questions}",
                f"out_dir={out / 'answers'}",
                quiet,
            ),
            out / "logs" / "answers.log",
        )
    if not args.reuse:
        counts = write_pairs(out / "answers" / "predictions.jsonl", out / "pairs")
        (out / "pairs" / "counts.json").write_text(json.dumps({**counts, "answers_s": wall["answers"]}, indent=1))
    counts = json.loads((out / "pairs" / "counts.json").read_text())
    print(
        f"[2 pairs] {counts['wrong']} of {counts['answered']} training questions answered wrong: "
        f"{counts['train']} pairs to train on, {counts['val']} held out (pictures not trained on)"
        + (f", {counts['empty']} empty answers left out" if counts["empty"] else ""),
        flush=True,
    )

    # 3: DPO from the SFT adapter, which is the reference
    wall["dpo"] = run(
        "3 DPO",
        [
            sys.executable,
            str(ROOT / "train.py"),
            *DPO_SETTINGS,
            f"model.adapter={demo}",
            f"run_dir={out / 'run'}",
            "data=jsonl",
            f"data.train_file={out / 'pairs' / 'train.jsonl'}",
            f"data.val_file={out / 'pairs' / 'val.jsonl'}",
            quiet,
            *args.overrides,
        ],
        out / "logs" / "dpo.log",
    )
    metrics = json.loads((out / "run" / "metrics.json").read_text())

    # 4: both adapters answer the demo's test questions, as the demo scores them
    test = ["data.split=test", f"data.max_val_samples={args.test_questions}", quiet]
    if not args.reuse:
        wall["test_sft"] = run(
            "4 score SFT",
            idefics2_ft("evaluate", f"run_dir={demo}", f"out_dir={out / 'test_sft'}", *test),
            out / "logs" / "test_sft.log",
        )
    as_questions = ["objective.name=sft", "data.source=easyvqa", "data.path=null", "data.metric=accuracy"]
    wall["test_dpo"] = run(
        "4 score DPO",
        idefics2_ft("evaluate", f"run_dir={out / 'run'}", *as_questions, f"out_dir={out / 'test_dpo'}", *test),
        out / "logs" / "test_dpo.log",
    )
    total = time.monotonic() - start

    before, after = scores(out / "test_sft" / "predictions.jsonl"), scores(out / "test_dpo" / "predictions.jsonl")
    o = metrics
    print(f"\neasy-VQA demo, DPO stage: {before['overall'][0]} held-out test questions, greedy decoding, exact match")
    print(f"{'question type':<14}{'n':>6}{'SFT adapter':>13}{'after DPO':>11}{'change':>9}")
    for t in TYPES:
        if t in before:
            n, b = before[t]
            a = after.get(t, (0, float("nan")))[1]
            print(f"{t:<14}{n:>6}{b:>13.1%}{a:>11.1%}{100 * (a - b):>+9.1f}")
    reward_accuracy = o.get("val/rewards/accuracies", float("nan"))
    print(
        f"held-out pairs: {int(o.get('val/pairs', 0))}, reward accuracy {reward_accuracy:.1%} (chosen above rejected), "
        f"margin {o.get('val/rewards/margins', float('nan')):.3f}, logps/chosen {o.get('val/logps/chosen', float('nan')):.3f}"
    )
    print(
        f"DPO: {counts['train']} pairs, {o.get('train/steps', '?')} steps; wall time {total:.0f} s = "
        f"answers {wall['answers']:.0f} s"
        + (" (reused)" if args.reuse else "")
        + f" + DPO {wall['dpo']:.0f} s (training {o.get('train/wall_s', float('nan')):.0f} s)"
        + (f" + scoring SFT {wall['test_sft']:.0f} s" if "test_sft" in wall else "")
        + f" + scoring DPO {wall['test_dpo']:.0f} s"
    )
    print(f"DPO run: {out / 'run'} (report.html: reward curves)")
    gain = after["overall"][1] - before["overall"][1]
    print(
        f"goal (test accuracy {100 * args.goal_gain:+.1f} points): " + ("met" if gain >= args.goal_gain else "not met")
    )
    failed = []
    if not reward_accuracy >= args.min_reward_accuracy:
        failed.append(f"held-out reward accuracy {reward_accuracy:.1%} < {args.min_reward_accuracy:.0%}")
    if not gain >= -args.max_drop - 1e-9:  # 5 of 1,000 questions is a 0.5-point drop, not below it
        failed.append(
            f"test accuracy {100 * gain:+.1f} points, more than {100 * args.max_drop:.1f} below the SFT adapter"
        )
    summary = {
        "demo_run": str(demo),
        "before": before,
        "after": after,
        "gain": gain,
        "reward_accuracy": reward_accuracy,
        "wall_s": {**wall, "total": total},
        "pairs": counts,
        "overrides": args.overrides,
        "floor_met": not failed,
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    if failed:
        print("FLOOR MISSED: " + "; ".join(failed))
        return 1
    print(f"floor met: held-out reward accuracy {reward_accuracy:.1%}, test accuracy {100 * gain:+.1f} points")
    return 0


if __name__ == "__main__":
    sys.exit(main())
