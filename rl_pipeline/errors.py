"""What can stop a run, each a kind of its own: rl_pipeline.run.jobs turns each into one line and an exit code."""


class ConfigError(ValueError):
    """A user's config mistake: reported as one line, before any training starts."""

    def __init__(self, key: str, problem: str, rooted: bool = False):
        self.key, self.problem, self.rooted = key, problem, rooted
        super().__init__(f"{key}: {problem}")

    def within(self, group: str) -> "ConfigError":
        """The same error, keyed from the config root (`capacity` -> `buffer.capacity`); a check across
        groups names its keys from the root already (`rooted`), and keeps them."""
        return self if self.rooted else ConfigError(f"{group}.{self.key}", self.problem)


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite: every later update would be garbage."""


class FrameStoreFull(RuntimeError):
    """More distinct frames are referenced than the store has room for."""


class TrackingLost(Exception):
    """The tracking server stopped answering within the bounded wait."""


class CorruptCheckpoint(Exception):
    """A checkpoint whose bytes are not the ones that were written."""
