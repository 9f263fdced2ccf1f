"""Merge a run's adapter into a full-precision base, check parity, save with a model card, push.

    idefics2-ft export run_dir=RUN                                   # -> RUN/export
    idefics2-ft export run_dir=RUN export.adapter_only=true          # just the adapter + card
    idefics2-ft export run_dir=RUN export.with_adapter=true          # both: RUN/export and RUN/export-adapter
    idefics2-ft export run_dir=RUN export.push_to_hub=true export.hub.repo_id=me/name export.hub.private=true
        # with export.with_adapter=true the adapter goes to export.hub.adapter_repo_id (default me/name-adapter)

The token comes from HF_TOKEN or `huggingface-cli login` and is written nowhere.
"""

import json
import sys

from idefics2_ft.cli import same_command
from idefics2_ft.cli.arguments import parse_overrides, rehearsed_stop, setup_logging
from idefics2_ft.config import ConfigError, validate
from idefics2_ft.hub import HubError, check_write_access, push_targets
from idefics2_ft.run_folder import OutputRefused, RunFolderError
from idefics2_ft.stops import Interrupted, StopPolicy, active, exiting
from idefics2_ft.tasks.export import NonFiniteWeights, ParityError, export_run


def main(argv: list[str]) -> int:
    setup_logging()
    policy = active() or StopPolicy("export").install()
    # an interrupted export leaves no export (the writer renames it into place once complete)
    policy.completed("no export was written", same_command("export", argv))
    try:
        cfg, _ = parse_overrides(argv, {})
        policy.rehearse(rehearsed_stop(argv))
        cfg.resume = False
        with policy.phase_of("checks"):
            validate(cfg)
            if cfg.export.push_to_hub:
                for repo_id in push_targets(cfg.export):
                    check_write_access(repo_id)
        out, report = export_run(cfg)
    except (ConfigError, NonFiniteWeights, ParityError, HubError, FileNotFoundError, RunFolderError) as err:
        sys.stderr.write(f"export failed: {err}\n")
        return 1
    except OutputRefused as err:
        sys.stderr.write(f"export refused: {err}\n")
        return 2
    except Interrupted as stop:
        exiting()  # deaf to further signals until the process is gone
        sys.stderr.write(f"{stop}\n")
        return stop.exit_code
    finally:
        policy.uninstall()
    sys.stdout.write(json.dumps(report, indent=2) + f"\nexported to {out}\n")
    return 0
