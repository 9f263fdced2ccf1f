"""``idefics2-ft train recipe=NAME [key=value ...]`` (or ``python train.py ...`` in a checkout): Hydra's
front door to :func:`idefics2_ft.tasks.train.train`."""

import faulthandler
import logging
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from idefics2_ft.cli import same_command
from idefics2_ft.cli.arguments import mixture_problem
from idefics2_ft.config import CONF_DIR, ConfigError, register_configs
from idefics2_ft.ranks import distributed
from idefics2_ft.stops import Interrupted, StopPolicy, active, exiting

register_configs()

CLOSE_TIMEOUT_S = 60  # after a finished run, the longest a rank waits for the process group to close

# Hydra's own flags that keep their meaning here (Hydra's --help would list our schemas as options)
HYDRA_FLAGS = (
    ("--cfg job", "print the composed config and exit (add --resolve to resolve ${...})"),
    ("--info", "Hydra's search path, defaults tree and plugins"),
    ("-m / --multirun", "a sweep: peft.r=8,16,32 runs three jobs (hydra/launcher=slurm: one SLURM job each)"),
    ("--hydra-help", "Hydra's own help"),
)


def _first_comment(path: Path) -> str:
    for line in path.read_text().splitlines():
        text = line.lstrip("# ").strip()
        if line.startswith("#") and text and not text.startswith("@package"):
            return text
    return ""


def help_text(prog: str = "idefics2-ft train") -> str:
    """The groups and their options, the recipes with what each is, and how to add one's own."""
    groups = sorted(d for d in CONF_DIR.iterdir() if d.is_dir() and d.name not in ("hydra", "recipe"))
    lines = [f"usage: {prog} [recipe=NAME] [group=option ...] [key=value ...] [--cfg job | --info | -m]", ""]
    lines.append("recipes (recipe=NAME, a whole experiment):")
    for path in sorted((CONF_DIR / "recipe").glob("*.yaml")):
        lines.append(f"  {path.stem:<24} {_first_comment(path)}")
    lines += ["", "groups (group=option swaps one part; the default is first):"]
    defaults = {g.name: _default_of(g.name) for g in groups}
    for group in groups:
        options = sorted(p.stem for p in group.glob("*.yaml"))
        options.sort(key=lambda o: o != defaults[group.name])
        lines.append(f"  {group.name + '=':<10} {', '.join(options)}")
    lines += ["", "any key can be overridden: peft.r=16 data.batch_size=2 trainer.max_steps=500 run_dir=outputs/x"]
    lines += ["", "Hydra:"] + [f"  {flag:<16} {what}" for flag, what in HYDRA_FLAGS]
    lines += [
        "",
        "a recipe of your own, outside the package: put it in DIR/recipe/NAME.yaml and run",
        f"  {prog} recipe=NAME 'hydra.searchpath=[file://DIR]'",
        f"(start from {CONF_DIR / 'recipe'}; docs/configuration.md has the rest)",
    ]
    return "\n".join(lines)


def _default_of(group: str) -> str | None:
    for line in (CONF_DIR / "train.yaml").read_text().splitlines():
        if line.strip().startswith(f"- {group}:"):
            return line.split(":", 1)[1].split("#")[0].strip()
    return None


def main() -> None:
    prog = "python train.py" if sys.argv[0].endswith("train.py") else "idefics2-ft train"
    if any(arg in ("--help", "-h") for arg in sys.argv[1:]):
        print(help_text(prog))
        return
    # before Hydra composes the config (and makes the run folder): its own refusals of these are blocks of text
    problem = run_dir_problem(sys.argv[1:]) or mixture_problem(sys.argv[1:])
    if problem:
        sys.stderr.write(f"{problem}\n")
        sys.exit(2)
    policy = active() or StopPolicy("train").install()  # before Hydra composes anything
    policy.completed("nothing was written yet", same_command("", sys.argv[1:], prog))
    try:
        _hydra_main()
    except Interrupted as stop:  # before the run folder was known (Hydra's composition)
        exiting()
        sys.stderr.write(f"{stop}\n")
        sys.exit(stop.exit_code)


def run_dir_problem(args: list[str]) -> str | None:
    """What stops Hydra from making the run folder, in one line with the fix (else a traceback): a
    ``run_dir`` its grammar cannot read unquoted, one that is a file, a place that cannot be written."""
    import os

    from hydra.core.override_parser.overrides_parser import OverridesParser

    from idefics2_ft.run_folder import hydra_arg

    given = [a for a in args if a.split("=", 1)[0].lstrip("+~") == "run_dir"]
    if given:
        raw = given[-1].split("=", 1)[1]
        try:
            value = OverridesParser.create().parse_override(given[-1]).value()
        except Exception:  # Hydra's grammar: non-ASCII letters, ~, brackets ... need quotes
            return (
                f"run_dir={raw}: Hydra cannot read this value unquoted (it holds characters outside its plain "
                f"grammar, such as non-ASCII letters, ~ or brackets). Quote it: {hydra_arg('run_dir', raw)}"
            )
        if not isinstance(value, str) or "${" in value:
            return None  # a sweep or an interpolation: Hydra and the run check it
        folder = Path(value)
    else:
        folder = Path("outputs")  # the default run_dir lies under outputs/ in the current folder
    if folder.exists() and not folder.is_dir():
        return f"run_dir={folder} is a file, not a folder: choose another run_dir."
    existing = next((p for p in [folder.absolute(), *folder.absolute().parents] if p.exists()), None)
    if existing is not None and not os.access(existing, os.W_OK | os.X_OK):
        if given and existing == folder.absolute():
            return (
                f"run_dir={folder} is read-only: a read-only run folder (a colleague's run, a snapshot) can be "
                "evaluated (idefics2-ft evaluate run_dir=... out_dir=ELSEWHERE) but not trained in; copy it to a "
                "folder you can write to continue it."
            )
        where = f"run_dir={folder}" if given else "the default run_dir (outputs/... in the current folder)"
        return f"{where} cannot be created: {existing} is not writable. Set run_dir= to a folder you can write."
    return None


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="train")
def _hydra_main(cfg: DictConfig) -> None:
    from idefics2_ft.cli import register_demo
    from idefics2_ft.data.records import DataError
    from idefics2_ft.hub import HubError
    from idefics2_ft.run_folder import FolderLock, OutputRefused, RunFolderError
    from idefics2_ft.tasks.train import OutOfMemory, train
    from idefics2_ft.training import CheckpointCorrupt, CheckpointSaveFailed, Diverged, Preempted

    register_demo()  # here, not at import: a sweep's job runs this function in a process of its own
    if HydraConfig.get().mode == RunMode.MULTIRUN:
        cfg.run_dir = HydraConfig.get().runtime.output_dir  # one folder per job: <sweep dir>/<job number>
    try:
        train(cfg)
        _close_process_group()
    except (ConfigError, DataError, HubError, CheckpointCorrupt, RunFolderError, OutputRefused) as err:
        logging.getLogger("idefics2_ft").error("%s", err)
        FolderLock(cfg.run_dir).remove_folder_if_unused()  # Hydra made the folder; a refused run leaves none behind
        sys.exit(2)
    except Diverged as err:
        logging.getLogger("idefics2_ft").error("%s", err)
        sys.exit(3)
    except (CheckpointSaveFailed, OutOfMemory) as err:  # one line here; the chained tracebacks are in train.log
        logging.getLogger("idefics2_ft").error("%s", err)
        sys.exit(1)
    except Interrupted as stop:  # SIGTERM or Ctrl-C, in any phase (stops.py): the shell's code for the signal
        exiting()  # deaf to further signals until the process is gone (a second Ctrl-C must not kill it)
        logging.getLogger("idefics2_ft").error("%s", stop)
        FolderLock(cfg.run_dir).remove_folder_if_unused()  # stopped before it wrote anything: no empty folder
        sys.exit(stop.exit_code)
    except Preempted as stop:  # checkpointed and requeued: not a failure
        logging.getLogger("idefics2_ft").warning("%s", stop)
        sys.exit(0)


def _close_process_group() -> None:
    """Every rank waits for the others (rank 0 saves last), then the process group is closed.

    Left to interpreter shutdown, gloo's threads can outlive it: a SLURM rank was seen to abort
    ("terminate called without an active exception") after a finished run, failing the job. Under
    torch 2.6 and 2.7 (make test-min) a rank sometimes deadlocked in the gloo process group's
    destructor (a mutex, with the GIL held) after the others had exited: after CLOSE_TIMEOUT_S it
    exits anyway, with the stacks on stderr. The run is saved by then.
    """
    import torch.distributed as dist

    if distributed():
        dist.barrier()
        # A C-level timer (it fires even while the gloo destructor holds the GIL): a teardown that
        # deadlocks must not hold the job. It prints the stacks and exits with status 1.
        faulthandler.dump_traceback_later(CLOSE_TIMEOUT_S, exit=True)
        dist.destroy_process_group()
        faulthandler.cancel_dump_traceback_later()
