"""The project's error classes: every error a user can cause or fix derives from ``OlmoHybridError``.

The command line prints these as one line (``olmo-hybrid COMMAND: error: MESSAGE``) and exits with
``exit_code``; anything else is a bug and keeps its traceback. Messages name the file, field or tensor
at fault and what was expected. Each class also derives from the builtin a caller would catch for that
kind of failure (``ValueError`` for bad values, ``OSError`` for failed writes), so ``except ValueError``
around a config keeps working.
"""

from __future__ import annotations


class OlmoHybridError(Exception):
    """Base of the errors the command line reports as one line."""

    exit_code = 1


class UsageError(OlmoHybridError):
    """Bad command-line arguments (exit code 2, as argparse uses)."""

    exit_code = 2


class ConfigError(OlmoHybridError, ValueError):
    """A config field is unknown, has the wrong type or value, or contradicts another field."""

    exit_code = 2


class DataError(OlmoHybridError, ValueError):
    """Bad data input: a missing or unreadable file, a malformed record, a corpus too small to use."""


class CheckpointError(OlmoHybridError, RuntimeError):
    """A run directory or checkpoint cannot be used: missing, damaged, locked, from another model."""


class DivergenceError(OlmoHybridError, RuntimeError):
    """Training produced non-finite values it cannot recover from (the run stops; checkpoints are kept)."""


class WriteError(OlmoHybridError, OSError):
    """A file or directory could not be written (full disk, permissions, ...); nothing partial is left."""
