"""Errors meant for the user: the input or the config is wrong, and the message says what to fix.

The entry points (``quality-gate``, ``src/main.py``, the seed's scripts) catch :class:`UserError`
alone and print its message on one line; every other exception is a bug and keeps its traceback
(``QG_TRACEBACK=1`` shows the traceback of user errors too).

Each class also derives from the built-in exception a caller would expect (``ValueError``,
``FileNotFoundError``, ``RuntimeError``), so ``except ValueError`` keeps working.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager


class UserError(Exception):
    """The input or the config cannot be used; the message names the key or file and what to do."""


class ConfigError(UserError, ValueError):
    """A config value is missing, of the wrong type, out of range, or inconsistent with another."""


class DataError(UserError, ValueError):
    """Input data that cannot be used (no valid rows, duplicate ids, an unreadable file)."""


class MissingPathError(UserError, FileNotFoundError):
    """A path given in the config does not exist (or is not the kind of file or dir expected)."""


class ModelLoadError(UserError, OSError):
    """A model or tokenizer cannot be loaded from the given path or Hub id."""


class RouterDataError(UserError, RuntimeError):
    """Router data (Stage 2's output) that is missing, incomplete, damaged, or from another setup."""


class SelectionError(UserError, ValueError):
    """The router data cannot be selected from as configured."""


class AdapterError(UserError, ValueError):
    """The adapter is missing, does not fit the base model, or does not change its outputs."""


class NonFiniteLossError(UserError, RuntimeError):
    """Training produced a NaN or infinite loss (learning rate, dtype or data; the message says)."""


class RunLockedError(UserError, RuntimeError):
    """Another process is running in the same run dir (it holds the run's lock file)."""


@contextmanager
def exit_on_user_error(what: str | None = None) -> Iterator[None]:
    """The one rule of every entry point: a :class:`UserError` inside becomes ``error: <message>`` on
    one line and exit code 1 (``QG_TRACEBACK=1`` re-raises it with its traceback); any other exception
    is a bug and propagates unchanged. ``what`` (e.g. the stage) also logs ``<what> failed: <message>``,
    so the run's log file says why it stopped."""
    try:
        yield
    except UserError as e:
        if os.environ.get("QG_TRACEBACK"):
            raise
        if what is not None:
            logging.getLogger("quality_gate").error("%s failed: %s", what, e)
        raise SystemExit(f"error: {e}") from None
