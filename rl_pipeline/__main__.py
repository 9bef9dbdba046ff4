"""`python -m rl_pipeline +experiment=dqn`: compose the config with Hydra and train."""

import gc
import warnings

import hydra
from omegaconf import DictConfig

from rl_pipeline.run import jobs
from rl_pipeline.run.train import train


@hydra.main(version_base="1.3", config_path="../conf", config_name="config")
def main(cfg: DictConfig) -> float:
    return jobs.run(train, cfg)


if __name__ == "__main__":
    # conf/hydra/launcher/ray.yaml stands in for hydra-ray-launcher's preset of that name, whose schema
    # it then matches; Hydra warns of that on every run (the match still checks the keys).
    warnings.filterwarnings("ignore", r"\s*'hydra/launcher/ray' is validated against ConfigStore schema", UserWarning)
    try:
        main()
    finally:
        # Everything is stored by now. Left to the cyclic collector, the objects that Lightning,
        # torch and MLflow made would take the interpreter's exit 1-2 s; atexit handlers still run.
        gc.freeze()
