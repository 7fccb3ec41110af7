"""Errors the command line reports as one message, without a traceback."""

from __future__ import annotations


class UserError(Exception):
    """A problem with what the user asked for (a bad flag value, missing data, a run directory in
    the way, a damaged checkpoint). The CLI prints the message and exits with status 2; the
    library raises it like any exception."""

    exit_code = 2


class ConfigError(UserError, ValueError):
    """A configuration value is invalid; the message names the flag or key and the value."""


class RunDirError(UserError):
    """The run directory cannot be used as asked (it holds another run, nothing to resume, ...)."""


class CheckpointError(UserError):
    """A checkpoint is missing, truncated, damaged or belongs to a different run. The file is
    never modified when this is raised."""


def damaged_file_advice() -> str:
    """What a message about a damaged run file advises (the file is never touched)."""
    return (
        "The file was left as it is: restore it from a backup, or start the run again with --overwrite "
        "(which deletes it)."
    )
