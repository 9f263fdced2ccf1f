"""The ``idefics2-ft`` command (a console script of the wheel): ``idefics2-ft COMMAND [key=value ...]``.

Each command is a module here with a ``main``. ``python train.py`` in a checkout is
``idefics2-ft train`` (Hydra's ``-m`` sweeps use it).
"""

from __future__ import annotations

import importlib
import sys

# command -> what it does (the module idefics2_ft.cli.<command> runs it)
COMMANDS = {
    "train": "fine-tune: recipe=NAME [key=value ...]; --help lists the groups and recipes",
    "evaluate": "answer a split with a finished run: run_dir=RUN [data.split=test] [model_dir=...]",
    "predict": "answer one question: run_dir=RUN image=PATH question='...'",
    "export": "merge the adapter into its base, check parity, write the card; push with export.push_to_hub=true",
    "plan": "will a recipe fit a GPU? memory and time per step: recipe=NAME [plan.gpu_gb=24]",
    "prefetch": "download what a recipe needs into the HF cache (on a login node): recipe=NAME",
}


def compose_config(overrides: list[str]):
    """The config ``train`` would compose from these overrides, without a run folder (for the
    commands that read a recipe but run nothing: ``plan``, ``prefetch``)."""
    from hydra import compose, initialize_config_dir

    from idefics2_ft.config import CONF_DIR, register_configs

    register_configs()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(config_name="train", overrides=[*overrides, "run_dir=unused"])


def register_demo() -> None:
    """``model.name_or_path=tiny`` is the demo's tiny base for every command."""
    from idefics2_ft import demo

    demo.register()


def same_command(command: str, args: list[str], prog: str = "idefics2-ft") -> str:
    """The command line again, as a shell reads it, without the rehearsal flags (``debug.stop_at``,
    ``debug.crash_at_step``): what continues a command stopped before it wrote anything."""
    import shlex

    kept = [a for a in args if not a.startswith(("debug.stop_at=", "debug.crash_at_step="))]
    return " ".join([prog, *([command] if command else []), *(shlex.quote(a) for a in kept)])


def usage() -> str:
    lines = ["usage: idefics2-ft COMMAND [key=value ...]", "", "commands:"]
    lines += [f"  {name:<9} {what}" for name, what in COMMANDS.items()]
    lines += ["", "idefics2-ft COMMAND --help says more for train and prefetch; docs/ in the repository has the rest."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        return 0
    if argv[0] in ("-V", "--version"):
        from idefics2_ft import __version__

        print(f"idefics2-ft {__version__}")
        return 0
    command, rest = argv[0], argv[1:]
    register_demo()
    if command not in COMMANDS:
        print(f"idefics2-ft: unknown command {command!r}\n\n{usage()}", file=sys.stderr)
        return 2
    if command in ("train", "evaluate", "export"):  # before the command's imports: a stop is never a traceback
        from idefics2_ft.stops import StopPolicy

        StopPolicy(command).install().completed("nothing was written yet", same_command(command, rest))
    if command in ("plan", "prefetch"):  # they compose train's config: the same refusal as train's, in one line
        from idefics2_ft.cli.arguments import mixture_problem

        problem = mixture_problem(rest)
        if problem:
            print(problem, file=sys.stderr)
            return 2
    module = importlib.import_module(f"idefics2_ft.cli.{command}")
    if command == "train":  # Hydra reads sys.argv itself
        sys.argv = [f"idefics2-ft {command}", *rest]
        module.main()
        return 0
    return module.main(rest)
