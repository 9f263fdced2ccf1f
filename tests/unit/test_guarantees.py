"""The shared guarantees, each tested as a mechanism: the output writer never replaces what it did not
write and leaves nothing half-written, the folder lock has one owner among many processes, the signal
policy stops any phase with one line, a file's fingerprint is its content, the printed commands parse."""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from hydra.core.override_parser.overrides_parser import OverridesParser

from idefics2_ft.data.fingerprint import file_fingerprint, same_file
from idefics2_ft.run_folder import (
    MARKER,
    FolderLock,
    OutputRefused,
    RunFolder,
    RunFolderError,
    claim_output_file,
    hydra_arg,
    load_yaml,
    output_folder,
    remove_outputs,
    resume_command,
    write_base_record,
)
from idefics2_ft.run_folder.outputs import claim_output
from idefics2_ft.stops import Interrupted, StopPolicy
from tests.helpers import ROOT


def a_run(tmp_path: Path) -> Path:
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "checkpoints" / "last.ckpt").write_bytes(b"ckpt")
    (run / "adapter").mkdir()
    (run / "adapter" / "adapter_config.json").write_text("{}")
    (run / "config.yaml").write_text("seed: 0\n")
    write_base_record(run, {"path": "tiny"})
    return run


def tree(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def write(target, files: dict[str, str]) -> None:
    with target.writing() as folder:
        for name, text in files.items():
            (folder / name).write_text(text)


# ---------------------------------------------------------------- the output writer
def test_an_output_folder_appears_whole_and_replaces_only_an_earlier_one_of_the_same_kind_and_run(tmp_path):
    run = a_run(tmp_path)
    target = output_folder(run, run / "export", "export", "export.out_dir")
    assert not target.replaces
    write(target, {"model.safetensors": "one"})
    assert (run / "export" / "model.safetensors").read_text() == "one"
    assert json.loads((run / "export" / MARKER).read_text())["complete"] is True

    again = output_folder(run, run / "export", "export", "export.out_dir")
    assert again.replaces
    write(again, {"model.safetensors": "two"})
    assert (run / "export" / "model.safetensors").read_text() == "two"
    assert not list(run.glob(".export.partial-*"))  # no temporary folder left beside it

    # another kind in the same place is not replaced, and neither is another run's export
    with pytest.raises(OutputRefused, match="holds the export of this run: it is not replaced by this evaluation"):
        output_folder(run, run / "export", "evaluation", "out_dir")
    other = a_run(tmp_path / "other")
    with pytest.raises(OutputRefused, match="holds the export of another run"):
        output_folder(other, run / "export", "export", "export.out_dir")


@pytest.mark.parametrize(
    "where, says",
    [
        (".", "is the run folder itself"),
        ("..", "contains the run folder"),
        ("adapter", "lies in adapter, where the run keeps its own files"),
        ("checkpoints/x", "lies in checkpoints, where the run keeps its own files"),
        ("config.yaml", "lies in config.yaml"),
    ],
)
def test_the_run_folder_and_where_it_keeps_its_files_are_refused_before_any_work(tmp_path, where, says):
    run = a_run(tmp_path)
    before = tree(tmp_path)
    with pytest.raises(OutputRefused, match=says) as refused:
        output_folder(run, run / where, "export", "export.out_dir")
    assert "Nothing was written" in str(refused.value) and "export.out_dir=" in str(refused.value)
    assert tree(tmp_path) == before


def test_a_folder_holding_other_files_is_refused_naming_them_and_kept(tmp_path):
    run = a_run(tmp_path)
    theirs = tmp_path / "models"
    (theirs / "llama").mkdir(parents=True)
    (theirs / "notes.txt").write_text("mine")
    before = tree(theirs)
    with pytest.raises(OutputRefused, match=r"already holds files .*\(llama/, notes.txt\).*they are kept"):
        output_folder(run, theirs, "export", "export.out_dir")
    assert tree(theirs) == before
    (tmp_path / "empty").mkdir()
    assert not output_folder(run, tmp_path / "empty", "export", "export.out_dir").replaces  # an empty one is used
    (tmp_path / "a_file").write_text("x")
    with pytest.raises(OutputRefused, match="is a file"):
        output_folder(run, tmp_path / "a_file", "export", "export.out_dir")


def test_an_interrupted_write_leaves_no_output_and_the_earlier_one_intact(tmp_path):
    run = a_run(tmp_path)
    write(output_folder(run, run / "export", "export", "export.out_dir"), {"model.safetensors": "one"})
    target = output_folder(run, run / "export", "export", "export.out_dir")
    with pytest.raises(Interrupted), target.writing() as folder:
        (folder / "model.safetensors").write_text("half")
        raise Interrupted(signal.SIGTERM, "the export save")
    assert (run / "export" / "model.safetensors").read_text() == "one"
    assert sorted(p.name for p in run.iterdir() if p.name.startswith(".export")) == []


def test_a_partial_folder_a_killed_writer_left_is_removed_by_the_next_write_and_only_that(tmp_path):
    run = a_run(tmp_path)
    code = textwrap.dedent(
        f"""
        import os
        from idefics2_ft.run_folder import output_folder
        target = output_folder({str(run)!r}, {str(run / "export")!r}, "export", "export.out_dir")
        with target.writing() as folder:
            (folder / "model.safetensors").write_text("half")
            os.kill(os.getpid(), 9)
        """
    )
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=False)
    partial = list(run.glob(".export.partial-*"))
    assert len(partial) == 1 and not (run / "export").exists()  # a kill leaves no export, only our partial folder
    users = run / ".export.partial-notes"  # a name like ours without our marker: not ours to remove
    users.mkdir()
    write(output_folder(run, run / "export", "export", "export.out_dir"), {"model.safetensors": "whole"})
    assert not partial[0].exists() and users.is_dir()


def test_overwrite_removes_the_outputs_this_run_wrote_and_nothing_else(tmp_path):
    run = a_run(tmp_path)
    write(output_folder(run, run / "export-fp16", "export", "export.out_dir"), {"a": "1"})
    write(output_folder(run, run / "eval" / "test", "evaluation", "out_dir"), {"eval_metrics.json": "{}"})
    (run / "eval" / "my_notes.txt").write_text("mine")
    (run / "export_notes").mkdir()
    (run / "export_notes" / "todo.txt").write_text("mine")
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "model.bin").write_text("theirs")
    (run / "export").symlink_to(precious)  # a link named like an output: never followed
    removed, kept = remove_outputs(run)
    assert (
        not (run / "export-fp16").exists() and not (run / "adapter").exists() and not (run / "eval" / "test").exists()
    )
    assert (run / "export_notes" / "todo.txt").read_text() == "mine" and (run / "eval" / "my_notes.txt").is_file()
    assert (precious / "model.bin").read_text() == "theirs" and (run / "export").is_symlink()
    assert "eval/my_notes.txt" in kept and "export (a link: not followed)" in kept and "checkpoints/" in removed


def test_a_replaced_output_keeps_files_someone_added_and_a_mount_point_is_refused(tmp_path):
    run = a_run(tmp_path)
    write(output_folder(run, run / "export", "export", "export.out_dir"), {"model.safetensors": "one"})
    (run / "export" / "my_notes.md").write_text("mine")
    with pytest.raises(OutputRefused, match=r"files it did not write \(my_notes.md\).*they are kept"):
        output_folder(run, run / "export", "export", "export.out_dir")
    mount = tmp_path / "volume"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "tmpfs", str(mount)], capture_output=True).returncode != 0:
        return  # mounting needs root: the rest is checked where it runs as root (CI)
    try:
        with pytest.raises(OutputRefused, match="is a mount point.*give a subfolder"):
            output_folder(run, mount, "export", "export.out_dir")
    finally:
        subprocess.run(["umount", str(mount)], check=False)


def test_a_plan_file_replaces_only_an_earlier_plan(tmp_path):
    mine = tmp_path / "plan.json"
    assert claim_output_file(mine, "idefics2-ft plan", "plan.json") == mine
    mine.write_text(json.dumps({"written_by": "idefics2-ft plan"}))
    claim_output_file(mine, "idefics2-ft plan", "plan.json")
    theirs = tmp_path / "budget.json"
    theirs.write_text('{"gpus": 8}')
    with pytest.raises(OutputRefused, match="is not an earlier idefics2-ft plan: it is kept"):
        claim_output_file(theirs, "idefics2-ft plan", "plan.json")


def test_a_read_only_folder_is_refused_before_any_work_with_the_key_to_set(tmp_path):
    if os.geteuid() == 0:
        pytest.skip("root writes anywhere: the check is os.access, which root passes")
    run = a_run(tmp_path)
    os.chmod(run, 0o555)
    try:
        with pytest.raises(OutputRefused, match="not writable .* set out_dir"):
            claim_output(run / "eval" / "test", "evaluation", "x", "out_dir")
    finally:
        os.chmod(run, 0o755)


# ---------------------------------------------------------------- the folder lock
LOCK_TURNS = """
import json, os, sys, time
from idefics2_ft.run_folder import FolderLock
folder, seconds, log = sys.argv[1], float(sys.argv[2]), sys.argv[3]
end = time.time() + seconds
with open(log, "a") as out:
    while time.time() < end:
        lock = FolderLock(folder)
        if lock.acquire() is None:
            out.write(f"+ {os.getpid()} {time.monotonic_ns()}\\n"); out.flush()
            time.sleep(0.002)
            out.write(f"- {os.getpid()} {time.monotonic_ns()}\\n"); out.flush()
            lock.release()
            if os.getpid() % 2:
                lock.remove_folder_if_unused()  # the unlink path too: it must not make a second owner
        time.sleep(0.001)
"""


def test_many_processes_taking_turns_never_own_the_folder_together(tmp_path):
    script = tmp_path / "turns.py"
    script.write_text(LOCK_TURNS)
    log = tmp_path / "turns.log"
    folder = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    procs = [subprocess.Popen([sys.executable, str(script), str(folder), "3", str(log)], env=env) for _ in range(4)]
    for p in procs:
        assert p.wait(timeout=120) == 0
    events = sorted((int(t), kind, pid) for kind, pid, t in (line.split() for line in log.read_text().splitlines()))
    owners, most, turns = set(), 0, 0
    for _, kind, pid in events:
        if kind == "+":
            owners.add(pid)
            turns += 1
        else:
            owners.discard(pid)
        most = max(most, len(owners))
    assert turns > 50  # they did take turns
    assert most == 1


def test_the_lock_names_its_holder_to_a_second_process_and_to_a_reader(tmp_path):
    first = FolderLock(tmp_path)
    assert first.acquire() is None
    holder = FolderLock(tmp_path).acquire()
    assert holder["pid"] == os.getpid()
    assert FolderLock(tmp_path).holder()["pid"] == os.getpid()
    first.release()
    assert FolderLock(tmp_path).holder() is None
    assert (tmp_path / ".lock").read_text() == ""  # released: the file stays, empty


# ---------------------------------------------------------------- the signal policy
def test_a_signal_stops_any_phase_at_once_naming_it_and_a_deferred_one_at_the_boundary():
    with StopPolicy("train") as policy:
        policy.completed("nothing trained yet", "idefics2-ft train run_dir=r resume=true")
        with pytest.raises(Interrupted) as stop, policy.phase_of("model loading", "load"):
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(1)
        assert stop.value.exit_code == 143
        assert str(stop.value) == (
            "Stopped by SIGTERM during model loading; nothing trained yet. "
            "Continue with: idefics2-ft train run_dir=r resume=true."
        )
        policy.signum, policy.stopping = None, False
        with policy.deferred():
            os.kill(os.getpid(), signal.SIGINT)  # only the flag
            assert policy.signum == signal.SIGINT
            with pytest.raises(Interrupted) as again:
                os.kill(os.getpid(), signal.SIGINT)  # the second: at once
                time.sleep(1)
        assert again.value.exit_code == 130
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # uninstalled: the handlers before it are back


def test_a_signal_during_start_up_is_held_until_the_first_phase(tmp_path):
    code = textwrap.dedent(
        """
        import os, signal, sys, time
        from idefics2_ft.stops import Interrupted, StopPolicy
        policy = StopPolicy("train").install()
        policy.done = ""
        os.kill(os.getpid(), signal.SIGINT)  # during imports: held, nothing raised here
        time.sleep(0.2)
        print("imports went on", flush=True)
        try:
            with policy.phase_of("checks"):
                print("never", flush=True)
        except Interrupted as stop:
            print(stop, flush=True)
            sys.exit(stop.exit_code)
        """
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.returncode == 130 and "Traceback" not in out.stderr
    assert out.stdout.splitlines() == ["imports went on", "Stopped by SIGINT during train start-up."]


def test_a_rehearsed_stop_fires_on_entering_its_phase():
    with StopPolicy("export") as policy:
        policy.rehearse("merge:SIGINT")
        with policy.phase_of("checks"):
            pass
        with (
            pytest.raises(Interrupted, match="Stopped by SIGINT during the merge"),
            policy.phase_of("the merge", "merge"),
        ):
            time.sleep(1)


# ---------------------------------------------------------------- identity and history
def test_a_file_is_known_by_its_content_not_its_mtime(tmp_path):
    data = tmp_path / "train.jsonl"
    data.write_text('{"a": 1}\n' * 1000)
    before = file_fingerprint(data)
    os.utime(data, (1, 1))  # staged again: the same bytes, another mtime
    assert file_fingerprint(data) == before
    data.write_text('{"a": 2}\n' + '{"a": 1}\n' * 999)  # one row edited, same size
    assert file_fingerprint(data) != before and file_fingerprint(data)[0] == before[0]
    assert same_file([before[0], 123, "old-head"], before)  # an older version's record: by size


def test_a_large_file_is_sampled_from_first_to_last_byte(tmp_path):
    from idefics2_ft.data import fingerprint

    big = tmp_path / "big.parquet"
    size = fingerprint.WHOLE_BYTES + 3 * fingerprint.BLOCK_BYTES
    big.write_bytes(b"\0" * size)
    before = file_fingerprint(big)
    assert before[1].startswith("sampled-sha256:")
    with open(big, "r+b") as f:
        f.seek(size - 1)
        f.write(b"\1")  # the last byte
    assert file_fingerprint(big) != before


def test_a_stray_copy_of_a_resume_config_is_not_a_resume_and_bad_yaml_is_named(tmp_path):
    folder = RunFolder(tmp_path)
    for name in (
        "config.resume-1.yaml",
        "config.resume-2.yaml",
        "config.resume-10.yaml",
        "config.resume-1 (copy).yaml",
    ):
        (tmp_path / name).write_text("seed: 0\n")
    assert [p.name for p in folder.resume_configs()] == [
        "config.resume-1.yaml",
        "config.resume-2.yaml",
        "config.resume-10.yaml",
    ]
    bad = tmp_path / "config.yaml"
    bad.write_text("seed: 0\ndata:\n  path: [unclosed\n")
    with pytest.raises(RunFolderError, match=r"config.yaml is not valid YAML \(line \d+, column \d+\)"):
        load_yaml(bad)


@pytest.mark.parametrize(
    "run_dir", ["outputs/plain", "my runs/a,b", "outputs/été", "it's/x=y", "~/runs/[1]", "a\\b", "ends\\"]
)
def test_the_printed_commands_parse_back_in_the_shell_and_in_hydra_to_the_folder(tmp_path, run_dir):
    arg = hydra_arg("run_dir", run_dir)
    (word,) = shlex.split(arg)  # one shell word
    assert OverridesParser.create().parse_override(word).value() == run_dir
    run = tmp_path / "moved"
    (run / "checkpoints").mkdir(parents=True)
    assert "resume=true" not in resume_command(run)  # nothing to resume from: the same command starts it
    (run / "checkpoints" / "last.ckpt").write_bytes(b"ckpt")
    (run / "command.txt").write_text("idefics2-ft train recipe=x 'peft.r=16' run_dir=/old/place resume=true\n")
    words = shlex.split(resume_command(run))
    assert words[:4] == ["idefics2-ft", "train", "recipe=x", "peft.r=16"]
    assert words[-1] == "resume=true" and "/old/place" not in " ".join(words)
    assert OverridesParser.create().parse_override(words[-2]).value() == str(run)
