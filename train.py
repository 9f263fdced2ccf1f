"""Fine-tune Idefics2: ``python train.py recipe=NAME [key=value ...]`` (see README.md)."""

import logging
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from idefics2_ft.config import ConfigError, register_configs

register_configs()


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> None:
    from idefics2_ft.data import DataError
    from idefics2_ft.train import train
    from idefics2_ft.trainer import Diverged, Preempted

    if HydraConfig.get().mode == RunMode.MULTIRUN:
        cfg.run_dir = HydraConfig.get().runtime.output_dir  # one folder per job: <sweep dir>/<job number>
    try:
        train(cfg)
        _close_process_group()
    except (ConfigError, DataError) as err:
        logging.getLogger("idefics2_ft").error("%s", err)
        _remove_if_empty(Path(cfg.run_dir))  # Hydra made the folder; a refused run leaves none behind
        sys.exit(2)
    except Diverged as err:
        logging.getLogger("idefics2_ft").error("%s", err)
        sys.exit(3)
    except Preempted as stop:  # checkpointed and requeued: not a failure
        logging.getLogger("idefics2_ft").warning("%s", stop)
        sys.exit(0)


def _close_process_group() -> None:
    """Every rank waits for the others (rank 0 saves last), then the process group is closed.

    Left to interpreter shutdown, gloo's threads can outlive it: a SLURM rank was seen to abort
    ("terminate called without an active exception") after a finished run, failing the job.
    """
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def _remove_if_empty(folder: Path) -> None:
    try:
        folder.rmdir()  # only succeeds on an empty folder
    except OSError:
        pass


if __name__ == "__main__":
    main()
