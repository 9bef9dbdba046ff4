"""A Hydra-configured deep RL experiment pipeline: Lightning trains, MLflow tracks."""
