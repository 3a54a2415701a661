"""Errors a user can act on: the CLI prints them as one line and exits with code 2."""
from __future__ import annotations


class UserError(Exception):
    """Base class: bad config, missing data, corrupt shard or checkpoint, ..."""


class CheckpointError(UserError):
    """A checkpoint that is missing, corrupt, or does not match the requested architecture."""


def first_line(err: BaseException, limit: int = 300) -> str:
    """One line for a user: the root cause of a (possibly nested, e.g. Ray task) error.

    Ray wraps a task's exception (`.cause`) and prints the remote traceback into its message: follow the
    causes to the innermost one, and keep the last line that is not traceback. A UserError's text is kept as
    it is; anything else is prefixed with its type unless the line already names one ("KeyError: 'x'").
    """
    cause = err
    while getattr(cause, "cause", None) is not None and cause.cause is not cause:
        cause = cause.cause
    lines = [ln.strip() for ln in str(cause).splitlines() if ln.strip() and not ln.startswith(("Traceback", "  "))]
    msg = (lines[-1] if lines else type(cause).__name__)[:limit]
    return msg if isinstance(cause, UserError) or ":" in msg else f"{type(cause).__name__}: {msg}"
