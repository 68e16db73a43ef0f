"""What distillkit tells its user while it works, short of an error: one stdlib logger, "distillkit".

Python users configure it like any logger (`logging.getLogger("distillkit")`); with no logging set up at
all, Python's last-resort handler prints each warning as a bare line on stderr. The `distillkit` command
prints them through rich as `warning: <message>` on stderr (`show_on`), and `--quiet` silences them.
"""

from __future__ import annotations

import logging

from rich.console import Console
from rich.markup import escape

logger = logging.getLogger("distillkit")


def warn(message: str) -> None:
    """Tell the user that something differs from what they asked for or expect; the run goes on."""
    logger.warning(message)


class ConsoleHandler(logging.Handler):
    """Prints each record as `warning: <message>` (or its level's name) on a rich console, no file:line."""

    def __init__(self, console: Console):
        super().__init__()
        self.console = console

    def emit(self, record: logging.LogRecord) -> None:
        try:
            level = record.levelname.lower()
            self.console.print(f"[yellow]{level}:[/] {escape(record.getMessage())}", highlight=False, soft_wrap=True)
        except Exception:  # noqa: BLE001 - logging's contract: a handler never raises
            self.handleError(record)


def show_on(console: Console, quiet: bool = False) -> None:
    """Print distillkit's messages on `console` (once, however often called); `quiet` keeps only errors."""
    handler = next((h for h in logger.handlers if isinstance(h, ConsoleHandler)), None)
    if handler is None:
        handler = ConsoleHandler(console)
        logger.addHandler(handler)
    handler.console = console
    handler.setLevel(logging.ERROR if quiet else logging.WARNING)
