"""Progress that reads well on a terminal and in a log file.

On a terminal, bars redraw in place; when the output is piped or redirected (a log, CI, a
``| tee``), every frame of a redrawn bar would stay in the file, so progress is printed as
one line per step instead: :func:`resolve_verbose` turns Keras-style ``verbose="auto"`` into
``1`` (a bar) on a terminal and ``2`` (one line per epoch) elsewhere, and
:class:`ProgressBar` does the same for loops of its own. No Keras import.
"""

from __future__ import annotations

import sys
import time
from typing import TextIO

__all__ = ["ProgressBar", "is_terminal", "resolve_verbose"]


def is_terminal(stream: TextIO | None = None) -> bool:
    """Whether ``stream`` (default: stdout) is an interactive terminal."""
    stream = sys.stdout if stream is None else stream
    return bool(getattr(stream, "isatty", lambda: False)())


def resolve_verbose(verbose: int | str) -> int:
    """``"auto"`` -> 1 (a progress bar) on a terminal, 2 (one line per epoch) otherwise;
    any other value unchanged.

    Args:
        verbose: ``"auto"``, 0, 1 or 2, as Keras takes it.

    Returns:
        0, 1 or 2.
    """
    if verbose == "auto":
        return 1 if is_terminal() else 2
    return verbose


class ProgressBar:
    """A one-line text progress bar on stderr (no TensorFlow import needed).

    Redraws in place on a terminal; elsewhere (logs, CI) prints one line per step so the
    output stays readable.
    """

    def __init__(self, total: int, stream: TextIO | None = None, width: int = 24) -> None:
        if not isinstance(total, int) or total < 0:
            raise ValueError(f"total must be an integer >= 0, got {total!r}")
        self.total = total
        self.done = 0
        self.width = width
        self.stream = stream if stream is not None else sys.stderr
        self._start = time.perf_counter()
        self._interactive = bool(getattr(self.stream, "isatty", lambda: False)())

    def begin(self, label: str) -> None:
        """Say what the next step is doing while it runs (a fit can take minutes): redrawn in
        place on a terminal, one line elsewhere."""
        elapsed = time.perf_counter() - self._start
        line = f"[{self.done + 1}/{self.total}] {elapsed:6.1f}s {label} ..."
        if self._interactive:
            self.stream.write("\r" + line[:120].ljust(120))
        else:
            self.stream.write(line + "\n")
        self.stream.flush()

    def update(self, label: str, advance: int = 1) -> None:
        self.done = min(self.total, self.done + advance)
        filled = int(self.width * self.done / self.total) if self.total else self.width
        bar = "#" * filled + "." * (self.width - filled)
        elapsed = time.perf_counter() - self._start
        line = f"[{bar}] {self.done}/{self.total} {elapsed:6.1f}s {label}"
        if self._interactive:
            self.stream.write("\r" + line[:120].ljust(120))
            if self.done == self.total:
                self.stream.write("\n")
        else:
            self.stream.write(line + "\n")
        self.stream.flush()
