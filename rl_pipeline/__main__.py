"""`python -m rl_pipeline +experiment=dqn`: compose the config with Hydra and train."""

import signal
import sys

import hydra
from omegaconf import DictConfig
from pytorch_lightning.utilities.exceptions import SIGTERMException

from rl_pipeline.module import TrainingDiverged
from rl_pipeline.train import train
from rl_pipeline.validation import ConfigError


@hydra.main(version_base="1.3", config_path="../conf", config_name="config")
def main(cfg: DictConfig) -> float:
    try:
        return train(cfg)
    except ConfigError as error:
        print(f"Config error: {error}", file=sys.stderr)
        sys.exit(2)
    except TrainingDiverged as error:
        print(f"Training diverged: {error}", file=sys.stderr)
        sys.exit(3)
    except SIGTERMException:  # Lightning stops at the next batch; the MLflow run is already KILLED
        sys.exit(128 + signal.SIGTERM)


if __name__ == "__main__":
    main()
