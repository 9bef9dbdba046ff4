"""Micro-benchmark of the replay buffers (add, sample, priority updates at 1e6 capacity) and the collector.

    python -m benchmarks.parts_speed [--seconds 2]

Buffers hold CartPole-shaped transitions (4 float32 per observation), filled to capacity first;
an add is one vector step of 4 sub-envs, a sample one batch of 256 (experiment=dqn's). The
collector steps experiment=dqn's env (4 sync CartPoles) into a uniform buffer, acting at random
(warm-up) and greedily through experiment=dqn's network.
"""

import argparse
import time

import numpy as np
import torch

from rl_pipeline.agents.exploration import epsilon_greedy
from rl_pipeline.agents.networks import MLP
from rl_pipeline.data.buffers import (
    PrioritizedReplayBuffer,
    Transitions,
    UniformReplayBuffer,
)
from rl_pipeline.data.collector import Collector
from rl_pipeline.data.nstep import NStepReturns
from rl_pipeline.envs.make import make_vector_env

CAPACITY, BATCH_SIZE, NUM_ENVS = 1_000_000, 256, 4


def random_transitions(count: int) -> Transitions:
    return Transitions(
        np.random.randn(count, 4).astype(np.float32), np.random.randint(2, size=count), np.ones(count),
        np.random.randn(count, 4).astype(np.float32), np.zeros(count, dtype=bool),
    )


def calls_per_s(call, seconds: float) -> float:
    calls, started = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - started) < seconds:
        call()
        calls += 1
    return calls / elapsed


def buffer_rates(buffer: UniformReplayBuffer, seconds: float) -> dict[str, float]:
    for _ in range(CAPACITY // 100_000):
        buffer.add(random_transitions(100_000))
    step = random_transitions(NUM_ENVS)
    batch = buffer.sample()
    td_errors = torch.randn(BATCH_SIZE)
    return {
        "add (transitions/s)": NUM_ENVS * calls_per_s(lambda: buffer.add(step), seconds),
        "sample (batches of 256/s)": calls_per_s(lambda: buffer.sample(50_000), seconds),
        "update_priorities (batches/s)": calls_per_s(lambda: buffer.update_priorities(batch.indices, td_errors), seconds),
    }


def collector_rate(epsilon: float, seconds: float) -> float:
    """Env steps per second of collecting into a buffer, acting ε-greedily on a [256, 256] MLP."""
    env = make_vector_env("CartPole-v1", num_envs=NUM_ENVS)
    buffer = UniformReplayBuffer(CAPACITY, BATCH_SIZE)
    collector = Collector(env, env_steps_per_iteration=256)
    q_network = MLP((4,), (2,), hidden_sizes=[256, 256])
    fold = NStepReturns(1, 0.99, NUM_ENVS)

    def act(observations):
        return epsilon_greedy(q_network, observations, epsilon, 2, torch.device("cpu"))

    def store(step):
        buffer.add(fold(*step))

    return 256 * calls_per_s(lambda: collector.collect(act, store), seconds)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=2.0, help="timed per figure")
    seconds = parser.parse_args().seconds
    lines = ["| part | operation | rate |", "|---|---|---|"]
    for name, buffer in (("uniform", UniformReplayBuffer(CAPACITY, BATCH_SIZE)),
                         ("prioritized", PrioritizedReplayBuffer(CAPACITY, BATCH_SIZE))):
        lines += [f"| {name} buffer, 1e6 | {op} | {rate:,.0f} |" for op, rate in buffer_rates(buffer, seconds).items()
                  if name == "prioritized" or "priorities" not in op]
    for label, epsilon in (("random actions", 1.0), ("greedy, MLP 256x256", 0.0)):
        lines.append(f"| collector, 4 CartPoles | {label} (transitions/s) | {collector_rate(epsilon, seconds):,.0f} |")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
