"""A Lightning callback the benchmark adds to a pipeline run: when its first env step and last update happened.

    python -m rl_pipeline +experiment=dqn '+callbacks.timestamps={_target_: benchmarks.timing.Timestamps, path: t.json}'

Training steps collect and then update, so the first one's start is the first env step and the
last one's end is the last update. Wall-clock times (time.time()), comparable across processes.
"""

import json
import time

import pytorch_lightning as pl


class Timestamps(pl.Callback):
    def __init__(self, path: str):
        self.path = path
        self.first_env_step = self.last_update = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self.first_env_step is None:
            self.first_env_step = time.time()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.last_update = time.time()

    def on_train_end(self, trainer, pl_module) -> None:
        with open(self.path, "w") as file:
            json.dump({"first_env_step": self.first_env_step, "last_update": self.last_update}, file)
