"""Whether a command draws live views (rich Live, progress bars) or prints plain lines."""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from rich.console import Console

__all__ = ["is_live"]


def is_live(console: Console) -> bool:
    """Whether to draw live views: stdout is a terminal, and not a dumb one.

    Not rich's ``is_terminal`` alone, which ``FORCE_COLOR`` turns on for pipes too:
    a pipe or a file gets plain, timestamped lines.
    """
    return sys.stdout.isatty() and console.is_terminal and not console.is_dumb_terminal
