"""Command-line plumbing shared by the launchers: config name + --config.key=value overrides."""

from __future__ import annotations

import logging as logging_std
import sys

from absl import logging

from jaxclip import config as config_lib


class _QuietLibraries(logging_std.Filter):
    """Drops INFO records from Orbax and JAX internals: a save logs a dozen lines otherwise."""

    NOISY = ("orbax", "jax/_src", "grain/_src", "etils")

    def filter(self, record: logging_std.LogRecord) -> bool:
        if record.levelno >= logging_std.WARNING:
            return True
        return not any(part in record.pathname for part in self.NOISY)


def setup_logging() -> None:
    """absl INFO logging for jaxclip on process 0 only, without library chatter."""
    logging.set_verbosity(logging.INFO)
    logging.get_absl_handler().addFilter(_QuietLibraries())


def split_overrides(argv: list[str]) -> tuple[list[str], list[tuple[str, str]]]:
    """Separates `--config.a.b=value` (or `--config.a.b value`) from the other flags."""
    rest, overrides, i = [], [], 0
    while i < len(argv):
        arg = argv[i]
        if arg.startswith("--config."):
            key, sep, value = arg[len("--config.") :].partition("=")
            if not sep:
                if i + 1 >= len(argv):
                    sys.exit(f"error: {arg} needs a value (--config.{key}=VALUE)")
                value, i = argv[i + 1], i + 1
            overrides.append((key, value))
        else:
            rest.append(arg)
        i += 1
    return rest, overrides


def load(name: str, overrides: list[tuple[str, str]]):
    try:
        cfg = config_lib.load_config(name)
        config_lib.apply_overrides(cfg, overrides)
    except config_lib.ConfigError as e:
        sys.exit(f"error: {e}")
    return cfg
