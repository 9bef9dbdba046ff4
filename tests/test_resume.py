"""Checkpoints that survive a kill, and runs that resume from them into the same MLflow run."""

import signal
import time

import mlflow
import numpy as np
import pytest
import torch
from conftest import all_runs, start_cli

from rl_pipeline.envs.make import env_state, make_vector_env, restore_env_state, sub_env_wrappers, wrap_for_training
from rl_pipeline.envs.transforms import ClipReward, FrameStack, NormalizeObservation
from rl_pipeline.errors import ConfigError
from rl_pipeline.run.checkpoints import (
    TRAILER_BYTES,
    AtomicCheckpointIO,
    CorruptCheckpoint,
    check_same_config,
    verify_checksum,
)
from rl_pipeline.tracking.mlflow_runs import MLFlowLogger

# Half the budget is 5,120 env steps; checkpoints and evaluations every 1,280, 5 whole iterations.
RUN = (
    "+experiment=dqn", "seed=0", "trainer.max_env_steps=10240", "trainer.stop_when_solved=false",
    "trainer.eval_interval_env_steps=1280",
    "trainer.checkpoint_interval_env_steps=1280", "trainer.lightning.enable_progress_bar=false",
)
METRICS = ("train/epsilon", "train/loss", "train/q_mean", "train/episode_return", "eval/return_mean", "eval/return_std")


def metric_histories(uri: str) -> dict[str, list]:
    (run,) = all_runs(uri)
    client = mlflow.MlflowClient(uri)
    return {key: [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, key)] for key in METRICS}


@pytest.mark.slow
def test_a_run_killed_at_half_its_budget_resumes_to_the_same_result(tmp_path, train_here):
    unkilled_uri, killed_uri = f"sqlite:///{tmp_path / 'unkilled.db'}", f"sqlite:///{tmp_path / 'killed.db'}"
    train_here(*RUN, tracking_uri=unkilled_uri, output_dir=tmp_path / "unkilled")

    process = start_cli(*RUN, cwd=tmp_path, tracking_uri=killed_uri, run_dir=tmp_path / "run")
    try:
        assert any("last.ckpt at 5120 env steps" in line for line in process.stdout)
        time.sleep(0.5)  # past the checkpoint: the resumed run replays what came after it
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=60)
    finally:
        process.kill()
    (killed,) = all_runs(killed_uri)
    assert killed.info.status == "RUNNING"  # SIGKILL leaves no chance to say otherwise
    logged_before_resume = len(metric_histories(killed_uri)["train/epsilon"])

    train_here(*RUN, "resume=last", tracking_uri=killed_uri, output_dir=tmp_path / "resumed")
    (run,) = all_runs(killed_uri)
    assert run.info.run_id == killed.info.run_id and run.info.status == "FINISHED"
    (reference,) = all_runs(unkilled_uri)
    assert run.data.metrics["test/return_mean"] == reference.data.metrics["test/return_mean"]
    histories = metric_histories(killed_uri)
    assert 20 <= logged_before_resume < 40  # the kill came after half of the 40 iterations
    assert [step for step, _ in histories["train/epsilon"]] == list(range(256, 10241, 256))
    assert [step for step, _ in histories["eval/return_mean"]] == list(range(1280, 10241, 1280))
    # Buffer, envs and RNGs restored: on this CPU the resumed run retraces the unkilled one exactly.
    assert histories == metric_histories(unkilled_uri)


def test_a_save_cut_short_leaves_the_previous_checkpoint_whole(tmp_path):
    class Unpicklable:
        def __reduce__(self):
            raise RuntimeError("killed mid-save")

    path = tmp_path / "last.ckpt"
    AtomicCheckpointIO().save_checkpoint({"step": 1, "weights": torch.ones(1000)}, path)
    with pytest.raises(RuntimeError, match="killed mid-save"):
        AtomicCheckpointIO().save_checkpoint({"step": 2, "weights": torch.zeros(1000), "bad": Unpicklable()}, path)
    assert torch.load(path, weights_only=True)["step"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]  # no partial file left behind


def test_a_checkpoint_with_any_one_bit_flipped_is_refused(tmp_path):
    path = tmp_path / "last.ckpt"
    AtomicCheckpointIO().save_checkpoint({"weights": torch.arange(400_000.0)}, path)  # 1.6 MB: read in chunks
    verify_checksum(path)
    written = path.read_bytes()
    body = len(written) - TRAILER_BYTES
    for offset in (0, body // 2, (1 << 20) + 1, body - 1, len(written) - 1):  # the body's first, middle, past
        flipped = bytearray(written)                                           # a chunk, last; the digest's last
        flipped[offset] ^= 0x01
        path.write_bytes(flipped)
        with pytest.raises(CorruptCheckpoint, match="its checksum does not match its contents"):
            verify_checksum(path)


@pytest.mark.parametrize(
    ("vectorization_mode", "make_transforms"),
    [
        ("sync", lambda: [NormalizeObservation()]),
        ("sync", lambda: [FrameStack(3), ClipReward(-0.5, 0.5)]),  # a sub-env wrapper; a wrapper holding a lambda
        ("vector_entry_point", lambda: [NormalizeObservation(), ClipReward()]),
    ],
    ids=["normalize_obs", "frame_stack+clip_reward", "native-vector"],
)
def test_env_state_restores_physics_rngs_and_wrapper_statistics(vectorization_mode, make_transforms):
    def make():
        transforms = make_transforms()
        env = make_vector_env("CartPole-v1", 3, vectorization_mode, wrappers=sub_env_wrappers(transforms))
        return wrap_for_training(env, transforms)

    original, copy = make(), make()
    original.reset(seed=7)
    rng = np.random.default_rng(0)
    for _ in range(40):  # mid-episode for some sub-envs, past an autoreset for others
        original.step(rng.integers(2, size=3))
    restore_env_state(copy, env_state(original))
    for _ in range(100):
        actions = rng.integers(2, size=3)
        for a, b in zip(original.step(actions)[:4], copy.step(actions)[:4]):
            np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize(
    ("id", "kwargs"),
    [("CartPole-v1", {"vectorization_mode": "async"}), ("ale_py:ALE/Pong-v5", {})],
    ids=["sub-envs in other processes", "ALE emulators"],
)
def test_env_state_is_none_for_sub_envs_it_cannot_restore_exactly(id, kwargs):
    env = make_vector_env(id, num_envs=2, **kwargs)
    try:
        assert env_state(env) is None
    finally:
        env.close()


def test_resume_refuses_another_config_naming_the_key():
    saved = {
        "optimizer.lr": "0.0023", "seed": "0", "paths.output_dir": "/a", "resume": "None",
        "trainer.lightning.enable_progress_bar": "False", "trainer.lightning.enable_model_summary": "False",
        "logger.server_timeout_s": "20",
    }
    watched_otherwise = {  # where it writes and how it is watched, not what it trains
        "paths.output_dir": "/b", "resume": "last", "trainer.lightning.enable_progress_bar": "True",
        "trainer.lightning.enable_model_summary": "True", "logger.server_timeout_s": "60",
        "callbacks.timestamps._target_": "benchmarks.timing.Timestamps",
    }
    check_same_config(saved, {**saved, **watched_otherwise})
    with pytest.raises(ConfigError, match=r"resume: the checkpoint was trained with optimizer.lr=0.0023, this job sets 0.001"):
        check_same_config(saved, {**saved, "optimizer.lr": "0.001"})


def test_logger_skips_the_steps_its_run_already_holds(tracking_uri):
    client = mlflow.MlflowClient(tracking_uri)
    run_id = client.create_run(client.create_experiment("resume")).info.run_id
    for step in (256, 512):
        client.log_metric(run_id, "train/loss", step / 1000, step=step)
    logger = MLFlowLogger(tracking_uri=tracking_uri, run_id=run_id)
    for step in (512, 768):  # 512 is a replay of the killed run's last iteration
        logger.log_metrics({"train/loss": -1.0 if step == 512 else 0.768, "eval/return_mean": 9.0}, step=step)
    assert len(client.get_metric_history(run_id, "train/loss")) == 2, "held back until flushed"
    logger.flush()
    history = {(m.step, m.value) for m in client.get_metric_history(run_id, "train/loss")}
    assert history == {(256, 0.256), (512, 0.512), (768, 0.768)}
    assert [m.step for m in client.get_metric_history(run_id, "eval/return_mean")] == [512, 768]
