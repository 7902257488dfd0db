"""The one base class of bad-input errors.

Every error that a user's input causes (a config key or value, a command-line option, a data,
weights or checkpoint file, a device or backend that cannot run here) derives from
:class:`UserError` as well as from the built-in class it has always been (``ValueError``,
``RuntimeError``), so ``except ValueError`` in a user's pipeline keeps working. ``cps-fast``
prints such an error as one line, ``cps-fast: error: <message>``, and exits with status 2
(``CPS_FAST_TRACEBACK=1`` shows the traceback); anything else is a bug and raises.

A leaf module: it imports nothing from cps_fast.
"""
from __future__ import annotations

__all__ = ["CheckpointError", "ConfigError", "DeviceError", "UserError"]


class UserError(Exception):
    """Bad input; the message names the file, key, option or device and what was expected."""


class ConfigError(UserError, ValueError):
    """A configuration value, key or preset is invalid; the message says which and why.

    Defined here, below every other module, so that the data package can raise it without
    importing :mod:`cps_fast.config`; ``from cps_fast.config import ConfigError`` is the same class."""


class CheckpointError(UserError, ValueError):
    """A checkpoint that is missing, unreadable (truncated, empty), unsafe (pickled code) or not
    written by cps-fast, or that does not belong to the run that loads it."""


class DeviceError(UserError, RuntimeError):
    """A device or a device-only backend asked for where there is none (``--device cuda``,
    ``data_backend=dali-gpu`` on a machine without a GPU)."""
