"""What a stage prints, read in a terminal or in a log (`dvc repro` under CI, `tee`, nohup): its own progress bars
at a sane rate, and the libraries' loading chatter off."""

import importlib
import os
import sys

from tqdm import tqdm

LOG_REFRESH_SECONDS = 30.0
QUIET_LIBRARIES = ("transformers", "diffusers")  # each has {NAME}_VERBOSITY; a set variable keeps its messages


class Progress(tqdm):
    """tqdm that redraws only on its own schedule.

    tqdm's `set_postfix` redraws at once by default, which on a log means one line per step; here the postfix waits
    for the next scheduled redraw. The monitor thread is off: it redraws a bar it thinks is stuck, showing the count
    of the last redraw, not the current one."""

    monitor_interval = 0

    def set_postfix(self, ordered_dict=None, refresh=False, **kwargs):
        super().set_postfix(ordered_dict, refresh=refresh, **kwargs)


def progress(iterable=None, **kwargs):
    """A progress bar over `iterable` (or a manual one, with `total` and `update`), redrawn at most every 30 s when
    its stream is not a terminal: there every redraw is appended to the log, and a per-step bar would bury the
    stage's own messages. The time is checked on every item (miniters=1), so a redraw comes on schedule even when
    the items slow down; closing draws the final count. Under `accelerate launch` only the main process (RANK 0)
    draws it: one line per stage, not one per process."""
    stream = kwargs.get("file") or sys.stderr
    if not stream.isatty():
        kwargs["mininterval"] = max(kwargs.get("mininterval", 0.1), LOG_REFRESH_SECONDS)
    kwargs.setdefault("miniters", 1)
    if not main_process():
        kwargs["disable"] = True
    return Progress(iterable, **kwargs)


def main_process() -> bool:
    """Whether this is the main one of `accelerate launch`'s (torchrun's) processes, or runs alone. RANK is set by
    the launcher before the process starts, so this needs no process group."""
    return os.environ.get("RANK", "0") == "0"


def quiet_libraries() -> None:
    """transformers' and diffusers' logs at error level and their loading bars ("Loading weights", "Loading pipeline
    components") off: every stage that loads a model would print them, and their warnings about LoRA keys are
    covered by lanskap's own load checks (lora.py counts the modules it loads). huggingface_hub's download bars
    stay as they were: a download of gigabytes should show progress. Set TRANSFORMERS_VERBOSITY or
    DIFFUSERS_VERBOSITY (e.g. `info`) to keep that library's messages."""
    from huggingface_hub.utils import are_progress_bars_disabled, enable_progress_bars

    downloads_shown = not are_progress_bars_disabled()
    for name in QUIET_LIBRARIES:
        if os.environ.get(f"{name.upper()}_VERBOSITY"):
            continue
        library_logging = importlib.import_module(f"{name}.utils.logging")
        library_logging.set_verbosity_error()
        library_logging.disable_progress_bar()  # transformers' also turns off huggingface_hub's bars
    if downloads_shown and are_progress_bars_disabled():
        enable_progress_bars()
