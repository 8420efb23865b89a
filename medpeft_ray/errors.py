"""User-facing errors: one line naming the file and the key, and a fixed exit code."""

from __future__ import annotations


class MedpeftError(Exception):
    """An error the CLI prints as one line (no traceback) before exiting with ``exit_code``."""

    exit_code = 1


class ConfigError(MedpeftError):
    """A bad configuration: ``<file>: <key.path>: <message>``, exit code 2."""

    exit_code = 2

    def __init__(self, key: str, message: str, file: str | None = None) -> None:
        self.key = key
        self.message = message
        self.file = file
        super().__init__(str(self))

    def with_file(self, file: str) -> "ConfigError":
        return ConfigError(self.key, self.message, file)

    def __str__(self) -> str:
        where = ": ".join(part for part in (self.file, self.key) if part)
        return f"{where}: {self.message}" if where else self.message


class UsageError(MedpeftError):
    """A bad command-line argument (an unknown sort column, a malformed option), exit code 2."""

    exit_code = 2


class DataError(MedpeftError):
    """A dataset that cannot be used: a missing or unreadable file, a bad label (names the file)."""

    exit_code = 2


class CheckpointError(MedpeftError):
    """Pre-trained weights that cannot be used: unreadable, unsafe to unpickle, or of another model (names the file)."""

    exit_code = 2


class TrialFailed(MedpeftError):
    """A trial that cannot go on (NaN loss, diverged); the search records it and continues."""
