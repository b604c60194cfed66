"""Progress bars that suit both a terminal and a log (`dvc repro` under CI, `tee`, nohup)."""

import sys

from tqdm import tqdm

LOG_REFRESH_SECONDS = 30.0


def progress(iterable, **kwargs):
    """tqdm, redrawn at most every 30 s when stderr is not a terminal: there every redraw is appended to the log,
    and a per-step bar would bury the stage's own messages."""
    if not sys.stderr.isatty():
        kwargs["mininterval"] = max(kwargs.get("mininterval", 0.1), LOG_REFRESH_SECONDS)
    return tqdm(iterable, **kwargs)
