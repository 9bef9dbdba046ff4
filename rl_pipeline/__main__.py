"""`python -m rl_pipeline +experiment=dqn`: compose the config with Hydra and train."""

import sys

import hydra
from omegaconf import DictConfig

from rl_pipeline.train import train
from rl_pipeline.validation import ConfigError


@hydra.main(version_base="1.3", config_path="../conf", config_name="config")
def main(cfg: DictConfig) -> float:
    try:
        return train(cfg)
    except ConfigError as error:
        print(f"Config error: {error}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
