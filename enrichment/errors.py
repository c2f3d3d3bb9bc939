"""Errors a user can act on.

Everything raised as `EnrichError` is shown by the CLI as one line with a
non-zero exit, without a traceback: these are problems with input or
configuration, not bugs.
"""

import unicodedata


class EnrichError(Exception):
    """A problem the user can fix; its message is the whole explanation."""


class ConfigError(EnrichError):
    """A setting is missing or invalid."""


class ScopeBusy(EnrichError):
    """Another process holds this scope (a scheduler, a run's executor, a publish): try later."""


class InputFileError(EnrichError):
    """A file given as input cannot be read as what it should be; the message names the line."""


class RecordsFileError(InputFileError):
    """A records file cannot be read; the message names the line."""


class RecordIdError(EnrichError, ValueError):
    """A record id is not of the form /DATASET/LOCAL_ID, or holds a character it may not.

    Also a ValueError, so a source skipping unusable items catches it with the rest.
    """


class OutputError(EnrichError):
    """An output file or directory cannot be created or written; nothing was left half-written."""


class ModelError(EnrichError):
    """A model directory is missing, inconsistent or unsafe to load."""


class DatabaseError(EnrichError):
    """The database cannot be reached, is not this project's, or is not at the expected schema."""


class InvalidValue(EnrichError):
    """A value the library was given is unknown or out of range.

    `field` names it as the library knows it (`image_source`, `classes`); the
    CLI's error boundary turns that into its own option name, so the Celery
    task and the review API never hand out command-line advice.
    """

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field


def printable(text: str) -> str:
    """`text` a server sent with control and format characters escaped: a terminal prints a
    message holding it as it reads."""
    return "".join(
        (f"\\x{ord(c):02x}" if ord(c) < 0x100 else f"\\u{ord(c):04x}")
        if unicodedata.category(c) in ("Cc", "Cf")
        else c
        for c in text
    )
