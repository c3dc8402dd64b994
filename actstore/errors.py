"""Errors a user can act on: one line naming the problem and the fix.

The CLI prints these without a traceback; usage errors exit 2, runtime errors exit 1.
"""


class ActstoreError(Exception):
    """Base class of every user-facing failure."""

    exit_code = 1


class UsageError(ActstoreError):
    """The command was asked for something impossible (bad option, unknown hookpoint, …)."""

    exit_code = 2


class StoreError(ActstoreError):
    """A store is missing, incomplete, damaged or was written with other settings."""

    exit_code = 1
