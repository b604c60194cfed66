"""The one exception type a user should ever see, and the wrapper that turns it into an exit code.

A `UserError` is bad input or a missing resource: its message says what is wrong, where (file, key) and
what to do. Stages print it without a traceback and exit non-zero. Anything else is a bug and keeps
its traceback. Ctrl-C is one line and exit status 130, wherever it lands: in the stage's work, or in its imports
(stages/__init__.py calls `exit_quietly_on_ctrl_c` before any of them).
"""

import os
import sys
from collections.abc import Callable

INTERRUPTED = "interrupted: no output was written"


class UserError(Exception):
    """Bad input, missing weights or files: a message for the user, not a bug."""


def exit_quietly_on_ctrl_c() -> None:
    """A KeyboardInterrupt that no code catches (a Ctrl-C in the stage's imports, before `run_stage` runs it) ends the
    process with the one line `run_stage` prints and status 130, not a traceback through whichever import it hit.
    Only an uncaught one reaches sys.excepthook: code importing the stages in-process (pytest) keeps its own."""
    previous = sys.excepthook

    def hook(kind, error, traceback):
        if not issubclass(kind, KeyboardInterrupt):
            return previous(kind, error, traceback)
        print(INTERRUPTED, file=sys.stderr)
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(130)  # sys.exit() is not honoured inside an excepthook; only imports ran, nothing to clean up

    sys.excepthook = hook


def run_stage(main: Callable[[list[str] | None], None], argv: list[str] | None = None) -> None:
    """Run a stage's main; print a UserError as one clear message and exit with status 2."""
    try:
        main(argv)
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print(INTERRUPTED, file=sys.stderr)
        sys.exit(130)
