"""Lightning callbacks of a run besides its checkpoints: when to stop, and what the progress bar shows."""

import logging
import math
import signal

import pytorch_lightning as pl
from pytorch_lightning.callbacks import EarlyStopping, TQDMProgressBar

log = logging.getLogger(__name__)


class StopWhenSolved(EarlyStopping):
    """Stops once `monitor` >= `solved_return` (never, when that is None): solved or out of budget, never a plateau."""

    def __init__(self, monitor: str, solved_return: float | None):
        if solved_return is not None:
            log.info("Stopping once %s >= %s", monitor, solved_return)
        super().__init__(
            monitor=monitor,
            mode="max",
            # EarlyStopping stops when strictly above its threshold; the metric is float64, so
            # "above the next float64 down" is ">= solved", as confirmation and the solved flag read it.
            stopping_threshold=None if solved_return is None else math.nextafter(solved_return, -math.inf),
            patience=math.inf,
            check_on_train_epoch_end=False,
        )


class ProgressBar(TQDMProgressBar):
    """Lightning's progress bar, with whole env steps and steps/s, and without the logger's run id."""

    def get_metrics(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict:
        metrics = super().get_metrics(trainer, pl_module)
        metrics.pop("v_num", None)
        for key in ("env_steps", "steps/s"):
            if key in metrics:
                metrics[key] = int(metrics[key])
        return metrics


class StopAtIterationEnd(pl.Callback):
    """Ctrl-C stops training once the current iteration is done, never halfway through an update or a write.

    A second Ctrl-C interrupts at once.
    """

    def __init__(self):
        self.requested = False
        self.previous_handler = None

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self.previous_handler = signal.signal(signal.SIGINT, self.request)

    def request(self, signum, frame) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        log.info("Ctrl-C: stopping after this iteration (again to stop now)")

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args) -> None:
        if self.requested:
            raise KeyboardInterrupt

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if self.previous_handler is not None:
            signal.signal(signal.SIGINT, self.previous_handler)
