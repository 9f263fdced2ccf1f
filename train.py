"""Fine-tune Idefics2: ``python train.py recipe=NAME [key=value ...]`` (see README.md)."""

import logging
import sys

import hydra
from omegaconf import DictConfig

from idefics2_ft.config import ConfigError, register_configs

register_configs()


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> None:
    from idefics2_ft.train import train

    try:
        train(cfg)
    except ConfigError as err:
        logging.getLogger("idefics2_ft").error("%s", err)
        sys.exit(2)


if __name__ == "__main__":
    main()
