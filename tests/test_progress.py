"""Progress people can read: a tqdm bar with rate and ETA on a terminal, plain lines with the
percentage and ETA in a log."""

import io
import re

from pipeline.core.progress import Progress


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_a_log_gets_plain_lines_with_percentage_and_eta():
    log = io.StringIO()
    progress = Progress("encode", total_units=4, total_items=400, every_s=0.0, stream=log)
    for _ in range(4):
        progress.update(100)
    lines = log.getvalue().splitlines()
    assert len(lines) == 4 and "\r" not in log.getvalue()
    assert re.fullmatch(r"encode: 1/4 units, 100/400 images \(25%\), [\d,.]+ images/s, "
                        r"elapsed 0:\d\d, ETA 0:\d\d", lines[0]), lines[0]  # fmt: skip
    assert lines[-1].startswith("encode: 4/4 units, 400/400 images (100%)")


def test_a_terminal_gets_a_bar_with_rate_and_eta():
    terminal = Terminal()
    progress = Progress("sample", total_units=2, total_items=64, unit="samples", stream=terminal)
    progress.update(32)
    progress.update(32, ", 0 rejected")
    screen = terminal.getvalue()
    assert "sample: 100%" in screen and "64/64" in screen and "samples/s" in screen
    assert "2/2 units, 0 rejected" in screen and "<00:00" in screen  # the remaining time
