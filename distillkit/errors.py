"""The two kinds of failure a user can meet, and the exit codes the CLI maps them to.

`UsageError` (exit 2): the input was wrong (a recipe key, a name, a path, a file that does not fit).
`RunError` (exit 1): the input was fine but the run failed (out of memory, disk full, NaN losses).
Every message says what was wrong and what to do about it.
"""


class DistillkitError(Exception):
    """Base class for errors distillkit reports to users without a traceback."""

    exit_code = 1


class UsageError(DistillkitError, ValueError):
    """Bad input: an option, a recipe value, a name or a file the user gave."""

    exit_code = 2


class RunError(DistillkitError, RuntimeError):
    """A failure while running a valid job."""

    exit_code = 1
