"""The one exception type a user should ever see, and the wrapper that turns it into an exit code.

A `UserError` is bad input or a missing resource: its message says what is wrong, where (file, key) and
what to do. Stages print it without a traceback and exit non-zero. Anything else is a bug and keeps
its traceback.
"""

import sys
from collections.abc import Callable


class UserError(Exception):
    """Bad input, missing weights or files: a message for the user, not a bug."""


def run_stage(main: Callable[[list[str] | None], None], argv: list[str] | None = None) -> None:
    """Run a stage's main; print a UserError as one clear message and exit with status 2."""
    try:
        main(argv)
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted: no output was written", file=sys.stderr)
        sys.exit(130)
