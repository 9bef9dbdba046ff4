"""Bytes per transition of the `frames` replay buffer on real Pong frames, at the dqn_atari size.

    python benchmarks/pixel_buffer.py [--env-steps 20000] [--capacity 1000000]

Collects env steps with uniformly random actions through the pipeline's own collector (4 envs,
transforms=atari) into a buffer of `capacity`, then prints what the buffer allocated, what each
transition costs, and what a buffer storing whole observations and next observations would take.
"""

import argparse
import time

import numpy as np
from torch import nn

from rl_pipeline.data.buffers import UniformReplayBuffer
from rl_pipeline.data.collector import Collector
from rl_pipeline.envs.make import make_vector_env, sub_env_wrappers, wrap_for_training
from rl_pipeline.envs.transforms import AtariPreprocessing


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--env-steps", type=int, default=20_000)
    parser.add_argument("--capacity", type=int, default=1_000_000)
    args = parser.parse_args()

    transforms = [AtariPreprocessing()]
    env = make_vector_env("ale_py:ALE/Pong-v5", num_envs=4, frameskip=1, wrappers=sub_env_wrappers(transforms))
    buffer = UniformReplayBuffer(capacity=args.capacity, batch_size=32, dedup_frames=True)
    collector = Collector(
        wrap_for_training(env, transforms), env_steps_per_iteration=256, max_env_steps=args.env_steps,
        learning_starts=2 * args.env_steps,  # random actions throughout: no network needed
    )
    started = time.perf_counter()
    while collector.env_steps < args.env_steps:
        collector.collect(nn.Identity(), buffer.add)
    seconds = time.perf_counter() - started

    frame_bytes = int(np.prod(env.single_observation_space.shape[1:]))
    frames_used = buffer.frames.capacity - buffer.frames.num_free
    whole = 2 * int(np.prod(env.single_observation_space.shape)) + sum(
        getattr(buffer.storage, name)[0].nbytes for name in ("actions", "rewards", "terminated", "steps")
    )
    print(f"{collector.env_steps} env steps in {seconds:.1f} s ({collector.env_steps / seconds:.0f} steps/s, random actions)")
    print(f"{len(buffer)} transitions stored; {frames_used} distinct frames held ({frames_used / len(buffer):.3f} a transition)")
    print(f"allocated for {args.capacity:,} transitions: {buffer.nbytes / 2**30:.2f} GiB = {buffer.nbytes / args.capacity:,.0f} B a transition")
    print(f"one 84x84 frame: {frame_bytes:,} B; whole s and s' a transition would take {whole:,} B "
          f"({whole * args.capacity / 2**30:.1f} GiB for {args.capacity:,})")


if __name__ == "__main__":
    main()
