"""Exceptions raised by tinyset. Every message says what was wrong, where, and what was expected."""


class TinysetError(Exception):
    """Base class of all errors tinyset raises on bad input."""


class DataError(TinysetError):
    """A dataset file is missing, truncated, corrupt or of the wrong format."""


class ConfigError(TinysetError):
    """A bad argument, preset or configuration value."""


class ArtifactError(TinysetError):
    """A synthetic-set or checkpoint file cannot be read."""


class NumericalError(TinysetError):
    """A run produced NaN or inf."""


class OutputError(TinysetError):
    """An output path (``--out``, ``--json``...) cannot or must not be written."""


class LockedError(TinysetError):
    """A run folder is locked by another tinyset process."""


class Interrupted(KeyboardInterrupt):
    """A run was stopped by SIGINT/SIGTERM; ``message`` says what was saved. The command exits with
    128 + the signal number (130 for Ctrl-C, 143 for SIGTERM)."""

    def __init__(self, signum: int, message: str = ""):
        super().__init__(message)
        self.signum = signum
        self.message = message
