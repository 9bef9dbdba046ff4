"""Argument checks shared by the parts: each failure names the config key and what it expects."""

from numbers import Integral, Real

from rl_pipeline.errors import ConfigError


def expected(key: str, what: str, got: object) -> ConfigError:
    return ConfigError(key, f"expected {what}, got {got!r}")


def _is_int(value) -> bool:
    return isinstance(value, Integral) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, Real) and not isinstance(value, bool)


def positive_int(key: str, value) -> int:
    if not (_is_int(value) and value > 0):
        raise expected(key, "a positive integer", value)
    return int(value)


def non_negative_int(key: str, value) -> int:
    if not (_is_int(value) and value >= 0):
        raise expected(key, "an integer >= 0", value)
    return int(value)


def positive_number(key: str, value) -> float:
    if not (_is_number(value) and value > 0):
        raise expected(key, "a positive number", value)
    return float(value)


def probability(key: str, value) -> float:
    if not (_is_number(value) and 0 <= value <= 1):
        raise expected(key, "a number in [0, 1]", value)
    return float(value)


def boolean(key: str, value) -> bool:
    if not isinstance(value, bool):
        raise expected(key, "true or false", value)
    return value


def one_of(key: str, value, options) -> str:
    if value not in options:
        raise expected(key, f"one of {', '.join(map(str, options))}", value)
    return value
