"""The composed config, checked: keys that no part takes, and the settings that no part checks itself.

`build` instantiates a part with Hydra and reports a mistake against its full key; `check_settings`
checks the top level, trainer, logger and seed. Both run before any MLflow run exists.
"""

import inspect
import logging
import types
import typing
from pathlib import Path

from hydra.errors import InstantiationException
from hydra.utils import get_object, instantiate
from omegaconf import DictConfig, OmegaConf

from rl_pipeline.errors import ConfigError
from rl_pipeline.validation import (
    boolean,
    expected,
    non_negative_int,
    positive_int,
    positive_number,
)

log = logging.getLogger(__name__)

CONF_DIR = Path(__file__).resolve().parents[2] / "conf"
GROUPS = (
    "agent", "env", "transforms", "network", "loss", "buffer", "optimizer", "collector", "exploration", "callbacks",
    "trainer", "logger",
)
TOP_LEVEL_KEYS = {*GROUPS, "seed", "paths", "resume"}
TRAINER_KEYS = set(OmegaConf.load(CONF_DIR / "trainer" / "default.yaml"))
MAX_SEED = 2**32 - 1  # numpy's limit
MAX_EXPERIMENT_NAME = 500  # MLflow's limit


def check_no_unknown_keys(keys, prefix: str, known: set[str]) -> None:
    unknown = sorted(set(keys) - known)
    if unknown:
        expected_keys = f"one of {', '.join(sorted(known))}" if known else "none: it takes no settings"
        raise ConfigError(f"{prefix}{unknown[0]}", f"unknown key; expected {expected_keys}")


def target_of(node: DictConfig, key: str):
    """The class or function that `node` instantiates."""
    target = node.get("_target_") if isinstance(node, DictConfig) else None
    try:
        return get_object(target)
    except Exception:
        raise expected(f"{key}._target_", "an importable class or function", target) from None


def check_keys(node: DictConfig, key: str, runtime_kwargs) -> None:
    """Every key of `node` must be an argument of its target that the pipeline does not pass itself."""
    params = inspect.signature(target_of(node, key)).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return
    for name in node:
        if name in runtime_kwargs:
            raise ConfigError(f"{key}.{name}", "set by the pipeline itself; remove it from the config")
    settable = {name for name in params if name not in runtime_kwargs and name not in ("self", "params")}
    check_no_unknown_keys([name for name in node if not name.startswith("_")], f"{key}.", settable)


PLAIN_TYPES = (int, float, bool, str, type(None))


def plain_members(annotation) -> list | None:
    """The members of an annotation made of plain types and literal values (`Optional[int]`); None for any other."""
    union = typing.get_origin(annotation) in (typing.Union, types.UnionType)
    members = []
    for member in typing.get_args(annotation) if union else (annotation,):
        if typing.get_origin(member) is typing.Literal:
            members += typing.get_args(member)
        elif member in PLAIN_TYPES:
            members.append(member)
        else:
            return None
    return members


def admits(member, value) -> bool:
    if isinstance(member, type):
        return isinstance(value, member) or (member is float and isinstance(value, int) and not isinstance(value, bool))
    return value == member  # a literal


def plain_name(member) -> str:
    return "null" if member is type(None) else getattr(member, "__name__", repr(member))


def check_plain_types(node: DictConfig, key: str) -> None:
    """Each value of `node` against the plain type its target's signature declares for it.

    For targets, such as Lightning's Trainer, that store an argument of the wrong type and fail on it
    mid-run (`log_every_n_steps="abc"`).
    """
    target = target_of(node, key)
    hints = typing.get_type_hints(target.__init__ if inspect.isclass(target) else target)
    for name, value in node.items():
        members = plain_members(hints.get(name))
        if members is not None and not any(admits(member, value) for member in members):
            what = " or ".join(plain_name(member) for member in members)
            raise expected(f"{key}.{name}", what, value)


def build(node: DictConfig, key: str, **runtime_kwargs):
    """hydra.utils.instantiate, with a config mistake reported against its full key."""
    log.info("Instantiating %s <%s>", key, node.get("_target_"))
    check_keys(node, key, runtime_kwargs)
    try:
        return instantiate(node, **runtime_kwargs)
    except InstantiationException as error:
        cause = error.__cause__
        if isinstance(cause, ConfigError):
            raise cause.within(key) from None
        raise ConfigError(key, str(cause or error).splitlines()[0]) from None


def build_around(node: DictConfig, key: str, **parts):
    """`build` for a target that takes the pipeline's built parts: they go to it as they are, where
    instantiate would hand a dataclass over as a DictConfig and a list as a ListConfig."""
    make = build(node, key, _partial_=True)
    check_keys(node, key, parts)
    try:
        return make(**parts)
    except ConfigError as error:
        raise error.within(key) from None


def check_settings(cfg: DictConfig) -> None:
    """The settings that no instantiated part checks: top-level keys, trainer, devices, logger, seed."""
    check_no_unknown_keys(cfg, "", TOP_LEVEL_KEYS)
    check_no_unknown_keys(cfg.trainer, "trainer.", TRAINER_KEYS)
    check_keys(cfg.logger, "logger", ("tracking_uri", "run_id"))
    check_logger(cfg.logger)
    if non_negative_int("seed", cfg.seed) > MAX_SEED:
        raise expected("seed", f"an integer in [0, {MAX_SEED}]", cfg.seed)
    check_devices(cfg.trainer.lightning)
    t = cfg.trainer
    for key in ("max_env_steps", "eval_interval_env_steps", "eval_episodes", "eval_max_episode_steps", "test_episodes",
                "checkpoint_interval_env_steps"):
        positive_int(f"trainer.{key}", t[key])
    if not (isinstance(t.checkpoint_buffer_max_mb, (int, float)) and t.checkpoint_buffer_max_mb >= 0):
        raise expected("trainer.checkpoint_buffer_max_mb", "a number >= 0", t.checkpoint_buffer_max_mb)
    non_negative_int("trainer.eval_seed", t.eval_seed)
    non_negative_int("trainer.solved_confirm_episodes", t.solved_confirm_episodes)
    check_test_seeds(t)
    boolean("trainer.stop_when_solved", t.stop_when_solved)
    if t.solved_return is not None and not isinstance(t.solved_return, (int, float)):
        raise expected("trainer.solved_return", "a number, or null for the env's reward threshold", t.solved_return)
    learning_starts = cfg.collector.get("learning_starts", 0)
    if isinstance(learning_starts, int) and t.max_env_steps < learning_starts:
        raise expected(
            "trainer.max_env_steps", f"at least collector.learning_starts ({learning_starts}), or no update ever happens",
            t.max_env_steps,
        )


def check_test_seeds(t: DictConfig) -> None:
    """The test episodes' seeds must be ones that evaluation (screening or confirmation) never plays."""
    if non_negative_int("trainer.test_seed", t.test_seed) + t.test_episodes > MAX_SEED + 1:
        raise expected("trainer.test_seed", f"seeds up to {MAX_SEED} for trainer.test_episodes episodes", t.test_seed)
    evaluation = range(t.eval_seed, t.eval_seed + t.eval_episodes + t.solved_confirm_episodes)
    test = range(t.test_seed, t.test_seed + t.test_episodes)
    if max(evaluation.start, test.start) < min(evaluation.stop, test.stop):
        raise expected(
            "trainer.test_seed",
            f"test seeds apart from evaluation's ({evaluation.start} .. {evaluation.stop - 1}, from trainer.eval_seed, "
            f"eval_episodes and solved_confirm_episodes); {t.test_seed} .. {test.stop - 1} overlap them",
            t.test_seed,
        )


def check_logger(logger: DictConfig) -> None:
    name = logger.experiment_name
    if not (isinstance(name, str) and name.strip() and len(name) <= MAX_EXPERIMENT_NAME):
        raise expected("logger.experiment_name", f"a name of 1 to {MAX_EXPERIMENT_NAME} characters", name)
    if logger.run_name is not None and not isinstance(logger.run_name, str):
        raise expected("logger.run_name", "a string, or null to name the run by its overrides", logger.run_name)
    positive_number("logger.server_timeout_s", logger.server_timeout_s)


def check_devices(lightning: DictConfig) -> None:
    """One process trains a run: several devices would each open a run and split the budget."""
    devices = lightning.get("devices", 1)
    one = devices in (1, "1") or (OmegaConf.is_list(devices) and len(devices) == 1)
    if not one:
        raise expected("trainer.lightning.devices", "1 or a list of one device index (sweep to use more)", devices)
