"""`python -m rl_pipeline +experiment=dqn`: compose the config with Hydra and train."""

import hydra
from omegaconf import DictConfig

from rl_pipeline import jobs
from rl_pipeline.train import train


@hydra.main(version_base="1.3", config_path="../conf", config_name="config")
def main(cfg: DictConfig) -> float:
    return jobs.run(train, cfg)


if __name__ == "__main__":
    main()
