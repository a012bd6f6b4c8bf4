"""Errors a user can cause. The CLI prints them as one line, never a traceback."""


class KvcoreError(Exception):
    """A failure with a message meant for the user (bad file, failed query, ...)."""

    exit_code = 1


class UsageError(KvcoreError):
    """Bad arguments or configuration: what was wrong and what would be valid."""

    exit_code = 2


class KvcoreWarning(UserWarning):
    """Something the user should know that did not stop the command (printed as one line)."""


def one_line(message: object) -> str:
    """Fold a (possibly multi-line) message into a single line."""
    return " ".join(str(message).split())
