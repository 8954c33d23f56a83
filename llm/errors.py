"""The error types for a user's mistake (a config that cannot work, a data file that cannot be read), not a bug.

A `ValueError`, so callers and tests that expect one keep working; `launch` commands
print it as one `error: ...` line instead of a traceback (`launch/cli.py`).
"""


class UserError(ValueError):
    """A mistake in what the user asked for; its message says what and how to fix it."""


class DataError(UserError):
    """A data file that cannot be used as it is; the message names the file."""
