"""Pixels: the pipeline's env steps/s on Pong with Nature-CNN updates, against a plain PyTorch loop.

    python -m benchmarks.pong_speed [--rounds 2] [--iterations 24] [--out outputs/benchmarks]

Both sides run experiment=dqn_atari's settings on CPU: 4 sync sub-envs of ALE/Pong-v5 with the
Nature preprocessing (gymnasium's AtariPreprocessing, 4 stacked frames), 256 env steps then 64
updates of 32 (one per 4 env steps) per iteration, Adam at 1e-4, the target synced every 250
updates. The plain loop is CleanRL's dqn_atari in shape: its replay buffer keeps whole uint8
observations, the pipeline's keeps each frame once. Each side runs as its own process, in turn,
`--rounds` times; the figure is the median over its iterations with updates of env steps per
second (the pipeline's perf/env_steps_per_sec, measured the same way by the loop).
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

CAPACITY = 20_000  # both buffers: enough for the timed iterations, small enough for whole observations
LEARNING_STARTS = 1024
ENV_STEPS_PER_ITERATION, UPDATES_PER_ITERATION, BATCH_SIZE, NUM_ENVS = 256, 64, 32, 4


def pipeline_overrides(iterations: int, run_dir: Path) -> list[str]:
    budget = LEARNING_STARTS + iterations * ENV_STEPS_PER_ITERATION
    return [
        "+experiment=dqn_atari", f"trainer.max_env_steps={budget}", f"collector.learning_starts={LEARNING_STARTS}",
        f"buffer.capacity={CAPACITY}", f"trainer.eval_interval_env_steps={budget}", "trainer.eval_episodes=1",
        "trainer.test_episodes=1", "trainer.lightning.enable_progress_bar=false", f"hydra.run.dir={run_dir}",
    ]


def pipeline_steps_per_s(iterations: int, out: Path, round_: int) -> list[float]:
    from mlflow import MlflowClient

    from benchmarks.speed import RUN_ID

    uri = f"sqlite:///{(out / 'pong.db').resolve()}"
    args = pipeline_overrides(iterations, out / f"pong-pipeline-{round_}")
    result = subprocess.run([sys.executable, "-m", "rl_pipeline", *args], capture_output=True, text=True,
                            env={**os.environ, "MLFLOW_TRACKING_URI": uri})
    if result.returncode:
        raise RuntimeError(f"the pipeline exited {result.returncode}: {result.stderr[-2000:]}")
    run_id = RUN_ID.search(result.stdout).group(1)
    return [m.value for m in MlflowClient(uri).get_metric_history(run_id, "perf/env_steps_per_sec")]


def plain_loop(iterations: int) -> list[float]:
    """CleanRL's dqn_atari loop at the pipeline's iteration shape; env steps/s of each iteration with updates."""
    import ale_py
    import gymnasium as gym
    import torch
    import torch.nn.functional as F
    from gymnasium.wrappers import AtariPreprocessing, FrameStackObservation
    from torch import nn

    gym.register_envs(ale_py)
    env = gym.make_vec(
        "ALE/Pong-v5", num_envs=NUM_ENVS, vectorization_mode="sync", frameskip=1, repeat_action_probability=0.25,
        wrappers=[lambda e: FrameStackObservation(AtariPreprocessing(e, noop_max=30, frame_skip=4, screen_size=84), 4)],
    )

    def nature_cnn() -> nn.Module:
        return nn.Sequential(
            nn.Conv2d(4, 32, 8, stride=4), nn.ReLU(), nn.Conv2d(32, 64, 4, stride=2), nn.ReLU(),
            nn.Conv2d(64, 64, 3, stride=1), nn.ReLU(), nn.Flatten(), nn.Linear(3136, 512), nn.ReLU(),
            nn.Linear(512, int(env.single_action_space.n)),
        )

    q_net, target_net = nature_cnn(), nature_cnn()
    target_net.load_state_dict(q_net.state_dict())
    optimizer = torch.optim.Adam(q_net.parameters(), lr=1e-4, eps=1.5e-4, fused=True)
    shape = env.single_observation_space.shape
    s_buf, s_next_buf = torch.zeros((CAPACITY, *shape), dtype=torch.uint8), torch.zeros((CAPACITY, *shape), dtype=torch.uint8)
    a_buf, r_buf, done_buf = torch.zeros(CAPACITY, dtype=torch.int64), torch.zeros(CAPACITY), torch.zeros(CAPACITY)
    cursor, size, num_updates, rates = 0, 0, 0, []
    torch.manual_seed(0)
    np.random.seed(0)
    s, _ = env.reset(seed=0)
    for iteration in range(LEARNING_STARTS // ENV_STEPS_PER_ITERATION + iterations):
        started = time.perf_counter()
        warming_up = iteration < LEARNING_STARTS // ENV_STEPS_PER_ITERATION
        for _ in range(ENV_STEPS_PER_ITERATION // NUM_ENVS):
            a = np.random.randint(env.single_action_space.n, size=NUM_ENVS)
            if not warming_up:
                with torch.no_grad():
                    greedy = q_net(torch.as_tensor(s).float() / 255.0).argmax(dim=1).numpy()
                a = np.where(np.random.rand(NUM_ENVS) < 0.05, a, greedy)
            s_next, r, terminated, truncated, _ = env.step(a)
            rows = (cursor + np.arange(NUM_ENVS)) % CAPACITY
            s_buf[rows], s_next_buf[rows] = torch.as_tensor(s), torch.as_tensor(s_next)
            a_buf[rows], r_buf[rows] = torch.as_tensor(a), torch.as_tensor(np.clip(r, -1, 1), dtype=torch.float32)
            done_buf[rows] = torch.as_tensor(terminated, dtype=torch.float32)
            cursor, size, s = (cursor + NUM_ENVS) % CAPACITY, min(size + NUM_ENVS, CAPACITY), s_next
        if warming_up:
            continue
        for _ in range(UPDATES_PER_ITERATION):
            rows = torch.randint(size, (BATCH_SIZE,))
            with torch.no_grad():
                next_q = target_net(s_next_buf[rows].float() / 255.0).max(dim=1).values
                y = r_buf[rows] + 0.99 * (1.0 - done_buf[rows]) * next_q
            q_taken = q_net(s_buf[rows].float() / 255.0).gather(1, a_buf[rows].unsqueeze(1)).squeeze(1)
            loss = F.smooth_l1_loss(q_taken, y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            num_updates += 1
            if num_updates % 250 == 0:
                target_net.load_state_dict(q_net.state_dict())
        rates.append(ENV_STEPS_PER_ITERATION / (time.perf_counter() - started))
    return rates


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--iterations", type=int, default=24, help="timed iterations (with updates) per run")
    parser.add_argument("--out", type=Path, default=Path("outputs/benchmarks"))
    parser.add_argument("--plain", action="store_true", help="run the plain loop once, print its rates as JSON")
    args = parser.parse_args()
    if args.plain:
        print(json.dumps(plain_loop(args.iterations)))
        return
    args.out.mkdir(parents=True, exist_ok=True)
    medians = {"pipeline": [], "plain": []}
    for round_ in range(args.rounds):
        medians["pipeline"].append(statistics.median(pipeline_steps_per_s(args.iterations, args.out, round_)))
        plain = subprocess.run([sys.executable, "-m", "benchmarks.pong_speed", "--plain", "--iterations",
                                str(args.iterations)], capture_output=True, text=True, check=True)
        medians["plain"].append(statistics.median(json.loads(plain.stdout.splitlines()[-1])))
        print(f"round {round_}: pipeline {medians['pipeline'][-1]:.0f}, plain {medians['plain'][-1]:.0f} env steps/s",
              flush=True)
    pipeline, plain = statistics.median(medians["pipeline"]), statistics.median(medians["plain"])
    report = (f"Pong, Nature CNN on CPU: pipeline {pipeline:.0f} env steps/s, plain PyTorch loop {plain:.0f} "
              f"env steps/s: ratio {pipeline / plain:.2f} (medians of {args.rounds} rounds)\n")
    print(report)
    (args.out / "pong_speed.md").write_text(report)
    (args.out / "pong_speed.json").write_text(json.dumps(medians, indent=2))


if __name__ == "__main__":
    main()
