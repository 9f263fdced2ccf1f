"""Print the easy-VQA demo's accuracy per question type: blind prior, base before QLoRA, after QLoRA.

    python scripts/demo_report.py RUN_DIR [--min-overall 0.80] [--min-gain 0.15] [--goal-overall 0.85] [--goal-type 0.75]

The blind prior answers each test question with its most common answer in the training set (the
image is never looked at); it is computed here on the same questions the run evaluated. Exits 1 if
a floor (--min-*) is missed; the goals (--goal-*) are reported, not enforced.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter, defaultdict
from pathlib import Path

from idefics2_ft.data.sources import easyvqa_question_type
from idefics2_ft.metrics import exact_match


def blind_answers() -> dict[str, str]:
    """Most common training answer for each question text (ties: the first seen)."""
    import easy_vqa

    questions, answers, _ = easy_vqa.get_train_questions()
    by_question: dict[str, Counter] = defaultdict(Counter)
    for q, a in zip(questions, answers, strict=True):
        by_question[q][a] += 1
    overall = Counter(answers).most_common(1)[0][0]
    return defaultdict(lambda: overall, {q: c.most_common(1)[0][0] for q, c in by_question.items()})


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--min-overall", type=float, default=None, help="floor: overall accuracy after QLoRA")
    parser.add_argument("--min-gain", type=float, default=None, help="floor: after QLoRA minus the base before it")
    parser.add_argument("--goal-overall", type=float, default=None)
    parser.add_argument("--goal-type", type=float, default=None, help="goal: every question type at least this")
    args = parser.parse_args()

    import easy_vqa

    metrics = json.loads((args.run_dir / "metrics.json").read_text())
    rows = [json.loads(line) for line in (args.run_dir / "predictions.jsonl").read_text().splitlines()]
    test_questions = easy_vqa.get_test_questions()[0]
    blind = blind_answers()
    scores: dict[str, list[tuple[float, float]]] = defaultdict(list)
    for row in rows:
        question = test_questions[int(str(row["id"]).split("-")[1])]
        qtype = easyvqa_question_type(row["answers"][0])
        pair = (row["accuracy"], exact_match(blind[question], row["answers"]))
        scores[qtype].append(pair)
        scores["overall"].append(pair)

    def mean(xs):
        return sum(xs) / len(xs) if xs else float("nan")

    before = {
        k.removeprefix("before/val/accuracy").lstrip("/") or "overall": v
        for k, v in metrics.items()
        if k.startswith("before/val/accuracy")
    }
    print(f"\neasy-VQA demo: {len(rows)} held-out test questions, greedy decoding, exact match")
    print(f"{'question type':<14}{'n':>6}{'blind prior':>13}{'base, before QLoRA':>20}{'after QLoRA':>13}")
    for qtype in ("yes/no", "shape", "color", "overall"):
        pairs = scores.get(qtype, [])
        b = before.get(qtype)
        print(
            f"{qtype:<14}{len(pairs):>6}{mean([p[1] for p in pairs]):>13.1%}"
            f"{(f'{b:.1%}' if b is not None else '-'):>20}{mean([p[0] for p in pairs]):>13.1%}"
        )
    total, base = metrics["wall_s"], metrics.get("base/wall_s", 0.0)
    built = base > 5  # loading the cached base takes well under a second
    print(
        f"wall time of this run: {total:.0f} s = stage 1 {base:.0f} s"
        + (
            " (built in this run)"
            if built
            else f" (cached by an earlier run; building it took {metrics.get('stage1/wall_s', float('nan')):.0f} s)"
        )
        + f" + QLoRA training {metrics['train/wall_s']:.0f} s + evaluations and loading {total - base - metrics['train/wall_s']:.0f} s"
    )
    report = args.run_dir / "report.html"
    if report.is_file():
        print(f"report: {report}  (open it in a browser: curves, the table, a gallery of answers)")
    overall = mean([p[0] for p in scores["overall"]])
    gain = overall - before.get("overall", float("nan"))
    by_type = {t: mean([p[0] for p in scores[t]]) for t in ("yes/no", "shape", "color") if scores.get(t)}
    if args.goal_overall is not None or args.goal_type is not None:
        goal = overall >= (args.goal_overall or 0) and all(v >= (args.goal_type or 0) for v in by_type.values())
        print(
            f"goal (overall >= {args.goal_overall or 0:.0%}, every type >= {args.goal_type or 0:.0%}): "
            + ("met" if goal else "not met")
        )
    failed = []
    if args.min_overall is not None and not overall >= args.min_overall:
        failed.append(f"overall {overall:.1%} < {args.min_overall:.0%}")
    if args.min_gain is not None and not gain >= args.min_gain:
        failed.append(f"QLoRA added {gain:+.1%} < {args.min_gain:.0%}")
    if failed:
        print("FLOOR MISSED: " + "; ".join(failed))
        return 1
    print(f"floor met: overall {overall:.1%}, QLoRA added {gain:+.1%}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
