"""Re-score a logged policy: play it greedily and print its mean return, spread and lower bound.

    python -m rl_pipeline.evaluate <run id> [--episodes N] [--seed S] [--video PATH.gif]

The policy is the run's MLflow model; the env (and its sub-env transforms) come from the run's
config.yaml. By default it plays the run's own test episodes, so it prints the run's test score.
"""

import argparse
import os
import sys
import tempfile
from pathlib import Path

import mlflow
from mlflow.exceptions import MlflowException
from omegaconf import DictConfig, OmegaConf

from rl_pipeline.agents.evaluation import Score, record_gif, score_policy
from rl_pipeline.errors import ConfigError
from rl_pipeline.run.build import build_env, build_transforms, eval_env_maker
from rl_pipeline.tracking import store
from rl_pipeline.validation import non_negative_int, positive_int


def run_config(client: mlflow.MlflowClient, run_id: str) -> DictConfig:
    with tempfile.TemporaryDirectory() as directory:
        return OmegaConf.load(client.download_artifacts(run_id, "config.yaml", directory))


def load_policy(run_id: str):
    try:
        return mlflow.pytorch.load_model(f"runs:/{run_id}/model")
    except (MlflowException, OSError):
        raise ConfigError("run_id", f"run {run_id} has no logged model (did it finish?)") from None


def given_or_run_setting(given: int | None, cfg: DictConfig, key: str, option: str) -> int:
    """The option's value, else the run's own setting (runs logged before test scores have none)."""
    value = given if given is not None else OmegaConf.select(cfg, key)
    if value is None:
        raise ConfigError(option, f"expected a value: the run's config has no {key}")
    return value


def main(argv: list[str] | None = None) -> Score:
    parser = argparse.ArgumentParser(prog="python -m rl_pipeline.evaluate", description=__doc__.split("\n")[0])
    parser.add_argument("run_id", help="the MLflow run whose policy to play")
    parser.add_argument("--episodes", type=int, help="how many episodes (default: the run's trainer.test_episodes)")
    parser.add_argument("--seed", type=int, help="episode i resets with seed + i (default: the run's trainer.test_seed)")
    parser.add_argument("--video", type=Path, help="also write an animated GIF of the first episode here")
    args = parser.parse_args(argv)
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # the output is the score
    uri = store.tracking_uri()
    try:
        store.check_store(uri)
        client = mlflow.MlflowClient(uri)
        try:
            cfg = run_config(client, args.run_id)
        except MlflowException:
            raise ConfigError("run_id", f"expected a run of the store {uri} that logged config.yaml, got {args.run_id!r}") from None
        mlflow.set_tracking_uri(uri)
        policy = load_policy(args.run_id).eval()
        episodes = positive_int("--episodes", given_or_run_setting(args.episodes, cfg, "trainer.test_episodes", "--episodes"))
        seed = non_negative_int("--seed", given_or_run_setting(args.seed, cfg, "trainer.test_seed", "--seed"))
        transforms = build_transforms(cfg)
        cap = OmegaConf.select(cfg, "trainer.eval_max_episode_steps")  # none in runs from before it existed
        score = score_policy(policy, eval_env_maker(cfg, transforms), episodes, seed, cap)
    except ConfigError as error:
        sys.exit(f"evaluate: {error}")
    print(f"Run {args.run_id} on {cfg.env.id}: return {score}, seeds {seed} .. {seed + episodes - 1}")
    if args.video:
        write_video(cfg, transforms, policy, args.video, seed)
    return score


def write_video(cfg: DictConfig, transforms: list, policy, path: Path, seed: int) -> None:
    render_env = build_env(cfg, transforms, num_envs=1, vectorization_mode="sync", render_mode="rgb_array")
    try:
        written = record_gif(policy, render_env, path, seed=seed, max_frames=sys.maxsize)
    except OSError as error:
        sys.exit(f"evaluate: --video: expected a writable file, got {str(path)!r} ({error.strerror or error})")
    finally:
        render_env.close()
    print(f"Wrote {written}" if written else f"{cfg.env.id} does not render to images: no video")


if __name__ == "__main__":
    main()
