"""The one error type for a user's mistake (a config that cannot work, input that cannot be read), not a bug.

A `ValueError`, so callers and tests that expect one keep working; `launch` commands
print it as one `error: ...` line instead of a traceback (`launch/cli.py`).
"""


class UserError(ValueError):
    """A mistake in what the user asked for; its message says what and how to fix it."""
