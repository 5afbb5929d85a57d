"""Typed readers for settings that come from the environment.

Each helper returns the default when the variable is unset or empty, and stops the
process with one sentence naming the variable when a value cannot be parsed.
"""

import os

TRUE_WORDS = frozenset({"1", "true", "yes", "on"})
FALSE_WORDS = frozenset({"0", "false", "no", "off"})


def _raw(name: str) -> str | None:
    value = os.environ.get(name, "").strip()
    return value or None


def env_str(name: str, default: str = "") -> str:
    """A string setting."""
    return _raw(name) or default


def env_bool(name: str, default: bool) -> bool:
    """A yes/no setting: 1/true/yes/on or 0/false/no/off."""
    value = _raw(name)
    if value is None:
        return default
    if value.lower() in TRUE_WORDS:
        return True
    if value.lower() in FALSE_WORDS:
        return False
    raise SystemExit(f"pingpong: {name}={value!r} is not a yes/no value (use 1 or 0).")


def env_int(name: str, default: int, *, minimum: int = 0) -> int:
    """A whole-number setting that may not be below `minimum`."""
    value = _raw(name)
    if value is None:
        return default
    try:
        number = int(value)
    except ValueError:
        number = minimum - 1
    if number < minimum:
        raise SystemExit(f"pingpong: {name}={value!r} must be a whole number >= {minimum}.")
    return number


def env_float(name: str, default: float, *, minimum: float = 0.0) -> float:
    """A decimal setting that may not be below `minimum`."""
    value = _raw(name)
    if value is None:
        return default
    try:
        number = float(value)
    except ValueError:
        number = minimum - 1
    if number < minimum:
        raise SystemExit(f"pingpong: {name}={value!r} must be a number >= {minimum}.")
    return number


def env_list(name: str, default: list[str]) -> list[str]:
    """A comma-separated list setting."""
    value = _raw(name)
    if value is None:
        return list(default)
    return [item.strip() for item in value.split(",") if item.strip()]
