"""Progress bars in a log redraw on a schedule, with the current count; library chatter is off, on request back."""

import io
import re

import pytest
import tqdm.std

from lanskap.core.console import LOG_REFRESH_SECONDS, progress, quiet_libraries

STEPS, SECONDS_PER_STEP = 300, 1.0


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def redraws(make_bar, stream, monkeypatch) -> list[str]:
    """Run a training-like loop (a postfix set every step) on a simulated clock; return what each redraw showed."""
    clock = [1000.0]
    monkeypatch.setattr(tqdm.std, "time", lambda: clock[0])
    bar = make_bar(range(STEPS), file=stream, desc="train", unit="step")
    for step in bar:
        clock[0] += SECONDS_PER_STEP
        bar.set_postfix(loss=f"{1 / (step + 1):.4f}")
    bar.close()
    return [line for line in stream.getvalue().split("\r") if line.strip()]


def counts(lines: list[str]) -> list[int]:
    return [int(re.search(rf"(\d+)/{STEPS}", line).group(1)) for line in lines]


def test_a_log_gets_a_redraw_per_interval_with_the_current_count(monkeypatch):
    lines = redraws(progress, io.StringIO(), monkeypatch)
    expected = STEPS * SECONDS_PER_STEP / LOG_REFRESH_SECONDS  # 10 scheduled redraws, plus the first and the last
    assert expected <= len(lines) <= expected + 3, lines
    shown = counts(lines)
    assert all(a < b for a, b in zip(shown, shown[1:-1]))  # every scheduled redraw moved on: no stale count
    assert shown[1] >= LOG_REFRESH_SECONDS / SECONDS_PER_STEP - 1  # the first scheduled redraw is not stuck at 0
    assert shown[-1] == STEPS and "loss=" in lines[-1]


def test_plain_tqdm_redraws_every_step_in_a_log(monkeypatch):
    """Negative control: the behaviour `progress` exists to avoid (set_postfix forces a redraw)."""
    lines = redraws(
        lambda iterable, **kwargs: tqdm.std.tqdm(iterable, mininterval=LOG_REFRESH_SECONDS, **kwargs),
        io.StringIO(),
        monkeypatch,
    )
    assert len(lines) >= STEPS


def test_a_terminal_gets_a_live_bar(monkeypatch):
    lines = redraws(progress, Terminal(), monkeypatch)
    assert len(lines) >= STEPS / 2  # a second per step is far above the terminal's 0.1 s interval


@pytest.fixture
def library_logging():
    """transformers' and diffusers' logging modules, restored to their defaults afterwards."""
    from diffusers.utils import logging as diffusers_logging
    from huggingface_hub.utils import enable_progress_bars
    from transformers.utils import logging as transformers_logging

    yield {"transformers": transformers_logging, "diffusers": diffusers_logging}
    for module in (transformers_logging, diffusers_logging):
        module.set_verbosity_warning()
        module.enable_progress_bar()
    enable_progress_bars()


def test_quiet_libraries_silences_warnings_and_loading_bars_but_not_downloads(library_logging, monkeypatch):
    from huggingface_hub.utils import are_progress_bars_disabled

    for name in ("TRANSFORMERS_VERBOSITY", "DIFFUSERS_VERBOSITY"):
        monkeypatch.delenv(name, raising=False)
    quiet_libraries()
    for module in library_logging.values():
        assert module.get_verbosity() == module.ERROR and not module.is_progress_bar_enabled()
    assert not are_progress_bars_disabled()


def test_a_verbosity_variable_keeps_that_librarys_messages(library_logging, monkeypatch):
    monkeypatch.setenv("DIFFUSERS_VERBOSITY", "info")
    monkeypatch.delenv("TRANSFORMERS_VERBOSITY", raising=False)
    quiet_libraries()
    diffusers_logging, transformers_logging = library_logging["diffusers"], library_logging["transformers"]
    assert diffusers_logging.is_progress_bar_enabled() and diffusers_logging.get_verbosity() != diffusers_logging.ERROR
    assert transformers_logging.get_verbosity() == transformers_logging.ERROR
