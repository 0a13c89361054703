"""User-facing errors: the CLI prints their message (which names the problem and the fix), no traceback."""


class RLCoreError(Exception):
    """Base of every error caused by user input (plugins, options, data, config files)."""


class PluginError(RLCoreError):
    """An unknown, disabled or broken plugin was selected."""


class ConfigError(RLCoreError):
    """A config file, `--set` override or option value is invalid."""


class DataError(RLCoreError):
    """A dataset row or rollout is malformed."""


class TrainingError(RLCoreError):
    """Training cannot go on (NaN loss, a worker died)."""
