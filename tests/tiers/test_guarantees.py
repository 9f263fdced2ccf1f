"""The guarantees every command inherits, tried through the command line as a user types it
(`make test-faults`): no command deletes or overwrites what it did not write; a stop in any phase
exits 143 or 130 with one line of ours (the phase, what is complete, the command that continues)
and leaves nothing half-written; a run's history records what happened and its data is known by
content; one process owns a folder. Each case adds a row to outputs/guarantees_table.md.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.helpers import IDEFICS2_FT, ROOT, CaseTable
from tests.tiers.test_faults import (
    RESUMABLE,
    base_overrides,
    jsonl_data,
    jsonl_overrides,
    last_error_line,
    run,
    short,
    train_py,
)

pytestmark = pytest.mark.faults

# the rows of outputs/guarantees_table.md, whole under `pytest -n 2` (CaseTable in tests/helpers.py)
TABLE = CaseTable("guarantees_table.md", ("case", "what the user sees", "exit"))


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("tiny_base")


def tool(command: str, *args: str, **popen) -> tuple[int, str, str]:
    """``idefics2-ft COMMAND ARGS``: (exit code, stdout, stderr)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = subprocess.run(
        [IDEFICS2_FT, command, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600, **popen
    )
    return out.returncode, out.stdout, out.stderr


def tree(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def stop_line(out: str) -> str:
    lines = [line for line in out.splitlines() if "Stopped by SIG" in line]
    return lines[-1].split(" - ", 1)[-1] if lines else ""


@pytest.fixture(scope="module")
def finished(cache, tmp_path_factory):
    """A finished tiny run (adapter, metrics), copied by each test that changes it."""
    run_dir = tmp_path_factory.mktemp("finished") / "run"
    rc, out, _ = run(*base_overrides(cache, run_dir, "trainer.max_steps=2"))
    assert rc == 0, out[-2000:]
    return run_dir


def copy_of(run_dir: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy)
    return copy


# ---------------------------------------------------------------- 1. nothing deleted that we did not write
def test_export_never_replaces_what_it_did_not_write(finished, tmp_path):
    run_dir = copy_of(finished, tmp_path)
    others = tmp_path / "models"
    (others / "llama-7b").mkdir(parents=True)
    (others / "notes.md").write_text("keep me")
    before_others, before_run = tree(others), tree(run_dir)
    cases = [
        ("export.out_dir=X, X holding other models and notes", others, "already holds files"),
        ("export.out_dir=RUN (the run folder)", run_dir, "is the run folder itself"),
        ("export.out_dir=RUN/adapter", run_dir / "adapter", "lies in adapter, where the run keeps its own files"),
        ("export.out_dir=RUN/.. (contains the run)", run_dir.parent, "contains the run folder"),
    ]
    for case, target, says in cases:
        start = time.perf_counter()
        rc, _, err = tool("export", f"run_dir={run_dir}", f"export.out_dir={target}")
        line = err.strip().splitlines()[-1]
        assert rc == 2 and says in line and "Nothing was written" in line or "nothing was written" in line, err
        assert "Traceback" not in err
        assert tree(others) == before_others and tree(run_dir) == before_run
        TABLE.append((case, short(line, tmp_path) + f" ({time.perf_counter() - start:.0f} s)", f"exit {rc}"))

    # an earlier export of the same run is replaced, and the log says so
    assert tool("export", f"run_dir={run_dir}")[0] == 0
    rc, _, err = tool("export", f"run_dir={run_dir}")
    assert rc == 0 and "Replaced the earlier export of this run" in err, err
    TABLE.append(("export twice into RUN/export", "the earlier export of this run is replaced (said in the log)", "0"))


def test_evaluate_never_replaces_what_it_did_not_write_and_records_what_it_scored(finished, tmp_path):
    run_dir = copy_of(finished, tmp_path)
    theirs = tmp_path / "results"
    theirs.mkdir()
    (theirs / "paper_table.csv").write_text("a,b\n")
    rc, _, err = tool("evaluate", f"run_dir={run_dir}", f"out_dir={theirs}", "trainer.enable_progress_bar=false")
    assert rc == 2 and "already holds files" in err and (theirs / "paper_table.csv").is_file(), err
    TABLE.append(("evaluate out_dir=X, X holding other files", short(err.strip().splitlines()[-1], tmp_path), "2"))
    rc, _, err = tool("evaluate", f"run_dir={run_dir}", "out_dir=" + str(run_dir / "checkpoints"))
    assert rc == 2 and "lies in checkpoints" in err, err

    rc, out, err = tool("evaluate", f"run_dir={run_dir}", "trainer.enable_progress_bar=false")
    assert rc == 0, err[-2000:]
    (written,) = (run_dir / "eval").glob("*/eval_metrics.json")
    scored = json.loads(written.read_text())
    assert scored["eval/trained_steps"] == 2 and len(scored["eval/weights_sha256"]) == 16
    assert scored["eval/weights"] == str(run_dir / "adapter")


# ---------------------------------------------------------------- 2. every stop is honest
TRAIN_PHASES = [
    # (debug.stop_at, the phase the line names, what must not exist afterwards)
    ("load", "model loading", ["adapter", "metrics.json", "checkpoints/last.ckpt"]),
    ("validate_before", "the validation before training", ["adapter", "metrics.json", "checkpoints/last.ckpt"]),
    # a signal during a save in the fit waits for the save and the step boundary: the line names the step
    ("checkpoint", "fit, at step", ["adapter", "metrics.json"]),
    ("validate", "the final validation", ["adapter", "metrics.json"]),
    ("save", "the adapter save", ["adapter", "metrics.json"]),
    ("report", "the report", ["report.html"]),
]


@pytest.mark.parametrize("phase, named, absent", TRAIN_PHASES, ids=[p[0] for p in TRAIN_PHASES])
@pytest.mark.parametrize("signame", ["SIGTERM"])
def test_a_stop_in_each_phase_of_train_exits_honestly_and_the_command_it_prints_continues(
    cache, tmp_path, phase, named, absent, signame
):
    run_dir = tmp_path / "run"
    extra = ["eval.before_training=true"] if phase == "validate_before" else []
    overrides = base_overrides(cache, run_dir, "trainer.checkpoint_every_n_steps=1", *extra)
    rc, out, _ = run(*overrides, f"debug.stop_at={phase}:{signame}")
    line = stop_line(out)
    code = 128 + getattr(signal, signame)
    assert rc == code, out[-3000:]
    assert line.startswith(f"Stopped by {signame} during {named}"), line
    assert "Continue with: idefics2-ft" in line and "debug.stop_at" not in line
    assert not any((run_dir / p).exists() for p in absent), sorted(p.name for p in run_dir.iterdir())
    assert not list(run_dir.glob(".*partial*"))  # nothing half-written
    if phase == "checkpoint":
        assert "holds step" in line
    TABLE.append((f"{signame} during {named}", short(line, tmp_path), f"exit {rc}"))

    command = shlex.split(line.split("Continue with: ", 1)[1].rstrip("."))
    assert command[:2] == ["idefics2-ft", "train"]
    rc, stdout, stderr = tool(command[1], *command[2:])
    assert rc == 0, (stdout + stderr)[-3000:]
    assert (run_dir / "adapter" / "adapter_config.json").is_file() or phase == "report"


def test_ctrl_c_twice_in_the_fit_stops_at_once_with_our_line_and_keeps_the_last_checkpoint(cache, tmp_path):
    run_dir = tmp_path / "run"
    proc = train_py(*base_overrides(cache, run_dir, *RESUMABLE, "trainer.max_steps=400"))
    last = run_dir / "checkpoints" / "last.ckpt"
    while proc.poll() is None and not last.is_file():
        time.sleep(0.02)
    proc.send_signal(signal.SIGINT)
    time.sleep(0.05)
    # then a user who keeps pressing: the later presses land in the stop, while its line is written
    # and while the interpreter shuts down (where Python puts the default handler back: exit -2 once)
    deadline = time.monotonic() + 120
    while proc.poll() is None and time.monotonic() < deadline:
        proc.send_signal(signal.SIGINT)
        time.sleep(0.01)
    out, _ = proc.communicate(timeout=120)
    line = stop_line(out)
    assert proc.returncode == 130, out[-3000:]
    assert line.startswith("Stopped by SIGINT during fit") and "resume=true" in line, line
    assert "Traceback" not in out.split("Stopped by")[-1]
    import torch

    assert torch.load(last, weights_only=False)["global_step"] >= 1  # the last save stands, whole
    TABLE.append(("Ctrl-C twice during the fit", short(line, tmp_path), "exit 130"))


def test_ctrl_c_during_a_resumes_start_up_says_the_checkpoint_is_untouched(finished, cache, tmp_path):
    run_dir = copy_of(finished, tmp_path)
    before = tree(run_dir)
    rc, out, _ = run(*base_overrides(cache, run_dir, "resume=true", "debug.stop_at=data:SIGINT"))
    line = stop_line(out)
    assert rc == 130 and line.startswith("Stopped by SIGINT during data loading"), out[-3000:]
    assert "still holds step 2; this resume trained nothing" in line
    after = tree(run_dir)
    assert {k for k in after if not k.startswith(("train.log", "phases.json", ".lock"))} == {
        k for k in before if not k.startswith(("train.log", "phases.json", ".lock"))
    }
    assert not list(run_dir.glob("config.resume-*")) and not (run_dir / "resumes.jsonl").exists()
    TABLE.append(("Ctrl-C during a resume's start-up", short(line, tmp_path), "exit 130"))


@pytest.mark.parametrize("phase, named", [("merge", "the merge"), ("export_save", "the export save")])
def test_a_stop_during_export_leaves_no_export(finished, tmp_path, phase, named):
    run_dir = copy_of(finished, tmp_path)
    rc, _, err = tool("export", f"run_dir={run_dir}", f"debug.stop_at={phase}")
    line = stop_line(err)
    assert rc == 143 and line.startswith(f"Stopped by SIGTERM during {named}; no export was written"), err[-3000:]
    assert not (run_dir / "export").exists() and not list(run_dir.glob(".export*"))
    TABLE.append((f"SIGTERM during export's {named.removeprefix('the ')}", short(line, tmp_path), "exit 143"))


def test_a_stop_during_evaluate_leaves_no_metrics(finished, tmp_path):
    run_dir = copy_of(finished, tmp_path)
    rc, _, err = tool("evaluate", f"run_dir={run_dir}", "debug.stop_at=evaluate", "trainer.enable_progress_bar=false")
    line = stop_line(err)
    assert rc == 143 and line.startswith("Stopped by SIGTERM during the evaluation"), err[-3000:]
    assert not (run_dir / "eval").exists() and not list(run_dir.rglob("eval_metrics.json"))
    TABLE.append(("SIGTERM during evaluate", short(line, tmp_path), "exit 143"))


# ---------------------------------------------------------------- 3. history and identity
def test_the_same_bytes_staged_again_resume_and_an_interrupted_resume_leaves_no_history(cache, tmp_path):
    data = jsonl_data(tmp_path / "staged", n=16)
    run_dir = tmp_path / "run"
    rc, out, _ = run(*jsonl_overrides(cache, run_dir, data, *RESUMABLE, "debug.crash_at_step=3"))
    assert rc != 0 and (run_dir / "checkpoints" / "last.ckpt").is_file(), out[-2000:]

    # a requeued job stages the data again: the same bytes, a new mtime
    staged = data.read_bytes()
    data.unlink()
    time.sleep(0.01)
    data.write_bytes(staged)
    resumed = jsonl_overrides(cache, run_dir, data, *RESUMABLE, "resume=true")
    rc, out, _ = run(*resumed, "debug.stop_at=load")  # stopped before its first step
    assert rc == 143, out[-3000:]
    assert not list(run_dir.glob("config.resume-*")) and not (run_dir / "resumes.jsonl").exists()
    TABLE.append(("a resume stopped before its first step", "no config.resume-N.yaml, no resumes.jsonl", "143"))

    rc, out, _ = run(*resumed)
    assert rc == 0, out[-3000:]
    assert "Resume 1 changes debug.crash_at_step: 3 -> None" in out and "data (files)" not in out  # the same data
    assert [p.name for p in run_dir.glob("config.resume-*")] == ["config.resume-1.yaml"]
    TABLE.append(("the same data staged again (new mtime), resume=true", "trains on: the data is the same", "0"))


def test_a_resume_that_cannot_be_checked_or_continued_is_refused_before_any_weight_loads(finished, cache, tmp_path):
    run_dir = copy_of(finished, tmp_path)
    # only checkpoints/ copied from elsewhere: nothing to compare the resume with
    bare = tmp_path / "bare"
    (bare / "checkpoints").mkdir(parents=True)
    shutil.copy(run_dir / "checkpoints" / "last.ckpt", bare / "checkpoints" / "last.ckpt")
    rc, out, seconds = run(*base_overrides(cache, bare, "resume=true", "trainer.max_steps=3"))
    line = last_error_line(out)
    assert rc == 2 and "but not config.yaml or base_model.json" in line and "resume_changes=[all]" in line, out[-2000:]
    TABLE.append(("resume=true on a folder holding only checkpoints/", short(line, tmp_path), "2"))

    # max_steps below the checkpoint's step
    rc, out, _ = run(*base_overrides(cache, run_dir, "resume=true", "trainer.max_steps=1", "optim.warmup_steps=0"))
    line = last_error_line(out)
    assert rc == 2 and "trainer.max_steps=1, below the step" in line, out[-2000:]
    TABLE.append(("resume=true with trainer.max_steps below the checkpoint's", short(line, tmp_path), "2"))

    # a truncated last.ckpt beside an intact older one
    last = run_dir / "checkpoints" / "last.ckpt"
    older = run_dir / "checkpoints" / "epoch=0-step=1.ckpt"
    shutil.copy(last, older)
    last.write_bytes(last.read_bytes()[: last.stat().st_size // 2])
    before = tree(run_dir)
    rc, out, _ = run(*base_overrides(cache, run_dir, "resume=true", "trainer.max_steps=3"))
    line = last_error_line(out)
    assert rc == 2 and "last.ckpt is corrupt" in line and "epoch=0-step=1.ckpt" in line and "is intact" in line, out
    assert "Traceback" not in out and not list(run_dir.glob("config.resume-*"))
    assert {k: v for k, v in tree(run_dir).items() if k not in ("train.log", ".lock")} == {
        k: v for k, v in before.items() if k not in ("train.log", ".lock")
    }
    TABLE.append(("resume=true with a truncated last.ckpt", short(line, tmp_path), "2"))


def test_a_moved_folder_prints_commands_for_itself_and_stray_or_broken_history_files_are_named(finished, tmp_path):
    moved = tmp_path / "moved here, with spaces"
    shutil.copytree(finished, moved)
    shutil.copy(moved / "config.yaml", moved / "config.resume-1 (copy).yaml")  # a stray copy
    rc, _, err = tool("export", f"run_dir={moved}", "export.adapter_only=true")
    assert rc == 0, err[-2000:]
    (moved / "adapter" / "adapter_config.json").unlink()  # now unfinished: the tools print the command
    rc, _, err = tool("export", f"run_dir={moved}")
    command = err.split("continue it with: ", 1)[1].strip()
    words = shlex.split(command)
    assert f"run_dir={moved}" in [w.replace("'", "") for w in words] and str(finished) not in command, command
    TABLE.append(("the continue command of a moved folder", "names the folder it was run on, quoted", f"exit {rc}"))

    (moved / "config.yaml").write_text("seed: 0\ndata: [unclosed\n")
    rc, _, err = tool("evaluate", f"run_dir={moved}", "trainer.enable_progress_bar=false")
    line = err.strip().splitlines()[-1]
    assert rc == 2 and "config.yaml is not valid YAML (line" in line and "Traceback" not in err, err[-2000:]
    TABLE.append(("invalid YAML in a run's config", short(line, tmp_path), "2"))


# ---------------------------------------------------------------- 4. one owner
def test_evaluate_on_a_folder_a_training_owns_says_so_and_records_what_it_scored(finished, cache, tmp_path):
    run_dir = copy_of(finished, tmp_path)
    proc = train_py(*base_overrides(cache, run_dir, "resume=true", "trainer.max_steps=400"))
    try:
        lock = run_dir / ".lock"
        while proc.poll() is None and not lock.read_text():
            time.sleep(0.05)
        rc, _, err = tool(
            "evaluate", f"run_dir={run_dir}", f"out_dir={tmp_path / 'eval'}", "trainer.enable_progress_bar=false"
        )
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=120)
    assert rc == 0 and f"is in use by a training (pid {proc.pid}" in err, err[-2000:]
    scored = json.loads((tmp_path / "eval" / "eval_metrics.json").read_text())
    assert scored["eval/trained_steps"] == 2
    TABLE.append(
        ("evaluate on a folder a training owns", "says so; eval_metrics.json records the step and weights", "0")
    )
    assert proc.returncode == 143


def test_a_run_dir_hydra_cannot_make_is_named_in_one_line(tmp_path, read_only):
    not_a_folder = tmp_path / "run"
    not_a_folder.write_text("x")
    rc, _, err = tool("evaluate", f"run_dir={not_a_folder}")
    assert rc != 0 and "is a file" in err and "Traceback" not in err, err
    cases = [
        ("a run_dir that is a file", [f"run_dir={not_a_folder}"], ROOT, "is a file, not a folder"),
        ("a non-ASCII run_dir, unquoted", [f"run_dir={tmp_path}/été"], ROOT, "Quote it: \"run_dir='"),
    ]
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    cases.append(("the default run_dir in a read-only folder", [], read_only(cwd), "is not writable. Set run_dir="))
    for case, args, where, says in cases:
        out = subprocess.run(
            [sys.executable, str(ROOT / "train.py"), *args, "trainer.max_steps=1"],
            cwd=where,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
            capture_output=True,
            text=True,
            timeout=300,
        )
        line = out.stderr.strip().splitlines()[-1]
        assert out.returncode == 2 and says in line and "Traceback" not in out.stderr, out.stderr[-2000:]
        TABLE.append((case, short(line, tmp_path), "2"))
        if "Quote it: " in line:  # the quoting it suggests is what Hydra reads back as the folder
            from hydra.core.override_parser.overrides_parser import OverridesParser

            (word,) = shlex.split(line.split("Quote it: ")[1])
            assert OverridesParser.create().parse_override(word).value() == f"{tmp_path}/été"


if __name__ == "__main__":  # pragma: no cover
    sys.exit(pytest.main([__file__, "-m", "faults"]))


@pytest.fixture
def read_only(tmp_path):
    """``mount(folder)`` makes a read-only view of ``folder`` (a bind mount; root) and returns its path."""
    mounted: list[Path] = []

    def mount(folder: Path) -> Path:
        view = tmp_path / f"read-only-{len(mounted)}"
        view.mkdir()
        for args in (["--bind", str(folder), str(view)], ["-o", "remount,bind,ro", str(view)]):
            if subprocess.run(["mount", *args], capture_output=True).returncode != 0:
                pytest.skip("a read-only bind mount needs root and mount(8)")
        mounted.append(view)
        return view

    yield mount
    for view in mounted:
        subprocess.run(["umount", str(view)], check=False)


def test_a_read_only_run_folder_is_evaluated_elsewhere_and_never_trained_in(finished, cache, tmp_path, read_only):
    view = read_only(copy_of(finished, tmp_path))
    rc, _, err = tool("evaluate", f"run_dir={view}", "trainer.enable_progress_bar=false")
    line = err.strip().splitlines()[-1]
    assert rc == 2 and "is not writable" in line and "set out_dir" in line and "Traceback" not in err, err[-2000:]
    TABLE.append(("evaluate on a read-only run folder", short(line, tmp_path), "2"))
    rc, _, err = tool(
        "evaluate", f"run_dir={view}", f"out_dir={tmp_path / 'scores'}", "trainer.enable_progress_bar=false"
    )
    assert rc == 0 and (tmp_path / "scores" / "eval_metrics.json").is_file(), err[-2000:]

    rc, out, _ = run(*base_overrides(cache, view, "resume=true", "trainer.max_steps=3"))
    line = out.strip().splitlines()[-1]  # said before Hydra starts: a plain line
    assert rc == 2 and "is read-only" in line and "copy it" in line and "Traceback" not in out, out[-2000:]
    TABLE.append(("resume=true in a read-only run folder", short(line, tmp_path), "2"))


def test_a_read_only_datasets_cache_is_named_and_leaves_no_run_folder(cache, tmp_path, read_only):
    import pandas as pd
    from PIL import Image

    Image.new("RGB", (64, 64), (200, 30, 30)).save(tmp_path / "red.png")
    picture = {"bytes": (tmp_path / "red.png").read_bytes(), "path": None}
    pd.DataFrame([{"question": "What color?", "answer": "red", "image": picture}] * 8).to_parquet(
        tmp_path / "qa.parquet"
    )
    hf_home = tmp_path / "hf"
    hf_home.mkdir()
    run_dir = tmp_path / "run"
    view = read_only(hf_home)
    env = {"HF_HOME": str(view), "HF_DATASETS_CACHE": str(view / "datasets")}
    rc, out, _ = run(*base_overrides(cache, run_dir, "data=hub", f"data.path={tmp_path / 'qa.parquet'}"), env=env)
    line = last_error_line(out)
    assert rc == 2 and "could not write its cache" in line and "set HF_DATASETS_CACHE" in line, out[-2000:]
    assert not run_dir.exists()  # a refused run leaves no folder behind
    TABLE.append(("a read-only HF_HOME (datasets' cache)", short(line, tmp_path), "2"))


# ---------------------------------------------------------------- 5. documented data works, bad data is named
def test_the_projects_own_jsonl_streams_shuffled_and_numbers_are_answers(cache, tmp_path):
    data = jsonl_data(tmp_path / "data", n=16)
    rc, out, _ = run(
        *base_overrides(cache, tmp_path / "stream", "data=hub", f"data.path={data}", "data.streaming=true")
    )
    assert rc == 0 and "not a trl row" not in out, out[-3000:]
    assert "shuffled within a buffer of 1,000 records" in out
    TABLE.append(("data.streaming=true on the project's TRL JSONL", "trains; the log says the shuffle buffer", "0"))

    import pandas as pd
    from PIL import Image

    Image.new("RGB", (64, 64), (200, 30, 30)).save(tmp_path / "red.png")
    picture = {"bytes": (tmp_path / "red.png").read_bytes(), "path": None}
    numbers = [{"question": "How many sides?", "answer": a, "image": picture} for a in (3, 4, 2.5, 3.0) * 4]
    pd.DataFrame(numbers).to_parquet(tmp_path / "numbers.parquet")
    qa = ["data=hub", "data.answer_column=answer"]
    overrides = base_overrides(cache, tmp_path / "numbers", *qa, f"data.path={tmp_path / 'numbers.parquet'}")
    rc, out, _ = run(*overrides)
    assert rc == 0 and "TypeError" not in out, out[-3000:]
    TABLE.append(("numeric answers in a question/answer table", "read as text (3, 2.5, 3.0 -> '3')", "0"))

    pd.DataFrame([*numbers, {"question": "How many?", "answer": float("nan"), "image": picture}]).to_parquet(
        tmp_path / "nan.parquet"
    )
    rc, out, _ = run(
        *base_overrides(
            cache, tmp_path / "nan", *qa, f"data.path={tmp_path / 'nan.parquet'}", "data.on_bad_sample=raise"
        )
    )
    line = last_error_line(out)
    assert rc == 2 and "nan.parquet" in line and "answer" in line and "Traceback" not in out, out[-3000:]
    TABLE.append(("a NaN answer, data.on_bad_sample=raise", short(line, tmp_path), "2"))


def test_a_mixture_source_of_bad_records_and_a_batch_that_never_fits_are_refused(cache, tmp_path):
    good = jsonl_data(tmp_path / "good", n=8)
    bad = tmp_path / "bad" / "train.jsonl"
    bad.parent.mkdir()
    bad.write_text(good.read_text().replace("good.png", "nowhere.png"))  # every record: a missing image
    mixture = (
        f"+data.mixture=[{{name: fine, path: '{good}', weight: 0.5}}, {{name: broken, path: '{bad}', weight: 0.5}}]"
    )
    rc, out, _ = run(*base_overrides(cache, tmp_path / "mix", "data=hub", f"data.path={good}", mixture))
    line = last_error_line(out)
    assert rc == 2 and "broken" in line and "image not found" in line, out[-3000:]
    TABLE.append(("a mixture source whose records are all bad", short(line, tmp_path), "2"))

    rc, out, _ = run(*base_overrides(cache, tmp_path / "auto", "data.batch_size=auto", "plan.gpu_gb=0.001"))
    line = last_error_line(out)
    assert rc == 2 and "not even a batch of 1 fits" in line and "fits (" not in out, out[-3000:]
    TABLE.append(("data.batch_size=auto when batch 1 does not fit", short(line, tmp_path), "2"))


def test_ddp_validation_keeps_every_question_when_ids_repeat(cache, tmp_path):
    from idefics2_ft.demo import formats

    files = {}
    for split in ("train", "test"):
        path = formats.write_llava(tmp_path / "llava", rows=24 if split == "train" else 12, split=split)
        rows = json.loads(path.read_text())
        for i, row in enumerate(rows):
            row["id"] = f"image-{i // 4}"  # LLaVA-style: one id per image, several questions each
        path.write_text(json.dumps(rows))
        files[split] = path
    data = ["data=jsonl", f"data.train_file={files['train']}", f"data.val_file={files['test']}"]
    extra = [
        "strategy=ddp",
        "trainer.devices=2",
        "trainer.accelerator=cpu",
        "data.batch_size=2",
        "data.eval_batch_size=5",
    ]
    rc, out, _ = run(*base_overrides(cache, tmp_path / "run", *data, *extra))
    assert rc == 0, out[-3000:]
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    predictions = (tmp_path / "run" / "predictions.jsonl").read_text().splitlines()
    assert metrics["val/n_questions"] == 12 and len(predictions) == 12
    TABLE.append(("DDP validation with ids repeated per image", "12 of 12 questions scored and predicted", "0"))


def test_a_stopped_resume_prints_its_own_command_and_it_finishes_the_resumed_schedule(finished, cache, tmp_path):
    run_dir = copy_of(finished, tmp_path)
    resumed = base_overrides(cache, run_dir, "resume=true", "trainer.max_steps=6", "trainer.checkpoint_every_n_steps=1")
    rc, out, _ = run(*resumed, "debug.stop_at=checkpoint")
    line = stop_line(out)
    assert rc == 143 and "trainer.max_steps=6" in line and "debug.stop_at" not in line, out[-3000:]
    command = shlex.split(line.split("Continue with: ", 1)[1].rstrip("."))
    rc, stdout, stderr = tool(command[1], *command[2:])
    assert rc == 0, (stdout + stderr)[-3000:]
    assert json.loads((run_dir / "metrics.json").read_text())["train/steps"] == 6
    assert "trainer.max_steps=6" in (run_dir / "command.txt").read_text()  # the newest part's command
    TABLE.append(("a stopped resume's continue command", "carries the resume's own overrides; it finishes", "0"))
