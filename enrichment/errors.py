"""Errors a user can act on.

Everything raised as `EnrichError` is shown by the CLI as one line with a
non-zero exit, without a traceback: these are problems with input or
configuration, not bugs.
"""


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
