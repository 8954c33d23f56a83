"""How every `launch` command reports a user's mistake: one `error: ...` line on stderr and exit status 2.

    if __name__ == "__main__":
        cli.main(main)            # or cli.main(main, sys.argv[1:])

A mistake is one of `MISTAKES`: an exception class that the code raises for bad
input and never for a bug of its own (a config override absl rejects, a path that
is missing or cannot be written, a workdir of another run, a launcher's own
`llm.errors.UserError`). Anything else is a bug and keeps its traceback. `ValueError`, which
bugs raise too, counts only inside `user_input()`, around code that does nothing
but read and check what the user gave (a config and its overrides). Set
LAUNCH_TRACEBACK=1 to see the traceback of a mistake as well.
"""

from __future__ import annotations

import contextlib
import errno
import os
import sys
import tempfile
from collections.abc import Callable, Iterator
from typing import Any, NoReturn

from absl import flags

from llm.errors import UserError
from llm.gguf import GGUFError
from llm.train.loop import ResumeMismatch

EXIT_MISTAKE = 2  # argparse's status for a bad command line


MISTAKES: tuple[type[BaseException], ...] = (
    UserError,
    ResumeMismatch,  # the workdir holds another run's checkpoints (nothing was written)
    flags.Error,  # a config override absl cannot parse: `--config.train.steps=abc`, a missing value
    GGUFError,  # a .gguf the user gave that this project cannot read
    FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError, FileExistsError,
)


def main(entry: Callable[..., Any], *args: Any) -> NoReturn:
    """Runs `entry(*args)` and exits with its status (an int it returns, else 0); a mistake exits 2 with one line."""
    try:
        status = entry(*args)
    except MISTAKES as error:
        if os.environ.get("LAUNCH_TRACEBACK"):
            raise
        print(f"error: {describe(error)}", file=sys.stderr)
        sys.exit(EXIT_MISTAKE)
    sys.exit(status if isinstance(status, int) else 0)


def describe(error: BaseException) -> str:
    """The message of a mistake: an OS error as `path: reason`, anything else as its own message."""
    if isinstance(error, OSError) and error.filename is not None and error.strerror:
        paths = " -> ".join(str(p) for p in (error.filename, error.filename2) if p is not None)
        return f"{paths}: {error.strerror}"
    return str(error).strip() or type(error).__name__  # a message's own further lines (details, a hint) stay


@contextlib.contextmanager
def user_input() -> Iterator[None]:
    """Inside, a ValueError is the user's mistake: wrap only code that reads and checks what the user gave."""
    try:
        yield
    except ValueError as error:
        if isinstance(error, MISTAKES):
            raise
        raise UserError(str(error)) from error


def writable_dir(path: str, what: str) -> None:
    """Fails unless `path` is a directory, or can be made one, that this process can write in; writes nothing."""
    if os.path.exists(path) and not os.path.isdir(path):
        raise UserError(f"{what} {path}: is a file, not a directory")
    _check_creatable(path, what)


def writable_file(path: str, what: str) -> None:
    """Fails unless a file can be written at `path` (its folders made if need be); writes nothing."""
    if os.path.isdir(path):
        raise UserError(f"{what} {path}: is a directory; name the file to write")
    _check_creatable(os.path.dirname(os.path.abspath(path)), what, path)


def _check_creatable(folder: str, what: str, shown: str | None = None) -> None:
    shown = shown or folder
    existing = os.path.abspath(folder)
    while not os.path.exists(existing):  # the nearest folder that is there: makedirs creates the rest in it
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise UserError(f"{what} {shown}: cannot be created, {existing} is a file")
    try:  # a probe, not os.access: root passes access() on a read-only mount, and /proc takes no new folder
        with tempfile.TemporaryFile(dir=existing):  # O_TMPFILE on Linux: no name ever appears in the folder
            pass
    except OSError as error:
        reason = "its file system takes no new files" if error.errno == errno.ENOENT else error.strerror or str(error)
        raise UserError(f"{what} {shown}: cannot be written in {existing} ({reason})") from error
