"""Fault injection through `python train.py`, as a user meets faults (`make test-faults`).

Every bad input is generated here and run in both `data.on_bad_sample` modes; runs are killed with
SIGKILL at random points and once in the middle of a checkpoint save (with $TMPDIR on another
filesystem), then resumed; a run is made to diverge; a finished run's folder is reused. For each
case the test asserts what the user sees (a named count, or one line naming the file, the line
and the fix), that a resumed adapter equals the uninterrupted one, and that nothing is lost or
silently replaced. The table of cases is written to outputs/fault_table.md (`make test-faults`
prints it).
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from idefics2_ft.run_folder import run_outputs
from tests.helpers import IDEFICS2_FT, ROOT, TINY_RUN, CaseTable

pytestmark = pytest.mark.faults

# the rows of outputs/fault_table.md, whole under `pytest -n 2` (CaseTable in tests/helpers.py)
TABLE = CaseTable("fault_table.md", ("case", "what the user sees", "time to error", "nothing lost"))


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("tiny_base")


def train_py(*overrides: str, env: dict | None = None, wrapper: str | None = None, **popen) -> subprocess.Popen:
    args = [sys.executable, *([wrapper] if wrapper else []), str(ROOT / "train.py"), *overrides]
    full_env = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}
    return subprocess.Popen(
        args, cwd=ROOT, env=full_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **popen
    )


def run(*overrides: str, **kw) -> tuple[int, str, float]:
    start = time.perf_counter()
    proc = train_py(*overrides, **kw)
    out, _ = proc.communicate(timeout=600)
    return proc.returncode, out, time.perf_counter() - start


def base_overrides(cache: Path, run_dir: Path, *extra: str) -> list[str]:
    return [*TINY_RUN, f"model.tiny.cache_dir={cache}", f"run_dir={run_dir}", "trainer.max_steps=2", *extra]


def short(line: str, tmp_path: Path, width: int = 220) -> str:
    """The line as the table shows it: the test's temporary folder as `<tmp>`, at most `width` characters."""
    line = line.replace(str(tmp_path), "<tmp>")
    return line if len(line) <= width else line[: width - 3] + "..."


def last_error_line(out: str) -> str:
    lines = [line for line in out.splitlines() if "ERROR" in line]
    return lines[-1].split(" - ", 1)[-1] if lines else ""


# ---------------------------------------------------------------- bad inputs, both modes
def _image(folder: Path, name: str, kind: str = "rgb") -> str:
    if kind == "corrupt":
        (folder / name).write_bytes(b"\x89PNG but not really")
    elif kind == "16bit":
        Image.fromarray(np.full((64, 64), 30000, dtype=np.uint16)).save(folder / name)
    else:
        Image.new("RGB", (64, 64), (200, 30, 30)).save(folder / name)
    return name


def _record(image: str | None, question="What color is the shape?", answer="red", role="assistant", images=None):
    content = ([{"type": "image"}] if image else []) + [{"type": "text", "text": question}]
    messages = [{"role": "user", "content": content}]
    if answer is not None:
        messages.append({"role": role, "content": [{"type": "text", "text": answer}]})
    return {"images": images if images is not None else ([image] if image else []), "messages": messages}


# case name -> (the bad line, the kind counted in skip mode, what the raise-mode line must say);
# a kind of None: the input is fine and must train (a 16-bit image) or is refused in both modes.
def bad_inputs(folder: Path) -> dict[str, tuple]:
    good = _image(folder, "good.png")
    return {
        "missing image file": (_record("nowhere.png"), "missing_image", "image not found"),
        "corrupt image file": (
            _record(_image(folder, "corrupt.png", "corrupt")),
            "unreadable_image",
            "unreadable image",
        ),
        "16-bit grayscale image": (_record(_image(folder, "scan16.png", "16bit")), None, None),
        "unknown role": (_record(good, role="bot"), "unknown_role", "unknown role"),
        "no assistant turn": (_record(good, answer=None), "no_assistant_turn", "no assistant turn"),
        "empty answer": (_record(good, answer=""), "empty_answer", "empty assistant answer"),
        "more placeholders than images": (_record(good, images=[]), "too_many_placeholders", "image placeholders"),
        "more images than placeholders": (_record(good, images=[good, good]), "too_many_images", "images but 1"),
        "answer cut by max_length": (
            _record(good, answer="a long answer " * 40),
            "answer_truncated",
            "cut by max_length",
        ),
    }


def write_case(folder: Path, bad: dict, n_good: int = 7) -> Path:
    good = _record(_image(folder, "good.png"))
    path = folder / "train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in [good] * 3 + [bad] + [good] * (n_good - 3)))
    return path


@pytest.mark.parametrize("mode", ["skip", "raise"])
@pytest.mark.parametrize(
    "case",
    [
        "missing image file",
        "corrupt image file",
        "16-bit grayscale image",
        "unknown role",
        "no assistant turn",
        "empty answer",
        "more placeholders than images",
        "more images than placeholders",
        "answer cut by max_length",
    ],
)
def test_bad_input(case, mode, cache, tmp_path):
    folder = tmp_path / "data"
    folder.mkdir()
    bad, kind, says = bad_inputs(folder)[case]
    data = write_case(folder, bad)
    max_length = ["data.max_length=60"] if case == "answer cut by max_length" else []
    run_dir = tmp_path / "run"
    overrides = base_overrides(
        cache, run_dir, "data=jsonl", f"data.train_file={data}", f"data.val_file={data}",
        f"data.on_bad_sample={mode}", "data.batch_size=8", *max_length,
    )  # fmt: skip
    rc, out, seconds = run(*overrides)
    if kind is None:  # a fine input: it trains, nothing is skipped
        assert rc == 0, out[-2000:]
        metrics = json.loads((run_dir / "metrics.json").read_text())
        assert metrics["data/skipped"] == 0
        TABLE.append((f"{case} ({mode})", "trains; read as faithful 8-bit RGB, nothing skipped", "-", "yes"))
        return
    if mode == "skip":
        assert rc == 0, out[-2000:]
        metrics = json.loads((run_dir / "metrics.json").read_text())
        assert metrics[f"data/skipped/train/{kind}"] == 1, metrics  # one record, counted once, named
        seen = f"trains; metrics.json data/skipped/train/{kind}=1 and a warning naming it"
        TABLE.append((f"{case} (skip)", seen, "-", "yes"))
    else:
        assert rc == 2, out[-2000:]
        line = last_error_line(out)
        assert "train.jsonl:4: " in line and says in line, line  # the file, the line, what is wrong
        assert "data.on_bad_sample=skip" in line  # and the fix
        assert "Traceback" not in out
        assert run_outputs(run_dir) == []  # refused before any weight loaded: no checkpoint, no adapter
        TABLE.append((f"{case} (raise)", short(line, tmp_path), f"{seconds:.0f} s", "yes"))


@pytest.mark.parametrize(
    "case, content, says",
    [
        ("non-UTF-8 line", b'{"messages": []}\n{"x": "caf\xe9"}\n', "val.jsonl:2: not UTF-8"),
        ("invalid JSON line", b'{"messages": [}\n', "val.jsonl:1: not valid JSON"),
    ],
)
@pytest.mark.parametrize("mode", ["skip", "raise"])
def test_unreadable_validation_file_fails_before_any_training(case, content, says, mode, cache, tmp_path):
    folder = tmp_path / "data"
    folder.mkdir()
    train_file = write_case(folder, _record(_image(folder, "good.png")))
    (folder / "val.jsonl").write_bytes(content)
    run_dir = tmp_path / "run"
    overrides = base_overrides(
        cache, run_dir, "data=jsonl", f"data.train_file={train_file}", f"data.val_file={folder / 'val.jsonl'}",
        f"data.on_bad_sample={mode}", "model.tiny.vision_pretrain_steps=50",  # stage 1 would run for a while
        f"model.tiny.cache_dir={tmp_path / 'fresh'}",
    )  # fmt: skip
    rc, out, seconds = run(*overrides)
    assert rc == 2 and says in last_error_line(out) and "Traceback" not in out
    assert not (tmp_path / "fresh").exists()  # stage 1 never started
    TABLE.append(
        (f"{case} in the validation file ({mode})", short(last_error_line(out), tmp_path), f"{seconds:.0f} s", "yes")
    )


# ---------------------------------------------------------------- kills and resumes
KILL_IN_SAVE = """
import os, runpy, signal, sys, torch
from idefics2_ft.training import checkpoints

step = int(os.environ["KILL_AT_SAVE_OF_STEP"])
real_save = torch.save
def save(obj, f, *a, **k):
    if isinstance(obj, dict) and obj.get("global_step") == step:
        real_save({"half": torch.zeros(10)}, f)   # part of the file is on disk...
        f.flush()
        os.kill(os.getpid(), signal.SIGKILL)      # ...when the kill comes
    return real_save(obj, f, *a, **k)
checkpoints.torch.save = save
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def adapter(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(run_dir / "adapter" / "adapter_model.safetensors")


def same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


RESUMABLE = ("trainer.max_steps=8", "trainer.checkpoint_every_n_steps=1", "peft.dropout=0.1", "eval.at_end=false")


@pytest.fixture(scope="module")
def uninterrupted(cache, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("straight") / "run"
    rc, out, _ = run(*base_overrides(cache, run_dir, *RESUMABLE))
    assert rc == 0, out[-2000:]
    return adapter(run_dir)


def test_a_kill_during_a_checkpoint_save_with_tmpdir_elsewhere(cache, tmp_path, uninterrupted):
    run_dir = tmp_path / "run"
    wrapper = tmp_path / "kill_in_save.py"
    wrapper.write_text(KILL_IN_SAVE)
    env = {"KILL_AT_SAVE_OF_STEP": "4", "TMPDIR": "/dev/shm"}  # a tmpfs: another filesystem than the run folder
    rc, out, _ = run(*base_overrides(cache, run_dir, *RESUMABLE), env=env, wrapper=str(wrapper))
    assert rc == -signal.SIGKILL
    checkpoints = run_dir / "checkpoints"
    kept = torch.load(checkpoints / "last.ckpt", weights_only=False)
    assert kept["global_step"] == 3  # the previous checkpoint, whole
    assert [p.name for p in checkpoints.iterdir() if ".tmp-" in p.name]  # the killed save's partial file
    rc, out, _ = run(*base_overrides(cache, run_dir, *RESUMABLE, "resume=true"), env={"TMPDIR": "/dev/shm"})
    assert rc == 0, out[-2000:]
    assert "partial checkpoint file" in out
    assert not [p for p in checkpoints.iterdir() if ".tmp-" in p.name]
    assert same(adapter(run_dir), uninterrupted)
    TABLE.append(
        (
            "kill -9 during a checkpoint save, $TMPDIR on tmpfs",
            "resume=true continues from the step before; the partial file is removed with a warning",
            "-",
            "yes (adapter equal to the uninterrupted run's)",
        )
    )


def test_kills_at_random_points_then_resume(cache, tmp_path, uninterrupted):
    rng = random.Random(11)
    run_dir = tmp_path / "run"
    last = run_dir / "checkpoints" / "last.ckpt"
    proc = train_py(*base_overrides(cache, run_dir, *RESUMABLE))
    kills = 0
    for _ in range(2):
        started = time.time()
        while proc.poll() is None and not (last.is_file() and last.stat().st_mtime > started):
            time.sleep(0.02)  # training under way: a checkpoint newer than this process's start
        time.sleep(rng.uniform(0.0, 0.3))
        if proc.poll() is not None:
            break  # it finished first
        proc.send_signal(signal.SIGKILL)
        proc.communicate(timeout=60)
        kills += 1
        proc = train_py(*base_overrides(cache, run_dir, *RESUMABLE, "resume=true"))
    out, _ = proc.communicate(timeout=600)
    assert kills >= 1 and proc.returncode == 0, out[-2000:]
    assert same(adapter(run_dir), uninterrupted)
    seen = f"resume=true continues after each of {kills} kills; the adapter equals the uninterrupted run's"
    TABLE.append((f"kill -9 at random points ({kills} kills)", seen, "-", "yes"))


# ---------------------------------------------------------------- divergence, reuse
def test_a_diverging_run_stops_at_once_and_keeps_the_last_good_checkpoint(cache, tmp_path):
    run_dir = tmp_path / "run"
    overrides = base_overrides(
        cache, run_dir, "optim.lr=1e20", "optim.warmup_steps=0", "trainer.gradient_clip_val=null",
        "trainer.max_steps=20", "trainer.checkpoint_every_n_steps=1",
    )  # fmt: skip
    rc, out, seconds = run(*overrides)
    line = last_error_line(out)
    assert rc == 3 and "Training diverged" in line and "Traceback" not in out
    assert not (run_dir / "adapter").exists() and not (run_dir / "metrics.json").exists()
    last = run_dir / "checkpoints" / "last.ckpt"
    if last.is_file():
        state = torch.load(last, weights_only=False)["state_dict"]
        assert all(torch.isfinite(v).all() for v in state.values())
    TABLE.append(
        (
            "divergence (lr 1e20)",
            short(line, tmp_path),
            f"{seconds:.0f} s",
            "yes (last good checkpoint kept, no NaN adapter)",
        )
    )


def test_reusing_a_finished_runs_folder_is_refused_untouched(cache, tmp_path):
    run_dir = tmp_path / "run"
    rc, out, _ = run(*base_overrides(cache, run_dir))
    assert rc == 0, out[-2000:]
    before = {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()}
    rc, out, seconds = run(*base_overrides(cache, run_dir, "seed=3"))
    line = last_error_line(out)
    assert rc == 2 and "already holds a run" in line and "resume=true" in line and "overwrite=true" in line
    assert {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()} == before
    TABLE.append(
        ("reusing a finished run's folder", short(line, tmp_path), f"{seconds:.0f} s", "yes (not a byte changed)")
    )


# ---------------------------------------------------------------- one run, one history
def snapshot(run_dir: Path) -> dict:
    return {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()}


def cli(*args: str, env: dict | None = None) -> tuple[int, str, float]:
    """``idefics2-ft ARGS`` as a user types it: the return code, stdout and stderr together, seconds."""
    start = time.perf_counter()
    done = subprocess.run(
        [IDEFICS2_FT, *args], cwd=ROOT, env={**os.environ, **(env or {})}, capture_output=True, text=True, timeout=600
    )
    return done.returncode, done.stdout + done.stderr, time.perf_counter() - start


def jsonl_data(folder: Path, n: int = 8, answer: str = "red") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    good = _record(_image(folder, "good.png"), answer=answer)
    path = folder / "train.jsonl"
    path.write_text("".join(json.dumps(good) + "\n" for _ in range(n)))
    return path


def jsonl_overrides(cache: Path, run_dir: Path, data: Path, *extra: str) -> list[str]:
    return base_overrides(
        cache, run_dir, "data=jsonl", f"data.train_file={data}", f"data.val_file={data}", "data.batch_size=4", *extra
    )


@pytest.fixture(scope="module")
def stopped_run(cache, tmp_path_factory):
    """A run stopped by a crash at step 2 (last.ckpt holds step 2), never finished: for the tools."""
    run_dir = tmp_path_factory.mktemp("crashed") / "run"
    rc, out, _ = run(*base_overrides(cache, run_dir, *RESUMABLE, "debug.crash_at_step=3"))
    assert rc != 0 and (run_dir / "checkpoints" / "last.ckpt").is_file(), out[-2000:]
    return run_dir


def test_a_resume_with_a_new_lr_follows_it_and_records_the_change(cache, tmp_path):
    run_dir = tmp_path / "run"
    first = base_overrides(cache, run_dir, "trainer.max_steps=3", "trainer.checkpoint_every_n_steps=1")
    rc, out, _ = run(*first)
    assert rc == 0, out[-2000:]
    config = (run_dir / "config.yaml").read_bytes()
    rc, out, _ = run(*first, "trainer.max_steps=6", "optim.lr=2e-4", "optim.scheduler=constant", "resume=true")
    assert rc == 0, out[-2000:]
    assert (run_dir / "config.yaml").read_bytes() == config  # the first part's config, kept as it was
    [entry] = [json.loads(line) for line in (run_dir / "resumes.jsonl").read_text().splitlines()]
    assert entry["changed"]["optim.lr"] == [1e-3, 2e-4] and entry["changed"]["trainer.max_steps"] == [3, 6]
    assert "lr: 0.001 -> 0.0002" in out
    history = [json.loads(line) for line in (run_dir / "history.jsonl").read_text().splitlines()]
    lrs = {row["step"]: row["train/lr"] for row in history if "train/lr" in row}
    assert lrs[4] == pytest.approx(2e-4) and lrs[6] == pytest.approx(2e-4)  # the new lr trains, constant
    TABLE.append(
        (
            "resume=true with a new optim.lr (and max_steps)",
            "the new lr trains from the restored step; config.yaml kept, config.resume-1.yaml and resumes.jsonl "
            "say what changed",
            "-",
            "yes",
        )
    )


@pytest.mark.parametrize(
    "case, change, says",
    [
        ("another data.train_file", "data.train_file", "resume_changes=[data.train_file]"),
        ("the same file edited", "edit", "data (files) changed"),
        ("peft.r changed", "peft.r=4", "peft.r changed (16 -> 4)"),
        ("seed changed", "seed=5", "seed changed (0 -> 5)"),
    ],
)
def test_a_resume_that_would_mix_two_experiments_is_refused_untouched(case, change, says, cache, tmp_path):
    data = jsonl_data(tmp_path / "data")
    run_dir = tmp_path / "run"
    first = jsonl_overrides(cache, run_dir, data, "trainer.max_steps=2", "trainer.checkpoint_every_n_steps=1")
    rc, out, _ = run(*first)
    assert rc == 0, out[-2000:]
    extra = []
    if change == "data.train_file":
        other = jsonl_data(tmp_path / "other", n=9)
        extra = [f"data.train_file={other}"]
    elif change == "edit":
        data.write_text(data.read_text() + data.read_text().splitlines()[0] + "\n")  # one more line
    else:
        extra = [change]
    before = snapshot(run_dir)
    rc, out, seconds = run(*first, "trainer.max_steps=4", *extra, "resume=true")
    line = out[out.rfind("ERROR") :]
    assert rc == 2 and says in line and "Traceback" not in out, out[-3000:]
    assert snapshot(run_dir) == before  # a refused resume changes nothing in the folder
    TABLE.append(
        (
            f"resume=true with {case}",
            short(line.split("\n", 1)[-1].strip(" -"), tmp_path),
            f"{seconds:.0f} s",
            "yes (not a byte changed)",
        )
    )
    if change == "data.train_file":  # accepted when asked: it trains on the new file and says so
        rc, out, _ = run(*first, "trainer.max_steps=4", *extra, "resume=true", "resume_changes=[data.train_file]")
        assert rc == 0, out[-2000:]
        [entry] = [json.loads(x) for x in (run_dir / "resumes.jsonl").read_text().splitlines()]
        assert entry["changed"]["data.train_file"] == [str(data), str(other)]
        TABLE.append(
            ("... with resume_changes=[data.train_file]", "trains on; resumes.jsonl records the change", "-", "yes")
        )


def test_two_runs_into_one_folder_the_second_is_refused_naming_the_first(cache, tmp_path):
    run_dir = tmp_path / "run"
    overrides = base_overrides(cache, run_dir, "trainer.max_steps=400", "trainer.checkpoint_every_n_steps=1")
    first = train_py(*overrides)
    lock = run_dir / ".lock"
    while first.poll() is None and not lock.is_file():
        time.sleep(0.05)
    rc, out, seconds = run(*overrides, "trainer.max_steps=4")
    line = last_error_line(out)
    assert rc == 2 and f"in use by pid {first.pid}" in line and "choose another run_dir" in line, out[-2000:]
    assert seconds < 60
    TABLE.append(("a second run into a run_dir in use", short(line, tmp_path), f"{seconds:.0f} s", "yes"))
    while first.poll() is None and not (run_dir / "checkpoints" / "last.ckpt").is_file():
        time.sleep(0.05)
    first.send_signal(signal.SIGKILL)  # a stale lock: the kernel released it with the process
    first.communicate(timeout=60)
    # a few steps past wherever the first run got to (a resume may not set max_steps below it)
    step = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=False)["global_step"]
    rc, out, _ = run(*overrides, f"trainer.max_steps={step + 2}", "resume=true")
    assert rc == 0, out[-2000:]
    assert lock.read_text() == ""  # released: the file stays (never unlinked: see FolderLock), naming nobody
    TABLE.append(("resume=true after the owner was killed -9", "continues: the lock died with the process", "-", "yes"))


@pytest.mark.parametrize("signum, code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_sigterm_and_sigint_stop_at_a_step_save_and_exit_honestly(signum, code, cache, tmp_path, uninterrupted):
    run_dir = tmp_path / "run"
    proc = train_py(*base_overrides(cache, run_dir, *RESUMABLE))
    last = run_dir / "checkpoints" / "last.ckpt"
    while proc.poll() is None and not last.is_file():
        time.sleep(0.02)
    proc.send_signal(signum)
    out, _ = proc.communicate(timeout=120)
    name = signal.Signals(signum).name
    line = last_error_line(out)
    assert proc.returncode == code, out[-3000:]
    step = int(line.split(" at step ")[1].split(";")[0])
    assert line.startswith(f"Stopped by {name} during fit, at step {step}; ") and f"holds step {step}" in line
    assert "Continue with: idefics2-ft train" in line and line.endswith("resume=true.")
    assert torch.load(last, weights_only=False)["global_step"] == step
    rc, out, _ = run(*base_overrides(cache, run_dir, *RESUMABLE, "resume=true"))
    assert rc == 0, out[-2000:]
    assert same(adapter(run_dir), uninterrupted)  # the stop did not break the exact resume
    TABLE.append(
        (
            f"{name} during training",
            short(line, tmp_path),
            f"exit {code}",
            "yes (resume gives the uninterrupted adapter)",
        )
    )


DISK_FULL_AT_SAVE = """
import errno, os, runpy, sys, torch
from idefics2_ft.training import checkpoints

step = int(os.environ["FULL_AT_SAVE_OF_STEP"])
real_save = torch.save
def save(obj, f, *a, **k):
    if isinstance(obj, dict) and obj.get("global_step", 0) >= step:
        raise OSError(errno.ENOSPC, "No space left on device")
    return real_save(obj, f, *a, **k)
checkpoints.torch.save = save
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def test_a_full_disk_during_a_save_says_the_previous_checkpoint_is_intact(cache, tmp_path):
    run_dir = tmp_path / "run"
    wrapper = tmp_path / "disk_full.py"
    wrapper.write_text(DISK_FULL_AT_SAVE)
    rc, out, seconds = run(
        *base_overrides(cache, run_dir, *RESUMABLE), env={"FULL_AT_SAVE_OF_STEP": "3"}, wrapper=str(wrapper)
    )
    line = last_error_line(out)
    assert rc == 1 and "No space left on device" in line and "last.ckpt, is intact" in line, out[-3000:]
    assert "Traceback" not in out and len(out.splitlines()) < 80
    assert torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=False)["global_step"] == 2
    assert "Traceback" in (run_dir / "train.log").read_text()  # the tracebacks are in the log file
    TABLE.append(("a full disk during a save", short(line, tmp_path), f"{seconds:.0f} s", "yes (last.ckpt of step 2)"))


def test_evaluate_refuses_a_split_a_jsonl_run_does_not_have(cache, tmp_path):
    data = jsonl_data(tmp_path / "data")
    run_dir = tmp_path / "run"
    rc, out, _ = run(*jsonl_overrides(cache, run_dir, data))
    assert rc == 0, out[-2000:]
    rc, out, seconds = cli("evaluate", f"run_dir={run_dir}", "data.split=test")
    line = out.strip().splitlines()[-1]
    assert rc == 2 and "a JSONL run's splits are its files" in line and "data.val_file=FILE" in line, out[-2000:]
    assert not (run_dir / "eval").exists()
    TABLE.append(("evaluate data.split=test on a JSONL run", short(line, tmp_path), f"{seconds:.0f} s", "yes"))


def test_a_run_that_was_never_validated_says_so(cache, tmp_path):
    folder = tmp_path / "data"
    data = jsonl_data(folder)
    val = folder / "val.jsonl"
    val.write_text(json.dumps(_record("nowhere.png")) + "\n")  # its only record is bad
    run_dir = tmp_path / "run"
    # a validation split whose every record is bad is refused before anything trains: nothing would be scored
    rc, out, _ = run(*base_overrides(cache, run_dir, "data=jsonl", f"data.train_file={data}", f"data.val_file={val}"))
    line = last_error_line(out)
    assert rc == 2 and "all 1 val records are bad" in line and "val.jsonl:1" in line, out[-2000:]
    TABLE.append(("a validation file whose every record is bad", short(line, tmp_path), "-", "yes"))
    # a run that skips its validation (eval.at_end=false, no validation during the fit) says so everywhere
    rc, out, _ = run(
        *base_overrides(
            cache, run_dir, "data=jsonl", f"data.train_file={data}", f"data.val_file={data}", "eval.at_end=false"
        )
    )
    assert rc == 0, out[-2000:]
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["validation"].startswith("never validated") and "This run was never validated" in out
    assert "never validated" in (run_dir / "report.html").read_text()
    TABLE.append(("a run never validated", "the log, metrics.json and report.html say: never validated", "-", "yes"))


def test_an_invalid_repo_id_fails_before_anything_trains(cache, tmp_path):
    run_dir = tmp_path / "run"
    env = {"HF_TOKEN": "hf_fake", "HF_HUB_OFFLINE": "1"}
    rc, out, seconds = run(
        *base_overrides(cache, run_dir, "export.push_to_hub=true", "export.hub.repo_id=me/bad name"), env=env
    )
    line = last_error_line(out)
    assert rc == 2 and "is not a valid Hub repo id" in line and "export.hub.repo_id" in line, out[-2000:]
    assert run_outputs(run_dir) == []
    TABLE.append(("an invalid export.hub.repo_id", short(line, tmp_path), f"{seconds:.0f} s", "yes (nothing trained)"))


@pytest.mark.parametrize("command", ["evaluate", "export", "predict"])
def test_tools_on_an_unfinished_run_name_its_checkpoint_and_the_resume_command(command, stopped_run):
    image = _image(stopped_run.parent, "x.png")
    extra = [f"image={stopped_run.parent / image}", "question=what?"] if command == "predict" else []
    rc, out, seconds = cli(command, f"run_dir={stopped_run}", *extra)
    line = out.strip().splitlines()[-1]
    assert rc != 0 and "did not finish" in line and "last.ckpt" in line and "resume=true" in line, out[-2000:]
    assert "idefics2-ft train" in line and "Traceback" not in out
    TABLE.append((f"{command} on an unfinished run", short(line, stopped_run.parent), f"{seconds:.0f} s", "yes"))


@pytest.mark.parametrize("case", ["missing", "empty", "url"])
def test_predict_with_a_bad_image_says_so_in_one_line(case, stopped_run, tmp_path):
    image = {
        "missing": str(tmp_path / "nowhere.png"),
        "empty": str(tmp_path / "empty.png"),
        "url": "https://x.org/a.png",
    }[case]
    if case == "empty":
        Path(image).write_bytes(b"")
    rc, out, seconds = cli("predict", f"run_dir={stopped_run}", f"image={image}", "question=what?")
    assert rc == 2 and "Traceback" not in out, out[-2000:]
    line = out.strip().splitlines()[-1]
    assert line.startswith(f"predict failed: image={image}"), line
    TABLE.append((f"predict with a {case} image", short(line, tmp_path), f"{seconds:.0f} s", "yes"))


@pytest.mark.parametrize(
    "case, overrides, says",
    [
        (
            "data.max_length shorter than the image",
            ["data.max_length=4"],
            "data.max_length=4 leaves no room for an answer",
        ),
        ("data.max_train_samples=0", ["data.max_train_samples=0"], "data.max_train_samples=0: must be positive"),
    ],
)
def test_messages_name_the_key_and_the_fix(case, overrides, says, cache, tmp_path):
    run_dir = tmp_path / "run"
    rc, out, seconds = run(*base_overrides(cache, run_dir), *overrides)
    line = out[out.rfind("ERROR") :].split(" - ", 1)[-1].strip()
    assert rc == 2 and says in line and "BadSample(" not in out, out[-2000:]
    TABLE.append((case, short(line, tmp_path), f"{seconds:.0f} s", "yes"))


def test_a_jsonl_with_a_bom_trains_and_a_url_image_is_a_counted_bad_record(cache, tmp_path):
    data = jsonl_data(tmp_path / "data")
    lines = data.read_text().splitlines()
    url = _record("https://example.org/page.png")
    data.write_text("\ufeff" + "\n".join([*lines, json.dumps(url)]) + "\n", encoding="utf-8")
    run_dir = tmp_path / "run"
    rc, out, _ = run(*jsonl_overrides(cache, run_dir, data))
    assert rc == 0, out[-2000:]
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["data/skipped/train/image_url"] == 1 and "image URLs are not fetched" in out
    TABLE.append(("a JSONL saved with a BOM", "trains: the BOM is read", "-", "yes"))
    TABLE.append(
        ("an http:// image path", "a counted bad record: image URLs are not fetched, give its local path", "-", "yes")
    )


def test_exports_answer_in_a_plain_client_as_the_project_does(cache, tmp_path):
    from peft import PeftModel
    from transformers import (
        AutoModelForImageTextToText,
        AutoProcessor,
        BitsAndBytesConfig,
        GenerationConfig,
        Idefics2ForConditionalGeneration,
    )

    from idefics2_ft.cli.arguments import parse_overrides
    from idefics2_ft.data import build_rows, load_image
    from idefics2_ft.tasks.evaluate import answer, load_run

    run_dir = tmp_path / "run"
    rc, out, _ = run(*base_overrides(cache, run_dir, "trainer.max_steps=30", "optim.lr=5e-3", "data.max_val_samples=8"))
    assert rc == 0, out[-2000:]
    for args in ([], ["export.adapter_only=true", f"export.out_dir={run_dir / 'export-adapter'}"]):
        rc, out, _ = cli("export", f"run_dir={run_dir}", *args)
        assert rc == 0, out[-2000:]
    cfg, _ = parse_overrides([f"run_dir={run_dir}"], {})
    rows = [build_rows(cfg.data, "val")[i] for i in range(8)]

    def plain(model, processor, row) -> str:  # as the transformers docs show it: no arguments of ours
        prompt = processor.apply_chat_template(row.messages[:-1], add_generation_prompt=True)
        inputs = processor(text=[prompt], images=[[load_image(r) for r in row.images]], return_tensors="pt")
        out = model.generate(**inputs, max_new_tokens=16, do_sample=False)
        return processor.batch_decode(out[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)[0].strip()

    def ours(model, processor, row) -> str:
        return answer(
            model, processor, [load_image(r) for r in row.images], messages=row.messages[:-1], max_new_tokens=16
        )

    merged = AutoModelForImageTextToText.from_pretrained(run_dir / "export").eval()
    processor = AutoProcessor.from_pretrained(run_dir / "export")
    assert merged.generation_config.eos_token_id == [32002, 2]
    project, project_processor = load_run(cfg, model_dir=str(run_dir / "export"))
    agree_merged = sum(plain(merged, processor, r) == ours(project, project_processor, r) for r in rows)

    base_path = json.loads((run_dir / "base_model.json").read_text())["path"]
    quantized = BitsAndBytesConfig(  # the base as the recipe loads it (peft=qlora)
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.float32,
        llm_int8_skip_modules=["model.vision_model", "model.connector", "lm_head"],
    )
    base = Idefics2ForConditionalGeneration.from_pretrained(
        base_path, quantization_config=quantized, dtype=torch.float32
    )
    with_adapter = PeftModel.from_pretrained(base, run_dir / "export-adapter").eval()
    with_adapter.generation_config = GenerationConfig.from_pretrained(run_dir / "export-adapter")  # the card's line
    as_trained, trained_processor = load_run(cfg)
    adapter_processor = AutoProcessor.from_pretrained(run_dir / "export-adapter")
    agree_adapter = sum(
        plain(with_adapter, adapter_processor, r) == ours(as_trained, trained_processor, r) for r in rows
    )
    assert agree_merged == len(rows) and agree_adapter == len(rows), (agree_merged, agree_adapter)
    TABLE.append(
        (
            "the exports in plain transformers / peft, default generate()",
            f"the merged export agreed with the project's answers on {agree_merged} of {len(rows)}, the adapter "
            f"(plain peft on its 4-bit base) on {agree_adapter} of {len(rows)}: both stop at <end_of_utterance>",
            "-",
            "yes",
        )
    )
