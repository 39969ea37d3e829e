"""Progress off a terminal: plain lines (start, end, at most every few seconds), nothing when off."""

from __future__ import annotations

import io

from herbens.core import progress
from herbens.core.progress import progress_bar


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_a_log_gets_plain_lines_with_the_count():
    log = io.StringIO()
    bar = progress_bar(total=5, desc="predict", unit="img", stream=log)
    for _ in range(5):
        bar.update(1)
    bar.close()
    lines = log.getvalue().splitlines()
    assert "\r" not in log.getvalue()
    assert lines[0].startswith("predict: 0/5 img") and lines[-1].startswith("predict: 5/5 img")


def test_a_log_line_at_every_update_when_the_interval_has_passed(monkeypatch):
    monkeypatch.setattr(progress, "LOG_INTERVAL_S", 0.0)
    log = io.StringIO()
    for _ in progress_bar(range(3), desc="chunks", unit="chunk", stream=log):
        pass
    counts = [line.split()[1] for line in log.getvalue().splitlines()]
    assert counts[0] == "0/3" and counts[-1] == "3/3" and "1/3" in counts and "2/3" in counts


def test_postfix_reaches_the_log():
    log = io.StringIO()
    bar = progress_bar(total=2, desc="epoch 1", unit="batch", stream=log)
    bar.set_postfix(loss="0.123")
    bar.update(2)
    bar.close()
    assert "loss=0.123" in log.getvalue().splitlines()[-1]


def test_disabled_writes_nothing():
    log = io.StringIO()
    bar = progress_bar(total=3, desc="x", enabled=False, stream=log)
    bar.update(3)
    bar.close()
    assert log.getvalue() == ""


def test_a_terminal_gets_the_redrawn_bar():
    term = _Terminal()
    bar = progress_bar(total=3, desc="x", stream=term)
    bar.update(3)
    bar.close()
    assert "\r" in term.getvalue()
